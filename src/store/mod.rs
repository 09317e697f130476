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
//! ([`PartFile::advance`]); the writer calls `fallocate`: both daemons
//! through `io_uring` (`server::upload`, the proxy's spool), because a
//! reservation can wait for the device (on a file with `O_DIRECT` writes
//! in flight, `fallocate` and `ftruncate` wait for them to complete: 8-90 ms
//! measured), and the loop must not; [`PartFile::write`] does it in line,
//! for tools and tests. Without it, ext4 does its delayed-allocation bookkeeping
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
//!
//! The code: this file is the directory and its names ([`Store`]); `part`
//! is one upload being written ([`PartFile`]): its byte count and CRC,
//! the space it reserves ahead, and how it ends.

mod part;

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::Context;
use crate::retention::Recorder;
use crate::sys;

/// Suffix of a file still being written.
pub const PART_SUFFIX: &str = ".part";
/// Suffix the proxy gives an upload whose client went away before finishing.
pub const INCOMPLETE_SUFFIX: &str = ".incomplete";

pub use part::{PartFile, Reservation, PREALLOCATE_AFTER, PREALLOCATE_STEP_MAX};

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
        PartFile::new(
            file,
            &self.dir,
            name,
            self.recorder.as_ref().map(Recorder::ticket),
        )
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
