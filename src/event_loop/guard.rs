//! Protections against peers that would wear a daemon down, shared by both
//! roles: a minimum upload rate, and warnings that a flood of bad peers
//! cannot turn into a flood of log lines.
//!
//! **Why a minimum rate as well as an idle timeout.** The idle timeout
//! closes a connection that moves *no* byte for a while; any byte resets
//! it. So a peer sending one byte just inside the timeout holds its slot
//! forever, and N such peers hold N slots: with `--max-conns N`, nobody else
//! is served (the slowloris attack). [`MinRate`] closes an upload that
//! brings in fewer than `rate × window` bytes in a window. It is checked
//! by a timer once per window, from the byte count the upload keeps anyway
//! (the spool's or the file's length), so it costs nothing per byte.
//!
//! It only judges what the client controls: a proxy that stops reading a
//! client because the upstream is slow (back-pressure), or because the
//! upload is complete, starts a new window instead of judging.

use std::fmt;
use std::time::{Duration, Instant};

/// `--min-rate`: at least `per_second` bytes per second, averaged over
/// `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    pub per_second: u64,
    pub window: Duration,
}

impl MinRate {
    /// The default window: long enough that a pause for breath (a client
    /// reading its next chunk from a slow disk) is averaged out.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// The default: 128 bytes a second over 10 s. No upload on a working
    /// link comes near it (a 56k modem moves 7,000 bytes a second), while a
    /// slowloris peer must now spend 1,280 bytes every 10 s per slot.
    pub const DEFAULT: MinRate = MinRate {
        per_second: 128,
        window: MinRate::WINDOW,
    };

    /// Bytes a window must bring in.
    pub fn needed(&self) -> u64 {
        (self.per_second as f64 * self.window.as_secs_f64()).ceil() as u64
    }
}

impl fmt::Display for MinRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} B/s over {}",
            self.per_second,
            humantime::format_duration(self.window)
        )
    }
}

/// One connection's current window: when it began, and the upload's byte
/// count then.
#[derive(Debug, Clone, Copy)]
pub struct RateWindow {
    start: Instant,
    bytes_at_start: u64,
}

impl RateWindow {
    /// A window starting `now` at `bytes`.
    pub fn new(now: Instant, bytes: u64) -> RateWindow {
        RateWindow {
            start: now,
            bytes_at_start: bytes,
        }
    }

    /// The window's timer fired at `now`, with `bytes` received so far.
    /// Too slow: the bytes that came in. Otherwise a new window begins and
    /// the next check is due at the returned time.
    pub fn check(&mut self, rate: &MinRate, now: Instant, bytes: u64) -> Result<Instant, u64> {
        let came = bytes.saturating_sub(self.bytes_at_start);
        if now >= self.start + rate.window && came < rate.needed() {
            return Err(came);
        }
        if now >= self.start + rate.window {
            *self = RateWindow::new(now, bytes);
        }
        Ok(self.start + rate.window)
    }

    /// Starts a new window (the client is not to blame for the last one).
    pub fn restart(&mut self, now: Instant, bytes: u64, rate: &MinRate) -> Instant {
        *self = RateWindow::new(now, bytes);
        now + rate.window
    }
}

/// Warnings of one kind, at most [`Throttle::BURST`] per
/// [`Throttle::PERIOD`]; the rest go to the debug log and are counted, and
/// the next warning says how many were held back.
#[derive(Debug, Default)]
pub struct Throttle {
    period_start: Option<Instant>,
    in_period: u32,
    held_back: u64,
}

impl Throttle {
    pub const BURST: u32 = 10;
    pub const PERIOD: Duration = Duration::from_secs(10);

    /// Logs `message` as a warning, unless this kind has had its share.
    pub fn warn(&mut self, message: fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .period_start
            .is_none_or(|t| now.duration_since(t) >= Self::PERIOD)
        {
            self.period_start = Some(now);
            self.in_period = 0;
        }
        if self.in_period < Self::BURST {
            self.in_period += 1;
            if self.held_back > 0 {
                log::warn!("{message} ({} similar warnings held back)", self.held_back);
                self.held_back = 0;
            } else {
                log::warn!("{message}");
            }
        } else {
            self.held_back += 1;
            log::debug!("{message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_too_slow_fails_and_a_fast_one_starts_the_next() {
        let rate = MinRate {
            per_second: 100,
            window: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut w = RateWindow::new(t0, 0);
        // Not over yet: no judgement, same deadline.
        assert_eq!(
            w.check(&rate, t0 + Duration::from_secs(3), 5),
            Ok(t0 + rate.window)
        );
        // Over, 1,000 bytes needed, 1,000 came: a new window.
        let t1 = t0 + rate.window;
        assert_eq!(w.check(&rate, t1, 1_000), Ok(t1 + rate.window));
        // Over again, only 999 more: too slow.
        assert_eq!(w.check(&rate, t1 + rate.window, 1_999), Err(999));
    }
}
