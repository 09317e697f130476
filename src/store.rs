//! Files on disk: where uploads land, and how they get their names.
//!
//! Both the server and the proxy store every upload. They share one
//! discipline, so that a file's name always tells the truth about it:
//!
//! 1. **A unique, generated name.** `20261125T124445.123456Z-4242-000017`:
//!    the UTC arrival time (so `ls` sorts by arrival), the process id and a
//!    per-process counter (so two servers sharing a directory, or one server
//!    restarted within a microsecond, never pick the same name). Nothing a
//!    peer sends ever becomes part of a path.
//! 2. **Written as `<name>.part`,** created with `O_EXCL` (`create_new`), so
//!    we never open a file someone else is writing, and with mode 0600.
//! 3. **Renamed to `<name>` only when complete.** `rename` is atomic: a
//!    reader sees either no final name or a finished file, never half of one.
//!    We use `renameat2(RENAME_NOREPLACE)` so a rename can never clobber an
//!    existing file either.
//! 4. **Incomplete uploads** are either removed (the server: the client will
//!    be told the transfer failed, and must send again) or kept as
//!    `<name>.incomplete` (the proxy: its copy is the last one, so a person
//!    may still want the bytes).
//!
//! The CRC-32C of the bytes is computed as they are written, so finishing a
//! file never needs to read it back.
//!
//! **Preallocation.** Once an upload passes [`PREALLOCATE_AFTER`], its file
//! reserves disk space ahead of the writes with
//! `fallocate(FALLOC_FL_KEEP_SIZE)`, in steps that double with the file
//! (up to [`PREALLOCATE_STEP_MAX`]), and gives back what it did not use when
//! it is finished. The file says *when* to reserve
//! ([`PartFile::advance`]); who calls `fallocate` depends on the writer:
//! the server in [`PartFile::write`] (ordinary writes, nothing in flight to
//! wait for), the proxy's spool through `io_uring`, because on a file with
//! `O_DIRECT` writes in flight `fallocate` and `ftruncate` wait for them to
//! complete (8-90 ms measured), and the loop must not. Without it, ext4 does its delayed-allocation bookkeeping
//! (space and quota reservation, the extent-status tree) for every 4 KiB
//! block of every `write`; over already-reserved space a `write` is little
//! more than the copy into the page cache. Measured on this project's
//! machine (1 GiB through the proxy, four interleaved A/B rounds), CPU per
//! GiB went from 0.41-0.44 s to 0.36-0.39 s in the server and from
//! 0.67-0.72 s to 0.58-0.71 s in the proxy.
//!
//! `KEEP_SIZE` leaves the file's length honest while it grows, so a reader
//! (or a person editing a held spool file) never sees reserved space as
//! zeros. Preallocation is only ever an optimisation: if the filesystem
//! refuses it (no support, or no space left to reserve), the file stops
//! asking and the writes themselves decide. The price on a nearly full disk:
//! while uploads are in flight, each holds up to 8 MiB it may not use, and a
//! `.part` file left by a crash keeps its reserve until it is truncated or
//! removed.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::Context;
use crate::retention::{Recorder, Ticket};
use crate::sys;

/// Suffix of a file still being written.
pub const PART_SUFFIX: &str = ".part";
/// Suffix the proxy gives an upload whose client went away before finishing.
pub const INCOMPLETE_SUFFIX: &str = ".incomplete";

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

/// A directory that uploads are stored in, and the name generator for it.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// The directory, open: files are created relative to it through the
    /// ring (see `proxy`'s accept path).
    dir_file: Arc<File>,
    pid: u32,
    seq: u64,
    /// Where finished and kept files are announced (see `retention`).
    recorder: Option<Recorder>,
}

impl Store {
    /// Opens (creating with mode 0700 if needed) the directory `dir` and
    /// checks that we can create files in it, so that a bad `--dir` fails at
    /// startup with a clear message rather than at the first upload.
    ///
    /// Leftover `.part` files (from a crash) are counted and reported in one
    /// warning; they are never touched, and new names never collide with them.
    pub fn open(dir: &Path) -> io::Result<Store> {
        let not_a_dir = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} exists and is not a directory", dir.display()),
            )
        };
        if fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
            return Err(not_a_dir());
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
        let meta =
            fs::metadata(dir).with_context(|| format!("reading directory {}", dir.display()))?;
        if !meta.is_dir() {
            return Err(not_a_dir());
        }
        // Uploads land here and, in hold mode, are read back by name: a
        // directory someone else can write to (or owns) is a way in.
        let me = sys::effective_uid();
        if meta.uid() != me {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refusing directory {}: it is owned by uid {}, not by this process (uid {me})",
                    dir.display(),
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refusing directory {}: other users can write to it (mode {:o}); chmod go-w it",
                    dir.display(),
                    meta.mode() & 0o7777
                ),
            ));
        }
        let dir_file =
            File::open(dir).with_context(|| format!("opening directory {}", dir.display()))?;
        let mut store = Store {
            dir: dir.to_path_buf(),
            dir_file: Arc::new(dir_file),
            pid: std::process::id(),
            seq: 0,
            recorder: None,
        };
        // Probe: the cheapest honest test of "can we create files here" is to
        // create one. Permission bits alone lie (root, ACLs, read-only mounts).
        // O_EXCL and O_NOFOLLOW, like every file we create: never open what
        // someone else put there.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let probe = store
            .dir
            .join(format!(".stopover-probe-{}-{nanos}", store.pid));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&probe)
            .with_context(|| format!("directory {} is not writable", dir.display()))?;
        let _ = fs::remove_file(&probe);
        store.report_leftovers();
        Ok(store)
    }

    /// The directory this store writes into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Announces every file finished or kept from now on to `recorder`
    /// (the retention keeper's books).
    pub fn record_to(&mut self, recorder: Recorder) {
        self.recorder = Some(recorder);
    }

    fn report_leftovers(&mut self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut count = 0usize;
        let mut example = None;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.as_bytes().ends_with(PART_SUFFIX.as_bytes()) {
                count += 1;
                example.get_or_insert_with(|| name.to_string_lossy().into_owned());
            }
        }
        if let Some(example) = example {
            log::warn!(
                "{} leftover {PART_SUFFIX} file(s) in {} (e.g. {example}): unfinished uploads from an earlier run; left untouched",
                count,
                self.dir.display()
            );
        }
    }

    /// Creates a new `<name>.part` file for an incoming upload.
    pub fn create(&mut self) -> io::Result<PartFile> {
        // O_EXCL makes collisions impossible to miss; retrying with the next
        // counter value makes them harmless.
        for _ in 0..MAX_NAME_TRIES {
            let name = self.next_name();
            let part_path = self.dir.join(format!("{name}{PART_SUFFIX}"));
            match OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .mode(0o600)
                .open(&part_path)
            {
                Ok(file) => return Ok(self.adopt(name, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", part_path.display()))
                }
            }
        }
        Err(self.no_free_name())
    }

    /// The next unique name (see the module docs): the time now, our pid
    /// and a counter. For a caller that creates `<name>.part` itself (the
    /// proxy does, through the ring) and then hands it to [`Store::adopt`];
    /// on `EEXIST` it takes the next name.
    pub fn next_name(&mut self) -> String {
        // humantime gives "2026-11-25T12:44:45.123456Z"; drop the separators
        // so the name is compact and free of ':' (awkward on some tools).
        let stamp: String = humantime::format_rfc3339_micros(SystemTime::now())
            .to_string()
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        self.seq += 1;
        format!("{stamp}-{}-{:06}", self.pid, self.seq)
    }

    /// `<name>.part` relative to the directory, for creating it there.
    pub fn part_name(name: &str) -> std::ffi::CString {
        std::ffi::CString::new(format!("{name}{PART_SUFFIX}")).expect("our names have no NUL byte")
    }

    /// The directory, open (files are created relative to it).
    pub fn dir_file(&self) -> &Arc<File> {
        &self.dir_file
    }

    /// Takes `file`, just created as `<name>.part` in this directory (with
    /// `O_EXCL`, mode 0600), as an upload being written.
    pub fn adopt(&self, name: String, file: File) -> PartFile {
        PartFile {
            file: Arc::new(file),
            final_path: self.dir.join(&name),
            part_path: self.dir.join(format!("{name}{PART_SUFFIX}")),
            name,
            bytes: 0,
            crc: 0,
            reserved: 0,
            preallocate: true,
            extend_reserve: false,
            finished: false,
            ticket: self.recorder.as_ref().map(Recorder::ticket),
        }
    }

    /// Removes `<name>.part`, created for an upload that is gone before
    /// it could be written (the proxy's creation through the ring finished
    /// after its transfer ended).
    pub fn remove_part(&self, name: &std::ffi::CStr) {
        let path = self.dir.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        if let Err(e) = fs::remove_file(&path) {
            log::debug!("removing {}: {e}", path.display());
        }
    }

    /// The error when every name tried was taken.
    pub fn no_free_name(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free file name in {}", self.dir.display()),
        )
    }
}

/// How many names [`Store::create`] (and the proxy's creation through the
/// ring) tries before it gives up: a collision needs another process with
/// our pid in the same directory within the same microsecond.
pub const MAX_NAME_TRIES: u32 = 1000;

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
    reserved: u64,
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
    /// Appends `data`, updating the byte count and running CRC-32C. (The
    /// server's way: ordinary writes on the loop, into the page cache. With
    /// no direct I/O in flight on the file, its `fallocate` does not wait
    /// for the device either.)
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
        rename_noreplace(&self.part_path, &self.final_path)
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

    fn finish_durable_with(
        &mut self,
        sync_dir: impl FnOnce(&Path) -> io::Result<()>,
    ) -> io::Result<()> {
        self.release_reserve()?;
        self.sync_data()?;
        self.finish()?;
        let dir = self.final_path.parent().unwrap_or(Path::new("."));
        if let Err(e) = sync_dir(dir) {
            if let Some(ticket) = &mut self.ticket {
                ticket.removed(self.bytes);
            }
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

    /// Removes an unfinished file (the server's way with aborted uploads).
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
        let to = self
            .final_path
            .with_file_name(format!("{}{INCOMPLETE_SUFFIX}", self.name));
        rename_noreplace(&self.part_path, &to).with_context(|| {
            format!("renaming {} to {}", self.part_path.display(), to.display())
        })?;
        if let Some(ticket) = &mut self.ticket {
            ticket.kept(&format!("{}{INCOMPLETE_SUFFIX}", self.name), self.bytes);
        }
        Ok(to)
    }
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match sys::rename_noreplace(from, to) {
        Ok(()) => Ok(()),
        // Old kernel or a filesystem without RENAME_NOREPLACE: link + unlink
        // gives the same no-clobber guarantee (link fails if `to` exists).
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) => {
            fs::hard_link(from, to)?;
            fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_file_life_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut part = store.create().unwrap();
        assert!(part.path().to_string_lossy().ends_with(PART_SUFFIX));
        part.write(b"hello ").unwrap();
        part.write(b"world").unwrap();
        assert_eq!(part.bytes(), 11);
        assert_eq!(part.crc32c(), crc32c::crc32c(b"hello world"));
        part.finish().unwrap();
        assert_eq!(
            fs::read(dir.path().join(part.name())).unwrap(),
            b"hello world"
        );
        assert!(!dir
            .path()
            .join(format!("{}{PART_SUFFIX}", part.name()))
            .exists());
    }

    #[test]
    fn names_are_unique_and_sort_by_arrival() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let names: Vec<String> = (0..50)
            .map(|_| store.create().unwrap().name().to_string())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted, names,
            "names must be unique and already in arrival order"
        );
    }

    /// Space on disk a file takes, from `st_blocks` (512-byte units).
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn large_files_are_preallocated_and_trimmed_when_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..3 * PREALLOCATE_AFTER + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let slack = 64 * 1024; // a filesystem's own metadata blocks
        for keep_incomplete in [false, true] {
            let mut part = store.create().unwrap();
            for chunk in data.chunks(64 * 1024) {
                part.write(chunk).unwrap();
            }
            if part.reserved <= part.bytes() {
                // This filesystem refused `fallocate`: nothing to trim.
                eprintln!("no preallocation on {}; skipping", dir.path().display());
                return;
            }
            // Reserved space shows while the file is written, but the
            // file's length stays the number of bytes written...
            assert!(allocated(part.path()) > part.bytes() + PREALLOCATE_AFTER / 2);
            assert_eq!(fs::metadata(part.path()).unwrap().len(), data.len() as u64);
            // ...and is given back when the file is finished or kept.
            let path = if keep_incomplete {
                part.keep_incomplete().unwrap()
            } else {
                part.finish().unwrap();
                part.path().to_path_buf()
            };
            assert!(
                allocated(&path) <= data.len() as u64 + slack,
                "{} bytes allocated for {} bytes of data",
                allocated(&path),
                data.len()
            );
            assert_eq!(fs::read(&path).unwrap(), data);
        }
    }

    #[test]
    fn discard_and_keep_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut a = store.create().unwrap();
        a.write(b"x").unwrap();
        let a_path = a.path().to_path_buf();
        a.discard();
        assert!(!a_path.exists());
        let mut b = store.create().unwrap();
        b.write(b"y").unwrap();
        let kept = b.keep_incomplete().unwrap();
        assert!(kept.to_string_lossy().ends_with(INCOMPLETE_SUFFIX));
        assert_eq!(fs::read(kept).unwrap(), b"y");
    }

    #[test]
    fn finish_never_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut part = store.create().unwrap();
        fs::write(dir.path().join(part.name()), b"someone else's").unwrap();
        let err = part.finish().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
    }

    #[test]
    fn a_failed_directory_sync_removes_the_final_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut part = store.create().unwrap();
        part.write(b"synced, but its name is not").unwrap();
        let err = part
            .finish_durable_with(|_| Err(io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert!(err.to_string().contains("upload removed"), "{err}");
        assert!(
            fs::read_dir(dir.path()).unwrap().next().is_none(),
            "no final (or partial) file is left for a retry to duplicate"
        );
        let mut part = store.create().unwrap();
        part.write(b"fine").unwrap();
        part.finish_durable().unwrap();
        assert_eq!(fs::read(dir.path().join(part.name())).unwrap(), b"fine");
    }

    #[test]
    fn unusable_directory_fails_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, b"").unwrap();
        assert!(Store::open(&file).is_err());
        assert!(Store::open(&file.join("sub")).is_err());
    }
}
