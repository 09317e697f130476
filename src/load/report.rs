//! What the load generator reports: the summary (also its `--json` form),
//! the interval lines of `-i`, and the `--fail-if` thresholds a CI job can
//! gate on.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    #[serde(default)]
    pub min: f64,
    #[serde(default)]
    pub mean: f64,
    #[serde(default)]
    pub stdev: f64,
    #[serde(default)]
    pub p999: f64,
}

/// One `-i` interval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IntervalReport {
    /// Seconds since counting began (after the warm-up).
    pub start_s: f64,
    pub end_s: f64,
    pub transfers_ok: u64,
    pub transfers_failed: u64,
    pub mb_per_s: f64,
    pub transfers_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl fmt::Display for IntervalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:6.1}-{:6.1} s] ok {:>7} failed {:>5}  {:9.1} MB/s {:9.0} transfers/s  p50 {:8.2} ms  p99 {:8.2} ms",
            self.start_s,
            self.end_s,
            self.transfers_ok,
            self.transfers_failed,
            self.mb_per_s,
            self.transfers_per_s,
            self.p50_ms,
            self.p99_ms
        )
    }
}

/// Open-loop (`--rate`) bookkeeping: did the clients keep the schedule?
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RateReport {
    /// Transfers per second asked for.
    pub offered: f64,
    /// Transfers per second verified.
    pub achieved: f64,
    /// Counted transfers that began more than 1 ms after their slot (all
    /// clients were busy, or the system under test was stalled).
    pub started_late: u64,
    /// The latest any of them began, in milliseconds.
    pub max_late_ms: f64,
}

/// What was run, echoed so that a result file stands on its own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunEcho {
    pub target: String,
    pub clients: usize,
    /// `64KiB`, or `1KiB..1MiB`.
    pub size: String,
    /// `closed` (each client sends as soon as its last transfer ended) or
    /// `open` (transfers start on a fixed schedule, `--rate`).
    pub mode: String,
    pub rate: Option<f64>,
    pub transfers: Option<u64>,
    pub duration_s: Option<f64>,
    pub warmup_s: f64,
    pub all_at_once: bool,
    /// `--replay`: what was replayed, and on what schedule.
    #[serde(default)]
    pub replay: Option<super::ReplayPlan>,
    pub stopover_version: String,
    /// RFC 3339, UTC.
    pub started_at: String,
}

/// The result of a load run (also its `--json` form). Keys added over
/// time are optional when read back, so older result files still load.
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
    /// Verified transfers, from their intended start (open loop) or their
    /// start (closed loop) to the end of the answer.
    pub latency_ms: Latency,
    /// One example message per failure kind, to say what went wrong.
    pub failure_examples: BTreeMap<String, String>,
    /// Open loop only: from the moment a client began each transfer (what
    /// a load generator that ignores coordinated omission would report).
    #[serde(default)]
    pub service_time_ms: Option<Latency>,
    /// Failed transfers: time to failure.
    #[serde(default)]
    pub failure_latency_ms: Option<Latency>,
    /// Open loop only: did the clients keep the schedule?
    #[serde(default)]
    pub rate: Option<RateReport>,
    /// With `-i`: one entry per interval.
    #[serde(default)]
    pub intervals: Vec<IntervalReport>,
    /// What was run.
    #[serde(default)]
    pub config: RunEcho,
    /// With `--fail-if`: each condition, what was measured, and whether
    /// the run passed it.
    #[serde(default)]
    pub thresholds: Vec<ThresholdResult>,
}

impl Summary {
    /// True when at least one transfer ran and every one was verified.
    pub fn all_verified(&self) -> bool {
        self.transfers_failed == 0 && self.transfers_ok > 0
    }

    /// True when the run passed every `--fail-if` threshold (none of the
    /// conditions is true).
    pub fn thresholds_passed(&self) -> bool {
        self.thresholds.iter().all(|t| t.passed)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "stopover load: {} clients -> {}", self.clients, self.to)?;
        if let Some(replay) = &self.config.replay {
            writeln!(f, "  replay            {}", replay.brief())?;
        }
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
        write!(
            f,
            "  rate              {:.0} transfers/s",
            self.transfers_per_s
        )?;
        if let Some(r) = &self.rate {
            write!(
                f,
                " (offered {:.0}/s; {} started late, by up to {:.1} ms)",
                r.offered, r.started_late, r.max_late_ms
            )?;
        }
        writeln!(f)?;
        let line = |f: &mut fmt::Formatter<'_>, name: &str, l: &Latency| {
            write!(
                f,
                "  {name:<17} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms\n  {:<17} min {:.2} ms  mean {:.2} ms  stdev {:.2} ms",
                l.p50, l.p90, l.p99, l.p999, l.max, "", l.min, l.mean, l.stdev
            )
        };
        line(f, "latency", &self.latency_ms)?;
        if let Some(service) = &self.service_time_ms {
            writeln!(f)?;
            line(f, "service time", service)?;
        }
        if let Some(failed) = &self.failure_latency_ms {
            writeln!(f)?;
            line(f, "time to failure", failed)?;
        }
        for t in &self.thresholds {
            write!(f, "\n  threshold         {t}")?;
        }
        Ok(())
    }
}

/// One `--fail-if` condition, e.g. `p99>50ms` or `errors>0`: the run fails
/// (exit code 4) if it is true.
#[derive(Debug, Clone)]
pub struct Threshold {
    text: String,
    metric: Metric,
    op: Op,
    value: f64,
}

#[derive(Debug, Clone, Copy)]
enum Metric {
    /// A latency figure, in milliseconds.
    Latency(fn(&Latency) -> f64),
    Errors,
    ErrorRate,
    MbPerS,
    TransfersPerS,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Metric {
    /// The unit a measured value of this metric is in.
    fn unit(self) -> &'static str {
        match self {
            Metric::Latency(_) => "ms",
            Metric::Errors => "errors",
            Metric::ErrorRate => "%",
            Metric::MbPerS => "MB/s",
            Metric::TransfersPerS => "transfers/s",
        }
    }
}

/// A threshold's outcome, in the summary (and its `--json` form:
/// `{"threshold": "p99>50ms", "measured": 5.423, "unit": "ms",
/// "passed": true}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThresholdResult {
    /// The condition that fails the run when it is true, as given.
    pub threshold: String,
    /// What was measured, in `unit`.
    pub measured: f64,
    /// The unit of `measured`: `ms`, `errors`, `%`, `MB/s` or
    /// `transfers/s`. (Absent from result files written before it was.)
    #[serde(default)]
    pub unit: String,
    /// True when the condition was false, so the run passed this
    /// threshold; false when it was crossed (exit code 4). Result files
    /// written before this field was renamed call it `met`.
    #[serde(alias = "met")]
    pub passed: bool,
}

impl fmt::Display for ThresholdResult {
    /// `p99>50ms: passed, measured 5.423 ms` or
    /// `errors>0: FAILED, measured 3 errors`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Up to three decimals, without trailing zeros: 5.423, 0, 12.5.
        let figure = format!("{:.3}", self.measured);
        let figure = figure.trim_end_matches('0').trim_end_matches('.');
        let sep = if self.unit == "%" { "" } else { " " };
        write!(
            f,
            "{}: {}, measured {figure}{sep}{}",
            self.threshold,
            if self.passed { "passed" } else { "FAILED" },
            self.unit
        )
    }
}

impl FromStr for Threshold {
    type Err = String;

    /// `METRIC OP VALUE` without spaces. Metrics: `p50`, `p90`, `p99`,
    /// `p99.9`, `max`, `mean` (a duration: `50ms`, `1s`), `errors` (a count),
    /// `error_rate` (a percentage), `mb_per_s`, `transfers_per_s`.
    /// Operators: `>`, `>=`, `<`, `<=`.
    fn from_str(text: &str) -> Result<Threshold, String> {
        let help = || {
            format!(
                "{text:?}: want METRIC>VALUE, e.g. 'p99>50ms', 'errors>0', 'error_rate>1', 'transfers_per_s<1000' \
                 (metrics: p50 p90 p99 p99.9 max mean errors error_rate mb_per_s transfers_per_s; operators > >= < <=)"
            )
        };
        // Unquoted, `--fail-if p99>50ms` reaches us as `p99` (the shell
        // took `>50ms` as a redirection and created a file `50ms`).
        let at = text.find(['>', '<']).ok_or_else(|| {
            format!(
                "{}; quote the whole condition (--fail-if 'p99>50ms'): unquoted, a shell takes > and < as redirections",
                help()
            )
        })?;
        let (name, rest) = text.split_at(at);
        let (op, value) = if let Some(v) = rest.strip_prefix(">=") {
            (Op::Ge, v)
        } else if let Some(v) = rest.strip_prefix("<=") {
            (Op::Le, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (Op::Gt, v)
        } else if let Some(v) = rest.strip_prefix('<') {
            (Op::Lt, v)
        } else {
            return Err(help());
        };
        let latency = |f: fn(&Latency) -> f64| Metric::Latency(f);
        let metric = match name.trim() {
            "p50" => latency(|l| l.p50),
            "p90" => latency(|l| l.p90),
            "p99" => latency(|l| l.p99),
            "p99.9" => latency(|l| l.p999),
            "max" => latency(|l| l.max),
            "mean" => latency(|l| l.mean),
            "errors" => Metric::Errors,
            "error_rate" => Metric::ErrorRate,
            "mb_per_s" => Metric::MbPerS,
            "transfers_per_s" => Metric::TransfersPerS,
            _ => return Err(help()),
        };
        let value = match metric {
            Metric::Latency(_) => humantime::parse_duration(value.trim())
                .map(|d: Duration| d.as_secs_f64() * 1000.0)
                .map_err(|e| format!("{text:?}: {e} (a duration: 50ms, 1s)"))?,
            _ => value
                .trim()
                .trim_end_matches('%')
                .parse::<f64>()
                .map_err(|e| format!("{text:?}: {e}"))?,
        };
        Ok(Threshold {
            text: text.to_string(),
            metric,
            op,
            value,
        })
    }
}

impl Threshold {
    /// Judges `summary` against this condition.
    pub fn judge(&self, summary: &Summary) -> ThresholdResult {
        let total = summary.transfers_ok + summary.transfers_failed;
        let measured = match self.metric {
            Metric::Latency(f) => f(&summary.latency_ms),
            Metric::Errors => summary.transfers_failed as f64,
            Metric::ErrorRate if total == 0 => 0.0,
            Metric::ErrorRate => summary.transfers_failed as f64 * 100.0 / total as f64,
            Metric::MbPerS => summary.mb_per_s,
            Metric::TransfersPerS => summary.transfers_per_s,
        };
        let fails = match self.op {
            Op::Gt => measured > self.value,
            Op::Ge => measured >= self.value,
            Op::Lt => measured < self.value,
            Op::Le => measured <= self.value,
        };
        ThresholdResult {
            threshold: self.text.clone(),
            measured,
            unit: self.metric.unit().to_string(),
            passed: !fails,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(p99: f64, ok: u64, failed: u64) -> Summary {
        Summary {
            to: String::new(),
            clients: 1,
            transfers_ok: ok,
            transfers_failed: failed,
            failures: BTreeMap::new(),
            bytes: 0,
            wall_s: 1.0,
            mb_per_s: 0.0,
            transfers_per_s: ok as f64,
            latency_ms: Latency {
                p99,
                ..Latency::default()
            },
            failure_examples: BTreeMap::new(),
            service_time_ms: None,
            failure_latency_ms: None,
            rate: None,
            intervals: Vec::new(),
            config: RunEcho::default(),
            thresholds: Vec::new(),
        }
    }

    #[test]
    fn thresholds_parse_and_judge() {
        let t: Threshold = "p99>50ms".parse().unwrap();
        assert!(t.judge(&summary(49.0, 10, 0)).passed);
        assert!(!t.judge(&summary(51.0, 10, 0)).passed);
        let t: Threshold = "errors>0".parse().unwrap();
        assert!(t.judge(&summary(1.0, 10, 0)).passed);
        assert!(!t.judge(&summary(1.0, 10, 1)).passed);
        let t: Threshold = "error_rate>=10%".parse().unwrap();
        assert!(!t.judge(&summary(1.0, 9, 1)).passed);
        let t: Threshold = "transfers_per_s<100".parse().unwrap();
        assert!(!t.judge(&summary(1.0, 99, 0)).passed);
        for bad in ["p99", "p98>1ms", "p99>fast", "errors>>1", ">1"] {
            assert!(bad.parse::<Threshold>().is_err(), "{bad}");
        }
        // What a shell leaves of an unquoted `--fail-if p99>50ms`.
        let e = "p99".parse::<Threshold>().unwrap_err();
        assert!(e.contains("quote") && e.contains("'p99>50ms'"), "{e}");
    }

    #[test]
    fn threshold_lines_say_passed_or_failed_and_the_unit() {
        let judge = |cond: &str, s: &Summary| cond.parse::<Threshold>().unwrap().judge(s);
        let calm = summary(5.4231, 10, 0);
        assert_eq!(
            judge("error_rate>1", &calm).to_string(),
            "error_rate>1: passed, measured 0%"
        );
        assert_eq!(
            judge("p99>5ms", &calm).to_string(),
            "p99>5ms: FAILED, measured 5.423 ms"
        );
        assert_eq!(
            judge("errors>0", &summary(1.0, 9, 2)).to_string(),
            "errors>0: FAILED, measured 2 errors"
        );
        assert_eq!(
            judge("transfers_per_s<5", &calm).to_string(),
            "transfers_per_s<5: passed, measured 10 transfers/s"
        );
        // The JSON names the outcome `passed`, with the unit; files written
        // before the rename (`met`) still load.
        let json = serde_json::to_value(judge("p99>50ms", &calm)).unwrap();
        assert_eq!(json["passed"], true);
        assert_eq!(json["unit"], "ms");
        let old: ThresholdResult =
            serde_json::from_str(r#"{"threshold":"p99>50ms","measured":1.0,"met":false}"#).unwrap();
        assert!(!old.passed);
    }
}
