//! [`Chunk`]: an aligned buffer the client's bytes are read into, the
//! upstream is sent from, and the disk takes by DMA.
//!
//! A chunk is filled from the front through [`Chunk::spare`] and
//! [`Chunk::commit`]. Once it is handed to the disk it is *submitted*: the
//! kernel may read it at any moment until the completion is reaped, so from
//! then on it only ever gives out shared, read-only views.

use std::alloc::{self, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Alignment of chunks in memory, and the block size the spool writes in:
/// a page, which is a multiple of every common device's logical block. A
/// file whose `statx(STATX_DIOALIGN)` asks for more is written through the
/// page cache instead (see `proxy::transfer::spool`).
pub const ALIGN: usize = 4096;

/// Size of one chunk: the largest single disk write, and the unit of
/// spool memory a transfer holds while its bytes pass. A direct write costs
/// about 40 us of system time however small it is on this project's VM
/// (`dd oflag=direct` of 1 GiB: 0.64 s of system time in 64 KiB blocks,
/// 0.21 s in 256 KiB, 0.09 s in 1 MiB), so chunks are large; the budget,
/// not the chunk size, bounds memory (see GUIDE section 13).
pub const CHUNK: usize = 1024 * 1024;

/// An aligned buffer of [`CHUNK`] bytes, filled from the front.
pub struct Chunk {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Chunks alive, counted by the `Disk` that made this one.
    alive: Arc<AtomicUsize>,
    /// Set when the chunk is handed to the disk: from then on the kernel
    /// may read it, and it must not change.
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
    pub(super) fn new(alive: &Arc<AtomicUsize>) -> Chunk {
        // SAFETY: the layout has a non-zero size. Zeroed, so that every
        // byte is initialised before anything can see it (a pooled chunk
        // pays for this once).
        let ptr = unsafe { alloc::alloc_zeroed(layout()) };
        let Some(ptr) = std::ptr::NonNull::new(ptr) else {
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
        if self.is_submitted() {
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
        assert!(n <= CHUNK - self.len && !self.is_submitted());
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

    /// Marks the chunk as handed to the disk (see the module docs).
    pub(super) fn mark_submitted(&self) {
        self.submitted.store(true, Ordering::Relaxed);
    }

    /// Makes a chunk nobody uses any more empty and fillable again.
    pub(super) fn reset(&mut self) {
        self.len = 0;
        self.submitted.store(false, Ordering::Relaxed);
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout. A chunk the kernel
        // may still read is held by the in-flight table (or leaked with it,
        // see `Disk`'s `Drop`), so this runs only once nobody reads it.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout()) }
        self.alive.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let submitted = if self.is_submitted() {
            ", submitted"
        } else {
            ""
        };
        write!(f, "Chunk({} bytes{submitted})", self.len)
    }
}
