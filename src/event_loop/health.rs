//! The loop's health: how long the handling of one event takes.
//!
//! Everything a daemon does happens on its one loop thread, so a single
//! slow step (a system call that waits for the disk, a long computation)
//! delays every connection at once. That is invisible in throughput
//! figures until it is large, so the loop measures it: each event's
//! handling (and each round of disk completions and submissions, and each
//! timer) is one observation in a Prometheus histogram,
//! `stopover_loop_event_seconds`, and the longest since start is
//! `stopover_loop_event_seconds_max`. A stall is then visible to users on
//! `/metrics`, not only to a profiler.
//!
//! It costs one clock read per observation: each lap starts where the
//! previous one ended ([`Health::lap`]), and the time spent waiting in
//! `poll` is left out by starting afresh after it ([`Health::start`]).

use std::time::{Duration, Instant};

use super::Exposition;

/// Upper bounds of the histogram's buckets, in seconds: 10 us to 1 s.
pub const BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A handling this long is logged (at debug level).
pub const SLOW: Duration = Duration::from_millis(50);

/// The histogram of event handling times (see the module docs).
#[derive(Debug)]
pub struct Health {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    max: Duration,
    lap_start: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            counts: [0; BUCKETS.len() + 1],
            sum: 0.0,
            max: Duration::ZERO,
            lap_start: Instant::now(),
        }
    }
}

impl Health {
    /// Starts timing (after `poll` returns).
    pub fn start(&mut self) {
        self.lap_start = Instant::now();
    }

    /// Ends one observation (of `what`) and starts the next. A handling
    /// longer than [`SLOW`] is logged at debug level, with what it was.
    pub fn lap(&mut self, what: &str) {
        let now = Instant::now();
        let took = now.saturating_duration_since(self.lap_start);
        self.observe(took);
        if took > SLOW {
            log::debug!("loop: {what} took {:.1} ms", took.as_secs_f64() * 1e3);
        }
        self.lap_start = now;
    }

    pub fn observe(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[bucket] += 1;
        self.sum += secs;
        self.max = self.max.max(took);
    }

    /// The longest observation so far.
    pub fn max(&self) -> Duration {
        self.max
    }

    pub fn metrics(&self, out: &mut Exposition) {
        let mut cumulative = 0;
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(self.counts)
            .map(|(b, n)| {
                cumulative += n;
                (*b, cumulative)
            })
            .collect();
        let count = self.counts.iter().sum();
        out.histogram(
            "stopover_loop_event_seconds",
            "Time the loop took to handle one event (or one round of disk completions, or one timer).",
            &buckets,
            self.sum,
            count,
        );
        out.gauge(
            "stopover_loop_event_seconds_max",
            "The longest handling of one event since start.",
            self.max.as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let mut h = Health::default();
        h.observe(Duration::from_micros(5));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(3));
        let mut e = Exposition::new();
        h.metrics(&mut e);
        let text = e.into_text();
        assert!(
            text.contains("stopover_loop_event_seconds_bucket{le=\"0.00001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("stopover_loop_event_seconds_bucket{le=\"0.001\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("stopover_loop_event_seconds_bucket{le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("stopover_loop_event_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("stopover_loop_event_seconds_count 3\n"),
            "{text}"
        );
        assert!(
            text.contains("stopover_loop_event_seconds_max 3\n"),
            "{text}"
        );
    }
}
