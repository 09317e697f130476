//! Disk writes that neither copy into the page cache nor block the loop.
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
//! - submissions are batched: every write queued while handling one batch of
//!   events goes to the kernel in one `io_uring_enter` ([`Disk::submit`]),
//!   just before the loop polls again.
//!
//! **Ownership is the safety argument.** The kernel reads a chunk after
//! the call that queued it has returned, so a chunk in flight is shared
//! (`Arc`: the daemon may be built on one thread and run on another) between its spool and the in-flight table here, and so is the
//! file; both stay alive until the completion is reaped, even if the
//! transfer that wrote them is long gone.
//!
//! **Fallbacks.** Where `io_uring` cannot be set up (an old kernel, a
//! sandbox that forbids it) every write is done at once with `pwrite` and
//! its completion queued for the next reap, so callers see one behaviour.
//! Where the filesystem refuses `O_DIRECT` (see `proxy::transfer::spool`)
//! the writes go through the page cache as before. The first is logged at
//! startup, the second (at debug level) for each file.
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

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use mio::unix::SourceFd;
use mio::{Interest, Registry};
use slab::Slab;

/// Alignment of `O_DIRECT` buffers, offsets and lengths: a page, which is a
/// multiple of every common device's logical block.
pub const ALIGN: usize = 4096;

/// Size of one chunk: the largest single disk write, and the unit of
/// spool memory a transfer holds while its bytes pass. A direct write costs
/// about 40 us of system time however small it is on this project's VM
/// (`dd oflag=direct` of 1 GiB: 0.64 s of system time in 64 KiB blocks,
/// 0.21 s in 256 KiB, 0.09 s in 1 MiB), so chunks are large; the budget,
/// not the chunk size, bounds memory (see GUIDE section 13).
pub const CHUNK: usize = 1024 * 1024;

/// Default memory budget for chunks (`--spool-memory`): staging, waiting
/// for the upstream, and in flight to the disk, all transfers together.
pub const DEFAULT_BUDGET: usize = 8 * 1024 * 1024;

/// Submission queue depth. More writes than this between two submits
/// just cause an early submit.
const RING_ENTRIES: u32 = 256;
/// Completion queue depth. More completions than this before a reap are
/// kept by the kernel and flushed by [`Disk::reap`].
const CQ_ENTRIES: u32 = 4096;

/// An aligned buffer of [`CHUNK`] bytes, filled from the front.
pub struct Chunk {
    ptr: NonNull<u8>,
    len: usize,
    /// Chunks alive, counted by the [`Disk`] that made this one.
    alive: Arc<AtomicUsize>,
    /// Set by [`Disk::write`]: from then on the kernel may read the chunk,
    /// and it must not change.
    submitted: AtomicBool,
}

// SAFETY: a chunk owns its allocation alone (like a `Box<[u8]>`), and
// through a shared reference it can only be read.
unsafe impl Send for Chunk {}
// SAFETY: as above: `&Chunk` gives read-only access, and the flag is atomic.
unsafe impl Sync for Chunk {}

fn layout() -> Layout {
    Layout::from_size_align(CHUNK, ALIGN).expect("CHUNK and ALIGN are valid")
}

impl Chunk {
    fn new(alive: &Arc<AtomicUsize>) -> Chunk {
        // SAFETY: the layout has a non-zero size. Zeroed, so that every
        // byte is initialised before anything can see it (a pooled chunk
        // pays for this once).
        let ptr = unsafe { alloc::alloc_zeroed(layout()) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout());
        };
        alive.fetch_add(1, Ordering::Relaxed);
        Chunk {
            ptr,
            len: 0,
            alive: Arc::clone(alive),
            submitted: AtomicBool::new(false),
        }
    }

    /// The bytes filled so far.
    pub fn filled(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written through `spare`, and
        // the allocation lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The room after the filled bytes, to read into; then [`Chunk::commit`].
    /// Empty once the chunk has been submitted.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.submitted.load(Ordering::Relaxed) {
            return &mut [];
        }
        // SAFETY: in bounds of the (initialised) allocation, which
        // `&mut self` makes ours alone: a submitted chunk, which the kernel
        // may be reading, returned above.
        unsafe {
            let start = self.ptr.as_ptr().add(self.len);
            std::slice::from_raw_parts_mut(start, CHUNK - self.len)
        }
    }

    /// Counts `n` more bytes as filled (written into [`Chunk::spare`]).
    pub fn commit(&mut self, n: usize) {
        assert!(n <= CHUNK - self.len && !self.submitted.load(Ordering::Relaxed));
        self.len += n;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == CHUNK
    }

    pub fn is_submitted(&self) -> bool {
        self.submitted.load(Ordering::Relaxed)
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout. A chunk the kernel
        // may still read is held by the in-flight table, so this runs only
        // once nobody reads it.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout()) }
        self.alive.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Chunk({} bytes{})",
            self.len,
            if self.is_submitted() {
                ", submitted"
            } else {
                ""
            }
        )
    }
}

/// Whose write a completion is: a connection's slab key and its identity
/// (keys are reused; identities are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub key: usize,
    pub id: u64,
}

/// A finished write, for its owner.
#[derive(Debug)]
pub struct Written {
    pub owner: Owner,
    pub result: io::Result<()>,
}

/// A write the kernel has: what must outlive it.
struct InFlight {
    chunk: Arc<Chunk>,
    _file: Arc<File>,
    owner: Owner,
    len: usize,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskCounters {
    pub writes: u64,
    pub bytes: u64,
    /// Bytes a spool wrote through the page cache because the disk was
    /// behind (see `proxy::transfer::spool`).
    pub overflow_bytes: u64,
}

/// The loop's asynchronous disk writer (see the module docs).
pub struct Disk {
    ring: Option<IoUring>,
    in_flight: Slab<InFlight>,
    /// Pushed to the submission queue, not yet given to the kernel.
    queued: usize,
    /// Completions not yet handed to their owners.
    done: Vec<Written>,
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
        let ring = match IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(RING_ENTRIES)
        {
            Ok(ring) => {
                let fd = ring.as_raw_fd();
                match registry.register(&mut SourceFd(&fd), token, Interest::READABLE) {
                    Ok(()) => Some(ring),
                    Err(e) => {
                        log::warn!(
                            "{role}: io_uring not usable ({e}): disk writes will block the loop"
                        );
                        None
                    }
                }
            }
            Err(e) => {
                log::info!("{role}: io_uring not available ({e}): disk writes will block the loop");
                None
            }
        };
        Disk {
            ring,
            used: true,
            ..Disk::blocking(budget)
        }
    }

    /// The synchronous writer, for roles that do not need a ring.
    pub fn blocking(budget: usize) -> Disk {
        Disk {
            ring: None,
            in_flight: Slab::new(),
            queued: 0,
            done: Vec::new(),
            pool: Vec::new(),
            alive: Arc::new(AtomicUsize::new(0)),
            budget: (budget / CHUNK).max(MIN_CHUNKS),
            waiters: std::collections::VecDeque::new(),
            counters: DiskCounters::default(),
            used: false,
        }
    }

    /// Its metrics, for a role that writes through it.
    pub fn metrics(&self, out: &mut super::Exposition) {
        if !self.used {
            return;
        }
        out.gauge(
            "stopover_spool_memory_bytes",
            "Memory in spool chunks now: uploads in passage and disk writes in flight.",
            (self.chunks_out() * CHUNK) as f64,
        );
        out.gauge(
            "stopover_spool_memory_budget_bytes",
            "The most memory spool chunks may take (--spool-memory).",
            (self.budget * CHUNK) as f64,
        );
        out.gauge(
            "stopover_spool_memory_waiting",
            "Transfers waiting for spool memory (their clients wait in the kernel).",
            self.waiters.len() as f64,
        );
        out.counter(
            "stopover_disk_writes_total",
            "Spool writes handed to the disk (direct, through io_uring where available).",
            self.counters.writes,
        );
        out.counter(
            "stopover_disk_write_bytes_total",
            "Bytes in those writes.",
            self.counters.bytes,
        );
        out.counter(
            "stopover_disk_overflow_bytes_total",
            "Spool bytes written through the page cache because the disk was behind.",
            self.counters.overflow_bytes,
        );
    }

    /// Chunks out of the pool: held by spools or in flight.
    pub fn chunks_out(&self) -> usize {
        self.alive.load(Ordering::Relaxed) - self.pool.len()
    }

    /// An empty chunk, from the pool when there is one, or `None` when the
    /// budget is spent (then [`Disk::wait`]).
    pub fn chunk(&mut self) -> Option<Chunk> {
        if self.chunks_out() >= self.budget {
            return None;
        }
        Some(self.pool.pop().unwrap_or_else(|| Chunk::new(&self.alive)))
    }

    /// True when half the budget is out: spools then give back their
    /// partial chunks as soon as they run out of bytes to read.
    pub fn under_pressure(&self) -> bool {
        self.chunks_out() * 2 >= self.budget
    }

    /// Queues `owner` for a chunk: [`Disk::wakeups`] names it once one is
    /// free. The caller queues itself once per wait.
    pub fn wait(&mut self, owner: Owner) {
        self.waiters.push_back(owner);
    }

    /// The owners to wake now, oldest first: one per chunk free in the
    /// budget. (A woken owner that finds the chunk taken queues again.)
    pub fn wakeups(&mut self) -> Vec<Owner> {
        let free = self.budget.saturating_sub(self.chunks_out());
        let n = free.min(self.waiters.len());
        self.waiters.drain(..n).collect()
    }

    /// Owners waiting for a chunk.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// True when [`Disk::wakeups`] has someone to wake now. The loop must
    /// not sleep then: nothing else may come to wake it. (The queue may hold
    /// owners that have since ended, or got a chunk another way; waking
    /// them is harmless, and it drains them.)
    pub fn has_wakeups(&self) -> bool {
        !self.waiters.is_empty() && self.chunks_out() < self.budget
    }

    /// Writes the first `len` bytes of `chunk` at `offset` of `file`, for
    /// `owner`, who hears of it through [`Disk::reap`]. With `O_DIRECT`,
    /// `offset` and `len` must be multiples of [`ALIGN`]. The chunk must not
    /// change from now on (it is marked submitted).
    pub fn write(
        &mut self,
        file: &Arc<File>,
        offset: u64,
        chunk: &Arc<Chunk>,
        len: usize,
        owner: Owner,
    ) {
        debug_assert!(len <= chunk.len());
        chunk.submitted.store(true, Ordering::Relaxed);
        self.counters.writes += 1;
        self.counters.bytes += len as u64;
        let Some(ring) = self.ring.as_mut() else {
            // The fallback: write now, report at the next reap.
            let result = file.write_all_at(&chunk.filled()[..len], offset);
            self.done.push(Written { owner, result });
            return;
        };
        let slot = self.in_flight.insert(InFlight {
            chunk: Arc::clone(chunk),
            _file: Arc::clone(file),
            owner,
            len,
        });
        let entry = opcode::Write::new(
            types::Fd(file.as_raw_fd()),
            chunk.filled().as_ptr(),
            len as u32,
        )
        .offset(offset)
        .build()
        .user_data(slot as u64);
        loop {
            // SAFETY: the buffer and the file are kept alive by the
            // in-flight entry until this write's completion is reaped, and
            // the chunk is marked submitted, so nothing writes to it.
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                break;
            }
            // The queue is full: hand what is queued to the kernel first.
            if let Err(e) = ring.submit() {
                log::warn!("io_uring submit: {e}");
            }
            self.queued = 0;
        }
        self.queued += 1;
    }

    /// Gives every queued write to the kernel in one system call. The loop
    /// calls this before it polls again.
    pub fn submit(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        if self.queued == 0 {
            return;
        }
        loop {
            match ring.submit() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EBUSY/EAGAIN: the completion queue is full; the loop
                // reaps and we try again next time round.
                Err(e) => {
                    log::debug!("io_uring submit: {e}");
                    return;
                }
            }
        }
        self.queued = 0;
    }

    /// Writes given to the kernel (or queued) and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// True when [`Disk::reap`] has something to hand out.
    pub fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
            || self
                .ring
                .as_mut()
                .is_some_and(|r| !r.completion().is_empty() || r.submission().cq_overflow())
    }

    /// Collects the completed writes. Their chunks go back to the pool
    /// once their spools have let go of them too.
    pub fn reap(&mut self) -> Vec<Written> {
        while let Some(ring) = self.ring.as_mut() {
            // Completions that did not fit the queue wait in the kernel
            // until a system call asks for them (IORING_FEAT_NODROP).
            if ring.completion().is_empty() && ring.submission().cq_overflow() {
                if let Err(e) = ring.submit() {
                    log::debug!("io_uring: flushing completions: {e}");
                    break;
                }
                self.queued = 0;
            }
            if ring.completion().is_empty() {
                break;
            }
            for cqe in ring.completion() {
                let slot = cqe.user_data() as usize;
                let Some(w) = self.in_flight.try_remove(slot) else {
                    continue;
                };
                let res = cqe.result();
                let result = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else if res as usize != w.len {
                    // A short direct write: the disk is full, or the
                    // device refused the rest. The spool is incomplete.
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short write: {res} of {} bytes (disk full?)", w.len),
                    ))
                } else {
                    Ok(())
                };
                self.done.push(Written {
                    owner: w.owner,
                    result,
                });
                if let Ok(chunk) = Arc::try_unwrap(w.chunk) {
                    recycle(&mut self.pool, chunk);
                }
            }
        }
        std::mem::take(&mut self.done)
    }

    /// Takes back a chunk nobody uses any more.
    pub fn recycle(&mut self, chunk: Chunk) {
        recycle(&mut self.pool, chunk);
    }

    /// Waits for every write in flight (at shutdown, so that a kept
    /// `.incomplete` file has all its bytes when the process exits).
    pub fn drain(&mut self) -> Vec<Written> {
        let mut all = Vec::new();
        while self.in_flight() > 0 {
            let Some(ring) = self.ring.as_mut() else {
                break;
            };
            if let Err(e) = ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("waiting for disk writes: {e}");
                    break;
                }
            }
            self.queued = 0;
            all.extend(self.reap());
        }
        all.extend(self.reap());
        all
    }
}

/// The smallest budget, in chunks, whatever `--spool-memory` says: enough
/// for one transfer to stream (staging, one waiting for the upstream, two
/// in flight).
pub const MIN_CHUNKS: usize = 4;

/// Keeps `chunk` for reuse (every chunk alive fits the budget, so the pool
/// never holds more than the budget).
fn recycle(pool: &mut Vec<Chunk>, mut chunk: Chunk) {
    {
        chunk.len = 0;
        chunk.submitted.store(false, Ordering::Relaxed);
        pool.push(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn disk() -> (mio::Poll, Disk) {
        let poll = mio::Poll::new().unwrap();
        let disk = Disk::new(poll.registry(), mio::Token(7), "test", DEFAULT_BUDGET);
        (poll, disk)
    }

    #[test]
    fn chunks_are_aligned_and_fill_from_the_front() {
        let (_poll, mut disk) = disk();
        let mut c = disk.chunk().unwrap();
        assert_eq!(c.spare().as_ptr() as usize % ALIGN, 0);
        c.spare()[..3].copy_from_slice(b"abc");
        c.commit(3);
        assert_eq!(c.filled(), b"abc");
        assert_eq!(c.spare().len(), CHUNK - 3);
        let c = Arc::new(c);
        c.submitted.store(true, Ordering::Relaxed);
        let mut c = Arc::try_unwrap(c).unwrap();
        assert!(
            c.spare().is_empty(),
            "a submitted chunk takes no more bytes"
        );
    }

    #[test]
    fn the_budget_bounds_chunks_and_wakes_waiters_in_order() {
        let (_poll, mut disk) = disk();
        let mut disk = Disk {
            budget: MIN_CHUNKS,
            ..std::mem::replace(&mut disk, Disk::blocking(0))
        };
        let held: Vec<Chunk> = (0..MIN_CHUNKS).map(|_| disk.chunk().unwrap()).collect();
        assert!(disk.chunk().is_none(), "the budget is spent");
        assert!(disk.under_pressure());
        for key in 0..3 {
            disk.wait(Owner { key, id: 1 });
        }
        assert!(disk.wakeups().is_empty(), "nothing is free yet");
        let mut held = held.into_iter();
        disk.recycle(held.next().unwrap()); // back to the pool
        drop(held.next().unwrap()); // or freed: both give room back
        assert!(disk.has_wakeups(), "the loop must not sleep now");
        let woken: Vec<usize> = disk.wakeups().iter().map(|o| o.key).collect();
        assert_eq!(woken, [0, 1], "one per free chunk, oldest first");
        assert_eq!(disk.waiting(), 1);
        assert!(
            disk.has_wakeups(),
            "the woken have not taken their chunks yet"
        );
        let taken = (disk.chunk().unwrap(), disk.chunk().unwrap());
        assert!(
            !disk.has_wakeups(),
            "the budget is spent again: nothing to wake"
        );
        drop(taken);
    }

    #[test]
    fn writes_complete_through_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // O_DIRECT where the filesystem allows it, as the proxy does.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .or_else(|_| std::fs::File::create(&path))
            .unwrap();
        let file = Arc::new(file);
        let (mut poll, mut disk) = disk();
        let owner = Owner { key: 1, id: 9 };
        let mut want = Vec::new();
        for i in 0..4u8 {
            let mut c = disk.chunk().unwrap();
            let n = c.spare().len();
            c.spare().fill(i + 1);
            c.commit(n);
            want.extend_from_slice(c.filled());
            let c = Arc::new(c);
            disk.write(&file, i as u64 * CHUNK as u64, &c, CHUNK, owner);
        }
        disk.submit();
        let mut done = Vec::new();
        let mut events = mio::Events::with_capacity(8);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.len() < 4 && std::time::Instant::now() < deadline {
            if !disk.has_completions() {
                // EINTR is normal: io_uring interrupts the wait to post
                // a completion.
                let _ = poll.poll(&mut events, Some(std::time::Duration::from_secs(1)));
            }
            done.extend(disk.reap());
        }
        assert_eq!(done.len(), 4, "every write completes");
        for w in &done {
            assert_eq!(w.owner, owner);
            assert!(w.result.is_ok(), "{:?}", w.result);
        }
        assert_eq!(disk.in_flight(), 0);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
