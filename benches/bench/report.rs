//! What the bench prints and writes: the table, the targets, the CPU
//! lines, `results.json` and the chart (`report.svg`).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use stopover::load::Summary;

use crate::measure::{median, paired_ratio, Machine, Run};
use crate::scenarios::{Preset, Scenario};

/// The medians of one path (direct, proxied, haproxy) of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct PathRow {
    pub mb_per_s: f64,
    pub transfers_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub proxy_peak_rss_mib: Option<f64>,
    pub proxy_cpu_s: Option<f64>,
    pub server_peak_rss_mib: f64,
    pub server_cpu_s: f64,
    pub load_cpu_s: f64,
    pub server_peak_conns: Option<usize>,
    pub proxy_peak_conns: Option<usize>,
    pub errors: u64,
    pub runs: usize,
    /// Slowest and fastest repetition, for the chart's whiskers.
    pub mb_per_s_min: f64,
    pub mb_per_s_max: f64,
    pub transfers_per_s_min: f64,
    pub transfers_per_s_max: f64,
    /// The relay's CPU per GiB relayed and per transfer (medians).
    pub relay_cpu_s_per_gib: Option<f64>,
    pub relay_cpu_us_per_transfer: Option<f64>,
    /// The relay's system calls per transfer (a separate short run under
    /// strace, see `syscalls`), where counted.
    pub relay_syscalls_per_transfer: Option<f64>,
    /// How much the page cache grew during a run (median), in MiB.
    pub cache_growth_mib: f64,
    /// stopover's proxy: its spool files' bytes in the page cache right
    /// after a run (the largest), in MiB.
    pub spool_cached_mib: Option<f64>,
}

impl PathRow {
    fn of(runs: &[Run]) -> PathRow {
        let med = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        PathRow {
            mb_per_s: med(&|r| r.load.mb_per_s),
            transfers_per_s: med(&|r| r.load.transfers_per_s),
            p50_ms: med(&|r| r.load.latency_ms.p50),
            p99_ms: med(&|r| r.load.latency_ms.p99),
            proxy_peak_rss_mib: runs
                .iter()
                .filter_map(|r| r.proxy_rss_kib)
                .max()
                .map(|k| k as f64 / 1024.0),
            proxy_cpu_s: runs
                .iter()
                .any(|r| r.proxy_cpu_s.is_some())
                .then(|| med(&|r| r.proxy_cpu_s.unwrap_or(0.0))),
            server_peak_rss_mib: runs.iter().map(|r| r.server_rss_kib).max().unwrap_or(0) as f64
                / 1024.0,
            server_cpu_s: med(&|r| r.server_cpu_s),
            load_cpu_s: med(&|r| r.load_cpu_s),
            server_peak_conns: runs.iter().map(|r| r.server_peak_conns).max(),
            proxy_peak_conns: runs.iter().filter_map(|r| r.proxy_peak_conns).max(),
            errors: runs.iter().map(Run::failed).sum(),
            runs: runs.len(),
            mb_per_s_min: runs.iter().map(Run::mb_per_s).fold(f64::MAX, f64::min),
            mb_per_s_max: runs.iter().map(Run::mb_per_s).fold(0.0, f64::max),
            transfers_per_s_min: runs
                .iter()
                .map(Run::transfers_per_s)
                .fold(f64::MAX, f64::min),
            transfers_per_s_max: runs.iter().map(Run::transfers_per_s).fold(0.0, f64::max),
            relay_cpu_s_per_gib: runs.iter().any(|r| r.proxy_cpu_s.is_some()).then(|| {
                med(&|r| r.proxy_cpu_s.unwrap_or(0.0) / (r.load.bytes as f64 / GIB).max(1e-9))
            }),
            relay_cpu_us_per_transfer: runs.iter().any(|r| r.proxy_cpu_s.is_some()).then(|| {
                med(&|r| r.proxy_cpu_s.unwrap_or(0.0) * 1e6 / (r.load.transfers_ok.max(1) as f64))
            }),
            relay_syscalls_per_transfer: None, // filled in from `Extras`
            cache_growth_mib: med(&|r| r.cache_growth_kib as f64 / 1024.0),
            spool_cached_mib: runs
                .iter()
                .filter_map(|r| r.spool_cached_bytes)
                .max()
                .map(|b| b as f64 / (1u64 << 20) as f64),
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// One scenario's line in results.json.
#[derive(Debug, Serialize)]
pub struct ScenarioRow {
    pub scenario: &'static str,
    pub what: String,
    pub direct: PathRow,
    pub proxied: PathRow,
    pub ratio_mb_per_s: f64,
    pub ratio_transfers_per_s: f64,
    pub ratios_per_repetition: Vec<f64>,
    /// Every run's summary, by path.
    pub raw: BTreeMap<String, Vec<Summary>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub haproxy: Option<PathRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub haproxy_ratio_mb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub haproxy_ratio_transfers_per_s: Option<f64>,
    /// The same, behind the plain threaded receiver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_threaded: Option<PathRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxied_threaded: Option<PathRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threaded_ratio_mb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threaded_ratio_transfers_per_s: Option<f64>,
    /// Path -> the receiver's CPU seconds per GiB it stored.
    pub receiver_cpu_s_per_gib: BTreeMap<String, f64>,
    /// Every reference relay that ran: its medians and paired ratios.
    pub references: BTreeMap<String, ReferenceRow>,
}

/// A reference relay's row.
#[derive(Debug, Serialize)]
pub struct ReferenceRow {
    #[serde(flatten)]
    pub row: PathRow,
    pub ratio_mb_per_s: f64,
    pub ratio_transfers_per_s: f64,
}

/// Every path, in table order.
const PATHS: [&str; 7] = [
    "direct",
    "proxied",
    "haproxy",
    "nginx",
    "socat",
    "direct-t",
    "proxied-t",
];
/// The reference relays' paths.
pub const REFERENCES: [&str; 3] = ["haproxy", "nginx", "socat"];

/// One target and whether the run met it.
#[derive(Debug, Serialize)]
pub struct Target {
    pub target: String,
    /// `None` where the run could not tell (a reference relay not installed).
    pub met: Option<bool>,
}

/// Everything the run found.
pub struct Report {
    pub rows: Vec<ScenarioRow>,
    pub targets: Vec<Target>,
    pub errors: u64,
}

/// What the bench measured beside the timed runs.
pub struct Extras<'a> {
    /// Scenario -> path -> the relay's system calls per transfer.
    pub syscalls: &'a BTreeMap<&'a str, BTreeMap<&'a str, f64>>,
    /// The file floor (`measure::file_floor_us`): microseconds per file,
    /// and the entries in the directory it was measured in.
    pub file_floor: Option<(f64, usize)>,
}

/// Prints the table, the CPU lines and the targets; returns them.
pub fn report(
    preset: Preset,
    scenarios: &[Scenario],
    results: &BTreeMap<&str, BTreeMap<&str, Vec<Run>>>,
    extras: &Extras,
    m: &Machine,
) -> Report {
    let mut rows = Vec::new();
    let mut errors = 0u64;
    println!();
    println!(
        "{:<12} {:<9} {:>9} {:>11} {:>9} {:>9} {:>10} {:>9} {:>10} {:>9} {:>7} {:>6}",
        "scenario",
        "path",
        "MB/s",
        "transfers/s",
        "p50 ms",
        "p99 ms",
        "relay MiB",
        "relay s",
        "server MiB",
        "server s",
        "load s",
        "errors"
    );
    for s in scenarios {
        let runs = &results[s.name];
        let mut summary = BTreeMap::new();
        for path in PATHS {
            let Some(runs) = runs.get(path) else {
                continue;
            };
            let mut row = PathRow::of(runs);
            row.relay_syscalls_per_transfer = extras
                .syscalls
                .get(s.name)
                .and_then(|c| c.get(path))
                .copied();
            errors += row.errors;
            let opt = |v: Option<f64>, digits: usize| {
                v.map_or("-".to_string(), |x| format!("{x:.digits$}"))
            };
            println!(
                "{:<12} {:<9} {:>9.1} {:>11.0} {:>9.2} {:>9.2} {:>10} {:>9} {:>10.1} {:>9.2} {:>7.2} {:>6}",
                s.name,
                path,
                row.mb_per_s,
                row.transfers_per_s,
                row.p50_ms,
                row.p99_ms,
                opt(row.proxy_peak_rss_mib, 1),
                opt(row.proxy_cpu_s, 2),
                row.server_peak_rss_mib,
                row.server_cpu_s,
                row.load_cpu_s,
                row.errors
            );
            summary.insert(path, row);
        }
        let direct = &runs["direct"];
        let (r_mb, r_tps) = ratios("ratio", direct, &runs["proxied"]);
        // Each reference relay against the same direct runs.
        let mut references = BTreeMap::new();
        for name in REFERENCES {
            if let Some(reference) = runs.get(name) {
                let r = ratios(&format!("{name}/d"), direct, reference);
                references.insert(name.to_string(), r);
            }
        }
        let reference = references.get("haproxy").copied();
        let threaded = match (runs.get("direct-t"), runs.get("proxied-t")) {
            (Some(d), Some(p)) => Some(ratios("ratio-t", d, p)),
            _ => None,
        };
        // What the receiver paid per GiB, on each path: the cost a relay
        // puts on the server behind it.
        let gib_moved = |path: &str| {
            runs.get(path).map(|rs| {
                let bytes: u64 = rs.iter().map(|r| r.load.bytes).sum();
                let cpu: f64 = rs.iter().map(|r| r.server_cpu_s).sum();
                cpu / (bytes as f64 / (1u64 << 30) as f64).max(1e-9)
            })
        };
        let cells: Vec<String> = PATHS
            .into_iter()
            .filter_map(|p| gib_moved(p).map(|v| format!("{p} {v:.2}")))
            .collect();
        println!("{:<12} receiver CPU s per GiB: {}", "", cells.join(", "));
        // What each relay paid, per GiB and per transfer.
        let cells: Vec<String> = PATHS
            .into_iter()
            .filter_map(|p| {
                let row = summary.get(p)?;
                Some(format!(
                    "{p} {:.2} s/GiB {:.0} us/transfer",
                    row.relay_cpu_s_per_gib?, row.relay_cpu_us_per_transfer?
                ))
            })
            .collect();
        println!("{:<12} relay CPU: {}", "", cells.join(", "));
        let cells: Vec<String> = PATHS
            .into_iter()
            .filter_map(|p| {
                Some(format!(
                    "{p} {:.1}",
                    summary.get(p)?.relay_syscalls_per_transfer?
                ))
            })
            .collect();
        if !cells.is_empty() {
            println!(
                "{:<12} relay system calls per transfer: {}",
                "",
                cells.join(", ")
            );
        }
        // What each path left in the page cache; and of that, the proxy's spool.
        let cells: Vec<String> = PATHS
            .into_iter()
            .filter_map(|p| {
                let row = summary.get(p)?;
                let spool = row
                    .spool_cached_mib
                    .map_or(String::new(), |m| format!(" (spool holds {m:.0})"));
                Some(format!("{p} {:.0}{spool}", row.cache_growth_mib))
            })
            .collect();
        println!("{:<12} page cache growth MiB: {}", "", cells.join(", "));
        rows.push(ScenarioRow {
            scenario: s.name,
            what: s.what.clone(),
            direct: summary["direct"].clone(),
            proxied: summary["proxied"].clone(),
            ratio_mb_per_s: r_mb,
            ratio_transfers_per_s: r_tps,
            ratios_per_repetition: direct
                .iter()
                .zip(&runs["proxied"])
                .map(|(d, p)| p.mb_per_s() / d.mb_per_s().max(f64::MIN_POSITIVE))
                .collect(),
            raw: runs
                .iter()
                .map(|(path, runs)| {
                    (
                        path.to_string(),
                        runs.iter().map(|r| r.load.clone()).collect(),
                    )
                })
                .collect(),
            haproxy: summary.get("haproxy").cloned(),
            references: REFERENCES
                .into_iter()
                .filter_map(|name| {
                    let row = summary.get(name)?.clone();
                    let (ratio_mb_per_s, ratio_transfers_per_s) = references.get(name).copied()?;
                    Some((
                        name.to_string(),
                        ReferenceRow {
                            row,
                            ratio_mb_per_s,
                            ratio_transfers_per_s,
                        },
                    ))
                })
                .collect(),
            direct_threaded: summary.get("direct-t").cloned(),
            proxied_threaded: summary.get("proxied-t").cloned(),
            threaded_ratio_mb_per_s: threaded.map(|r| r.0),
            threaded_ratio_transfers_per_s: threaded.map(|r| r.1),
            receiver_cpu_s_per_gib: PATHS
                .into_iter()
                .filter_map(|p| gib_moved(p).map(|v| (p.to_string(), v)))
                .collect(),
            haproxy_ratio_mb_per_s: reference.map(|r| r.0),
            haproxy_ratio_transfers_per_s: reference.map(|r| r.1),
        });
    }

    let targets = crate::targets::judge(preset, scenarios, &rows, errors, extras, m);
    Report {
        rows,
        targets,
        errors,
    }
}

/// The paired ratios of `other` to `direct` (MB/s, transfers/s), printed
/// as one table line labelled `label`.
fn ratios(label: &str, direct: &[Run], other: &[Run]) -> (f64, f64) {
    let r = (
        paired_ratio(direct, other, Run::mb_per_s),
        paired_ratio(direct, other, Run::transfers_per_s),
    );
    println!("{:<12} {:<9} {:>8.2}x {:>10.2}x", "", label, r.0, r.1);
    r
}

/// The closing line: how long the run took, and how to run it again.
pub fn footer(preset: Preset, wall: f64, waited: Duration) {
    let waited_note = if waited.as_secs() > 0 {
        format!(
            " (of which {:.0} s waiting for file creation)",
            waited.as_secs_f64()
        )
    } else {
        String::new()
    };
    println!(
        "bench wall time {wall:.0} s{waited_note}; reproduce with: {}",
        match preset {
            Preset::Full => "make bench",
            Preset::Quick => "BENCH_QUICK=1 make bench",
            Preset::Smoke => "BENCH_SMOKE=1 make bench",
        }
    );
}

/// The whole of results.json.
#[derive(Serialize)]
struct Results<'a> {
    preset: String,
    machine: &'a Machine,
    wall_s: f64,
    waited_for_file_creation_s: f64,
    scenarios: &'a [ScenarioRow],
    targets: &'a [Target],
}

/// Writes `results.json` and `report.svg` into `out_dir`.
pub fn write(
    out_dir: &Path,
    preset: Preset,
    m: &Machine,
    wall: f64,
    waited: Duration,
    report: &Report,
) {
    let results = Results {
        preset: format!("{preset:?}"),
        machine: m,
        wall_s: wall,
        waited_for_file_creation_s: waited.as_secs_f64(),
        scenarios: &report.rows,
        targets: &report.targets,
    };
    let json_path = out_dir.join("results.json");
    let text = serde_json::to_string_pretty(&results).expect("results serialize");
    fs::write(&json_path, text).expect("write results.json");
    let svg_path = out_dir.join("report.svg");
    fs::write(&svg_path, crate::chart::svg_report(&report.rows, m, preset))
        .expect("write report.svg");
    println!("wrote {} and {}", json_path.display(), svg_path.display());
}
