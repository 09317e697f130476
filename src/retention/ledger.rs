//! The keeper's bookkeeping, with no I/O: which files are on disk, how
//! large, which of them may be deleted, and which to delete next.
//!
//! Kept apart from the keeper so that the rules (what counts, what is
//! deletable, in what order) can be tested without a directory.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::store::{INCOMPLETE_SUFFIX, PART_SUFFIX};

use super::Limits;

/// What a file in the directory is, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `NAME`: a complete upload.
    Finished,
    /// `NAME.incomplete`: what arrived of an upload that did not finish.
    Incomplete,
    /// `NAME.part`: being written (or left by a crash).
    Part,
}

/// Parses one of our file names, `YYYYMMDDTHHMMSS.ffffffZ-PID-SEQ` with
/// an optional suffix (see `store`): its kind and its arrival time.
/// `None` for any other name: files we did not name are never touched.
pub fn parse_name(file: &str) -> Option<(Kind, SystemTime)> {
    let (base, kind) = if let Some(base) = file.strip_suffix(PART_SUFFIX) {
        (base, Kind::Part)
    } else if let Some(base) = file.strip_suffix(INCOMPLETE_SUFFIX) {
        (base, Kind::Incomplete)
    } else {
        (file, Kind::Finished)
    };
    let b = base.as_bytes();
    // 20261125T124445.123456Z-4242-000017
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 27
        || !digits(0..8)
        || b[8] != b'T'
        || !digits(9..15)
        || b[15] != b'.'
        || !digits(16..22)
        || &b[22..24] != b"Z-"
    {
        return None;
    }
    let (pid, seq) = base[24..].split_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|d| d.is_ascii_digit());
    if !all_digits(pid) || !all_digits(seq) {
        return None;
    }
    let s = &base[..23];
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..]
    );
    let at = humantime::parse_rfc3339(&rfc3339).ok()?;
    Some((kind, at))
}

/// Why a file on the books may not be deleted (or may).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// A recording at rest: deletable, oldest first.
    Free,
    /// Finished, but its transfer still holds it (a held upload, or a
    /// proxied one whose answer has not come back): counted, never deleted.
    Pinned,
    /// A `.part` left by an earlier run: counted, never deleted.
    Leftover,
    /// Deleting it failed (not for being gone): counted, not tried again.
    Stuck,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    hold: Hold,
}

/// A file chosen for deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    pub name: String,
    pub bytes: u64,
}

/// The files of one directory that the keeper knows of, in arrival order
/// (name order), and their totals.
///
/// With no limit set there is nothing to choose, so only the totals are
/// kept (`track` false): a daemon without retention does not grow a list
/// of every file it ever stored.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: BTreeMap<String, Entry>,
    track: bool,
    bytes: u64,
    files: u64,
}

impl Ledger {
    /// An empty ledger; `track` keeps each file (needed to choose any).
    pub fn new(track: bool) -> Ledger {
        Ledger {
            track,
            ..Ledger::default()
        }
    }

    /// Bytes of the files on the books.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of files on the books.
    pub fn files(&self) -> u64 {
        self.files
    }

    /// A file is on disk: `name` (with its suffix, if any), `bytes` long.
    pub fn add(&mut self, name: String, bytes: u64, hold: Hold) {
        if self.track {
            if let Some(old) = self.entries.insert(name, Entry { bytes, hold }) {
                self.bytes -= old.bytes;
                self.files -= 1;
            }
        }
        self.bytes += bytes;
        self.files += 1;
    }

    /// A pinned file's transfer has let it go: it may now be deleted.
    pub fn release(&mut self, name: &str) {
        if let Some(e) = self.entries.get_mut(name) {
            if e.hold == Hold::Pinned {
                e.hold = Hold::Free;
            }
        }
    }

    /// A file went away without us (the store removed it again).
    pub fn remove(&mut self, name: &str, bytes: u64) {
        let bytes = match self.entries.remove(name) {
            Some(e) => e.bytes,
            None if self.track => return, // never on the books
            None => bytes,
        };
        self.bytes = self.bytes.saturating_sub(bytes);
        self.files = self.files.saturating_sub(1);
    }

    /// Chooses what to delete so that every limit holds again, and takes
    /// it off the books: the oldest deletable files first (by name, which
    /// is arrival order), while the total is over `--retain-bytes`, the
    /// count over `--retain-files`, the file older than `--retain-for`, or
    /// less than `short` bytes have been chosen (`--min-free`'s shortfall).
    /// Pinned, leftover and stuck files are skipped but stay counted.
    pub fn select(&mut self, limits: &Limits, now: SystemTime, short: u64) -> Vec<Doomed> {
        let mut chosen = Vec::new();
        let mut freed = 0u64;
        let mut names = Vec::new();
        for (name, e) in &self.entries {
            if e.hold != Hold::Free {
                continue;
            }
            let bytes_over = limits.bytes.is_some_and(|max| self.bytes - freed > max);
            let files_over = limits
                .files
                .is_some_and(|max| self.files - chosen.len() as u64 > max);
            let too_old = limits.age.is_some_and(|max| age(name, now) > max);
            if !(bytes_over || files_over || too_old || freed < short) {
                // Every later file is younger, and the totals are within
                // bounds: nothing more to choose.
                break;
            }
            freed += e.bytes;
            chosen.push(Doomed {
                name: name.clone(),
                bytes: e.bytes,
            });
            names.push(name.clone());
        }
        for name in names {
            self.entries.remove(&name);
        }
        self.bytes -= freed;
        self.files -= chosen.len() as u64;
        chosen
    }
}

/// How long ago the file called `name` arrived (zero if its name says the
/// future, or says nothing).
fn age(name: &str, now: SystemTime) -> Duration {
    parse_name(name)
        .and_then(|(_, at)| now.duration_since(at).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn name(second: u32, suffix: &str) -> String {
        format!("20261125T1200{second:02}.000000Z-42-{second:06}{suffix}")
    }

    fn at(second: u32) -> SystemTime {
        parse_name(&name(second, "")).unwrap().1
    }

    fn names(doomed: &[Doomed]) -> Vec<String> {
        doomed.iter().map(|d| d.name.clone()).collect()
    }

    #[test]
    fn names_parse_into_kind_and_arrival() {
        let (kind, t) = parse_name("20261125T124445.123456Z-4242-000017").unwrap();
        assert_eq!(kind, Kind::Finished);
        assert_eq!(
            t,
            humantime::parse_rfc3339("2026-11-25T12:44:45.123456Z").unwrap()
        );
        assert_eq!(
            parse_name("20261125T124445.123456Z-4242-000017.incomplete").map(|p| p.0),
            Some(Kind::Incomplete)
        );
        assert_eq!(
            parse_name("20261125T124445.123456Z-1-1.part").map(|p| p.0),
            Some(Kind::Part)
        );
        for foreign in [
            "notes.txt",
            ".stopover-probe-1-2",
            "20261125T124445.123456Z-4242",
            "20261125T124445.123456Z-42x-1",
            "20261125T124445.123456Z-42-1.bak",
            "20261345T124445.123456Z-42-1", // month 13
            "2026112ET124445.123456Z-42-1",
        ] {
            assert_eq!(parse_name(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn oldest_go_first_until_the_byte_budget_holds() {
        let mut l = Ledger::new(true);
        // Added out of order, as transfers finish out of order.
        for s in [3, 1, 4, 2, 5] {
            l.add(name(s, ""), MIB, Hold::Free);
        }
        let limits = Limits {
            bytes: Some(2 * MIB),
            ..Limits::default()
        };
        let doomed = l.select(&limits, at(10), 0);
        assert_eq!(names(&doomed), [name(1, ""), name(2, ""), name(3, "")]);
        assert_eq!((l.bytes(), l.files()), (2 * MIB, 2));
        assert!(l.select(&limits, at(10), 0).is_empty(), "within budget now");
    }

    #[test]
    fn incomplete_files_are_recordings_in_arrival_order() {
        let mut l = Ledger::new(true);
        l.add(name(1, ""), MIB, Hold::Free);
        l.add(name(2, ".incomplete"), MIB, Hold::Free);
        l.add(name(3, ""), MIB, Hold::Free);
        let limits = Limits {
            files: Some(1),
            ..Limits::default()
        };
        let doomed = l.select(&limits, at(10), 0);
        assert_eq!(names(&doomed), [name(1, ""), name(2, ".incomplete")]);
    }

    #[test]
    fn pinned_and_leftover_files_count_but_are_never_chosen() {
        let mut l = Ledger::new(true);
        l.add(name(1, ".part"), MIB, Hold::Leftover);
        l.add(name(2, ""), MIB, Hold::Pinned);
        l.add(name(3, ""), MIB, Hold::Free);
        l.add(name(4, ""), MIB, Hold::Free);
        let limits = Limits {
            bytes: Some(2 * MIB),
            ..Limits::default()
        };
        // 4 MiB on the books, 2 allowed: the two at rest go, although the
        // older two are still there (they are counted, not deletable).
        let doomed = l.select(&limits, at(10), 0);
        assert_eq!(names(&doomed), [name(3, ""), name(4, "")]);
        assert_eq!(l.bytes(), 2 * MIB);
        // Once its transfer lets go, the pinned one is a recording like
        // any other, and the oldest.
        l.add(name(5, ""), MIB, Hold::Free);
        l.release(&name(2, ""));
        assert_eq!(names(&l.select(&limits, at(10), 0)), [name(2, "")]);
        assert_eq!((l.bytes(), l.files()), (2 * MIB, 2));
    }

    #[test]
    fn age_and_free_space_choose_by_arrival_too() {
        let mut l = Ledger::new(true);
        for s in 1..=6 {
            l.add(name(s, ""), MIB, Hold::Free);
        }
        let limits = Limits {
            age: Some(Duration::from_secs(8)),
            ..Limits::default()
        };
        // At second 12, files of seconds 1-3 are older than 8 s.
        let doomed = l.select(&limits, at(12), 0);
        assert_eq!(names(&doomed), [name(1, ""), name(2, ""), name(3, "")]);
        // 1.5 MiB short of free space: the two oldest left cover it.
        let doomed = l.select(&Limits::default(), at(12), MIB + MIB / 2);
        assert_eq!(names(&doomed), [name(4, ""), name(5, "")]);
        assert_eq!(l.files(), 1);
    }

    #[test]
    fn removal_and_untracked_totals() {
        let mut l = Ledger::new(true);
        l.add(name(1, ""), MIB, Hold::Pinned);
        l.remove(&name(1, ""), MIB);
        l.remove(&name(9, ""), MIB); // never on the books: no effect
        assert_eq!((l.bytes(), l.files()), (0, 0));
        // Without limits only the totals are kept.
        let mut l = Ledger::new(false);
        l.add(name(1, ""), MIB, Hold::Free);
        l.add(name(2, ""), 2 * MIB, Hold::Pinned);
        l.remove(&name(1, ""), MIB);
        assert_eq!((l.bytes(), l.files()), (2 * MIB, 1));
        assert!(l.entries.is_empty());
    }
}
