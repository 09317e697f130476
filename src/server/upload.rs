//! The file side of one server connection: `<name>.part` created, written,
//! synced and named through the loop's `Disk` (its `io_uring`), so that
//! the loop never waits for the disk.
//!
//! A plain `write` returns once the bytes are in the page cache, but when
//! the disk is behind the kernel makes the writer wait (dirty-page
//! throttling): the server's longest handling of one event in a soak was a
//! `write` of 292 ms, and every other connection waited with it. `openat`
//! with `O_CREAT`, `rename` and `unlink` wait for the directory's lock,
//! and `fsync` for the device itself (milliseconds to seconds). So every
//! one of them is handed to the ring, and comes back as a completion
//! ([`Upload::on_done`]), like the proxy's spool (`proxy::files`,
//! `proxy::transfer::spool::recording`), but simpler: no `O_DIRECT`, no
//! forwarding, and an incomplete upload is removed, never kept.
//!
//! ```text
//!   Creating ─ open done ─> Writing ─ EOF, every write done ─> (Trimming) ─> (SyncingFile) ─> Naming ─> (SyncingDir) ─> named: OK
//!   (no read: the bytes      read into a chunk, each           ftruncate     fsync            rename     fsync of the
//!    wait in the kernel)     batch one write of it              if reserved   with --fsync              directory, --fsync
//!      any failure (open, a write, a sync, the rename): ERR, and `<name>.part` (or, after a failed
//!      directory sync, `<name>`) is removed through the ring
//! ```
//!
//! **The bytes belong to the ring until their write completes.** The
//! client is read straight into a [`Chunk`] of the disk's budget (no copy);
//! the chunk is handed to the disk when it is full or when the socket has
//! nothing more for now (so an idle connection holds no memory), and comes
//! back to the pool when the write completes. Memory is bounded twice: a
//! connection has at most [`WRITES_IN_FLIGHT`] writes in flight, and all
//! connections together at most [`WRITE_MEMORY`] of chunks; a connection
//! over either bound stops reading its socket (back-pressure: its bytes
//! wait in the kernel, and the client's sends block) until a completion
//! (or a chunk, `Disk::wait`) comes back. Neither pause is counted against
//! the client by the idle timeout or `--min-rate`.
//!
//! **Preallocation is kept** (see the store's module docs): the reservation
//! (`fallocate(KEEP_SIZE)`) goes through the ring with the write it runs
//! ahead of. Their order does not matter (a reservation keeps the file's
//! length, and the write lands inside or beyond it), and the trim that
//! gives back what was not used waits until nothing else of the file is in
//! flight (the ring keeps no order). It saved 10-12% of the server's CPU
//! per GiB when the writes were made on the loop; with the writes in the
//! kernel's workers, three interleaved rounds of 4 x 64 MiB straight to
//! the server showed no difference beyond noise (0.64-0.75 s of CPU per
//! GiB with it, 0.66-0.70 without). It is kept because it costs the loop
//! one ring entry per doubling of the file and one trim, and ext4 gets
//! its space in few large pieces.
//!
//! **The price is CPU.** The kernel runs most buffered writes from the
//! ring in its `iou-wrk` threads (counted in the server's CPU): the same
//! 1 GiB took 0.62-0.68 s of the server's CPU through the ring against
//! 0.44-0.53 s with `write` on the loop (the loop thread's own share fell
//! to about 0.40 s), in exchange for a loop that never waits for the disk.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::Context as _;
use crate::event_loop::disk::{Buf, Chunk, Disk, Done, Op, Owner};
use crate::store::{PartFile, Store, MAX_NAME_TRIES, PART_SUFFIX};
use crate::sys;

/// Most writes one upload may have in flight. Buffered writes through the
/// ring usually complete within the loop's next turn; more in flight only
/// means the disk is behind, and then the client should wait, not our
/// memory grow.
pub const WRITES_IN_FLIGHT: u32 = 4;

/// Memory for uploads' bytes between the socket and the page cache, all
/// connections together: 16 chunks of 1 MiB (`event_loop::disk::CHUNK`).
/// A chunk written holds only the pages read into it, so this bounds the
/// writes in flight more than it costs memory.
pub const WRITE_MEMORY: usize = 16 * 1024 * 1024;

/// Where the upload stands (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `<name>.part` is being created, by the try `tries` of
    /// [`MAX_NAME_TRIES`].
    Creating { tries: u32 },
    /// Bytes arrive and are written; after EOF, the last writes complete.
    Writing,
    /// Reserved space past the data is given back (`ftruncate`).
    Trimming,
    /// The data is synced (`--fsync`).
    SyncingFile,
    /// `<name>.part` is renamed `<name>`.
    Naming,
    /// The directory is synced (`--fsync`), so that the name survives too.
    SyncingDir,
    /// Named, or failed.
    Ended,
}

/// What went wrong, by when: each says it its own way (see `conn`).
#[derive(Debug)]
pub(super) enum Trouble {
    /// The file could not be created.
    Create(io::Error),
    /// A write failed (the disk is full...).
    Write(io::Error),
    /// Syncing or naming the complete file failed.
    Finish(io::Error),
}

impl std::fmt::Display for Trouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trouble::Create(e) | Trouble::Write(e) | Trouble::Finish(e) => e.fmt(f),
        }
    }
}

/// One upload's file (see the module docs).
#[derive(Debug)]
pub(super) struct Upload {
    name: String,
    /// `None` while the file is being created, and once let go of.
    part: Option<PartFile>,
    /// The store's directory, open, to sync (`--fsync`).
    dir: Arc<File>,
    owner: Owner,
    fsync: bool,
    step: Step,
    /// The chunk being filled from the socket.
    chunk: Option<Chunk>,
    /// CRC-32C of every byte read, computed as it arrives.
    crc: u32,
    /// Writes in flight (see [`WRITES_IN_FLIGHT`]).
    writes: u32,
    /// Every operation of this upload in flight.
    in_flight: u32,
    /// Queued for a chunk (`Disk::wait`).
    waiting: bool,
    /// Reading was paused by us (memory, writes) since the last rate check.
    held_back: bool,
    /// The file's removal has been asked for.
    removed: bool,
    /// The last [`Upload::room`] found none: the connection stopped
    /// reading with its socket's readiness left set, and a completion must
    /// drive it again (see [`Upload::wants_drive`]).
    stalled: bool,
    failed: Option<Trouble>,
}

impl Upload {
    /// Asks the ring to create the file of a new upload for `owner`.
    pub fn create(store: &mut Store, disk: &mut Disk, owner: Owner, fsync: bool) -> Upload {
        let name = store.next_name();
        disk.open(store.dir_file(), Store::part_name(&name), owner);
        Upload {
            name,
            part: None,
            dir: Arc::clone(store.dir_file()),
            owner,
            fsync,
            step: Step::Creating { tries: 1 },
            chunk: None,
            crc: 0,
            writes: 0,
            in_flight: 1,
            waiting: false,
            held_back: false,
            removed: false,
            stalled: false,
            failed: None,
        }
    }

    /// The stored name (without directory or suffix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes read so far (written, in flight, or in the chunk).
    pub fn bytes(&self) -> u64 {
        self.part.as_ref().map_or(0, PartFile::bytes)
            + self.chunk.as_ref().map_or(0, |c| c.len() as u64)
    }

    pub fn crc32c(&self) -> u32 {
        self.crc
    }

    /// Where the file is, for log lines (`None` while it is being created).
    pub fn path(&self) -> Option<PathBuf> {
        self.part.as_ref().map(|p| p.path().to_path_buf())
    }

    /// True while the file is being created: nothing is read meanwhile.
    pub fn creating(&self) -> bool {
        matches!(self.step, Step::Creating { .. })
    }

    /// True while we are the reason nothing is read: the file is being
    /// created, or memory or writes are at their bound.
    pub fn paused(&self) -> bool {
        self.creating() || self.waiting || (self.chunk.is_none() && self.writes >= WRITES_IN_FLIGHT)
    }

    /// True when we are the reason nothing is read now, or were since the
    /// last call (which forgets it): the client is not to blame.
    pub fn held_back(&mut self) -> bool {
        std::mem::take(&mut self.held_back) || self.paused()
    }

    /// The first failure, once.
    pub fn take_trouble(&mut self) -> Option<Trouble> {
        self.failed.take()
    }

    /// Room to read the client's next bytes into, or `None` when the
    /// upload cannot take any now: its file is not there yet, it failed,
    /// or it is over one of the memory bounds (then a completion, or the
    /// loop's wake-up for a chunk, drives the connection again).
    pub fn room(&mut self, disk: &mut Disk) -> Option<&mut [u8]> {
        self.stalled = true;
        if self.part.is_none() || self.failed.is_some() {
            return None;
        }
        if self.chunk.is_none() {
            if self.writes >= WRITES_IN_FLIGHT {
                self.held_back = true;
                return None;
            }
            match disk.chunk() {
                Some(chunk) => self.chunk = Some(chunk),
                None => {
                    if !self.waiting {
                        disk.wait(self.owner);
                        self.waiting = true;
                    }
                    self.held_back = true;
                    return None;
                }
            }
        }
        self.stalled = false;
        self.chunk.as_mut().map(Chunk::spare)
    }

    /// True when a completion must drive the connection: it stopped
    /// reading for want of room (its file, memory, writes), or something
    /// failed and the client must be told. Otherwise its socket's next
    /// event will: a read on every completion would mostly find nothing.
    pub fn wants_drive(&self) -> bool {
        self.stalled || self.failed.is_some()
    }

    /// The loop's wake-up for a chunk came (see `Disk::wakeups`).
    pub fn woken(&mut self) {
        self.waiting = false;
    }

    /// `n` bytes were read into [`Upload::room`]: counted, checksummed,
    /// and written once the chunk is full.
    pub fn commit(&mut self, n: usize, disk: &mut Disk) {
        let Some(chunk) = self.chunk.as_mut() else {
            return;
        };
        let from = chunk.len();
        chunk.commit(n);
        self.crc = crc32c::crc32c_append(self.crc, &chunk.filled()[from..]);
        if chunk.is_full() {
            self.flush(disk);
        }
    }

    /// Hands the bytes read so far to the disk (with the reservation due
    /// before them, if any), as one write at the end of the file.
    pub fn flush(&mut self, disk: &mut Disk) {
        let Some(chunk) = self.chunk.take() else {
            return;
        };
        let Some(part) = self.part.as_mut().filter(|_| !chunk.is_empty()) else {
            disk.recycle(chunk);
            return;
        };
        let len = chunk.len();
        let offset = part.bytes();
        if let Some(r) = part.advance(len as u64) {
            disk.reserve(part.shared_file(), r.mode, r.offset, r.len, self.owner);
            self.in_flight += 1;
        }
        log::trace!(
            "server: #{} disk write {len} at {offset}{}",
            self.owner.key,
            if disk.is_async() { " queued" } else { "" }
        );
        let buf = Buf::Chunk(Arc::new(chunk));
        disk.write(part.shared_file(), None, offset, buf, len, self.owner);
        self.writes += 1;
        self.in_flight += 1;
    }

    /// One of this upload's operations has completed.
    pub fn on_done(&mut self, done: Done, store: &mut Store, disk: &mut Disk) {
        self.in_flight = self.in_flight.saturating_sub(1);
        log::trace!("server: #{} disk {done}", self.owner.key);
        match done.op {
            Op::Open => self.created(done, store, disk),
            Op::Write { .. } => {
                self.writes = self.writes.saturating_sub(1);
                if let Err(e) = done.result {
                    self.fail(Trouble::Write(e));
                }
            }
            Op::Reserve => {
                if let (Err(e), Some(part)) = (&done.result, self.part.as_mut()) {
                    part.reservation_failed(e);
                }
            }
            Op::Truncate => {
                if let (Err(e), Some(part)) = (&done.result, self.part.as_ref()) {
                    // Only spare space is lost: the length is the data's.
                    log::warn!("trimming {}: {e}", part.path().display());
                }
            }
            Op::Fsync => self.synced(done.result, disk),
            Op::Rename => match (done.result, self.part.as_mut()) {
                (Ok(()), Some(part)) => part.named_final(),
                (Err(e), Some(part)) => {
                    let from = part.path().display().to_string();
                    let e = Err::<(), _>(e).context(format!("renaming {from} to its final name"));
                    self.fail(Trouble::Finish(e.unwrap_err()));
                }
                (_, None) => {}
            },
            Op::Unlink => {
                if let Err(e) = done.result {
                    log::warn!("server: removing the file of {}: {e}", self.name);
                }
            }
            Op::Close | Op::Reopen | Op::Writeback | Op::DropCached => {}
        }
    }

    /// The creation of the file completed: the file is ours, or the name
    /// was taken (the next one is tried, through the ring again), or the
    /// upload cannot be stored.
    fn created(&mut self, done: Done, store: &mut Store, disk: &mut Disk) {
        let Step::Creating { tries } = self.step else {
            return;
        };
        match (done.result, done.opened) {
            (Ok(()), Some(file)) => {
                log::trace!(
                    "server: #{} disk created {}.part",
                    self.owner.key,
                    self.name
                );
                self.part = Some(store.adopt(self.name.clone(), file));
                self.step = Step::Writing;
            }
            (Err(e), _) if e.kind() == io::ErrorKind::AlreadyExists && tries < MAX_NAME_TRIES => {
                // Taken (another process with our pid, this microsecond).
                self.name = store.next_name();
                disk.open(store.dir_file(), Store::part_name(&self.name), self.owner);
                self.step = Step::Creating { tries: tries + 1 };
                self.in_flight += 1;
            }
            (Err(e), _) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.fail(Trouble::Create(store.no_free_name()));
            }
            (result, _) => {
                let e = result
                    .err()
                    .unwrap_or_else(|| io::Error::other("the ring made no file"));
                let path = store.dir().join(format!("{}{PART_SUFFIX}", self.name));
                let e = io::Error::new(e.kind(), format!("creating {}: {e}", path.display()));
                self.fail(Trouble::Create(e));
            }
        }
    }

    /// An `fsync` completed: the file's (before the rename) or the
    /// directory's (after it). If the directory's failed, the final name's
    /// survival is not promised: the file is removed (see
    /// `PartFile::finish_durable`), and the client told `ERR`, so that its
    /// retry stores the upload once, not twice.
    fn synced(&mut self, result: io::Result<()>, disk: &mut Disk) {
        let Err(e) = result else {
            return;
        };
        let Some(part) = self.part.as_mut() else {
            return;
        };
        let e = if self.step == Step::SyncingDir {
            let dir = part
                .path()
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            part.final_removed();
            self.remove(disk);
            io::Error::new(
                e.kind(),
                format!("syncing directory {dir} (upload removed): {e}"),
            )
        } else {
            io::Error::new(e.kind(), format!("syncing {}: {e}", part.path().display()))
        };
        self.fail(Trouble::Finish(e));
    }

    /// Keeps the first failure, for the connection to answer.
    fn fail(&mut self, trouble: Trouble) {
        if self.failed.is_none() {
            self.failed = Some(trouble);
        }
    }

    /// The client's EOF: the last bytes go to the disk, and the upload
    /// heads for its final name.
    pub fn eof(&mut self, disk: &mut Disk) {
        self.flush(disk);
    }

    /// Moves a complete upload (after [`Upload::eof`]) on towards its final
    /// name: `None` while something is in flight, then `Ok` once named
    /// (and, with `--fsync`, synced), or what went wrong (the caller then
    /// refuses the upload and [`Upload::abandon`]s it).
    pub fn advance_to_end(&mut self, disk: &mut Disk) -> Option<Result<(), Trouble>> {
        if self.in_flight > 0 || self.step == Step::Ended {
            return None;
        }
        let next = match self.failed.take() {
            Some(trouble) => Err(trouble),
            None => self.next_step(disk),
        };
        match next {
            Ok(Step::Ended) => {
                self.step = Step::Ended;
                Some(Ok(()))
            }
            Ok(step) => {
                self.step = step;
                self.in_flight += 1;
                None
            }
            Err(trouble) => {
                self.step = Step::Ended;
                Some(Err(trouble))
            }
        }
    }

    /// Asks for the operation that follows the one completed, and returns
    /// the step it makes (see the module docs).
    fn next_step(&mut self, disk: &mut Disk) -> Result<Step, Trouble> {
        let Some(part) = self.part.as_mut() else {
            return Err(Trouble::Finish(io::Error::other("no file")));
        };
        let file = Arc::clone(part.shared_file());
        match self.step {
            Step::Writing => {
                if let Some(len) = part.trim_due() {
                    disk.truncate(&file, len, self.owner);
                    return Ok(Step::Trimming);
                }
            }
            Step::Trimming => part.trimmed(),
            Step::SyncingFile => return self.rename(disk),
            Step::Naming if self.fsync => {
                disk.fsync(&self.dir, self.owner);
                return Ok(Step::SyncingDir);
            }
            Step::Naming | Step::SyncingDir | Step::Creating { .. } | Step::Ended => {
                return Ok(Step::Ended)
            }
        }
        // Trimmed (or nothing to trim): sync the data first with --fsync.
        if self.fsync {
            disk.fsync(&file, self.owner);
            return Ok(Step::SyncingFile);
        }
        self.rename(disk)
    }

    fn rename(&mut self, disk: &mut Disk) -> Result<Step, Trouble> {
        let Some(part) = self.part.as_ref() else {
            return Err(Trouble::Finish(io::Error::other("no file")));
        };
        let (from, to) = part.part_and_final_paths();
        let (from, to) = (sys::cpath(from), sys::cpath(to));
        match (from, to) {
            (Ok(from), Ok(to)) => {
                disk.rename(from, to, self.owner);
                Ok(Step::Naming)
            }
            (Err(e), _) | (_, Err(e)) => Err(Trouble::Finish(e)),
        }
    }

    /// Lets go of a named file: its descriptor is closed through the ring
    /// (and its retention ticket says the upload no longer holds it).
    pub fn close(mut self, disk: &mut Disk) {
        if let Some(chunk) = self.chunk.take() {
            disk.recycle(chunk);
        }
        if let Some(part) = self.part.take() {
            disk.release(part.into_file());
        }
    }

    /// Gives up the upload: an unfinished file is removed and closed,
    /// through the ring (writes in flight land in the unlinked file, and
    /// their completions find nobody). A file still being created is
    /// removed when its creation completes (see `server::files`).
    pub fn abandon(self, disk: &mut Disk) {
        if let Some(part) = self
            .part
            .as_ref()
            .filter(|p| !p.is_finished() && !self.removed)
        {
            unlink(part, None, disk);
        }
        self.close(disk);
    }

    /// Removes the file where it is now (`<name>.part`, or `<name>` after a
    /// failed directory sync), through the ring, once; the removal counts
    /// as in flight, so that [`Upload::settled`] waits for it.
    pub fn remove(&mut self, disk: &mut Disk) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        if let Some(part) = self.part.as_ref() {
            if unlink(part, Some(self.owner), disk) {
                self.in_flight += 1;
            }
        }
    }

    /// True once nothing of this upload is in flight (after
    /// [`Upload::remove`]: its file is gone).
    pub fn settled(&self) -> bool {
        self.in_flight == 0
    }
}

/// Removes `part`'s file where it is now, through the ring, for `owner`
/// if there is one to hear of it; false if it could not even be asked.
fn unlink(part: &PartFile, owner: Option<Owner>, disk: &mut Disk) -> bool {
    match sys::cpath(part.path()) {
        Ok(path) => {
            disk.unlink(path, owner);
            true
        }
        Err(e) => {
            log::warn!("removing {}: {e}", part.path().display());
            false
        }
    }
}

#[cfg(test)]
#[path = "upload_tests.rs"]
mod tests;
