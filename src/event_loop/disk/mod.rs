//! Disk work that neither copies into the page cache nor waits on the loop.
//!
//! A recording proxy writes every byte it relays. Written the ordinary way,
//! each byte is copied into the page cache: the loop's CPU does the copy,
//! the cache grows by everything recorded recently (evicting the cache of
//! every other process on the host), and writeback happens later on
//! someone's time. Profiled under load (1,000 uploads streaming at once,
//! issue 12), 44% of the proxy's CPU was that copy, and the server behind
//! it did twice its direct CPU per GiB because its own page-cache pages
//! had become expensive to fill.
//!
//! So the proxy writes its spool with **`O_DIRECT` through `io_uring`**:
//!
//! - the bytes live in [`Chunk`]s, aligned buffers of [`CHUNK`] bytes that
//!   the client's data is read straight into, that the upstream is sent
//!   from, and that the disk takes by DMA: one copy in, one copy out, none
//!   to disk, and no page cache;
//! - a full chunk is handed to the kernel as one asynchronous write
//!   ([`Disk::write`]); the loop goes on at once, and the completion comes
//!   back through the ring, whose descriptor is registered with the poll
//!   like any socket (token [`DISK`](super::DISK)): *disk completions are
//!   just one more kind of readiness*;
//! - submissions are batched: everything queued while handling one batch of
//!   events goes to the kernel in one `io_uring_enter` ([`Disk::submit`]),
//!   just before the loop polls again.
//!
//! **Everything that can wait for the device goes through the ring**, not
//! only the writes: creating a spool file ([`Disk::open`], `openat` with
//! `O_CREAT`, which allocates an inode and may read the disk's bitmaps:
//! up to 255 ms on the loop under a 1,000-stream load, the largest stall
//! left after the writes had moved), reserving space ([`Disk::reserve`], `fallocate`),
//! trimming ([`Disk::truncate`], `ftruncate`), starting writeback
//! ([`Disk::writeback`]), dropping cached pages ([`Disk::drop_cached`]),
//! naming and removing files ([`Disk::rename`], [`Disk::unlink`]: both take
//! the directory's lock, which creations in it hold too), syncing
//! ([`Disk::fsync`]) and closing ([`Disk::release`]: the last `close` of a
//! file runs the filesystem's release work, so it goes to a kernel worker).
//! Measured on this project's VM (issue 18), a plain `fallocate` or
//! `ftruncate` on a file with `O_DIRECT` writes in flight returns only once
//! they complete: 8-13 ms with four 4 MiB writes in flight, 28-55 ms with
//! sixteen, and every connection of the loop waits meanwhile. Through the
//! ring the kernel's own workers do that waiting. The ring keeps no order
//! between entries, so the one operation whose order matters, trimming a
//! file to its length, is issued by the spool only when nothing else of
//! that file is in flight.
//!
//! **Ownership is the safety argument.** The kernel reads a buffer after
//! the call that queued it has returned, so a buffer in flight is owned
//! (shared, for a [`Chunk`]: `Arc`, as the daemon may be built on one
//! thread and run on another) by the in-flight table here, and so is the
//! file; both stay alive until the completion is reaped, even if the
//! transfer that wrote them is long gone. If the completions never come
//! (the `Disk` is dropped with operations in flight and they do not finish
//! within [`DROP_WAIT`]), their buffers are leaked, never freed under the
//! kernel's feet.
//!
//! **Fallbacks.** Where `io_uring` cannot be set up (an old kernel, a
//! sandbox that forbids it, `kernel.io_uring_disabled`, or
//! `STOPOVER_NO_IO_URING=1`) every operation is done at once and its
//! completion queued for the next reap, so callers see one behaviour; the
//! spool then writes through the page cache (a synchronous `O_DIRECT` write
//! would hold the loop for the device's whole write time), see
//! `proxy::transfer::spool`. A direct write the device refuses (`EINVAL`:
//! it accepted `O_DIRECT` at open but not this write) is written again
//! through the page cache, and its completion says so.
//!
//! **Memory is a budget, shared.** All the chunks of all transfers together
//! may take at most `--spool-memory` ([`DEFAULT_BUDGET`]); a transfer that
//! needs a chunk when none is left does not read its client (its bytes wait
//! in the kernel, as with any back-pressure) and queues for one
//! ([`Disk::wait`]); the loop wakes the queue, oldest first, as chunks come
//! back ([`Disk::wakeups`]). Under pressure (half the budget in use), a
//! transfer that runs out of bytes to read hands its partial chunk to the
//! disk at once instead of keeping it, so that idle transfers hold no chunk,
//! only their last partial block (under 4 KiB). So memory stays bounded
//! however many transfers stream at once, and with few of them every disk
//! write is a whole chunk.
//!
//! Chunks that come back are kept for reuse (within the budget), because on
//! a VM memory that is freed and reallocated is slow to touch again.
//!
//! The code is split by concept: `chunk` (the aligned buffers), `budget`
//! (the pool, the budget and its queue, the metrics), `ring` (the
//! `io_uring` and every way a call into it can fail), `ops` (each
//! operation a role can ask for), and this file (the in-flight table:
//! submission, completion, draining).

mod budget;
mod chunk;
mod ops;
mod ring;

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};
use mio::unix::SourceFd;
use mio::{Interest, Registry};
use slab::Slab;

pub use chunk::{Chunk, ALIGN, CHUNK};
use ring::Ring;
pub use ring::NO_RING_ENV;

/// Default memory budget for chunks (`--spool-memory`): staging, waiting
/// for the upstream, and in flight to the disk, all transfers together.
pub const DEFAULT_BUDGET: usize = 8 * 1024 * 1024;

/// The smallest budget, in chunks, whatever `--spool-memory` says: enough
/// for one transfer to stream (staging, one waiting for the upstream, two
/// in flight).
pub const MIN_CHUNKS: usize = 4;

/// How long dropping a [`Disk`] (or [`Disk::drain`]) waits for operations
/// in flight before it leaks their buffers instead.
pub const DROP_WAIT: Duration = Duration::from_secs(10);

/// Whose operation a completion is: a connection's slab key and its
/// identity (keys are reused; identities are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    pub key: usize,
    pub id: u64,
}

/// The bytes a write takes: a chunk, shared with the spool that forwards
/// it, or a few bytes of its own (a file's last partial block).
#[derive(Debug)]
pub enum Buf {
    Chunk(Arc<Chunk>),
    Bytes(Box<[u8]>),
}

impl Buf {
    fn bytes(&self) -> &[u8] {
        match self {
            Buf::Chunk(c) => c.filled(),
            Buf::Bytes(b) => b,
        }
    }
}

/// What an operation was, as its completion reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `len` bytes at `offset`; `direct` if through an `O_DIRECT` file.
    /// (A short write is written on from where it stopped; if the rest
    /// fails, the write completes as a failed write of the part that was
    /// not written, with the kernel's reason: `ENOSPC`, `EFBIG`...)
    Write {
        offset: u64,
        len: usize,
        direct: bool,
    },
    /// `fallocate`.
    Reserve,
    /// `ftruncate`.
    Truncate,
    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)`.
    Writeback,
    /// `posix_fadvise(DONTNEED)`.
    DropCached,
    /// `openat(O_CREAT | O_EXCL)`: the new file is in [`Done::opened`].
    Open,
    /// `open` of an existing file by path with other flags (the spool's
    /// `O_DIRECT` descriptor): the descriptor is in [`Done::opened`].
    Reopen,
    /// `renameat2(RENAME_NOREPLACE)`: fails with `EEXIST` rather than
    /// replace a file.
    Rename,
    /// `unlinkat`.
    Unlink,
    /// `fsync`.
    Fsync,
    /// `close` of a file's last descriptor (nobody hears of it).
    Close,
}

impl Op {
    /// The operation's name, for trace lines.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Reserve => "fallocate",
            Op::Truncate => "ftruncate",
            Op::Writeback => "writeback",
            Op::DropCached => "fadvise",
            Op::Open => "open",
            Op::Reopen => "reopen",
            Op::Rename => "rename",
            Op::Unlink => "unlink",
            Op::Fsync => "fsync",
            Op::Close => "close",
        }
    }
}

/// A finished operation, for its owner.
#[derive(Debug)]
pub struct Done {
    pub owner: Owner,
    pub op: Op,
    pub result: io::Result<()>,
    /// A direct write the device refused, written through the page cache
    /// instead (see the module docs): the file should stay buffered.
    pub refused_direct: bool,
    /// [`Op::Open`]: the file created, and its name in its directory.
    pub opened: Option<File>,
    pub name: Option<CString>,
}

impl std::fmt::Display for Done {
    /// `write done`, `fsync done (failed)`: for its owner's trace line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let failed = if self.result.is_err() {
            " (failed)"
        } else {
            ""
        };
        write!(f, "{} done{failed}", self.op.name())
    }
}

/// An operation the kernel has: what must outlive it.
struct InFlight {
    buf: Option<Buf>,
    /// The file operated on (`None` for operations on names alone).
    file: Option<Arc<File>>,
    /// Where a refused direct write is written again.
    fallback: Option<Arc<File>>,
    owner: Option<Owner>,
    op: Op,
    refused_direct: bool,
    /// [`Op::Open`]: the name the kernel reads (relative to `file`, the
    /// directory), kept alive until the completion; the path renamed or
    /// removed for [`Op::Rename`] and [`Op::Unlink`].
    name: Option<CString>,
    /// [`Op::Rename`]: the new path.
    to: Option<CString>,
    /// [`Op::Write`]: bytes of the buffer already written (a short write
    /// goes on from there).
    skip: usize,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskCounters {
    pub writes: u64,
    pub bytes: u64,
    /// Bytes a spool wrote through the page cache because the disk was
    /// behind (see `proxy::transfer::spool`).
    pub overflow_bytes: u64,
    /// Direct writes refused by the device and written buffered.
    pub refused_direct: u64,
}

/// The loop's asynchronous disk (see the module docs).
pub struct Disk {
    ring: Option<Ring>,
    in_flight: Slab<InFlight>,
    /// Completions not yet handed to their owners.
    done: Vec<Done>,
    pool: Vec<Chunk>,
    /// Chunks alive (in the pool, held by spools, in flight).
    alive: Arc<AtomicUsize>,
    /// Most chunks out of the pool at once.
    budget: usize,
    /// Owners waiting for a chunk, oldest first.
    waiters: std::collections::VecDeque<Owner>,
    pub counters: DiskCounters,
    /// Made with [`Disk::new`] for a role that writes through it.
    used: bool,
}

impl Disk {
    /// Sets up a ring and registers it with `registry` under `token`, or,
    /// where that fails, the synchronous fallback.
    pub fn new(registry: &Registry, token: mio::Token, role: &str, budget: usize) -> Disk {
        let ring = match Ring::new() {
            Ok(ring) => {
                let fd = ring.fd();
                match registry.register(&mut SourceFd(&fd), token, Interest::READABLE) {
                    Ok(()) => Some(ring),
                    Err(e) => {
                        log::warn!("{role}: io_uring not usable ({e}): disk operations are done at once, on the loop");
                        None
                    }
                }
            }
            Err(e) => {
                log::info!("{role}: io_uring not available ({e}): disk operations are done at once, on the loop");
                None
            }
        };
        let mut disk = Disk::blocking(budget);
        disk.ring = ring;
        disk.used = true;
        disk
    }

    /// The synchronous disk, for roles that do not need a ring.
    pub fn blocking(budget: usize) -> Disk {
        Disk {
            ring: None,
            in_flight: Slab::new(),
            done: Vec::new(),
            pool: Vec::new(),
            alive: Arc::new(AtomicUsize::new(0)),
            budget: (budget / CHUNK).max(MIN_CHUNKS),
            waiters: std::collections::VecDeque::new(),
            counters: DiskCounters::default(),
            used: false,
        }
    }

    /// True when operations are asynchronous (there is a ring). Without
    /// one, a spool must not use `O_DIRECT`: every write would wait for the
    /// device on the loop.
    pub fn is_async(&self) -> bool {
        self.ring.is_some()
    }

    fn insert(&mut self, file: Option<&Arc<File>>, owner: Option<Owner>, op: Op) -> usize {
        self.in_flight.insert(InFlight {
            buf: None,
            file: file.cloned(),
            fallback: None,
            owner,
            op,
            refused_direct: false,
            name: None,
            to: None,
            skip: 0,
        })
    }

    /// Queues the entry for `slot` on the ring, or, without one, runs
    /// `now` and queues its completion.
    fn queue(&mut self, slot: usize, entry: squeue::Entry, now: impl FnOnce() -> io::Result<()>) {
        match self.ring.as_mut() {
            // SAFETY: the entry points at nothing but the file, which the
            // in-flight entry keeps open until its completion is reaped.
            Some(ring) => unsafe { ring.push(entry.user_data(slot as u64)) },
            None => {
                let result = now();
                self.complete(slot, result);
            }
        }
    }

    /// Starts the write in `slot`: on the ring, or at once.
    fn start(&mut self, slot: usize) {
        let w = &self.in_flight[slot];
        let Op::Write {
            offset,
            len,
            direct,
        } = w.op
        else {
            return;
        };
        // A direct write is issued from a kernel worker, never inline in
        // the loop's `io_uring_enter`: issuing it maps its blocks, and on
        // ext4 that takes the inode's extent lock for writing, which the
        // completions of earlier direct writes hold while they convert
        // their extents (seen under 1,000 streams: the loop asleep in
        // `ext4_map_blocks`, `io_uring_enter` up to 27 ms). (Not a write
        // through the page cache: its inline copy is the cheaper way.)
        let flags = if direct && w.fallback.is_some() {
            squeue::Flags::ASYNC
        } else {
            squeue::Flags::empty()
        };
        let data = &w.buf.as_ref().expect("a write has a buffer").bytes()[w.skip..w.skip + len];
        let file = w.file.as_ref().expect("a write has a file");
        let Some(ring) = self.ring.as_mut() else {
            let result = file.write_all_at(data, offset);
            self.complete(slot, result);
            return;
        };
        let entry = opcode::Write::new(types::Fd(file.as_raw_fd()), data.as_ptr(), len as u32)
            .offset(offset)
            .build()
            .flags(flags)
            .user_data(slot as u64);
        // SAFETY: the buffer and the file are owned by the in-flight entry
        // until this write's completion is reaped, and a chunk is marked
        // submitted, so nothing writes to it.
        unsafe { ring.push(entry) };
    }

    /// Completes an [`Op::Open`] with the file it made, or why not.
    fn complete_open(&mut self, slot: usize, result: io::Result<File>) {
        let (result, file) = match result {
            Ok(file) => (Ok(()), Some(file)),
            Err(e) => (Err(e), None),
        };
        self.complete_with(slot, result, file);
    }

    /// Turns the in-flight entry `slot` into a completion for its owner.
    fn complete(&mut self, slot: usize, result: io::Result<()>) {
        self.complete_with(slot, result, None);
    }

    fn complete_with(&mut self, slot: usize, result: io::Result<()>, opened: Option<File>) {
        let Some(w) = self.in_flight.try_remove(slot) else {
            return;
        };
        if let Some(owner) = w.owner {
            self.done.push(Done {
                owner,
                op: w.op,
                result,
                refused_direct: w.refused_direct,
                opened,
                name: w.name,
            });
        }
        if let Some(Buf::Chunk(chunk)) = w.buf {
            if let Ok(chunk) = Arc::try_unwrap(chunk) {
                self.recycle(chunk);
            }
        }
        for file in [w.file, w.fallback].into_iter().flatten() {
            self.release(file);
        }
    }

    /// Gives every queued operation to the kernel in one system call. The
    /// loop calls this before it polls again.
    pub fn submit(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            if ring.has_queued() {
                ring.submit();
            }
        }
    }

    /// Operations given to the kernel (or queued) and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// True when [`Disk::reap`] has something to hand out.
    pub fn has_completions(&mut self) -> bool {
        !self.done.is_empty() || self.ring.as_mut().is_some_and(Ring::has_completions)
    }

    /// Collects the completed operations. Their chunks go back to the pool
    /// once their spools have let go of them too.
    pub fn reap(&mut self) -> Vec<Done> {
        loop {
            let cqes = match self.ring.as_mut() {
                Some(ring) => ring.completions(),
                None => Vec::new(),
            };
            if cqes.is_empty() {
                break;
            }
            for cqe in cqes {
                self.on_cqe(cqe.user_data() as usize, cqe.result());
            }
        }
        std::mem::take(&mut self.done)
    }

    /// One completion from the kernel: `res` is a byte count or `-errno`.
    fn on_cqe(&mut self, slot: usize, res: i32) {
        let Some(w) = self.in_flight.get_mut(slot) else {
            return;
        };
        if matches!(w.op, Op::Write { direct: true, .. }) && res == -libc::EINVAL {
            if let Some(fallback) = w.fallback.take() {
                // The device took O_DIRECT at open but refuses this write:
                // the same bytes, through the page cache.
                w.file = Some(fallback);
                w.refused_direct = true;
                self.counters.refused_direct += 1;
                self.start(slot);
                return;
            }
        }
        if w.op == Op::Rename && res == -libc::EINVAL {
            // A filesystem without `RENAME_NOREPLACE`: the no-clobber
            // fallback (`link` + `unlink`), at once. Rare, and small.
            let (Some(from), Some(to)) = (&w.name, &w.to) else {
                return;
            };
            let result = crate::sys::rename_no_clobber(ops::path(from), ops::path(to));
            self.complete(slot, result);
            return;
        }
        if matches!(w.op, Op::Open | Op::Reopen) {
            let result = match res {
                // SAFETY: a non-negative result of `openat` is a new
                // descriptor, ours alone.
                fd if fd >= 0 => Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
            self.complete_open(slot, result);
            return;
        }
        let result = match w.op {
            _ if res < 0 => Err(io::Error::from_raw_os_error(-res)),
            Op::Write {
                offset,
                len,
                direct,
            } if res as usize != len => {
                // A short write: the disk is full, a size limit was
                // reached, or the device refused the rest. Written on from
                // where it stopped, so that the kernel says which (or
                // takes the rest after all); a write that moved nothing
                // is taken as a full disk. If the rest fails, what follows
                // in the file cannot be trusted; the completion reports
                // the part that was not written.
                let n = res as usize;
                w.op = Op::Write {
                    offset: offset + n as u64,
                    len: len - n,
                    direct,
                };
                if n > 0 {
                    w.skip += n;
                    self.start(slot);
                    return;
                }
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            Op::Write {
                offset,
                len,
                direct,
            } if w.skip > 0 => {
                // The rest of a short write went: report the whole write.
                w.op = Op::Write {
                    offset: offset - w.skip as u64,
                    len: len + w.skip,
                    direct,
                };
                Ok(())
            }
            _ => Ok(()),
        };
        self.complete(slot, result);
    }

    /// Waits (at most [`DROP_WAIT`] in all) for every operation in flight,
    /// at shutdown, so that the files being finished have all their bytes
    /// when the process exits. Returns the completions; the caller may
    /// queue more (and call this again).
    pub fn drain(&mut self, deadline: Instant) -> Vec<Done> {
        let mut all = Vec::new();
        while self.in_flight() > 0 && Instant::now() < deadline {
            let Some(ring) = self.ring.as_mut() else {
                break;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = ring.wait(left.min(Duration::from_millis(100))) {
                log::warn!("waiting for disk operations: {e}");
                break;
            }
            all.extend(self.reap());
        }
        all.extend(self.reap());
        all
    }
}

impl Drop for Disk {
    /// Waits (bounded) for what is in flight; whatever is still in flight
    /// after that keeps its buffers and files forever (leaked): the kernel
    /// may still be using them.
    fn drop(&mut self) {
        if self.in_flight() == 0 {
            return;
        }
        self.submit();
        let _ = self.drain(Instant::now() + DROP_WAIT);
        if self.in_flight() > 0 {
            log::warn!(
                "{} disk operation(s) still in flight at exit: their buffers are left to the kernel",
                self.in_flight()
            );
            for w in std::mem::take(&mut self.in_flight).drain() {
                std::mem::forget(w);
            }
        }
    }
}

#[cfg(test)]
mod tests;
