//! Deadlines inside a poll loop, without sleeping.
//!
//! A single-threaded event loop may never call `sleep`: while it sleeps, no
//! other connection moves. Instead, "do X at time T" becomes an entry in an
//! ordered map, and the loop asks `poll` to wait *at most* until the earliest
//! entry:
//!
//! ```text
//!   loop {
//!       poll.poll(&mut events, timers.timeout(now))   // sleeps until I/O or the next deadline
//!       handle every I/O event
//!       while let Some(what) = timers.pop_due(now) { handle what }
//!   }
//! ```
//!
//! The map is keyed by `(deadline, sequence number)`: ordered by time, and
//! the sequence number keeps two timers with the same deadline distinct.
//! Scheduling, cancelling and popping the earliest are all O(log n), so ten
//! thousand pending timers cost nothing noticeable. Cancellation is real
//! removal (the [`TimerId`] is the key), so a connection that ends early can
//! take its timer with it and no stale entry ever fires.
//!
//! Timers that would be re-armed on every byte (an idle timeout) are better
//! kept coarse: remember the time of last activity on the connection, and
//! when the timer fires, check it and re-arm for the remainder.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Identifies one scheduled timer, for cancelling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerId(Instant, u64);

/// An ordered set of deadlines, each carrying a value of type `T` that says
/// what to do when it is due.
#[derive(Debug)]
pub struct Timers<T> {
    due: BTreeMap<TimerId, T>,
    seq: u64,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            due: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<T> Timers<T> {
    /// An empty timer set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `what` to be due at `at`.
    pub fn schedule(&mut self, at: Instant, what: T) -> TimerId {
        self.seq += 1;
        let id = TimerId(at, self.seq);
        self.due.insert(id, what);
        id
    }

    /// Cancels a timer; returns its value if it had not fired yet.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        self.due.remove(&id)
    }

    /// How long `poll` may wait before the earliest timer is due: `None`
    /// (wait for I/O indefinitely) when no timer is pending, zero when one is
    /// already overdue.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.due
            .keys()
            .next()
            .map(|id| id.0.saturating_duration_since(now))
    }

    /// Removes and returns the earliest timer if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(TimerId, T)> {
        let first = self.due.first_entry()?;
        if first.key().0 <= now {
            Some(first.remove_entry())
        } else {
            None
        }
    }

    /// True when no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        timers.schedule(t0 + Duration::from_millis(30), "c");
        timers.schedule(t0 + Duration::from_millis(10), "a");
        timers.schedule(t0 + Duration::from_millis(20), "b");
        assert_eq!(timers.timeout(t0), Some(Duration::from_millis(10)));
        assert!(timers.pop_due(t0).is_none(), "nothing is due yet");
        let now = t0 + Duration::from_millis(25);
        let fired: Vec<_> = std::iter::from_fn(|| timers.pop_due(now).map(|(_, v)| v)).collect();
        assert_eq!(fired, ["a", "b"]);
        assert_eq!(timers.timeout(now), Some(Duration::from_millis(5)));
    }

    #[test]
    fn equal_deadlines_are_distinct_and_cancellable() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        let a = timers.schedule(t0, 1);
        let b = timers.schedule(t0, 2);
        assert_ne!(a, b);
        assert_eq!(timers.cancel(a), Some(1));
        assert_eq!(timers.cancel(a), None, "a cancelled timer is gone");
        assert_eq!(timers.pop_due(t0), Some((b, 2)));
        assert!(timers.is_empty());
        assert_eq!(timers.timeout(t0), None);
    }

    #[test]
    fn overdue_timer_means_zero_wait() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        timers.schedule(t0, ());
        assert_eq!(
            timers.timeout(t0 + Duration::from_secs(1)),
            Some(Duration::ZERO)
        );
    }
}
