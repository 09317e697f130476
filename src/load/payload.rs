//! What the load generator's clients send: payload sizes, one shared pool
//! of random bytes, and the source that hands a client its payload as
//! slices of that pool (and, with `--all-at-once`, holds it half-way at a
//! gate until every client got there).

use std::io;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::client::Source;
use crate::rng::Rng;

/// An inclusive range of payload sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRange {
    pub min: u64,
    pub max: u64,
}

impl std::str::FromStr for SizeRange {
    type Err = String;

    /// `64KiB`, or `1KiB..1MiB` for sizes drawn uniformly from a range.
    fn from_str(text: &str) -> Result<Self, String> {
        let parse = |t: &str| {
            parse_size::parse_size(t.trim())
                .map_err(|e| format!("{t:?}: {e} (try 64KiB, 1MiB, 1KiB..1MiB)"))
        };
        let (min, max) = match text.split_once("..") {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let v = parse(text)?;
                (v, v)
            }
        };
        if min > max {
            return Err(format!("size range {text:?} is empty (min > max)"));
        }
        Ok(SizeRange { min, max })
    }
}

impl std::fmt::Display for SizeRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

/// A payload: `remaining` bytes of the pool from `pos`, wrapping around,
/// handed to the client as slices of the pool (no copy). With `pause_at`,
/// stops there once and waits at the gate.
pub(super) struct PoolSource<'a> {
    pub pool: &'a [u8],
    pub pos: usize,
    pub remaining: u64,
    pub chunk: usize,
    pub pause_at: Option<u64>,
    pub sent: u64,
    pub gate: &'a Gate,
    pub arrived: bool,
    pub wait_limit: Duration,
    pub hold_open: Duration,
}

impl Source for PoolSource<'_> {
    fn next_chunk(&mut self) -> io::Result<&[u8]> {
        if let Some(at) = self.pause_at {
            if self.sent == at && !self.arrived {
                self.arrived = true;
                self.gate.arrive();
                self.gate.wait(self.wait_limit);
                // Shaping the load, not synchronising: every connection
                // stays open half-way for this long, all together.
                std::thread::sleep(self.hold_open);
            }
        }
        let mut want = (self.chunk as u64).min(self.remaining);
        if let Some(at) = self.pause_at.filter(|_| !self.arrived) {
            want = want.min(at - self.sent);
        }
        let start = self.pos;
        let n = (want as usize).min(self.pool.len() - start);
        self.pos = (start + n) % self.pool.len();
        self.remaining -= n as u64;
        self.sent += n as u64;
        Ok(&self.pool[start..start + n])
    }
}

/// A countdown every client passes once; waiting returns when all have
/// passed or the time limit is up.
pub(super) struct Gate {
    left: Mutex<usize>,
    all_in: Condvar,
}

impl Gate {
    pub fn new(n: usize) -> Gate {
        Gate {
            left: Mutex::new(n),
            all_in: Condvar::new(),
        }
    }

    pub fn arrive(&self) {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.all_in.notify_all();
        }
    }

    pub fn wait(&self, limit: Duration) {
        let left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .all_in
            .wait_timeout_while(left, limit, |left| *left > 0);
    }
}

/// Random bytes for payloads: up to 8 MiB, reused by all transfers.
pub(super) fn random_pool(max_size: u64) -> Vec<u8> {
    let len = max_size.clamp(64 * 1024, 8 * 1024 * 1024) as usize;
    let mut rng = Rng::new(seed_for(usize::MAX));
    let mut pool = Vec::with_capacity(len + 8);
    while pool.len() < len {
        pool.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    pool.truncate(len);
    pool
}

pub(super) fn seed_for(index: usize) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(
            "64KiB".parse(),
            Ok(SizeRange {
                min: 65536,
                max: 65536
            })
        );
        assert_eq!(
            "1KiB..1MiB".parse(),
            Ok(SizeRange {
                min: 1024,
                max: 1 << 20
            })
        );
        assert_eq!("0".parse(), Ok(SizeRange { min: 0, max: 0 }));
        assert!("2MiB..1MiB".parse::<SizeRange>().is_err());
        assert!("lots".parse::<SizeRange>().is_err());
    }

    #[test]
    fn pool_source_wraps_and_pauses_once() {
        let pool: Vec<u8> = (0..10u8).collect();
        let gate = Gate::new(1);
        let mut r = PoolSource {
            pool: &pool,
            pos: 7,
            remaining: 8,
            chunk: 64,
            pause_at: Some(4),
            sent: 0,
            gate: &gate,
            arrived: false,
            wait_limit: Duration::from_secs(5),
            hold_open: Duration::ZERO,
        };
        let mut out = Vec::new();
        loop {
            let chunk = r.next_chunk().unwrap();
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(chunk);
            if out.len() == 3 {
                assert!(!r.arrived);
            }
        }
        assert_eq!(out, [7, 8, 9, 0, 1, 2, 3, 4]);
        assert!(r.arrived);
    }
}
