//! The memory budget of chunks: the pool, who waits for a chunk, and the
//! disk's metrics (see the parent module's docs, "Memory is a budget").

use std::sync::atomic::Ordering;

use super::{Chunk, Disk, Owner, CHUNK};

impl Disk {
    /// Its metrics, for a role that writes through it.
    pub fn metrics(&self, out: &mut crate::event_loop::Exposition) {
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
        out.gauge(
            "stopover_disk_in_flight",
            "Disk operations handed to the kernel and not completed.",
            self.in_flight.len() as f64,
        );
        out.counter(
            "stopover_disk_writes_total",
            "Spool writes handed to the disk (through io_uring where available).",
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
        out.counter(
            "stopover_disk_direct_refused_total",
            "Direct writes the device refused, written through the page cache instead.",
            self.counters.refused_direct,
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

    /// Takes back a chunk nobody uses any more.
    pub fn recycle(&mut self, mut chunk: Chunk) {
        // Every chunk alive fits the budget, so the pool never holds more.
        chunk.reset();
        self.pool.push(chunk);
    }
}
