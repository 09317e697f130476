//! The operations a role can ask of the [`Disk`]: each one a ring entry
//! whose buffers and files the in-flight table owns until its completion
//! (see the module docs of `disk` for the safety argument), or, without a
//! ring, done at once and reported at the next reap.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use super::{Buf, Disk, InFlight, Op, Owner};
use crate::sys;

impl Disk {
    /// Writes the first `len` bytes of `buf` at `offset` of `file`, for
    /// `owner`, who hears of it through [`Disk::reap`]. If `file` is
    /// `O_DIRECT` (`fallback` is then the same file without it), `offset`
    /// and `len` must be multiples of [`ALIGN`]. A chunk must not change
    /// from now on (it is marked submitted).
    pub fn write(
        &mut self,
        file: &Arc<File>,
        fallback: Option<&Arc<File>>,
        offset: u64,
        buf: Buf,
        len: usize,
        owner: Owner,
    ) {
        debug_assert!(len <= buf.bytes().len());
        if let Buf::Chunk(c) = &buf {
            c.mark_submitted();
        }
        self.counters.writes += 1;
        self.counters.bytes += len as u64;
        let op = Op::Write {
            offset,
            len,
            direct: fallback.is_some(),
        };
        let slot = self.in_flight.insert(InFlight {
            buf: Some(buf),
            file: Some(Arc::clone(file)),
            fallback: fallback.cloned(),
            owner: Some(owner),
            op,
            refused_direct: false,
            name: None,
            to: None,
            skip: 0,
        });
        self.start(slot);
    }

    /// Reserves `len` bytes of space at `offset` (`fallocate(mode)`).
    pub fn reserve(&mut self, file: &Arc<File>, mode: i32, offset: u64, len: u64, owner: Owner) {
        let slot = self.insert(Some(file), Some(owner), Op::Reserve);
        let entry = opcode::Fallocate::new(types::Fd(file.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        self.queue(slot, entry, || sys::fallocate(file, mode, offset, len));
    }

    /// Sets the file's length to `len` (`ftruncate`). The caller issues it
    /// only when nothing else of the file is in flight: the ring keeps no
    /// order, and a write or a reservation completing after it would undo it.
    pub fn truncate(&mut self, file: &Arc<File>, len: u64, owner: Owner) {
        let slot = self.insert(Some(file), Some(owner), Op::Truncate);
        let entry = opcode::Ftruncate::new(types::Fd(file.as_raw_fd()), len).build();
        let can = self.ring.as_ref().is_some_and(|r| r.can_truncate);
        if can {
            self.queue(slot, entry, || Ok(()));
        } else {
            // No ring, or a kernel without the opcode: at once. Nothing of
            // this file is in flight (see above), so nothing makes it wait.
            let result = file.set_len(len);
            self.complete(slot, result);
        }
    }

    /// Starts writeback of `len` bytes at `offset` without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
    pub fn writeback(&mut self, file: &Arc<File>, offset: u64, len: u64, owner: Owner) {
        let slot = self.insert(Some(file), Some(owner), Op::Writeback);
        let entry = opcode::SyncFileRange::new(types::Fd(file.as_raw_fd()), len as u32)
            .offset(offset)
            .flags(libc::SYNC_FILE_RANGE_WRITE)
            .build();
        self.queue(slot, entry, || sys::start_writeback(file, offset, len));
    }

    /// Creates `name` in the directory `dir` (`O_CREAT | O_EXCL`, mode
    /// 0600, read-write), for `owner`, whose completion carries the file
    /// ([`Done::opened`]) or the error (`EEXIST` when the name is taken).
    pub fn open(&mut self, dir: &Arc<File>, name: CString, owner: Owner) {
        const FLAGS: i32 = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
        let slot = self.insert(Some(dir), Some(owner), Op::Open);
        let w = &mut self.in_flight[slot];
        let name = w.name.insert(name);
        let Some(ring) = self.ring.as_mut() else {
            let result = sys::open_at(dir, name, FLAGS, 0o600);
            self.complete_open(slot, result);
            return;
        };
        let entry = opcode::OpenAt::new(types::Fd(dir.as_raw_fd()), name.as_ptr())
            .flags(FLAGS)
            .mode(0o600)
            .build()
            .user_data(slot as u64);
        // SAFETY: the name (a heap buffer that does not move) and the
        // directory are owned by the in-flight entry until the completion
        // is reaped.
        unsafe { ring.push(entry) };
    }

    /// Opens `path` (absolute), which `file` already is, again with
    /// `flags` (`O_DIRECT` for the spool), for `owner`, whose completion
    /// carries the new descriptor ([`Done::opened`]). A path lookup can
    /// wait for the directory's lock while the ring creates files in it:
    /// up to 14 ms on the loop under 1,000 streams. Only with a ring: the
    /// caller does without the second descriptor otherwise.
    pub fn reopen(&mut self, file: &Arc<File>, path: CString, flags: i32, owner: Owner) {
        let slot = self.insert(Some(file), Some(owner), Op::Reopen);
        let w = &mut self.in_flight[slot];
        let path = w.name.insert(path);
        let entry = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .flags(flags | libc::O_CLOEXEC)
            .build()
            .user_data(slot as u64);
        match self.ring.as_mut() {
            // SAFETY: the path (a heap buffer that does not move) is owned
            // by the in-flight entry until the completion is reaped.
            Some(ring) => unsafe { ring.push(entry) },
            None => {
                let e = io::Error::new(io::ErrorKind::Unsupported, "no ring");
                self.complete_open(slot, Err(e));
            }
        }
    }

    /// Drops the file's clean pages from the page cache. Nobody hears of
    /// its completion: it is advice.
    pub fn drop_cached(&mut self, file: &Arc<File>) {
        let slot = self.insert(Some(file), None, Op::DropCached);
        let entry =
            opcode::Fadvise::new(types::Fd(file.as_raw_fd()), 0, libc::POSIX_FADV_DONTNEED).build();
        self.queue(slot, entry, || sys::drop_cached(file));
    }

    /// Renames `from` to `to` (paths), failing with `EEXIST` rather than
    /// replace a file at `to` (`renameat2(RENAME_NOREPLACE)`), for `owner`.
    /// A rename takes its directory's lock, which the creations and
    /// removals in that directory take too: on the loop it waited up to
    /// 11 ms under 1,000 streams. The kernel always hands a rename from the
    /// ring to one of its workers.
    pub fn rename(&mut self, from: CString, to: CString, owner: Owner) {
        let slot = self.insert(None, Some(owner), Op::Rename);
        let w = &mut self.in_flight[slot];
        let from = w.name.insert(from);
        let to = w.to.insert(to);
        let entry = opcode::RenameAt::new(
            types::Fd(libc::AT_FDCWD),
            from.as_ptr(),
            types::Fd(libc::AT_FDCWD),
            to.as_ptr(),
        )
        .flags(libc::RENAME_NOREPLACE)
        .build()
        .user_data(slot as u64);
        match self.ring.as_mut().filter(|r| r.can_name) {
            // SAFETY: both paths (heap buffers that do not move) are owned
            // by the in-flight entry until the completion is reaped.
            Some(ring) => unsafe { ring.push(entry) },
            None => {
                let result = crate::sys::rename_no_clobber(path(from), path(to));
                self.complete(slot, result);
            }
        }
    }

    /// Removes `name` (a path), for `owner` if there is one to hear of it.
    pub fn unlink(&mut self, name: CString, owner: Option<Owner>) {
        let slot = self.insert(None, owner, Op::Unlink);
        let w = &mut self.in_flight[slot];
        let name = w.name.insert(name);
        let entry = opcode::UnlinkAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr())
            .build()
            .user_data(slot as u64);
        match self.ring.as_mut().filter(|r| r.can_name) {
            // SAFETY: the path is owned by the in-flight entry until the
            // completion is reaped.
            Some(ring) => unsafe { ring.push(entry) },
            None => {
                let result = std::fs::remove_file(path(name));
                self.complete(slot, result);
            }
        }
    }

    /// Flushes `file` to the device (`fsync`), for `owner`.
    pub fn fsync(&mut self, file: &Arc<File>, owner: Owner) {
        let slot = self.insert(Some(file), Some(owner), Op::Fsync);
        let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd())).build();
        self.queue(slot, entry, || file.sync_all());
    }

    /// Lets go of one reference to `file`. The last one closes it, through
    /// the ring and in one of the kernel's workers (`IOSQE_ASYNC`): closing
    /// a file's last descriptor runs the filesystem's release work (ext4
    /// gives back preallocated blocks, under a lock that completing direct
    /// writes hold too), and a `close` from the loop, or one the ring runs
    /// inline, does that work on the loop's thread: up to 8 ms under 1,000
    /// streams. Without a ring, the file is closed at once.
    pub fn release(&mut self, file: Arc<File>) {
        let Ok(file) = Arc::try_unwrap(file) else {
            return; // someone else still holds it, and will release it
        };
        if !self.ring.as_ref().is_some_and(|r| r.can_name) {
            drop(file);
            return;
        }
        let fd = file.into_raw_fd();
        let slot = self.insert(None, None, Op::Close);
        let entry = opcode::Close::new(types::Fd(fd))
            .build()
            .flags(squeue::Flags::ASYNC)
            .user_data(slot as u64);
        if let Some(ring) = self.ring.as_mut() {
            // SAFETY: the descriptor is the kernel's to close from now on:
            // nothing of ours refers to it any more.
            unsafe { ring.push(entry) };
        }
    }
}

/// A path the ring was given, as a path again (for the synchronous way).
pub(super) fn path(name: &CStr) -> &Path {
    Path::new(OsStr::from_bytes(name.to_bytes()))
}
