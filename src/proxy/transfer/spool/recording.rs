//! The file side of a spool: one upload's recording on disk, its
//! operations in flight, and how it ends.
//!
//! A recording writes through two descriptors of the same file: the
//! `.part` file as created (through the page cache: small uploads, a last
//! partial block, overflow, and every write where `O_DIRECT` is refused or
//! there is no ring), and, once the upload is large enough, a second one
//! opened with `O_DIRECT` for whole chunks. Every operation goes through
//! the loop's `Disk` (the ring), and is counted here until it completes.
//!
//! **How a recording ends.** Each recording has a goal:
//!
//! - `Finish`: the upload is complete; once every operation has completed,
//!   the file is trimmed to its length (space reserved past it is given
//!   back) and renamed to its final name;
//! - `Keep`: the upload is not complete (or a write failed); the file is
//!   trimmed to its **longest valid prefix** (the bytes before the first
//!   failed write: no hole, no zero padding from a reservation) and renamed
//!   `NAME.incomplete`, or removed if that prefix is empty;
//! - `Discard`: removed at once (writes in flight land in the unlinked file).
//!
//! Trimming is an `ftruncate` through the ring, issued only when nothing
//! else of the file is in flight (the ring keeps no order between entries);
//! the rename (and a removal) goes through the ring too, and so does the
//! `close` of each descriptor once the recording is let go of
//! ([`Recording::close_files`]): nothing that touches the directory or
//! the file's blocks runs on the loop.
//!
//! **No `.part` outlives its transfer.** A recording dropped before it has
//! ended (its transfer closed, failed, or gave up recording) hands itself
//! to the loop's [`Closing`] table, which finishes it as its completions
//! come in: `Finish` if the upload was complete, `Keep` otherwise.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::event_loop::disk::{Buf, Disk, Done, Op, Owner, ALIGN};
use crate::store::PartFile;
use crate::sys;

mod ending;
use ending::Naming;

/// Most direct writes one recording may have in flight. A chunk that fills
/// up beyond that (the disk is slower than the client) *overflows*: it is
/// written through the page cache (still through the ring: the loop never
/// waits for the writeback, nor for the dirty-page throttling that makes a
/// buffered `write` wait when the disk is behind), so the transfer goes on
/// at memory speed; writeback of those pages is started as soon as the
/// write completes, and they are dropped from the cache when the file is
/// finished.
pub const MAX_IN_FLIGHT: u32 = 4;

/// How a recording ends (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    Finish,
    Keep,
    Discard,
}

/// How a recording ended.
#[derive(Debug)]
pub enum Ended {
    /// Under its final name.
    Finished(PathBuf),
    /// As `.incomplete`, with this many bytes.
    Kept(PathBuf, u64),
    /// Nothing kept.
    Removed,
}

/// Whether the recording writes with `O_DIRECT`.
#[derive(Debug)]
enum Direct {
    /// Not asked yet (a small upload so far).
    NotYet,
    /// The `O_DIRECT` descriptor is being opened through the ring; full
    /// chunks meanwhile go through the page cache, like an overflow.
    Opening,
    On(Arc<File>),
    /// The filesystem (or the lack of a ring) said no: ordinary writes.
    Off,
}

/// Recordings whose transfers are gone (or have given up recording), to be
/// finished by the loop as their completions arrive. Shared by every
/// recording of one proxy, and drained by the proxy after each event.
#[derive(Debug, Clone, Default)]
pub struct Closing(Arc<Mutex<Vec<Recording>>>);

impl Closing {
    /// Hands `rec` over to be finished.
    pub fn retire(&self, mut rec: Recording) {
        let taken = rec.take();
        if let Ok(mut list) = self.0.lock() {
            list.push(taken);
        }
    }

    /// The recordings handed over since the last call.
    pub fn take_new(&self) -> Vec<Recording> {
        self.0
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }
}

/// One upload's file (see the module docs).
#[derive(Debug)]
pub struct Recording {
    /// `None` once handed on (see [`Recording::take`]) or removed.
    part: Option<PartFile>,
    /// The file's name (kept for the log once the file is gone).
    name: String,
    owner: Owner,
    direct: Direct,
    /// Operations of this file in flight (writes, reservations, trims).
    in_flight: u32,
    /// Direct writes in flight (see [`MAX_IN_FLIGHT`]).
    direct_in_flight: u32,
    /// The lowest offset a write failed at, and the first error (its
    /// `errno` where it has one, and what it says).
    failed: Option<(u64, Option<i32>, String)>,
    /// The failure has been reported to the transfer.
    failure_taken: bool,
    /// Bytes written through the page cache because the disk was behind.
    pub overflowed: u64,
    /// Trimmed to this length (through the ring), or asked to be.
    trimmed_to: Option<u64>,
    /// The final rename (to the final name or `.incomplete`).
    naming: Naming,
    /// What to do when it ends.
    pub goal: Goal,
    /// Why recording was given up, if it was (for the log and the metric).
    pub given_up: Option<String>,
    closing: Closing,
}

impl Recording {
    pub fn new(part: PartFile, owner: Owner, closing: Closing) -> Recording {
        Recording {
            name: part.name().to_string(),
            part: Some(part),
            owner,
            direct: Direct::NotYet,
            in_flight: 0,
            direct_in_flight: 0,
            failed: None,
            failure_taken: false,
            overflowed: 0,
            trimmed_to: None,
            naming: Naming::NotAsked,
            goal: Goal::Keep,
            given_up: None,
            closing,
        }
    }

    /// Moves everything out into a new recording, leaving this one empty
    /// (so that its `Drop` does nothing).
    fn take(&mut self) -> Recording {
        Recording {
            name: std::mem::take(&mut self.name),
            part: self.part.take(),
            owner: self.owner,
            direct: std::mem::replace(&mut self.direct, Direct::Off),
            in_flight: self.in_flight,
            direct_in_flight: self.direct_in_flight,
            failed: self.failed.take(),
            failure_taken: self.failure_taken,
            overflowed: self.overflowed,
            trimmed_to: self.trimmed_to,
            naming: std::mem::replace(&mut self.naming, Naming::NotAsked),
            goal: self.goal,
            given_up: self.given_up.take(),
            closing: self.closing.clone(),
        }
    }

    fn part(&self) -> &PartFile {
        self.part.as_ref().expect("a live recording has its file")
    }

    pub fn owner(&self) -> Owner {
        self.owner
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why the recording is not whole, if it is not: given up, or a write
    /// failed.
    pub fn failure(&self) -> Option<&str> {
        self.given_up
            .as_deref()
            .or(self.failed.as_ref().map(|(_, _, e)| e.as_str()))
    }

    pub fn path(&self) -> &Path {
        self.part().path()
    }

    pub fn is_finished(&self) -> bool {
        self.part.as_ref().is_some_and(PartFile::is_finished)
    }

    /// True once `O_DIRECT` is on.
    pub fn is_direct(&self) -> bool {
        matches!(self.direct, Direct::On(_))
    }

    /// True until the upload is large enough to ask for `O_DIRECT`.
    pub fn direct_not_yet(&self) -> bool {
        matches!(self.direct, Direct::NotYet)
    }

    /// True while the `O_DIRECT` descriptor is being opened.
    pub fn direct_opening(&self) -> bool {
        matches!(self.direct, Direct::Opening)
    }

    /// True when this file is written through the page cache for good.
    fn is_off(&self) -> bool {
        matches!(self.direct, Direct::Off)
    }

    /// Asks for the `O_DIRECT` descriptor now (the upload has become
    /// large), so that it is open by the time the first chunk is full.
    pub fn prepare_direct(&mut self, disk: &mut Disk) {
        if self.direct_not_yet() {
            self.direct = self.open_direct(disk);
        }
    }

    /// True when the disk is behind: a full chunk should overflow.
    pub fn disk_behind(&self) -> bool {
        self.is_direct() && self.direct_in_flight >= MAX_IN_FLIGHT
    }

    /// Counts `len` more upload bytes, reserving space ahead through the ring.
    pub fn advance(&mut self, len: u64, disk: &mut Disk) {
        let Some(part) = self.part.as_mut() else {
            return;
        };
        if let Some(r) = part.advance(len) {
            disk.reserve(part.shared_file(), r.mode, r.offset, r.len, self.owner);
            self.in_flight += 1;
        }
    }

    /// Writes `len` bytes (whole blocks) of `buf` at `offset`, directly
    /// where it can: the `O_DIRECT` descriptor is asked for at the first
    /// such write, when there is a ring; until it is there, the write goes
    /// through the page cache like an overflow.
    pub fn write_blocks(&mut self, disk: &mut Disk, offset: u64, buf: Buf, len: usize) {
        if self.direct_not_yet() {
            self.direct = self.open_direct(disk);
        }
        let Some(part) = self.part.as_ref() else {
            return;
        };
        match &self.direct {
            Direct::On(file) => {
                log::trace!(
                    "proxy: #{} disk write {len} at {offset} queued (direct)",
                    self.owner.key
                );
                disk.write(file, Some(part.shared_file()), offset, buf, len, self.owner);
                self.direct_in_flight += 1;
                self.in_flight += 1;
            }
            Direct::Opening => self.overflow(disk, offset, buf, len),
            _ => self.write_plain(disk, offset, buf, len),
        }
    }

    /// Writes through the page cache (through the ring, where there is one).
    pub fn write_plain(&mut self, disk: &mut Disk, offset: u64, buf: Buf, len: usize) {
        if len == 0 {
            return;
        }
        let Some(part) = self.part.as_ref() else {
            return;
        };
        log::trace!(
            "proxy: #{} disk write {len} at {offset}{}",
            self.owner.key,
            if disk.is_async() { " queued" } else { "" }
        );
        disk.write(part.shared_file(), None, offset, buf, len, self.owner);
        self.in_flight += 1;
    }

    /// A full chunk the disk is too far behind to take directly.
    pub fn overflow(&mut self, disk: &mut Disk, offset: u64, buf: Buf, len: usize) {
        self.overflowed += len as u64;
        disk.counters.overflow_bytes += len as u64;
        self.write_plain(disk, offset, buf, len);
    }

    /// Asks the ring for the `O_DIRECT` descriptor, if this file may have
    /// one: only with a ring (a direct write done at once would hold the
    /// loop for the device's write time). The completion decides
    /// ([`Recording::direct_opened`]).
    fn open_direct(&mut self, disk: &mut Disk) -> Direct {
        let Some(part) = self.part.as_ref() else {
            return Direct::Off;
        };
        if !disk.is_async() {
            return Direct::Off;
        }
        let Ok(path) = sys::cpath(part.path()) else {
            return Direct::Off;
        };
        disk.reopen(
            part.shared_file(),
            path,
            libc::O_WRONLY | libc::O_DIRECT | libc::O_NOFOLLOW,
            self.owner,
        );
        self.in_flight += 1;
        Direct::Opening
    }

    /// The `O_DIRECT` descriptor is open (or refused): keep it only where
    /// `statx(STATX_DIOALIGN)` asks for an alignment that our blocks
    /// ([`ALIGN`]) satisfy.
    fn direct_opened(&mut self, file: Option<File>, result: io::Result<()>) {
        let refused = |path: &Path, why: String| {
            log::debug!(
                "{}: O_DIRECT refused ({why}): writing through the page cache",
                path.display()
            );
            Direct::Off
        };
        let path = self
            .part
            .as_ref()
            .map(|p| p.path().to_path_buf())
            .unwrap_or_default();
        self.direct = match (file, result) {
            (Some(file), Ok(())) => match sys::dio_alignment(&file) {
                Ok(Some((mem, offset))) if mem == 0 || offset == 0 => {
                    refused(&path, "statx: no direct I/O on this file".into())
                }
                Ok(Some((mem, offset)))
                    if ALIGN % mem as usize != 0 || ALIGN % offset as usize != 0 =>
                {
                    refused(
                        &path,
                        format!("statx: alignment {mem}/{offset} does not divide {ALIGN}"),
                    )
                }
                // Known and satisfied, or not reported (older kernel or
                // filesystem): our page-sized blocks, which every common
                // device takes.
                _ => {
                    if let Some(part) = self.part.as_mut() {
                        part.extend_reserve();
                    }
                    Direct::On(Arc::new(file))
                }
            },
            (_, Err(e)) => refused(&path, e.to_string()),
            (None, Ok(())) => refused(&path, "no descriptor".into()),
        };
    }

    /// One of our operations has completed.
    pub fn on_done(&mut self, done: Done, disk: &mut Disk) {
        self.in_flight = self.in_flight.saturating_sub(1);
        log::trace!("proxy: #{} disk {done}", self.owner.key);
        match done.op {
            Op::Write {
                offset,
                len,
                direct,
            } => {
                if direct {
                    self.direct_in_flight = self.direct_in_flight.saturating_sub(1);
                }
                if done.refused_direct && self.is_direct() {
                    log::debug!(
                        "{}: a direct write was refused: writing through the page cache from now on",
                        self.path().display()
                    );
                    self.direct = Direct::Off;
                }
                match done.result {
                    Err(e) => self.write_failed(offset, e),
                    Ok(()) if !direct && self.overflowed > 0 && !self.is_off() => {
                        // An overflow write: start its writeback now, so its
                        // pages are clean (and can be dropped) at the end.
                        if let Some(part) = self.part.as_ref() {
                            disk.writeback(part.shared_file(), offset, len as u64, self.owner);
                            self.in_flight += 1;
                        }
                    }
                    Ok(()) => {}
                }
            }
            Op::Reserve => {
                if let (Err(e), Some(part)) = (&done.result, self.part.as_mut()) {
                    part.reservation_failed(e);
                }
            }
            Op::Truncate => {
                if let Err(e) = done.result {
                    // Not trimmed: past the data may lie zeros from a
                    // reservation, or bytes past a failed write, so the
                    // file can be neither named nor kept: no valid prefix
                    // is known to end where the file does.
                    log::debug!("trimming {}: {e}", self.path().display());
                    let what = format!("trimming the file: {}", crate::error::brief(&e));
                    self.failed = Some((0, e.raw_os_error(), what));
                }
            }
            Op::Reopen => self.direct_opened(done.opened, done.result),
            Op::Rename => {
                if let Naming::Asked { finish } = self.naming {
                    self.naming = Naming::Done {
                        result: done.result,
                        finish,
                    };
                }
            }
            // Opens are the proxy's (see `Spool::opening`), never a
            // recording's: a recording exists once its file does. Nobody
            // hears of closes and removals.
            Op::Writeback | Op::DropCached | Op::Open | Op::Unlink | Op::Fsync | Op::Close => {}
        }
    }

    fn write_failed(&mut self, offset: u64, e: io::Error) {
        let path = self.path().display().to_string();
        log::debug!("{path}: disk write at {offset} failed: {e}");
        match &mut self.failed {
            Some((at, _, _)) => *at = (*at).min(offset),
            None => self.failed = Some((offset, e.raw_os_error(), crate::error::brief(&e))),
        }
    }

    /// The first failed write, reported once.
    pub fn take_failure(&mut self) -> Option<io::Error> {
        if self.failure_taken {
            return None;
        }
        let (_, errno, what) = self.failed.as_ref()?;
        self.failure_taken = true;
        Some(match errno {
            Some(errno) => io::Error::from_raw_os_error(*errno),
            None => io::Error::other(what.clone()),
        })
    }
}

impl Drop for Recording {
    /// A recording let go of goes to the loop's closing table: to be ended
    /// if it has not, and to have its descriptors closed through the ring
    /// in any case.
    fn drop(&mut self) {
        if self.part.is_some() || matches!(self.direct, Direct::On(_)) {
            let closing = self.closing.clone();
            closing.retire(self.take());
        }
    }
}
