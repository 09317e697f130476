//! The `io_uring` itself: setting it up (or saying why not), queueing
//! entries, handing them to the kernel, and waiting for completions with a
//! time limit.
//!
//! Every call into the kernel here returns promptly or fails, and every
//! failure has an exit:
//!
//! - a full submission queue never loops: entries that do not fit wait in
//!   a backlog of ours, pushed at the next [`Ring::submit`];
//! - `io_uring_enter` answering `EBUSY`/`EAGAIN` (the completion queue is
//!   full) is not retried on the spot: the loop reaps, and submits again on
//!   its next turn;
//! - waiting (only at shutdown) is bounded: [`Ring::wait`] waits at most its
//!   timeout, whatever the kernel does.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

/// Submission queue depth. More entries than this between two submits wait
/// in the backlog.
const RING_ENTRIES: u32 = 256;
/// Completion queue depth. More completions than this before a reap are
/// kept by the kernel (`IORING_FEAT_NODROP`) and flushed by the next enter.
const CQ_ENTRIES: u32 = 4096;

/// Set to anything but `0` to run without `io_uring`, as where a sandbox
/// forbids it: the tests use it to exercise the fallback.
pub const NO_RING_ENV: &str = "STOPOVER_NO_IO_URING";

/// A ring, and the entries that did not fit in it yet.
pub struct Ring {
    ring: IoUring,
    backlog: VecDeque<squeue::Entry>,
    /// The kernel has `IORING_OP_FTRUNCATE` (Linux 6.9).
    pub can_truncate: bool,
    /// The kernel has `IORING_OP_RENAMEAT`, `_UNLINKAT` and `_CLOSE`
    /// (Linux 5.11).
    pub can_name: bool,
}

impl Ring {
    /// A new ring, or why there is none.
    pub fn new() -> Result<Ring, String> {
        if std::env::var_os(NO_RING_ENV).is_some_and(|v| v != "0") {
            return Err(format!("{NO_RING_ENV} is set"));
        }
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(RING_ENTRIES)
            .map_err(|e| e.to_string())?;
        let mut probe = Probe::new();
        let probed = ring.submitter().register_probe(&mut probe).is_ok();
        let can_truncate = probed && probe.is_supported(opcode::Ftruncate::CODE);
        let can_name = probed
            && [
                opcode::RenameAt::CODE,
                opcode::UnlinkAt::CODE,
                opcode::Close::CODE,
            ]
            .iter()
            .all(|&code| probe.is_supported(code));
        Ok(Ring {
            ring,
            backlog: VecDeque::new(),
            can_truncate,
            can_name,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Queues `entry`.
    ///
    /// # Safety
    ///
    /// Whatever `entry` points at (buffer, descriptor) must stay valid until
    /// its completion has been reaped.
    pub unsafe fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() {
            // SAFETY: the caller's promise.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(entry);
    }

    /// True when entries wait to be handed to the kernel.
    pub fn has_queued(&mut self) -> bool {
        !self.backlog.is_empty() || !self.ring.submission().is_empty()
    }

    /// Hands every queued entry to the kernel, as far as it takes them.
    pub fn submit(&mut self) {
        loop {
            while let Some(entry) = self.backlog.front() {
                // SAFETY: pushed through `push`, whose caller promised.
                if unsafe { self.ring.submission().push(entry) }.is_err() {
                    break;
                }
                self.backlog.pop_front();
            }
            if self.ring.submission().is_empty() {
                return;
            }
            match self.ring.submit() {
                Ok(_) if !self.backlog.is_empty() => continue, // room again
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EBUSY/EAGAIN: the completion queue is full. The loop
                // reaps first (it does not sleep while completions wait) and
                // we come back here on its next turn.
                Err(e) => {
                    log::debug!("io_uring submit: {e}");
                    return;
                }
            }
        }
    }

    /// True when completions wait to be reaped (in the queue, or held back
    /// by the kernel because the queue was full).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.ring.submission().cq_overflow()
    }

    /// The completions ready now. Completions the kernel held back are
    /// flushed by one enter first.
    pub fn completions(&mut self) -> Vec<cqueue::Entry> {
        if self.ring.completion().is_empty() && self.ring.submission().cq_overflow() {
            if let Err(e) = self.ring.submit() {
                log::debug!("io_uring: flushing completions: {e}");
            }
        }
        self.ring.completion().collect()
    }

    /// Submits what is queued and waits up to `timeout` for one completion
    /// (at shutdown only: the loop itself never waits here).
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.submit();
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
            // The completion queue is full: the caller reaps, then waits again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
