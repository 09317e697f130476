//! Every direct call into the C library, each with its SAFETY note.
//!
//! The standard library, mio and socket2 cover almost everything stopover
//! does with the kernel. What they do not cover is here, as small safe
//! functions that take Rust types and return `io::Result`, so that a reader
//! can audit the unsafe code at once. (The one other file with `unsafe` is
//! `event_loop::disk`: buffers that the kernel reads after the call that
//! queued them has returned, which no wrapper can make safe by itself; its
//! safety argument is ownership, stated there.)
//!
//! | call | used by | why std does not have it |
//! |---|---|---|
//! | `getrlimit`/`setrlimit` | the accept gate, the load generator | no std API |
//! | `setsockopt(SO_RCVLOWAT)` | the server | neither std nor socket2 |
//! | `ioctl(SIOCOUTQ)` | the proxy's cut answer (has the client taken it all?), the tests | neither std nor socket2 |
//! | `sync_file_range`, `posix_fadvise` | the disk's fallback without a ring | no std API |
//! | `statx(STATX_DIOALIGN)` | the proxy's spool (may it use `O_DIRECT`?) | no std API |
//! | `fallocate` | the store | no std API |
//! | `openat` | the disk's fallback without a ring (creating a spool file) | std opens by path only |
//! | `renameat2(RENAME_NOREPLACE)` | the store | `fs::rename` replaces |
//! | `geteuid` | the store (who owns a directory) | no std API |
//! | `fstatvfs` | retention (`--min-free`) | no std API |
//! | `io_uring` `unlinkat` | retention ([`UnlinkRing`]) | no std API: an unlink that does not wait |
//! | `mmap` + `mincore` | the bench and the tests (page cache a file holds) | no std API |
//!
//! Every function here is a thin wrapper: no policy, no retries, no logging.
//! Callers decide what an error means.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new
/// soft limit. Each connection costs the server two descriptors and the
/// proxy three, and the usual soft default of 1024 would cap us far below
/// what the machine allows.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct we pass, which lives
    // for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Grows this process's descriptor table now to hold descriptors up to
/// `n`, so that it never grows under load. Growing it (each time a new
/// descriptor passes a power of two) waits for an RCU grace period when
/// the process has more than one thread: milliseconds, seen on the proxy's
/// loop in `accept4` and in the ring's `openat` under 1,000 streams. The
/// table keeps its size once grown: a descriptor duplicated to `n - 1` and
/// closed again is enough.
pub fn grow_descriptor_table(n: u64) -> io::Result<()> {
    let top = libc::c_int::try_from(n.saturating_sub(1)).unwrap_or(libc::c_int::MAX);
    let probe = std::fs::File::open("/dev/null")?;
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own (borrowed from
    // `probe` for the call) returns a new descriptor or -1.
    let fd = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just made for us and nothing else refers to it.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Sets `SO_RCVLOWAT`: readiness for reading is reported only once `bytes`
/// are queued (or at EOF or an error). A non-blocking read still returns
/// whatever is there.
pub fn set_recv_low_water(sock: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is open for the duration of the call (the
    // borrow of `sock` guarantees it); we pass a pointer to a c_int that
    // outlives the call, and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `ioctl(SIOCOUTQ)`: the bytes in a TCP socket's send queue that the
/// other end has not acknowledged yet (sent or not). Zero means every byte
/// written is in the peer's kernel. Never waits.
pub fn unacked_bytes(sock: &impl AsRawFd) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: the descriptor is open for the duration of the call (the
    // borrow of `sock` guarantees it); SIOCOUTQ (the same request number
    // as TIOCOUTQ on Linux) writes one c_int through the pointer, which
    // points at ours for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(queued).unwrap_or(0))
}

/// `openat(2)`: opens `name` in the directory `dir` with `flags` and
/// `mode` (for creating files relative to a directory descriptor, as the
/// ring's `openat` does).
pub fn open_at(
    dir: &File,
    name: &std::ffi::CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<File> {
    // SAFETY: `name` is a valid C string for the duration of the call, and
    // the descriptor is owned by `dir`, which outlives it.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative result is a new descriptor, ours alone.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `fallocate(2)` with `mode` (0: reserve and extend the file's length;
/// `FALLOC_FL_KEEP_SIZE`: reserve only).
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "offset out of range",
        ));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is
    // owned by `file`, which outlives the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What `O_DIRECT` needs of `file`, from `statx(STATX_DIOALIGN)`: the
/// alignment of buffers in memory and of offsets and lengths, in bytes (`0`:
/// no direct I/O on this file). `None` where the kernel or the filesystem
/// does not say (before Linux 6.1, or a filesystem that does not report it).
pub fn dio_alignment(file: &File) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: statx is plain old data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH names the open descriptor
    // (kept open by `file` for the call); statx writes only into `stx`,
    // which outlives the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align)))
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: starts writeback of the
/// dirty pages in the range, without waiting for it.
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    // SAFETY: integer arguments only; `file` keeps the descriptor open.
    let rc = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)` on the whole file: drops its clean
/// pages from the page cache (dirty ones stay until written back).
pub fn drop_cached(file: &File) -> io::Result<()> {
    // SAFETY: integer arguments only; `file` keeps the descriptor open.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// `renameat2(RENAME_NOREPLACE)`: renames `from` to `to`, failing with
/// `AlreadyExists` instead of replacing an existing `to`. Kernels or
/// filesystems without the flag answer `ENOSYS` or `EINVAL`; the caller
/// chooses the fallback.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (c_from, c_to) = (cpath(from)?, cpath(to)?);
    // SAFETY: both arguments are valid NUL-terminated strings that outlive
    // the call; renameat2 does not keep the pointers.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `path` as a C string, for a system call or the ring.
pub fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`:
/// [`rename_noreplace`], or, on a kernel or filesystem without
/// `RENAME_NOREPLACE`, `link` + `unlink`, which gives the same no-clobber
/// guarantee (`link` fails if `to` exists).
pub fn rename_no_clobber(from: &Path, to: &Path) -> io::Result<()> {
    match rename_noreplace(from, to) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        r => r,
    }
}

/// Space on the filesystem that holds `file` (`fstatvfs`), in bytes:
/// `(available, total)`. Available is what an unprivileged writer may
/// still use (`f_bavail`), the figure `df` shows.
pub fn fs_space(file: &File) -> io::Result<(u64, u64)> {
    // SAFETY: statvfs is plain old data, so all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call (borrowed from `file`);
    // fstatvfs writes only into `st`, which outlives the call.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok((
        (st.f_bavail as u64).saturating_mul(unit),
        (st.f_blocks as u64).saturating_mul(unit),
    ))
}

/// The effective user id of this process: who owns what we create.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// Bytes of `file` in the page cache now, page by page (what `fincore(1)`
/// prints), from `mincore(2)` on a mapping that touches nothing.
pub fn page_cache_bytes(file: &File) -> io::Result<u64> {
    let len = usize::try_from(file.metadata()?.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: sysconf has no memory arguments.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut resident = vec![0u8; len.div_ceil(page)];
    // SAFETY: a shared read-only mapping of an open file (`file` keeps the
    // descriptor open for the call); it is only passed to mincore, never
    // read, and unmapped before returning.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `at` maps `len` bytes; mincore writes one byte per page into
    // `resident`, which has exactly that many.
    let rc = unsafe { libc::mincore(at, len, resident.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(at, len) };
    if rc != 0 {
        return Err(err);
    }
    Ok(resident.iter().filter(|r| **r & 1 == 1).count() as u64 * page as u64)
}

/// Unlinks done by the kernel, off the calling thread: a small `io_uring`
/// of its own, whose `unlinkat` requests the kernel always runs in one of
/// its worker threads (`iou-wrk-*`). Handing one over costs one
/// `io_uring_enter` that does not wait; what the unlink itself costs
/// (freeing the file's blocks, waiting for the journal) is paid there.
///
/// Nothing is registered with a poll: the caller looks for completions
/// ([`UnlinkRing::reap`], which reads shared memory, no system call).
pub struct UnlinkRing {
    ring: io_uring::IoUring,
    /// The paths of the unlinks in flight, by id. The kernel copies a path
    /// when the request is submitted; we keep it until the completion all
    /// the same, so no reading of the kernel's can outlive it.
    in_flight: std::collections::HashMap<u64, CString>,
    next_id: u64,
}

impl UnlinkRing {
    /// A ring for up to `entries` unlinks in flight.
    pub fn new(entries: u32) -> io::Result<UnlinkRing> {
        Ok(UnlinkRing {
            ring: io_uring::IoUring::new(entries)?,
            in_flight: std::collections::HashMap::new(),
            next_id: 0,
        })
    }

    /// Unlinks in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Queues the unlink of `path` (for the next [`UnlinkRing::submit`]);
    /// returns its id, which [`UnlinkRing::reap`] reports with the result.
    /// `WouldBlock` when the queue is full.
    pub fn unlink(&mut self, path: &Path) -> io::Result<u64> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        self.next_id += 1;
        let id = self.next_id;
        let entry =
            io_uring::opcode::UnlinkAt::new(io_uring::types::Fd(libc::AT_FDCWD), c_path.as_ptr())
                .build()
                .user_data(id);
        // SAFETY: the entry points at `c_path`, which is stored in
        // `in_flight` below and stays there (a CString's buffer does not
        // move when the CString does) until its completion is reaped.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "unlink ring full",
            ));
        }
        self.in_flight.insert(id, c_path);
        Ok(id)
    }

    /// Hands every queued unlink to the kernel in one `io_uring_enter`
    /// that does not wait.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// The unlinks that have completed since the last call: each id with
    /// its result.
    pub fn reap(&mut self) -> Vec<(u64, io::Result<()>)> {
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let id = cqe.user_data();
            self.in_flight.remove(&id);
            let result = match cqe.result() {
                r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                _ => Ok(()),
            };
            done.push((id, result));
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FDSize` in /proc/self/status: the descriptor table's size.
    fn table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("FDSize:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn the_descriptor_table_is_grown_at_once_and_stays_grown() {
        // Other tests of this process may have grown the table already:
        // the check runs in a fresh one (this test binary, this test alone).
        const CHILD: &str = "STOPOVER_TEST_FDTABLE_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let limit = raise_nofile_limit().unwrap();
            let before = table_size();
            let want = (before * 4).min(limit);
            assert!(want > before, "the limit ({limit}) leaves no room to grow");
            grow_descriptor_table(want).unwrap();
            assert!(table_size() >= want, "{} < {want}", table_size());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sys::tests::the_descriptor_table_is_grown_at_once_and_stays_grown",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("1 passed"), "the check ran: {text}");
    }
}
