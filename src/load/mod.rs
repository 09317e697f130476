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
//! **Closed or open loop.** By default each client starts its next
//! transfer as soon as the last one ended (closed loop): the load adapts
//! to the system under test, which is what a throughput benchmark wants.
//! With `--rate R` transfers start on a fixed schedule, one every 1/R s
//! (open loop, as in wrk2 and vegeta), and each latency is measured from
//! the transfer's *scheduled* start (see `record` on coordinated
//! omission). `--warmup` runs transfers without counting them; `-i`
//! reports every interval; `--hdr-log` writes the histograms in the
//! HdrHistogram log format; `--fail-if` sets thresholds a CI job can gate
//! on (`report`).
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
//!
//! `--replay DIR` sends a recording (a spool, a server's directory) again,
//! each file at its recorded time, on the same open loop (`replay`).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::client::{self, ClientError, Source, Verdict, CHUNK};
use crate::sys;

mod payload;
mod progress;
mod record;
mod recording;
mod replay;
mod report;

pub use payload::SizeRange;
pub use report::{
    IntervalReport, Latency, RateReport, RunEcho, Summary, Threshold, ThresholdResult,
};

pub use recording::{arrival_time, Bound};
pub use replay::{parse_speed, Replay, ReplayOptions, ReplayPlan};

use crate::rng::Rng;
use payload::{random_pool, seed_for, Gate, PoolSource};
use progress::watch_progress;
use record::{Done, Recorder};

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
    /// Open loop: start this many transfers a second, on a schedule.
    pub rate: Option<f64>,
    /// Run transfers for this long first without counting them.
    pub warmup: Duration,
    /// Report every interval of this length.
    pub interval: Option<Duration>,
    /// Print interval lines as they close (not with `--json`).
    pub print_intervals: bool,
    /// Write the latency histograms here (HdrHistogram interval log).
    pub hdr_log: Option<PathBuf>,
    /// `--fail-if` conditions.
    pub thresholds: Vec<Threshold>,
    /// Progress bar on stderr when it is a terminal.
    pub progress: bool,
    /// Send this recording on its schedule instead of random payloads
    /// (open loop; it ends after its slots, whatever `stop` says; `size`
    /// and `warmup` are not used).
    pub replay: Option<Arc<Replay>>,
}

impl LoadConfig {
    /// Transfers a second asked for in open loop (`--rate`, or a replay's
    /// average); `None` in closed loop.
    fn offered_rate(&self) -> Option<f64> {
        match &self.replay {
            Some(replay) => Some(replay.offered_rate()),
            None => self.rate,
        }
    }
}

/// When the load generator stops starting new transfers.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this many (counted) transfers in total.
    Transfers(u64),
    /// After this much (counted) time.
    Duration(Duration),
}

/// A transfer that starts later than this after its scheduled slot is
/// reported as late.
const LATE: Duration = Duration::from_millis(1);

/// What each client thread brings back.
struct Tally {
    ok: u64,
    bytes: u64,
    failures: BTreeMap<String, u64>,
    examples: BTreeMap<String, String>,
    /// When the last counted transfer ended: the end of the wall time.
    ended: Option<Instant>,
    /// Open loop: counted transfers that began late, and the latest.
    late: u64,
    max_late: Duration,
}

impl Tally {
    fn new() -> Tally {
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

    fn fail(&mut self, kind: &str, message: String) {
        // The summary keeps one example per kind; -v shows every one.
        log::debug!("load: transfer failed ({kind}): {message}");
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

/// When and how many: the schedule every client follows.
struct Plan {
    /// Transfers intended to start before this are warm-up.
    counted_from: Instant,
    /// Open loop: the first slot, and the rate (slot `k` is at
    /// `first + k / rate`, see [`slot_time`]).
    schedule: Option<(Instant, f64)>,
    /// Slots (open loop) or counted transfers (closed loop) to run.
    total: Option<u64>,
    /// No transfer starts (or is scheduled) at or after this.
    deadline: Option<Instant>,
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
    let started_at = SystemTime::now();
    let started = Instant::now();
    let schedule = config.rate.map(|r| (started, r));
    // Open loop: the slots are counted, not timed, so `--rate 3000 -d 2s`
    // runs 6,000 transfers whatever the rounding of 1/3000 s; counting
    // starts with the first slot after the warm-up.
    let warmup_slots = config.rate.map_or(0, |r| slots_within(config.warmup, r));
    let counted_from = match schedule {
        Some(schedule) => slot_time(schedule, warmup_slots),
        None => started + config.warmup,
    };
    let planned_end = match config.stop {
        Stop::Duration(d) => Some(counted_from + d),
        Stop::Transfers(_) => None,
    };
    let plan = Plan {
        counted_from,
        schedule,
        total: match (config.all_at_once, config.stop, config.rate) {
            (true, _, _) => Some(config.clients as u64),
            (false, Stop::Transfers(n), _) => Some(n + warmup_slots),
            (false, Stop::Duration(d), Some(r)) => Some(slots_within(d, r) + warmup_slots),
            (false, Stop::Duration(_), None) => None,
        },
        deadline: if config.rate.is_some() {
            None
        } else {
            planned_end
        },
    };
    // A replay sends files, not the pool: keep the pool at its smallest.
    let pool = Arc::new(random_pool(if config.replay.is_some() {
        0
    } else {
        config.size.max
    }));
    let claimed = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Gate::new(config.clients));
    let recorder = Arc::new(Mutex::new(Recorder::new(
        counted_from,
        planned_end,
        config.interval,
        config.print_intervals,
    )));
    let plan = Arc::new(plan);
    // A chunk buffer per client: large for few clients (fast bulk
    // transfers), small when there are thousands of them.
    let chunk = (config.size.max.clamp(4096, CHUNK as u64) as usize).min(if config.clients > 256 {
        64 * 1024
    } else {
        CHUNK
    });

    log::debug!(
        "load: {} client thread(s) against {}, {} to {} bytes per upload, chunks of {chunk} bytes",
        config.clients,
        config.to,
        config.size.min,
        config.size.max
    );
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
            recorder: recorder.clone(),
            plan: plan.clone(),
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

    watch_progress(config, &finished, &running, plan.total, &recorder);
    let mut tally = Tally::new();
    for t in threads {
        match t.join() {
            Ok(part) => tally.merge(part),
            Err(_) => tally.fail("panic", "a client thread panicked".into()),
        }
    }
    // From the start of counting to the end of the last counted transfer,
    // as the clients saw it (not when this thread noticed: it polls).
    let end = tally.ended.unwrap_or_else(Instant::now);
    let wall = end.saturating_duration_since(counted_from).as_secs_f64();
    if let Some(e) = spawn_error {
        if tally.ok == 0 {
            return Err(e);
        }
        tally.fail("client_limit", e);
    }
    let mut rec = recorder.lock().unwrap_or_else(|p| p.into_inner());
    rec.finish(end);
    if let Some(path) = &config.hdr_log {
        record::write_hdr_log(
            path,
            started_at + config.warmup,
            &rec.intervals,
            (&rec.latency, wall),
        )
        .map_err(|e| format!("writing --hdr-log {}: {e}", path.display()))?;
    }
    let failed: u64 = tally.failures.values().sum();
    let per_s = |n: f64| if wall > 0.0 { n / wall } else { 0.0 };
    let mut summary = Summary {
        to: config.to.clone(),
        clients: config.clients,
        transfers_ok: tally.ok,
        transfers_failed: failed,
        failures: tally.failures,
        bytes: tally.bytes,
        wall_s: wall,
        mb_per_s: per_s(tally.bytes as f64 / 1e6),
        transfers_per_s: per_s(tally.ok as f64),
        latency_ms: Recorder::latency_of(&rec.latency),
        failure_examples: tally.examples,
        service_time_ms: config
            .offered_rate()
            .map(|_| Recorder::latency_of(&rec.service)),
        failure_latency_ms: (!rec.failed.is_empty()).then(|| Recorder::latency_of(&rec.failed)),
        rate: config.offered_rate().map(|offered| RateReport {
            offered,
            achieved: per_s(tally.ok as f64),
            started_late: tally.late,
            max_late_ms: tally.max_late.as_secs_f64() * 1000.0,
        }),
        intervals: rec.intervals.iter().map(|(r, _)| r.clone()).collect(),
        config: echo(config, started_at),
        thresholds: Vec::new(),
    };
    summary.thresholds = config
        .thresholds
        .iter()
        .map(|t| t.judge(&summary))
        .collect();
    Ok(summary)
}

/// Open loop: when slot `k` of `(first, rate)` is due.
fn slot_time((first, rate): (Instant, f64), k: u64) -> Instant {
    first + Duration::from_secs_f64(k as f64 / rate)
}

/// How many slots of a `rate` a second fall within `d` (`k / rate < d`),
/// forgiving the float rounding that would make `0.1 * 30` more than 3.
fn slots_within(d: Duration, rate: f64) -> u64 {
    (d.as_secs_f64() * rate - 1e-9).ceil().max(0.0) as u64
}

/// What was run, for the summary.
fn echo(config: &LoadConfig, started_at: SystemTime) -> RunEcho {
    RunEcho {
        target: config.to.clone(),
        clients: config.clients,
        size: config.size.to_string(),
        mode: if config.offered_rate().is_some() {
            "open"
        } else {
            "closed"
        }
        .to_string(),
        rate: config.rate,
        transfers: match config.stop {
            Stop::Transfers(n) if !config.all_at_once => Some(n),
            _ if config.all_at_once => Some(config.clients as u64),
            _ => None,
        },
        duration_s: match config.stop {
            Stop::Duration(d) => Some(d.as_secs_f64()),
            Stop::Transfers(_) => None,
        },
        warmup_s: config.warmup.as_secs_f64(),
        all_at_once: config.all_at_once,
        replay: config.replay.as_ref().map(|r| r.plan.clone()),
        stopover_version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: humantime::format_rfc3339_millis(started_at).to_string(),
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
    recorder: Arc<Mutex<Recorder>>,
    plan: Arc<Plan>,
    chunk: usize,
    seed: u64,
}

impl ClientCtx {
    /// The next transfer's intended start and, in a replay, its slot (0
    /// otherwise), or `None` when the run is over.
    fn next_slot(&self) -> Option<(Instant, u64)> {
        let plan = &self.plan;
        if let Some(replay) = &self.config.replay {
            // The open loop, with the slots' times from the recording (a
            // replay has no warm-up: counting starts with the first slot).
            let slot = self.claimed.fetch_add(1, Ordering::SeqCst);
            return (slot < replay.slots()).then(|| (plan.counted_from + replay.at(slot), slot));
        }
        let now = Instant::now();
        let intended = match plan.schedule {
            // Open loop: the next free slot of the schedule.
            Some(schedule) => {
                let slot = self.claimed.fetch_add(1, Ordering::SeqCst);
                if plan.total.is_some_and(|t| slot >= t) {
                    return None;
                }
                slot_time(schedule, slot)
            }
            // Closed loop: now; only counted transfers take a number.
            None => {
                if now >= plan.counted_from
                    && plan
                        .total
                        .is_some_and(|t| self.claimed.fetch_add(1, Ordering::SeqCst) >= t)
                {
                    return None;
                }
                now
            }
        };
        if plan.deadline.is_some_and(|d| intended >= d) {
            return None;
        }
        Some((intended, 0))
    }

    fn run(self) -> Tally {
        let mut tally = Tally::new();
        let mut rng = Rng::new(self.seed);
        let mut read_buf = Vec::new(); // a replay's, for its files
        while let Some((intended, slot)) = self.next_slot() {
            // Open loop: wait for the slot. Pacing the load, not
            // synchronising anything.
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            let (mut pool, mut file) = (None, None);
            let payload: Result<&mut dyn Source, ClientError> = match &self.config.replay {
                Some(replay) => replay
                    .open(slot, &mut read_buf)
                    .map(|f| file.insert(f) as &mut dyn Source),
                None => {
                    let size = self.config.size.min
                        + rng.below(self.config.size.max - self.config.size.min + 1);
                    Ok(pool.insert(PoolSource {
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
                    }))
                }
            };
            let what = (self.config.replay.as_ref()).map(|r| r.path(slot).display().to_string());
            let began = Instant::now();
            let result = payload.and_then(|payload| {
                client::upload(
                    &self.config.to,
                    payload,
                    what.as_deref().unwrap_or("payload"),
                    self.config.timeout,
                    &mut |_| {},
                )
            });
            let ended = Instant::now();
            if pool.is_some_and(|p| !p.arrived) && self.config.all_at_once {
                self.gate.arrive(); // failed before half-way: do not hold up the others
            }
            self.finished.fetch_add(1, Ordering::Relaxed);
            let mut recorder = self.recorder.lock().unwrap_or_else(|p| p.into_inner());
            if !recorder.counts(intended) {
                continue; // warm-up
            }
            let ok = match result {
                Ok(receipt) => match receipt.verdict() {
                    Verdict::Verified => Some(receipt.sent_bytes),
                    Verdict::Refused(reason) => {
                        tally.fail("err_answer", format!("ERR {reason}"));
                        None
                    }
                    mismatch @ Verdict::Mismatch { .. } => {
                        tally.fail("mismatch", mismatch.to_string());
                        None
                    }
                },
                Err(e) => {
                    tally.fail(failure_kind(&e), e.to_string());
                    None
                }
            };
            recorder.record(&Done {
                intended,
                began,
                ended,
                ok,
            });
            drop(recorder);
            if let Some(bytes) = ok {
                tally.ok += 1;
                tally.bytes += bytes;
            }
            let late = began.saturating_duration_since(intended);
            let open_loop = self.plan.schedule.is_some() || self.config.replay.is_some();
            if open_loop && late > LATE {
                tally.late += 1;
                tally.max_late = tally.max_late.max(late);
            }
            tally.ended = Some(ended);
            if self.config.all_at_once {
                break;
            }
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        tally
    }
}

#[cfg(test)]
mod tests;
