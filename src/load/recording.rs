//! A recording: the finished uploads in a proxy's spool or a server's
//! directory, in the order they arrived, with their arrival times.
//!
//! Every stored upload's name starts with its UTC arrival time to the
//! microsecond (`20261125T124445.123456Z-4242-000017`, see
//! [`crate::store`]), so a directory of them *is* a recording of the
//! traffic: what came (the files' bytes) and when (their names). Reading
//! one costs a `readdir` and an `lstat` per file; only the names and sizes
//! are kept in memory, never the contents, so a recording of 100,000
//! uploads costs a few MiB (the bytes are read as each upload is sent, in
//! `replay`).
//!
//! What is not a finished upload is skipped and counted: `.part` (still
//! being written, or left by a crash) and `.incomplete` (the proxy's copy
//! of an upload whose client went away) are *unfinished*; hidden files and
//! anything that is not a regular file (a directory, a symlink, a FIFO)
//! are *other*. A name that carries no time (a file stopover did not
//! write) cannot be placed on the recording's time line: see
//! [`Recording::timed`].

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::{INCOMPLETE_SUFFIX, PART_SUFFIX};

/// One finished upload on disk.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub name: OsString,
    pub size: u64,
    /// Arrival time, from the name; `None` if the name carries none.
    pub at: Option<SystemTime>,
}

/// What was skipped while reading a directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// `.part` and `.incomplete` files.
    pub unfinished: u64,
    /// Hidden files, and anything that is not a regular file.
    pub other: u64,
}

/// The finished uploads of one directory, sorted by arrival time (then
/// name); names without a time sort last, by name.
#[derive(Debug, Clone)]
pub struct Recording {
    pub files: Vec<Recorded>,
    pub skipped: Skipped,
}

impl Recording {
    /// Reads `dir`. Errors are one line, naming the directory: unreadable,
    /// or holding no finished upload.
    pub fn read(dir: &Path) -> Result<Recording, String> {
        let what = || format!("--replay {}", dir.display());
        let entries = fs::read_dir(dir).map_err(|e| format!("{}: cannot read it: {e}", what()))?;
        let mut files = Vec::new();
        let mut skipped = Skipped::default();
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: reading it: {e}", what()))?;
            let name = entry.file_name();
            let bytes = name.as_bytes();
            if bytes.ends_with(PART_SUFFIX.as_bytes())
                || bytes.ends_with(INCOMPLETE_SUFFIX.as_bytes())
            {
                skipped.unfinished += 1;
                continue;
            }
            // `DirEntry::metadata` does not follow symlinks: a link is
            // "other", never a way to send a file from elsewhere.
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Removed since the readdir (a retention sweep, say).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {}: {e}", what(), name.to_string_lossy())),
            };
            if bytes.starts_with(b".") || !meta.is_file() {
                skipped.other += 1;
                continue;
            }
            files.push(Recorded {
                at: name.to_str().and_then(arrival_time),
                size: meta.len(),
                name,
            });
        }
        if files.is_empty() {
            return Err(format!(
                "{}: no finished upload to replay in it (skipped {} unfinished .part/.incomplete, {} other)",
                what(),
                skipped.unfinished,
                skipped.other
            ));
        }
        // `None` sorts first for Option; we want untimed names last.
        files.sort_by(|a, b| (a.at.is_none(), a.at, &a.name).cmp(&(b.at.is_none(), b.at, &b.name)));
        Ok(Recording { files, skipped })
    }

    /// Checks that every name carries a time, so the files can be placed
    /// on the recording's time line; if not, says how many do not. A
    /// directory with other files in it is refused rather than guessed at
    /// (`replay` offers `--rate`, which sends any directory in name order).
    pub fn timed(&self) -> Result<(), String> {
        let untimed = self.files.iter().filter(|f| f.at.is_none()).count();
        match self.files.iter().find(|f| f.at.is_none()) {
            None => Ok(()),
            Some(example) => Err(format!(
                "{untimed} of {} file names carry no arrival time (e.g. {:?}), so stopover did not record them",
                self.files.len(),
                example.name.to_string_lossy()
            )),
        }
    }

    /// For `--rate`: the files in name order (for stopover's names, the
    /// order of arrival).
    pub fn by_name(mut self) -> Recording {
        self.files.sort_by(|a, b| a.name.cmp(&b.name));
        self
    }
}

/// The arrival time a stored upload's name starts with
/// (`20261125T124445.123456Z-4242-000017`: time, process id, counter), or
/// `None` if the name is not one stopover writes.
pub fn arrival_time(name: &str) -> Option<SystemTime> {
    let (stamp, rest) = name.split_at_checked(STAMP_LEN)?;
    let (pid, seq) = rest.strip_prefix('-')?.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(seq) {
        return None;
    }
    stamp_time(stamp)
}

/// Length of the time stamp in a stored name: `YYYYMMDDTHHMMSS.ffffffZ`.
const STAMP_LEN: usize = 23;

/// `20261125T124445.123456Z` as a time.
fn stamp_time(stamp: &str) -> Option<SystemTime> {
    let b = stamp.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != STAMP_LEN
        || !digits(0..8)
        || b[8] != b'T'
        || !digits(9..15)
        || b[15] != b'.'
        || !digits(16..22)
        || b[22] != b'Z'
    {
        return None;
    }
    // Put back the separators that `Store::create` took out.
    let s = stamp;
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}{}",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15],
        &s[15..]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

/// A `--since` or `--until`: an offset into the recording (`90s`), a UTC
/// time (`2026-11-25T12:44:45Z`, `2026-11-25 12:44:45`), or a stored file's
/// name (or its time stamp, `20261125T124445.123456Z`).
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    /// This long after the recording's first upload.
    Offset(Duration),
    /// This time, UTC.
    At(SystemTime),
}

impl std::str::FromStr for Bound {
    type Err = String;

    fn from_str(text: &str) -> Result<Bound, String> {
        let t = text.trim();
        if let Ok(d) = humantime::parse_duration(t) {
            return Ok(Bound::Offset(d));
        }
        if let Some(at) = arrival_time(t).or_else(|| stamp_time(t)) {
            return Ok(Bound::At(at));
        }
        humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
            .map(Bound::At)
            .map_err(|_| {
                format!(
                    "{text:?}: want an offset into the recording (90s, 2m), a UTC time \
                     (2026-11-25T12:44:45Z) or a recorded file's name"
                )
            })
    }
}

impl Bound {
    /// The time this bound stands for, in a recording that starts at `first`.
    pub fn resolve(&self, first: SystemTime) -> SystemTime {
        match self {
            Bound::Offset(d) => first.checked_add(*d).unwrap_or(first),
            Bound::At(t) => *t,
        }
    }
}

/// A time as the RFC 3339 text the JSON and the dry run show.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Microseconds since the epoch (0 for an earlier time), for arithmetic.
pub fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_name_gives_back_its_arrival_time() {
        // The name generator and the parser must agree: make a real name.
        let dir = tempfile::tempdir().unwrap();
        let before = SystemTime::now();
        let mut store = crate::store::Store::open(dir.path()).unwrap();
        let mut part = store.create().unwrap();
        part.finish().unwrap();
        let at = arrival_time(part.name()).expect("a stored name carries its time");
        let after = SystemTime::now();
        // The name keeps microseconds: compare at that precision.
        assert!(micros(before) <= micros(at) && micros(at) <= micros(after));
        let t = arrival_time("20261125T124445.123456Z-4242-000017").unwrap();
        assert_eq!(rfc3339(t), "2026-11-25T12:44:45.123456Z");
        for bad in [
            "notes.txt",
            "20261125T124445.123456Z",
            "20261125T124445.123456Z-42",
            "20261125T124445.123456Z-x-1",
            "20261125X124445.123456Z-1-1",
            "20261325T124445.123456Z-1-1", // month 13
            "2026112",
        ] {
            assert_eq!(arrival_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn reading_skips_and_counts_what_is_not_a_finished_upload() {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, len: usize| fs::write(dir.path().join(name), vec![7; len]).unwrap();
        put("20261125T124445.500000Z-1-000002", 3);
        put("20261125T124445.100000Z-1-000001", 5);
        put("20261125T124446.000000Z-1-000003.part", 1);
        put("20261125T124446.000000Z-1-000004.incomplete", 1);
        put(".stopover-probe-1-2", 0);
        fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let rec = Recording::read(dir.path()).unwrap();
        let names: Vec<_> = rec.files.iter().map(|f| f.name.clone()).collect();
        assert_eq!(
            names,
            [
                "20261125T124445.100000Z-1-000001",
                "20261125T124445.500000Z-1-000002"
            ]
        );
        assert_eq!(rec.files[0].size, 5);
        assert_eq!(
            rec.skipped,
            Skipped {
                unfinished: 2,
                other: 3
            }
        );
        assert!(rec.timed().is_ok());

        put("notes.txt", 1);
        let rec = Recording::read(dir.path()).unwrap();
        assert_eq!(rec.files.last().unwrap().name, "notes.txt", "untimed last");
        let e = rec.timed().unwrap_err();
        assert!(e.contains("1 of 3") && e.contains("notes.txt"), "{e}");
    }

    #[test]
    fn an_empty_or_missing_directory_is_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x.part"), b"").unwrap();
        let e = Recording::read(dir.path()).unwrap_err();
        assert!(
            e.contains("no finished upload") && e.contains("1 unfinished"),
            "{e}"
        );
        let e = Recording::read(&dir.path().join("nope")).unwrap_err();
        assert!(e.contains("cannot read it") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn bounds_parse() {
        assert_eq!("90s".parse(), Ok(Bound::Offset(Duration::from_secs(90))));
        let t = arrival_time("20261125T124445.123456Z-1-1").unwrap();
        assert_eq!("20261125T124445.123456Z-1-1".parse(), Ok(Bound::At(t)));
        assert_eq!("20261125T124445.123456Z".parse(), Ok(Bound::At(t)));
        assert_eq!("2026-11-25T12:44:45.123456Z".parse(), Ok(Bound::At(t)));
        let whole = humantime::parse_rfc3339("2026-11-25T12:44:45Z").unwrap();
        assert_eq!("2026-11-25 12:44:45".parse(), Ok(Bound::At(whole)));
        assert!("yesterday".parse::<Bound>().is_err());
    }
}
