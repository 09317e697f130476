//! One upload being written: `<name>.part` until it is finished (renamed
//! to `<name>`), kept (`<name>.incomplete`) or discarded; its byte count
//! and running CRC-32C, and the space it reserves ahead of its writes (see
//! the store's module docs: "Preallocation").

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{INCOMPLETE_SUFFIX, PART_SUFFIX};
use crate::error::Context;
use crate::retention::Ticket;
use crate::sys;

/// Uploads up to this size are never preallocated: for small files the
/// extra system call costs more than it saves.
pub const PREALLOCATE_AFTER: u64 = 1024 * 1024;
/// The largest step a file reserves ahead of its writes. A step is as large
/// as the file already is (so reserved-but-unused space is at most what was
/// written, and at most this much), which keeps the number of `fallocate`
/// calls logarithmic for files up to this size and linear, in 8 MiB steps,
/// beyond.
pub const PREALLOCATE_STEP_MAX: u64 = 8 * 1024 * 1024;

/// Space to reserve ahead of a file's writes: `fallocate(mode, offset, len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub mode: i32,
    pub offset: u64,
    pub len: u64,
}

/// One upload being written: `<name>.part` until [`PartFile::finish`].
#[derive(Debug)]
pub struct PartFile {
    /// Shared with disk writes in flight (`event_loop::disk`), which must
    /// keep the descriptor open until they complete.
    file: Arc<File>,
    name: String,
    part_path: PathBuf,
    final_path: PathBuf,
    bytes: u64,
    crc: u32,
    /// End of the space reserved with `fallocate` (0: none).
    pub(super) reserved: u64,
    /// False once the filesystem has refused a preallocation.
    preallocate: bool,
    /// Reserve by extending the file's length (see [`PartFile::extend_reserve`]).
    extend_reserve: bool,
    finished: bool,
    /// Announces the file to the retention keeper; dropped with the
    /// `PartFile`, it lets go of the finished file.
    ticket: Option<Ticket>,
}

impl PartFile {
    /// `file`, just created as `<name>.part` in `dir`.
    pub(super) fn new(file: File, dir: &Path, name: String, ticket: Option<Ticket>) -> PartFile {
        PartFile {
            file: Arc::new(file),
            final_path: dir.join(&name),
            part_path: dir.join(format!("{name}{PART_SUFFIX}")),
            name,
            bytes: 0,
            crc: 0,
            reserved: 0,
            preallocate: true,
            extend_reserve: false,
            finished: false,
            ticket,
        }
    }

    /// Appends `data`, updating the byte count and running CRC-32C, with
    /// ordinary writes that may wait for the disk: for tools and tests, not
    /// for a loop (the daemons write through their ring, see
    /// [`PartFile::advance`]).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if let Some(r) = self.reservation_due(data.len() as u64) {
            if let Err(e) = sys::fallocate(&self.file, r.mode, r.offset, r.len) {
                self.reservation_failed(&e);
            }
        }
        (&*self.file).write_all(data)?;
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Counts `len` more bytes as part of the file, for a caller that writes
    /// them itself, at its own offsets, and keeps its own CRC (the proxy's
    /// spool, see `proxy::transfer::spool`). Returns the reservation due
    /// before they are written, if any: the caller performs it (the spool
    /// through the ring, so that it never waits on the loop for the direct
    /// writes in flight) and reports a refusal with
    /// [`PartFile::reservation_failed`].
    pub fn advance(&mut self, len: u64) -> Option<Reservation> {
        let due = self.reservation_due(len);
        self.bytes += len;
        due
    }

    /// From now on, reserve space by extending the file's length rather
    /// than with `FALLOC_FL_KEEP_SIZE`. For a writer whose writes would
    /// otherwise each extend the file: on ext4 an extending `O_DIRECT`
    /// write holds the inode lock until the device is done, so writes in
    /// flight queue up one behind the other; inside the length they do not.
    /// The price: until [`PartFile::finish`] (or `keep_incomplete`) trims
    /// it, the `.part` file is longer than its data, with zeros at the end.
    pub fn extend_reserve(&mut self) {
        self.extend_reserve = true;
    }

    /// The open file, shared (for writes that outlive the call).
    pub fn shared_file(&self) -> &Arc<File> {
        &self.file
    }

    /// The reservation due before `len` more bytes are written, once the
    /// file is past [`PREALLOCATE_AFTER`] (see the module docs). Counted as
    /// made: a refusal reported later only means an unneeded trim.
    fn reservation_due(&mut self, len: u64) -> Option<Reservation> {
        let end = self.bytes + len;
        if !self.preallocate || self.bytes < PREALLOCATE_AFTER || end <= self.reserved {
            return None;
        }
        let from = self.reserved.max(self.bytes);
        let to = end + self.bytes.min(PREALLOCATE_STEP_MAX);
        self.reserved = to;
        Some(Reservation {
            mode: if self.extend_reserve {
                0
            } else {
                libc::FALLOC_FL_KEEP_SIZE
            },
            offset: from,
            len: to - from,
        })
    }

    /// The filesystem refused a reservation: stop asking.
    pub fn reservation_failed(&mut self, e: &io::Error) {
        if self.preallocate {
            log::debug!(
                "{}: no preallocation from here on: {e}",
                self.part_path.display()
            );
        }
        self.preallocate = false;
    }

    /// The length the file must be trimmed to before it is named, when
    /// space was reserved past its data (`None`: nothing to trim).
    pub fn trim_due(&self) -> Option<u64> {
        (self.reserved > self.bytes).then_some(self.bytes)
    }

    /// The caller has trimmed the file (through the ring): naming it need
    /// not trim again.
    pub fn trimmed(&mut self) {
        self.reserved = 0;
    }

    /// Gives back reserved space past the end of the data. On ext4,
    /// truncating to the current length releases blocks that
    /// `FALLOC_FL_KEEP_SIZE` reserved past it.
    fn release_reserve(&mut self) -> io::Result<()> {
        if self.reserved > self.bytes {
            self.file
                .set_len(self.bytes)
                .with_context(|| format!("trimming {}", self.part_path.display()))?;
        }
        self.reserved = 0;
        Ok(())
    }

    /// The stored name (final name, without directory or suffix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// CRC-32C of the bytes written so far.
    pub fn crc32c(&self) -> u32 {
        self.crc
    }

    /// The open file, for reading back what was written (the proxy forwards
    /// from it). Renaming does not disturb an open descriptor.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the file is now: the `.part` path, or the final path once finished.
    pub fn path(&self) -> &Path {
        if self.finished {
            &self.final_path
        } else {
            &self.part_path
        }
    }

    /// True once [`PartFile::finish`] has renamed the file to its final name.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Flushes to disk with `fsync` (the file, then its directory entry after
    /// the rename), for callers that promise durability.
    pub fn sync_data(&self) -> io::Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("syncing {}", self.part_path.display()))
    }

    /// Gives the complete file its final name. After this, the name is a
    /// promise: the file holds the whole upload.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.finished {
            return Ok(());
        }
        self.release_reserve()?;
        sys::rename_no_clobber(&self.part_path, &self.final_path)
            .with_context(|| format!("renaming {} to its final name", self.part_path.display()))?;
        self.finished = true;
        if let Some(ticket) = &mut self.ticket {
            ticket.finished(&self.name, self.bytes);
        }
        Ok(())
    }

    /// Like [`PartFile::finish`], but durable: the file's data is synced
    /// before the rename and the directory entry after it, so once this
    /// returns, the upload survives a power cut under its final name.
    ///
    /// If the directory cannot be synced, the final name's survival is not
    /// promised, so the file is removed and the error returned: the client
    /// is told `ERR` and its retry stores the upload once, not twice.
    pub fn finish_durable(&mut self) -> io::Result<()> {
        self.finish_durable_with(|dir| File::open(dir).and_then(|d| d.sync_all()))
    }

    pub(super) fn finish_durable_with(
        &mut self,
        sync_dir: impl FnOnce(&Path) -> io::Result<()>,
    ) -> io::Result<()> {
        self.release_reserve()?;
        self.sync_data()?;
        self.finish()?;
        let dir = self
            .final_path
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        if let Err(e) = sync_dir(&dir) {
            self.final_removed();
            if let Err(rm) = fs::remove_file(&self.final_path) {
                log::warn!(
                    "removing {} after a failed sync: {rm}",
                    self.final_path.display()
                );
            }
            return Err(e)
                .with_context(|| format!("syncing directory {} (upload removed)", dir.display()));
        }
        Ok(())
    }

    /// The `.part` path and the final path: the rename that
    /// [`PartFile::finish`] does, for a caller that does it itself (the
    /// proxy, through the ring) and then says so with
    /// [`PartFile::named_final`].
    pub fn part_and_final_paths(&self) -> (&Path, &Path) {
        (&self.part_path, &self.final_path)
    }

    /// The caller has renamed the `.part` file to its final name (trimmed
    /// first, if anything was reserved past its data).
    pub fn named_final(&mut self) {
        self.reserved = 0;
        self.finished = true;
        if let Some(ticket) = &mut self.ticket {
            ticket.finished(&self.name, self.bytes);
        }
    }

    /// The caller removes the finished file again (its directory could not
    /// be synced: see [`PartFile::finish_durable`]): the retention keeper
    /// forgets it.
    pub fn final_removed(&mut self) {
        if let Some(ticket) = &mut self.ticket {
            ticket.removed(self.bytes);
        }
    }

    /// Where [`PartFile::keep_incomplete`] puts an unfinished file.
    pub fn incomplete_path(&self) -> PathBuf {
        self.final_path
            .with_file_name(format!("{}{INCOMPLETE_SUFFIX}", self.name))
    }

    /// The caller has renamed the `.part` file to
    /// [`PartFile::incomplete_path`], `bytes` long.
    pub fn named_incomplete(&mut self, bytes: u64) {
        if let Some(ticket) = &mut self.ticket {
            ticket.kept(&format!("{}{INCOMPLETE_SUFFIX}", self.name), bytes);
        }
    }

    /// Lets go of the bookkeeping and hands over the descriptor, for a
    /// caller that closes it itself (the proxy, through the ring).
    pub fn into_file(self) -> Arc<File> {
        self.file
    }

    /// Removes an unfinished file, at once (the server removes its aborted
    /// uploads this way, through its ring).
    pub fn discard(self) {
        if !self.finished {
            if let Err(e) = fs::remove_file(&self.part_path) {
                log::warn!("removing {}: {e}", self.part_path.display());
            }
        }
    }

    /// Renames an unfinished file to `<name>.incomplete` and returns the new
    /// path (the proxy's way with aborted uploads: the bytes stay recoverable,
    /// and the name says they are not the whole upload).
    pub fn keep_incomplete(mut self) -> io::Result<PathBuf> {
        if self.finished {
            return Ok(self.final_path);
        }
        if let Err(e) = self.release_reserve() {
            log::warn!("{e}"); // the bytes matter more than the spare space
        }
        let to = self.incomplete_path();
        sys::rename_no_clobber(&self.part_path, &to).with_context(|| {
            format!("renaming {} to {}", self.part_path.display(), to.display())
        })?;
        if let Some(ticket) = &mut self.ticket {
            ticket.kept(&format!("{}{INCOMPLETE_SUFFIX}", self.name), self.bytes);
        }
        Ok(to)
    }
}
