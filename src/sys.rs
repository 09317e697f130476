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
//! | `fcntl(F_SETFL, O_DIRECT)` | the proxy's spool | no std API |
//! | `fallocate(FALLOC_FL_KEEP_SIZE)` | the store | no std API |
//! | `renameat2(RENAME_NOREPLACE)` | the store | `fs::rename` replaces |
//! | `geteuid` | the store (who owns a directory) | no std API |
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

/// `fallocate(FALLOC_FL_KEEP_SIZE)`: reserves `len` bytes of disk from
/// `offset` without changing the file's length.
pub fn fallocate_keep_size(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "offset out of range",
        ));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is
    // owned by `file`, which outlives the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Turns `O_DIRECT` on or off for an open file (`fcntl(F_SETFL)`): its
/// writes then go from our buffer to the device, bypassing the page cache,
/// and must be aligned. Filesystems without direct I/O answer `EINVAL`.
pub fn set_direct_io(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL takes no argument beyond the descriptor, which
    // `file` keeps open for the call.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above; F_SETFL reads one integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `renameat2(RENAME_NOREPLACE)`: renames `from` to `to`, failing with
/// `AlreadyExists` instead of replacing an existing `to`. Kernels or
/// filesystems without the flag answer `ENOSYS` or `EINVAL`; the caller
/// chooses the fallback.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
    };
    let (c_from, c_to) = (cstr(from)?, cstr(to)?);
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

/// The effective user id of this process: who owns what we create.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}
