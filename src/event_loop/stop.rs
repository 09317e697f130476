//! Stopping a loop: the [`StopHandle`] another thread (or a signal) uses
//! to ask, and the graceful stop that follows: the listener closes, the
//! transfers in flight get the grace period to finish, and a second
//! request stops at once.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Registry, Waker};

use super::WAKER;
use crate::error::Context;

/// A handle that stops a running loop from another thread.
///
/// The first request starts a graceful stop (stop accepting, let transfers
/// in flight finish for up to the grace period); a second one stops at
/// once. SIGINT and SIGTERM, when the role handles signals, count as
/// requests too.
#[derive(Clone, Debug)]
pub struct StopHandle {
    waker: Arc<Waker>,
    requests: Arc<AtomicUsize>,
}

impl StopHandle {
    pub(super) fn new(registry: &Registry) -> io::Result<StopHandle> {
        Ok(StopHandle {
            waker: Arc::new(Waker::new(registry, WAKER).context("creating waker")?),
            requests: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Asks the loop to stop: gracefully the first time, at once the second.
    pub fn shutdown(&self) {
        self.request(1);
    }

    /// Asks the loop to stop at once, whatever is in flight.
    pub fn shutdown_now(&self) {
        self.request(2);
    }

    pub(super) fn request(&self, n: usize) {
        self.requests.fetch_add(n, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::warn!("waking loop for shutdown: {e}");
        }
    }

    /// How many times a stop was asked for (0: keep running).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Graceful stop, the same for both roles.
///
/// The first stop request closes the listener at once, so new clients are
/// refused rather than left in a backlog nobody will accept from, and gives
/// the transfers in flight `grace` to finish. The loop stops when none are
/// left, when the grace period is over, or at a second request.
#[derive(Debug)]
pub(super) struct GracefulStop {
    pub(super) role: &'static str,
    pub(super) grace: Duration,
    pub(super) until: Option<Instant>,
}

impl GracefulStop {
    pub(super) fn new(role: &'static str, grace: Duration) -> GracefulStop {
        GracefulStop {
            role,
            grace,
            until: None,
        }
    }

    pub(super) fn is_draining(&self) -> bool {
        self.until.is_some()
    }

    pub(super) fn should_stop(
        &mut self,
        handle: &StopHandle,
        in_flight: usize,
        listener: &mut Option<TcpListener>,
        registry: &Registry,
    ) -> bool {
        let requests = handle.requests();
        if requests == 0 {
            return false;
        }
        let now = Instant::now();
        if self.until.is_none() {
            self.until = Some(now + self.grace);
            if let Some(mut listener) = listener.take() {
                let _ = registry.deregister(&mut listener);
            }
            log::info!(
                "{}: shutting down: not accepting; {in_flight} transfer(s) in flight get up to {} to finish (again to stop now)",
                self.role,
                humantime::format_duration(self.grace)
            );
        }
        requests >= 2 || in_flight == 0 || self.until.is_some_and(|t| now >= t)
    }
}
