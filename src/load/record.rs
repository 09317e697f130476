//! What the load generator measures while it runs: latency histograms for
//! the whole run and for the current interval, counters per interval, and
//! the interval lines (`-i`) and histogram log (`--hdr-log`) made from them.
//!
//! Every client thread records into one [`Recorder`] behind a mutex taken
//! once per transfer: uncontended in practice, and one histogram per thread
//! would cost hundreds of KiB each, times thousands of clients.
//!
//! **Two latencies in open-loop mode.** A transfer's *latency* is measured
//! from its *intended* start (its slot in the `--rate` schedule), its
//! *service time* from the moment a client actually began it. When the
//! system under test stalls, clients are stuck and the schedule runs on:
//! latency grows by the stall for every transfer that should have started
//! meanwhile, while service time does not. Reporting only service time is
//! "coordinated omission": the load generator politely stops asking while
//! the system cannot answer, and the stall vanishes from the percentiles.
//! In closed-loop mode (no `--rate`) the two are the same.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::report::{IntervalReport, Latency};

/// Histograms hold microseconds, from 1 µs to an hour, 3 significant digits.
const MAX_US: u64 = 3_600_000_000;

pub(super) fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

/// One finished transfer, as a client reports it.
pub(super) struct Done {
    /// When it should have started (the schedule), or did (closed loop).
    pub intended: Instant,
    /// When a client began it.
    pub began: Instant,
    pub ended: Instant,
    /// Verified (and its payload size), or failed.
    pub ok: Option<u64>,
}

/// The run's histograms and counters. See the module docs.
pub(super) struct Recorder {
    /// Transfers whose intended start is before this are warm-up: run,
    /// not counted.
    pub counted_from: Instant,
    pub latency: Histogram<u64>,
    pub service: Histogram<u64>,
    pub failed: Histogram<u64>,
    /// The current interval (with `-i`).
    interval: Option<Interval>,
    /// With `--duration`: when the run's counted time ends. The interval
    /// that reaches it is the last: transfers still in flight then end in
    /// it, instead of in a sliver of an interval of their own.
    planned_end: Option<Instant>,
    /// Finished intervals, for `--json` and `--hdr-log`.
    pub intervals: Vec<(IntervalReport, Histogram<u64>)>,
    /// Print each interval's line as it closes.
    print: bool,
}

struct Interval {
    start: Instant,
    length: Duration,
    ok: u64,
    failed: u64,
    bytes: u64,
    latency: Histogram<u64>,
}

impl Recorder {
    pub fn new(
        counted_from: Instant,
        planned_end: Option<Instant>,
        interval: Option<Duration>,
        print: bool,
    ) -> Recorder {
        Recorder {
            counted_from,
            planned_end,
            latency: histogram(),
            service: histogram(),
            failed: histogram(),
            interval: interval.map(|length| Interval {
                start: counted_from,
                length,
                ok: 0,
                failed: 0,
                bytes: 0,
                latency: histogram(),
            }),
            intervals: Vec::new(),
            print,
        }
    }

    /// True if a transfer intended to start at `intended` counts.
    pub fn counts(&self, intended: Instant) -> bool {
        intended >= self.counted_from
    }

    /// Records one finished transfer (the caller checked that it counts),
    /// in the interval in which it ended.
    pub fn record(&mut self, done: &Done) {
        self.roll(done.ended);
        let latency = micros(done.ended.duration_since(done.intended));
        match done.ok {
            Some(_) => {
                let _ = self.latency.record(latency);
                let _ = self
                    .service
                    .record(micros(done.ended.duration_since(done.began)));
            }
            None => {
                let _ = self.failed.record(latency);
            }
        }
        if let Some(i) = &mut self.interval {
            match done.ok {
                Some(bytes) => {
                    i.ok += 1;
                    i.bytes += bytes;
                    let _ = i.latency.record(latency);
                }
                None => i.failed += 1,
            }
        }
    }

    /// Closes every interval that ended by `now`, except the last one of
    /// a `--duration` run (see [`Recorder::finish`]).
    pub fn roll(&mut self, now: Instant) {
        let planned_end = self.planned_end;
        while self.interval.as_ref().is_some_and(|i| {
            let natural_end = i.start + i.length;
            now >= natural_end && planned_end.is_none_or(|p| natural_end < p)
        }) {
            self.close_interval(None);
        }
    }

    /// At the end of the run (`end`: when the last counted transfer
    /// ended): closes every full interval, then the last one. In a
    /// `--duration` run the last one is the interval that reaches the
    /// planned end; it ends then, or at `end` if transfers still in flight
    /// finished later (they belong to it: `-d 4s -i 1s` makes four
    /// intervals, not a fifth of a millisecond with one transfer in it).
    /// Otherwise the last, partial interval ends at `end`, if anything
    /// happened in it.
    pub fn finish(&mut self, end: Instant) {
        self.roll(end);
        let end = self.planned_end.map_or(end, |p| end.max(p));
        let planned = self.planned_end.is_some();
        if self
            .interval
            .as_ref()
            .is_some_and(|i| (planned || i.ok + i.failed > 0) && end > i.start)
        {
            self.close_interval(Some(end));
        }
    }

    /// Closes the current interval (at its natural end, or at `end`),
    /// printing its line when asked, and starts the next.
    fn close_interval(&mut self, end: Option<Instant>) {
        let Some(i) = &mut self.interval else {
            return;
        };
        let end = end.unwrap_or(i.start + i.length);
        let secs = end.duration_since(i.start).as_secs_f64().max(1e-9);
        let ms = |q: f64| i.latency.value_at_quantile(q) as f64 / 1000.0;
        let report = IntervalReport {
            start_s: i.start.duration_since(self.counted_from).as_secs_f64(),
            end_s: end.duration_since(self.counted_from).as_secs_f64(),
            transfers_ok: i.ok,
            transfers_failed: i.failed,
            mb_per_s: i.bytes as f64 / 1e6 / secs,
            transfers_per_s: i.ok as f64 / secs,
            p50_ms: if i.ok > 0 { ms(0.5) } else { 0.0 },
            p99_ms: if i.ok > 0 { ms(0.99) } else { 0.0 },
        };
        if self.print {
            crate::human::out(&report);
        }
        let finished = std::mem::replace(&mut i.latency, histogram());
        self.intervals.push((report, finished));
        i.start = end;
        i.ok = 0;
        i.failed = 0;
        i.bytes = 0;
    }

    /// The summary's latency figures of `h`.
    pub fn latency_of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            stdev: h.stdev() / 1000.0,
            p999: ms(h.value_at_quantile(0.999)),
        }
    }
}

/// Writes `intervals` (or, without `-i`, the whole run as one) as an
/// HdrHistogram interval log: readable by HdrHistogram's own log tools and
/// plotters. Values are microseconds; the max column is in milliseconds.
pub(super) fn write_hdr_log(
    path: &std::path::Path,
    start: std::time::SystemTime,
    intervals: &[(IntervalReport, Histogram<u64>)],
    whole: (&Histogram<u64>, f64),
) -> std::io::Result<()> {
    use hdrhistogram::serialization::{interval_log, V2DeflateSerializer};
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut serializer = V2DeflateSerializer::new();
    let mut log = interval_log::IntervalLogWriterBuilder::new()
        .add_comment("stopover load: transfer latency, microseconds")
        .with_start_time(start)
        .with_base_time(start)
        .with_max_value_divisor(1000.0)
        .begin_log_with(&mut out, &mut serializer)?;
    let to_io = |e: interval_log::IntervalLogWriterError<_>| match e {
        interval_log::IntervalLogWriterError::IoError(e) => e,
        interval_log::IntervalLogWriterError::SerializeError(e) => {
            std::io::Error::other(format!("serializing a histogram: {e:?}"))
        }
    };
    if intervals.is_empty() {
        log.write_histogram(
            whole.0,
            Duration::ZERO,
            Duration::from_secs_f64(whole.1),
            None,
        )
        .map_err(to_io)?;
    }
    for (report, h) in intervals {
        log.write_histogram(
            h,
            Duration::from_secs_f64(report.start_s),
            Duration::from_secs_f64(report.end_s - report.start_s),
            None,
        )
        .map_err(to_io)?;
    }
    drop(log);
    std::io::Write::flush(&mut out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(at: Instant) -> Done {
        Done {
            intended: at,
            began: at,
            ended: at,
            ok: Some(1),
        }
    }

    #[test]
    fn a_transfer_ending_after_a_duration_run_belongs_to_its_last_interval() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut rec = Recorder::new(t0, Some(t0 + 2 * second), Some(second), false);
        rec.record(&done(t0 + second / 2));
        rec.record(&done(t0 + second + second / 2));
        // Began before the end of the run, ended half a millisecond after.
        let straggler = t0 + 2 * second + Duration::from_micros(500);
        rec.record(&done(straggler));
        rec.finish(straggler);
        let reports: Vec<&IntervalReport> = rec.intervals.iter().map(|(r, _)| r).collect();
        assert_eq!(reports.len(), 2, "-d 2s -i 1s: two intervals: {reports:?}");
        assert_eq!(reports[1].transfers_ok, 2);
        assert!((reports[1].end_s - 2.0005).abs() < 1e-6, "{reports:?}");
        assert!(reports[1].transfers_per_s < 2.0, "{reports:?}");
    }

    #[test]
    fn a_run_of_so_many_transfers_ends_with_its_partial_interval() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut rec = Recorder::new(t0, None, Some(second), false);
        rec.record(&done(t0 + second / 2));
        let end = t0 + second + second / 4;
        rec.record(&done(end));
        rec.finish(end);
        let ends: Vec<f64> = rec.intervals.iter().map(|(r, _)| r.end_s).collect();
        assert_eq!(ends, [1.0, 1.25]);
    }
}
