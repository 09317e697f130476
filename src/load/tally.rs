//! What each client thread brings back (counts, failures by kind, when its
//! last transfer ended, how late it started its transfers), and how the
//! threads' tallies add up to the run's.

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use crate::client::ClientError;

/// What each client thread brings back.
pub(super) struct Tally {
    pub ok: u64,
    pub bytes: u64,
    pub failures: BTreeMap<String, u64>,
    pub examples: BTreeMap<String, String>,
    /// When the last counted transfer ended: the end of the wall time.
    pub ended: Option<Instant>,
    /// Open loop: counted transfers that began late, and the latest.
    pub late: u64,
    pub max_late: Duration,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            ok: 0,
            bytes: 0,
            failures: BTreeMap::new(),
            examples: BTreeMap::new(),
            ended: None,
            late: 0,
            max_late: Duration::ZERO,
        }
    }

    pub fn fail(&mut self, kind: &str, message: String) {
        *self.failures.entry(kind.to_string()).or_default() += 1;
        self.examples.entry(kind.to_string()).or_insert(message);
    }

    pub fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.bytes += other.bytes;
        for (k, n) in other.failures {
            *self.failures.entry(k).or_default() += n;
        }
        for (k, m) in other.examples {
            self.examples.entry(k).or_insert(m);
        }
        self.ended = self.ended.max(other.ended);
        self.late += other.late;
        self.max_late = self.max_late.max(other.max_late);
    }
}

/// The failure kind of a client error, for the summary.
pub fn failure_kind(e: &ClientError) -> &'static str {
    use io::ErrorKind::*;
    match e {
        ClientError::Connect(_, err) if err.kind() == ConnectionRefused => "connect_refused",
        ClientError::Connect(..) => "connect_failed",
        ClientError::Lost(_, err)
            if matches!(err.kind(), ConnectionReset | BrokenPipe | ConnectionAborted) =>
        {
            "reset"
        }
        ClientError::Lost(..) => "lost",
        ClientError::Timeout(..) => "timeout",
        ClientError::BadAnswer(_) => "bad_answer",
        ClientError::Source(..) => "source",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_time_ends_with_the_last_transfer() {
        // The summary's wall time is the latest end any client reported,
        // not the moment the main thread's 50 ms progress poll noticed.
        let t0 = Instant::now();
        let (early, late) = (t0 + Duration::from_millis(3), t0 + Duration::from_millis(7));
        let mut total = Tally::new();
        for ended in [Some(late), None, Some(early)] {
            let mut part = Tally::new();
            part.ended = ended;
            total.merge(part);
        }
        assert_eq!(total.ended, Some(late));
    }
}
