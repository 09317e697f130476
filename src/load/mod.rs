//! The load generator: many concurrent blocking clients, every answer
//! verified, and a summary worth trusting.
//!
//! Each simulated client is a thread running the ordinary blocking client
//! ([`client::upload`]) in a loop, exactly as `stopover client` does it:
//! connect, send, half-close, read the answer, check bytes and CRC-32C.
//! Threads (with small stacks) rather than an event loop on purpose: the
//! clients should behave like many independent real clients, and the thing
//! under test is the proxy's loop, not the load generator's.
//!
//! Payloads are slices of one shared pool of random bytes, starting at a
//! random offset and wrapping around, so generating them costs a `memcpy`
//! and no transfer sends the same bytes as the one before it.
//!
//! `--all-at-once` makes every client hold its connection open half-way
//! through its upload until all clients have got that far (and then for
//! `--hold-open` longer), so the server or proxy holds `--clients`
//! transfers at the same moment. Note that a client "got there" once the
//! kernel took its bytes, which can be before the receiver has accepted its
//! connection; `--hold-open` gives a slow receiver time to catch up. A
//! client that fails before the half-way point still counts as arrived, so
//! one failure cannot hang the rest; the wait is also bounded by
//! `--timeout`.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client::{self, ClientError, Verdict, CHUNK};
use crate::sys;

mod payload;

pub use payload::SizeRange;
use payload::{random_pool, seed_for, Gate, PoolSource, SplitMix};

/// Settings for [`run`].
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Where to send (`host:port`).
    pub to: String,
    /// Concurrent clients.
    pub clients: usize,
    /// When to stop.
    pub stop: Stop,
    /// Payload size range (inclusive).
    pub size: SizeRange,
    /// Per-transfer timeout (connect, each blocked send, the answer).
    pub timeout: Duration,
    /// Hold every transfer open half-way until all clients got there.
    pub all_at_once: bool,
    /// With `all_at_once`: keep holding this long after the last client
    /// got there, so the receiver has time to accept them all.
    pub hold_open: Duration,
    /// Progress bar on stderr when it is a terminal.
    pub progress: bool,
}

/// When the load generator stops starting new transfers.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this many transfers in total.
    Transfers(u64),
    /// After this much time.
    Duration(Duration),
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The result of a load run (also its `--json` form).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub to: String,
    pub clients: usize,
    pub transfers_ok: u64,
    pub transfers_failed: u64,
    /// Failure kind -> count: `connect_refused`, `connect_failed`, `reset`,
    /// `lost`, `timeout`, `err_answer`, `bad_answer`, `mismatch`.
    pub failures: BTreeMap<String, u64>,
    /// Payload bytes of verified transfers.
    pub bytes: u64,
    pub wall_s: f64,
    pub mb_per_s: f64,
    pub transfers_per_s: f64,
    pub latency_ms: Latency,
    /// One example message per failure kind, to say what went wrong.
    pub failure_examples: BTreeMap<String, String>,
}

impl Summary {
    /// True when at least one transfer ran and every one was verified.
    pub fn all_verified(&self) -> bool {
        self.transfers_failed == 0 && self.transfers_ok > 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "stopover load: {} clients -> {}", self.clients, self.to)?;
        writeln!(f, "  transfers ok      {}", self.transfers_ok)?;
        write!(f, "  transfers failed  {}", self.transfers_failed)?;
        if !self.failures.is_empty() {
            let kinds: Vec<String> = self
                .failures
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            write!(f, " ({})", kinds.join(", "))?;
        }
        writeln!(f)?;
        for (kind, example) in &self.failure_examples {
            writeln!(f, "    e.g. {kind}: {example}")?;
        }
        writeln!(
            f,
            "  payload           {:.1} MB in {:.2} s = {:.1} MB/s",
            self.bytes as f64 / 1e6,
            self.wall_s,
            self.mb_per_s
        )?;
        writeln!(
            f,
            "  rate              {:.0} transfers/s",
            self.transfers_per_s
        )?;
        write!(
            f,
            "  latency           p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            self.latency_ms.p50, self.latency_ms.p90, self.latency_ms.p99, self.latency_ms.max
        )
    }
}

/// What each client thread brings back.
struct Tally {
    ok: u64,
    bytes: u64,
    failures: BTreeMap<String, u64>,
    examples: BTreeMap<String, String>,
    /// When the last transfer counted here ended: the end of the wall time.
    ended: Option<Instant>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ok: 0,
            bytes: 0,
            failures: BTreeMap::new(),
            examples: BTreeMap::new(),
            ended: None,
        }
    }

    fn fail(&mut self, kind: &str, message: String) {
        *self.failures.entry(kind.to_string()).or_default() += 1;
        self.examples.entry(kind.to_string()).or_insert(message);
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.bytes += other.bytes;
        for (k, n) in other.failures {
            *self.failures.entry(k).or_default() += n;
        }
        for (k, m) in other.examples {
            self.examples.entry(k).or_insert(m);
        }
        self.ended = self.ended.max(other.ended);
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

/// Runs the load and returns the summary. Errors are for problems that
/// stop the run from starting at all (e.g. not enough file descriptors).
pub fn run(config: &LoadConfig) -> Result<Summary, String> {
    if config.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    // Each client holds one socket; leave room for the rest of the process.
    let limit = sys::raise_nofile_limit().map_err(|e| e.to_string())?;
    let needed = config.clients as u64 + 32;
    if needed > limit {
        return Err(format!(
            "--clients {} needs about {needed} open files, but the open-files limit (RLIMIT_NOFILE, hard limit) is {limit}",
            config.clients
        ));
    }
    if config.all_at_once {
        if let Stop::Duration(_) = config.stop {
            return Err(
                "--all-at-once runs exactly one transfer per client; use it without --duration"
                    .into(),
            );
        }
    }

    let pool = Arc::new(random_pool(config.size.max));
    let claimed = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Gate::new(config.clients));
    // One histogram for all clients, behind a lock taken once per transfer:
    // uncontended in practice, and one histogram per thread would cost
    // hundreds of KiB each, times thousands of clients.
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| e.to_string())?,
    ));
    let started = Instant::now();
    let deadline = match config.stop {
        Stop::Duration(d) => Some(started + d),
        Stop::Transfers(_) => None,
    };
    let total = match (config.all_at_once, config.stop) {
        (true, _) => Some(config.clients as u64),
        (false, Stop::Transfers(n)) => Some(n),
        (false, Stop::Duration(_)) => None,
    };
    // A chunk buffer per client: large for few clients (fast bulk
    // transfers), small when there are thousands of them.
    let chunk = (config.size.max.clamp(4096, CHUNK as u64) as usize).min(if config.clients > 256 {
        64 * 1024
    } else {
        CHUNK
    });

    let mut threads = Vec::with_capacity(config.clients);
    let mut spawn_error = None;
    for index in 0..config.clients {
        let ctx = ClientCtx {
            config: config.clone(),
            pool: pool.clone(),
            claimed: claimed.clone(),
            finished: finished.clone(),
            running: running.clone(),
            gate: gate.clone(),
            latency: latency.clone(),
            total,
            deadline,
            chunk,
            seed: seed_for(index),
        };
        running.fetch_add(1, Ordering::SeqCst);
        match std::thread::Builder::new()
            .name(format!("load-{index}"))
            .stack_size(128 * 1024)
            .spawn(move || ctx.run())
        {
            Ok(t) => threads.push(t),
            Err(e) => {
                running.fetch_sub(1, Ordering::SeqCst);
                // Let the others through the gate, then report the limit.
                for _ in index..config.clients {
                    gate.arrive();
                }
                spawn_error = Some(format!(
                    "could start only {index} of {} client threads ({e}); the thread or memory limit stops it",
                    config.clients
                ));
                break;
            }
        }
    }
    if let Some(e) = &spawn_error {
        log::warn!("load: {e}");
    }

    watch_progress(config, &finished, &running, total);
    let mut tally = Tally::new();
    for t in threads {
        match t.join() {
            Ok(part) => tally.merge(part),
            Err(_) => tally.fail("panic", "a client thread panicked".into()),
        }
    }
    // From the start to the end of the last transfer, as the clients saw it
    // (not when this thread noticed: it polls every 50 ms).
    let wall = tally
        .ended
        .unwrap_or_else(Instant::now)
        .duration_since(started)
        .as_secs_f64();
    if let Some(e) = spawn_error {
        if tally.ok == 0 {
            return Err(e);
        }
        tally.fail("client_limit", e);
    }
    let failed: u64 = tally.failures.values().sum();
    let h = latency.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(Summary {
        to: config.to.clone(),
        clients: config.clients,
        transfers_ok: tally.ok,
        transfers_failed: failed,
        failures: tally.failures,
        bytes: tally.bytes,
        wall_s: wall,
        mb_per_s: if wall > 0.0 {
            tally.bytes as f64 / 1e6 / wall
        } else {
            0.0
        },
        transfers_per_s: if wall > 0.0 {
            tally.ok as f64 / wall
        } else {
            0.0
        },
        latency_ms: Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        },
        failure_examples: tally.examples,
    })
}

/// Shows a progress bar until every client thread is done (terminal only).
fn watch_progress(
    config: &LoadConfig,
    finished: &AtomicU64,
    running: &AtomicUsize,
    total: Option<u64>,
) {
    let show = config.progress && io::stderr().is_terminal();
    let bar = show.then(|| {
        crate::human::progress_bar(
            total,
            "{bar:40} {pos}/{len} transfers, {per_sec}, {elapsed}",
        )
    });
    while running.load(Ordering::SeqCst) > 0 {
        if let Some(bar) = &bar {
            bar.set_position(finished.load(Ordering::Relaxed));
        }
        // The main thread has nothing else to do; 50 ms keeps the bar
        // lively and costs nothing.
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// Everything one client thread needs.
struct ClientCtx {
    config: LoadConfig,
    pool: Arc<Vec<u8>>,
    claimed: Arc<AtomicU64>,
    finished: Arc<AtomicU64>,
    running: Arc<AtomicUsize>,
    gate: Arc<Gate>,
    latency: Arc<Mutex<Histogram<u64>>>,
    total: Option<u64>,
    deadline: Option<Instant>,
    chunk: usize,
    seed: u64,
}

impl ClientCtx {
    fn run(self) -> Tally {
        let mut tally = Tally::new();
        let mut rng = SplitMix(self.seed);
        loop {
            if let Some(total) = self.total {
                if self.claimed.fetch_add(1, Ordering::SeqCst) >= total {
                    break;
                }
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let size =
                self.config.size.min + rng.below(self.config.size.max - self.config.size.min + 1);
            let mut payload = PoolSource {
                pool: &self.pool,
                pos: rng.below(self.pool.len() as u64) as usize,
                remaining: size,
                chunk: self.chunk,
                pause_at: self.config.all_at_once.then_some(size / 2),
                sent: 0,
                gate: &self.gate,
                arrived: false,
                wait_limit: self.config.timeout,
                hold_open: self.config.hold_open,
            };
            let started = Instant::now();
            let result = client::upload(
                &self.config.to,
                &mut payload,
                "payload",
                self.config.timeout,
                &mut |_| {},
            );
            if !payload.arrived && self.config.all_at_once {
                payload.gate.arrive(); // failed before half-way: do not hold up the others
            }
            match result {
                Ok(receipt) => match receipt.verdict() {
                    Verdict::Verified => {
                        tally.ok += 1;
                        tally.bytes += size;
                        let us = started.elapsed().as_micros().clamp(1, 3_600_000_000) as u64;
                        let _ = self
                            .latency
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .record(us);
                    }
                    Verdict::Refused(reason) => tally.fail("err_answer", format!("ERR {reason}")),
                    mismatch @ Verdict::Mismatch { .. } => {
                        tally.fail("mismatch", mismatch.to_string())
                    }
                },
                Err(e) => tally.fail(failure_kind(&e), e.to_string()),
            }
            self.finished.fetch_add(1, Ordering::Relaxed);
            tally.ended = Some(Instant::now());
            if self.config.all_at_once {
                break;
            }
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        tally
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
