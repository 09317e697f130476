//! Retention: recordings that cannot fill the disk.
//!
//! Both daemons keep a copy of every upload (the server in `--dir`, the
//! proxy in its spool). At the rates a load test reaches (about 1 GB/s
//! here) 80 GB fill in 90 s, and a full disk refuses everything. The
//! [`Keeper`] deletes old recordings so that this never happens, the way
//! dumpcap's ring buffer (`-b files:N`) and stenographer
//! (`DiskFreePercentage`) do:
//!
//! - `--retain-bytes SIZE`: the recordings together stay within SIZE;
//! - `--retain-files N`: at most N recordings (dumpcap's ring);
//! - `--retain-for DURATION`: recordings older than this are deleted;
//! - `--min-free SIZE|PERCENT`: while the filesystem has less free
//!   (`fstatvfs`, as `df` reports it), the oldest are deleted until the
//!   bytes chosen cover the shortfall (stenographer's rule).
//!
//! **What is deleted.** A *recording* is a finished upload (`NAME`) or
//! the kept part of an unfinished one (`NAME.incomplete`), once no
//! transfer holds it. Both count the same and go in one order: oldest
//! arrival first, which is name order (the name starts with the arrival
//! time, see `store`). So an `.incomplete` file is never deleted before an
//! older finished one, nor kept after a younger one is gone. Never
//! deleted, but counted in the totals (they take space too):
//! - a finished file whose transfer still holds it: a held upload
//!   (`--hold`: it is final-named while a person may edit it, and must be
//!   there to be forwarded), or a proxied one whose answer has not come
//!   back yet. It becomes deletable when its transfer ends;
//! - a `.part` left by an earlier run (reported at startup, never touched);
//! - a file whose deletion failed for another reason than being gone
//!   (logged), and any file whose name is not one of ours.
//!
//! Uploads still being written (`.part`) are counted once finished: the
//! totals are of files at rest, so in-flight uploads come on top (at most
//! one upload per open connection). A single recording larger than
//! `--retain-bytes` is deleted as soon as its transfer ends: the budget is
//! a bound on the disk, not a wish.
//!
//! **Accounting is incremental.** One scan at startup, before the loop
//! starts, puts the files already there (from earlier runs) on the books;
//! the first turn of the loop then enforces the limits on them. From then
//! on the store tells the keeper what happens: each `PartFile` carries a
//! [`Ticket`], which announces the file when it is finished (pinned: its
//! transfer holds it) or kept as `.incomplete`, and lets go of the pin
//! when the `PartFile` is dropped, that is, when the transfer no longer
//! needs it. The announcements wait in a channel until the loop's next
//! turn; the keeper never lists the directory again. `--min-free` is the
//! one limit the books cannot answer (other writers share the
//! filesystem), so it is looked at on a timer: every second, and at once
//! after 64 MiB more were recorded.
//!
//! **Deleting never stalls the loop.** An `unlink` frees the file's
//! blocks and drops its cached pages, and may wait for the filesystem's
//! journal: its cost grows with the file and with the disk's load.
//! Measured on this project's machine (ext4 on a virtual disk), on a quiet
//! disk: 0.09 ms for 64 KiB, 0.35 ms for 1 MiB, 12 ms for 64 MiB, 185 ms
//! for 1 GiB; and for the proxy's 1 MiB spool files (written `O_DIRECT`,
//! so their blocks are on disk) during `load -c 16 -n 1000 -s 1MiB`,
//! under `strace -T`: 0.6 ms median, 9 ms p99, 58 ms at worst. So the
//! keeper does not unlink on the loop's thread. It has a small `io_uring`
//! of its own ([`UnlinkRing`]; the spool's ring is `event_loop::disk`'s),
//! whose `unlinkat` requests the kernel always runs in one of its worker
//! threads: each turn ([`Keeper::turn`], called before each `poll`), the
//! files chosen go to the kernel in one `io_uring_enter` that does not
//! wait (in the same run: 6 us median, 0.45 ms at worst), at most
//! [`MAX_UNLINKS_IN_FLIGHT`] at a time, and the completions are picked up
//! at the next turns (at least every [`REAP_EVERY`] while any are out).
//! The price: the kernel's workers compete for the CPU with everyone
//! else, so under a load that saturates the machine the deletions fall
//! behind, and the directory is over its budget by what waits to be
//! deleted, until they catch up (measured below in README). Files chosen
//! but not yet deleted are still counted as on disk.
//!
//! Where `io_uring` is not available (an old kernel, a seccomp profile),
//! the unlinks run on the loop, a little each turn: at most
//! [`TURN_BUDGET`] of work a turn (and at least one step), then back to
//! the sockets. A file larger than [`CUT_STEP`] is then opened, unlinked
//! (its name goes at once, so no one mistakes a shrinking file for a
//! recording), and cut down from its end [`CUT_STEP`] at a time with
//! `ftruncate` (1-2 ms a step measured, 8 ms at worst on a busy disk)
//! before it is closed.
//!
//! **What it costs.** The books hold one entry per file kept (its name and
//! size, about 100 bytes) when a limit is set; with no limit only the
//! totals are kept. The metrics (`stopover_recordings_bytes`,
//! `_files`, `_deleted_total`, `_deleted_bytes_total`, and with
//! `--min-free` `stopover_filesystem_free_bytes`) are on `/metrics` and
//! in the `--stats-interval` line.
//!
//! The parts: `ledger` (the books and the choice of what to delete, no
//! I/O), `limits` (the flags), `ticket` (the store's side), `delete` (the
//! unlinks, through the ring or on the loop); the keeper, here, takes in
//! the news, looks at the filesystem and reports.

mod delete;
mod ledger;
mod limits;
mod ticket;

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant, SystemTime};

use crate::error::Context as _;
use crate::event_loop::{Exposition, Throttle};
use crate::sys::{self, UnlinkRing};

use delete::Cut;
pub use ledger::{parse_name, Kind};
use ledger::{Doomed, Hold, Ledger};
use limits::describe;
pub use limits::{parse_min_free, Limits, MinFree};
use ticket::Note;
pub use ticket::{Recorder, Ticket};

/// Without the ring: the most deleting work done in one turn of the loop
/// (at least one step is always done, so the work cannot starve).
pub const TURN_BUDGET: Duration = Duration::from_millis(1);
/// The most steps (unlinks or cuts) in one turn, however fast they are.
pub const MAX_STEPS_PER_TURN: usize = 64;
/// Files larger than this are cut down in steps of this size after their
/// unlink (see the module docs): each step frees about as much as the
/// unlink of a file of this size, 1-2 ms here.
pub const CUT_STEP: u64 = 4 * 1024 * 1024;
/// How often the filesystem's free space is looked at (`--min-free`), and
/// `--retain-for` enforced.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);
/// Look at the free space at once after this many bytes were recorded.
pub const LOOK_AFTER_BYTES: u64 = 64 * 1024 * 1024;
/// The most unlinks handed to the kernel at once (through the ring): a
/// bound on the paths held for it. Measured, 16 and 64 made no clear
/// difference to how far the server's deletions fell behind a 500-800 MB/s
/// load of 1 MiB uploads (130-450 MB at the peak either way): the kernel's
/// workers, not this bound, set the pace.
pub const MAX_UNLINKS_IN_FLIGHT: usize = 64;
/// While unlinks are in flight and the loop has nothing else to do, look
/// for their completions this often.
pub const REAP_EVERY: Duration = Duration::from_millis(5);

/// The retention keeper of one directory. See the module docs.
pub struct Keeper {
    role: &'static str,
    dir: PathBuf,
    /// The directory, open, for `fstatvfs`.
    dir_file: File,
    limits: Limits,
    notes: Receiver<Note>,
    recorder: Recorder,
    ledger: Ledger,
    /// Chosen for deletion, oldest first, and their bytes.
    doomed: VecDeque<Doomed>,
    doomed_bytes: u64,
    cutting: Option<Cut>,
    /// Unlinks done by the kernel (`None` where `io_uring` is not
    /// available: then they are done here, a little each turn).
    ring: Option<UnlinkRing>,
    /// The unlinks in flight in the ring, by id, and their bytes.
    unlinking: HashMap<u64, Doomed>,
    unlinking_bytes: u64,
    /// When the free space (and ages) are looked at next.
    next_look: Instant,
    /// Bytes recorded since the last look.
    since_look: u64,
    /// The books changed (or were just read): a limit may be exceeded.
    dirty: bool,
    deleted_files: u64,
    deleted_bytes: u64,
    warnings: Throttle,
}

impl Keeper {
    /// Scans `dir` (flat: our names only) and puts what is there on the
    /// books; the limits are enforced from the loop's first turn.
    pub fn open(role: &'static str, dir: &Path, limits: Limits) -> io::Result<Keeper> {
        let dir_file =
            File::open(dir).with_context(|| format!("{role}: opening {}", dir.display()))?;
        let mut ledger = Ledger::new(limits.any());
        let entries =
            fs::read_dir(dir).with_context(|| format!("{role}: listing {}", dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((kind, _)) = parse_name(name) else {
                continue; // not ours: not counted, never touched
            };
            // `DirEntry::metadata` does not follow symlinks: only regular
            // files are ours.
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let hold = match kind {
                Kind::Part => Hold::Leftover,
                Kind::Finished | Kind::Incomplete => Hold::Free,
            };
            ledger.add(name.to_string(), meta.len(), hold);
        }
        if limits.any() {
            log::info!(
                "{role}: retention: {} files ({} bytes) in {} at startup; keeping {}",
                ledger.files(),
                ledger.bytes(),
                dir.display(),
                describe(&limits)
            );
        }
        let ring = match limits
            .any()
            .then(|| UnlinkRing::new(2 * MAX_UNLINKS_IN_FLIGHT as u32))
        {
            Some(Ok(ring)) => Some(ring),
            Some(Err(e)) => {
                log::info!(
                    "{role}: retention: io_uring not available ({e}): unlinks run on the loop, a little each turn"
                );
                None
            }
            None => None,
        };
        let (tx, notes) = mpsc::channel();
        Ok(Keeper {
            role,
            dir: dir.to_path_buf(),
            dir_file,
            limits,
            notes,
            recorder: Recorder { tx },
            ledger,
            doomed: VecDeque::new(),
            doomed_bytes: 0,
            cutting: None,
            ring,
            unlinking: HashMap::new(),
            unlinking_bytes: 0,
            next_look: Instant::now(), // at the first turn
            since_look: 0,
            dirty: true, // the files found at startup
            deleted_files: 0,
            deleted_bytes: 0,
            warnings: Throttle::default(),
        })
    }

    /// For the store: where its files announce themselves.
    pub fn recorder(&self) -> Recorder {
        self.recorder.clone()
    }

    /// One turn's worth of retention, called by the loop before each
    /// `poll`: take in the store's announcements, look at the free space
    /// when due, choose what to delete, and delete some of it (bounded by
    /// [`TURN_BUDGET`]). Returns when the keeper wants its next turn at the
    /// latest: now, while deletions are pending; the next look, with a
    /// periodic limit; otherwise `None`.
    pub fn turn(&mut self, now: Instant) -> Option<Instant> {
        let mut choose = self.take_notes() | std::mem::take(&mut self.dirty);
        let mut short = 0;
        if self.limits.periodic() && (now >= self.next_look || self.since_look >= LOOK_AFTER_BYTES)
        {
            short = self.look(now);
            choose = true;
        }
        if choose && self.limits.any() {
            let chosen = self.ledger.select(&self.limits, SystemTime::now(), short);
            if short > 0 {
                let freed: u64 = chosen.iter().map(|d| d.bytes).sum();
                if freed < short {
                    self.warnings.warn(format_args!(
                        "{}: {} has less free than --min-free {}, and no recording is left to delete ({} bytes short)",
                        self.role,
                        self.dir.display(),
                        self.limits.min_free.map_or_else(String::new, |m| m.to_string()),
                        short - freed
                    ));
                }
            }
            for d in chosen {
                self.doomed_bytes += d.bytes;
                self.doomed.push_back(d);
            }
        }
        self.delete_some();
        let room = self.ring.is_none() || self.unlinking.len() < MAX_UNLINKS_IN_FLIGHT;
        let next = if self.cutting.is_some() || (room && !self.doomed.is_empty()) {
            Some(now) // more to do at once
        } else if !self.unlinking.is_empty() {
            Some(now + REAP_EVERY) // the kernel is at work: see how it went
        } else {
            None
        };
        let look = self.limits.periodic().then_some(self.next_look);
        next.into_iter().chain(look).min()
    }

    /// Bytes chosen for deletion and not yet freed.
    fn pending_bytes(&self) -> u64 {
        self.doomed_bytes + self.unlinking_bytes + self.cutting.as_ref().map_or(0, |c| c.left)
    }

    /// Applies the store's announcements; true if a limit may now be
    /// exceeded.
    fn take_notes(&mut self) -> bool {
        let mut changed = false;
        while let Ok(note) = self.notes.try_recv() {
            match note {
                Note::Finished { name, bytes } => {
                    self.since_look += bytes;
                    self.ledger.add(name, bytes, Hold::Pinned);
                }
                Note::Kept { name, bytes } => {
                    self.since_look += bytes;
                    self.ledger.add(name, bytes, Hold::Free);
                }
                Note::Released { name } => self.ledger.release(&name),
                Note::Removed { name, bytes } => self.ledger.remove(&name, bytes),
            }
            changed = true;
        }
        changed
    }

    /// Looks at the free space; returns how many bytes short of
    /// `--min-free` it is, beyond what is already being deleted.
    fn look(&mut self, now: Instant) -> u64 {
        self.next_look = now + LOOK_EVERY;
        self.since_look = 0;
        let Some(min_free) = self.limits.min_free else {
            return 0;
        };
        match sys::fs_space(&self.dir_file) {
            Ok((available, total)) => {
                let pending = self.pending_bytes();
                min_free
                    .bytes(total)
                    .saturating_sub(available)
                    .saturating_sub(pending)
            }
            Err(e) => {
                self.warnings.warn(format_args!(
                    "{}: free space of {}: {e}",
                    self.role,
                    self.dir.display()
                ));
                0
            }
        }
    }

    /// The retention metrics.
    pub fn metrics(&self, out: &mut Exposition) {
        let pending = self.pending_bytes();
        out.gauge(
            "stopover_recordings_bytes",
            "Bytes of files in --dir (finished, .incomplete, held; .part left by an earlier run), including any being deleted.",
            (self.ledger.bytes() + pending) as f64,
        );
        out.gauge(
            "stopover_recordings_files",
            "Files in --dir (as stopover_recordings_bytes counts them), not yet deleted.",
            (self.ledger.files() + (self.doomed.len() + self.unlinking.len()) as u64) as f64,
        );
        out.counter(
            "stopover_recordings_deleted_total",
            "Recordings deleted by retention (--retain-*, --min-free).",
            self.deleted_files,
        );
        out.counter(
            "stopover_recordings_deleted_bytes_total",
            "Bytes of the recordings deleted by retention.",
            self.deleted_bytes,
        );
        if self.limits.min_free.is_some() {
            // Asked now (a scrape, a stats line), not at the last look.
            if let Ok((free, _)) = sys::fs_space(&self.dir_file) {
                out.gauge(
                    "stopover_filesystem_free_bytes",
                    "Free bytes on the filesystem of --dir (--min-free).",
                    free as f64,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, len: usize) {
        fs::write(dir.join(name), vec![7u8; len]).unwrap();
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Turns the keeper until it has nothing left to do (bounded).
    fn run_until_idle(k: &mut Keeper) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while k.turn(Instant::now()).is_some() {
            assert!(Instant::now() < deadline, "the keeper never went idle");
            std::thread::sleep(Duration::from_millis(1)); // the kernel's unlinks, in flight
        }
    }

    #[test]
    fn startup_scan_counts_ours_and_the_first_turn_enforces() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for s in 1..=6 {
            write(d, &format!("20261125T1200{s:02}.000000Z-7-{s:06}"), 1000);
        }
        write(d, "20261125T120000.000000Z-7-000000.part", 500);
        write(d, "notes.txt", 10_000);
        let limits = Limits {
            bytes: Some(2500),
            ..Limits::default()
        };
        let mut k = Keeper::open("test", d, limits).unwrap();
        assert_eq!((k.ledger.files(), k.ledger.bytes()), (7, 6500));
        run_until_idle(&mut k);
        // 500 (.part, kept) + 2 x 1000 fit in 2500.
        assert_eq!(
            names_in(d),
            [
                "20261125T120000.000000Z-7-000000.part",
                "20261125T120005.000000Z-7-000005",
                "20261125T120006.000000Z-7-000006",
                "notes.txt"
            ]
        );
        assert_eq!((k.deleted_files, k.deleted_bytes), (4, 4000));
        let mut e = Exposition::new();
        k.metrics(&mut e);
        let line = e.one_line();
        assert!(line.contains("stopover_recordings_bytes=2500"), "{line}");
        assert!(line.contains("stopover_recordings_files=3"), "{line}");
    }

    #[test]
    fn tickets_pin_until_dropped_and_large_files_are_cut_down() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let limits = Limits {
            bytes: Some(1),
            ..Limits::default()
        };
        let mut k = Keeper::open("test", d, limits).unwrap();
        k.ring = None; // the way without io_uring
        let big = "20261125T120001.000000Z-7-000001";
        let len = 3 * CUT_STEP as usize + 5;
        write(d, big, len);
        let mut ticket = k.recorder().ticket();
        ticket.finished(big, len as u64);
        run_until_idle(&mut k);
        assert_eq!(names_in(d), [big], "held by its ticket: never deleted");
        assert_eq!(k.ledger.bytes(), len as u64, "but counted");
        drop(ticket);
        k.turn(Instant::now());
        assert!(
            names_in(d).is_empty(),
            "released: the name goes in the first turn"
        );
        run_until_idle(&mut k);
        assert!(names_in(d).is_empty(), "released, then deleted");
        assert!(k.cutting.is_none());
        assert_eq!((k.deleted_files, k.deleted_bytes), (1, len as u64));
    }

    #[test]
    fn the_ring_unlinks_off_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let len = 64 * 1024 * 1024;
        let names: Vec<String> = (1..=3)
            .map(|s| format!("20261125T12000{s}.000000Z-7-00000{s}"))
            .collect();
        for name in &names {
            write(d, name, len);
        }
        let limits = Limits {
            files: Some(1),
            ..Limits::default()
        };
        let mut k = Keeper::open("test", d, limits).unwrap();
        if k.ring.is_none() {
            eprintln!("skipped: no io_uring here");
            return;
        }
        let t = Instant::now();
        k.turn(Instant::now());
        let handed_over = t.elapsed();
        assert!(
            k.cutting.is_none(),
            "the kernel frees the blocks, not the loop"
        );
        run_until_idle(&mut k);
        assert_eq!(names_in(d), [names[2].clone()]);
        assert_eq!((k.deleted_files, k.deleted_bytes), (2, 2 * len as u64));
        assert_eq!(k.pending_bytes(), 0);
        eprintln!("two 64 MiB unlinks handed over in {handed_over:?}");
    }
}
