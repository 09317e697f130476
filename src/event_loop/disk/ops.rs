//! The operations a role can ask of the [`Disk`]: each one a ring entry
//! whose buffers and files the in-flight table owns until its completion
//! (see the module docs of `disk` for the safety argument), or, without a
//! ring, done at once and reported at the next reap.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types};

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
            file: Arc::clone(file),
            fallback: fallback.cloned(),
            owner: Some(owner),
            op,
            refused_direct: false,
            name: None,
        });
        self.start(slot);
    }

    /// Reserves `len` bytes of space at `offset` (`fallocate(mode)`).
    pub fn reserve(&mut self, file: &Arc<File>, mode: i32, offset: u64, len: u64, owner: Owner) {
        let slot = self.insert(file, Some(owner), Op::Reserve);
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
        let slot = self.insert(file, Some(owner), Op::Truncate);
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
        let slot = self.insert(file, Some(owner), Op::Writeback);
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
        let slot = self.insert(dir, Some(owner), Op::Open);
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
        let slot = self.insert(file, Some(owner), Op::Reopen);
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
        let slot = self.insert(file, None, Op::DropCached);
        let entry =
            opcode::Fadvise::new(types::Fd(file.as_raw_fd()), 0, libc::POSIX_FADV_DONTNEED).build();
        self.queue(slot, entry, || sys::drop_cached(file));
    }
}
