//! What the bench prints and writes: the table, the targets, the CPU
//! lines, `results.json` and the chart (`report.svg`).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use stopover::load::Summary;

use crate::measure::{cpu_bound_s, median, paired_ratio, Machine, Run};
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
const REFERENCES: [&str; 3] = ["haproxy", "nginx", "socat"];

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

/// Prints the table, the CPU lines and the targets; returns them.
pub fn report(
    preset: Preset,
    scenarios: &[Scenario],
    results: &BTreeMap<&str, BTreeMap<&str, Vec<Run>>>,
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
            let row = PathRow::of(runs);
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

    // ---- Targets (reported, not enforced: speed is not a test) ----
    let row = |name: &str| rows.iter().find(|r| r.scenario == name);
    let conc = row("concurrency");
    let conc_clients = scenarios
        .iter()
        .find(|s| s.name == "concurrency")
        .map_or(1, |s| s.clients) as f64;
    let proxy_mib = conc
        .and_then(|c| c.proxied.proxy_peak_rss_mib)
        .unwrap_or(f64::MAX);
    // The paired ratio of a scenario's proxied path, and of a reference
    // relay (None if it did not run), in the unit the scenario is judged by.
    let ratio = |name: &str| row(name).map(|r| r.ratio_mb_per_s);
    let reference = |name: &str, relay: &str| {
        row(name).and_then(|r| r.references.get(relay).map(|x| x.ratio_mb_per_s))
    };
    let best_reference = |name: &str| {
        row(name).and_then(|r| {
            r.references
                .values()
                .map(|x| x.ratio_mb_per_s)
                .reduce(f64::max)
        })
    };
    let at_least = |mine: Option<f64>, theirs: Option<f64>| match (mine, theirs) {
        (Some(m), Some(t)) => Some(m >= t),
        _ => None,
    };
    let receiver_ratio = row("active").and_then(|r| {
        let d = r.receiver_cpu_s_per_gib.get("direct")?;
        let p = r.receiver_cpu_s_per_gib.get("proxied")?;
        Some(p / d.max(1e-9))
    });
    // "The smallest in memory": stopover's peak RSS against every
    // reference relay's, in every scenario where both ran.
    let smallest = rows
        .iter()
        .flat_map(|r| {
            let mine = r.proxied.proxy_peak_rss_mib;
            r.references
                .iter()
                .filter(|(name, _)| name.as_str() != "socat")
                .filter_map(move |(_, x)| Some(mine? <= x.row.proxy_peak_rss_mib?))
        })
        .reduce(|a, b| a && b);
    let targets = vec![
        Target {
            target: "active: ratio >= nginx's".into(),
            met: at_least(ratio("active"), reference("active", "nginx")),
        },
        Target {
            target: format!(
                "active: receiver CPU per GiB behind stopover <= 1.25x direct (is {})",
                receiver_ratio.map_or("-".into(), |r| format!("{r:.2}x"))
            ),
            met: receiver_ratio.map(|r| r <= 1.25),
        },
        Target {
            target: "small: ratio >= 0.85".into(),
            met: row("small").map(|r| r.ratio_transfers_per_s >= 0.85),
        },
        Target {
            target: "small: ratio >= nginx's".into(),
            met: at_least(
                row("small").map(|r| r.ratio_transfers_per_s),
                row("small")
                    .and_then(|r| r.references.get("nginx").map(|x| x.ratio_transfers_per_s)),
            ),
        },
        Target {
            target: "medium: ratio >= the best reference relay's".into(),
            met: at_least(ratio("medium"), best_reference("medium")),
        },
        Target {
            target: "bulk: ratio >= the best reference relay's".into(),
            met: at_least(ratio("bulk"), best_reference("bulk")),
        },
        Target {
            target: "concurrency: proxy peak RSS <= 16 KiB per transfer".into(),
            met: conc.map(|_| proxy_mib * 1024.0 / conc_clients <= 16.0),
        },
        Target {
            target: "proxy peak RSS <= HAProxy's and nginx's, in every scenario".into(),
            met: smallest,
        },
        Target {
            target: "no scenario shows errors".into(),
            met: Some(errors == 0),
        },
    ];
    println!();
    if let (Some(bulk), Some(b)) = (scenarios.iter().find(|s| s.name == "bulk"), row("bulk")) {
        let gib = bulk.size as f64 / (1u64 << 30) as f64;
        let (dl, ds) = (b.direct.load_cpu_s / gib, b.direct.server_cpu_s / gib);
        let (pl, pp, ps) = (
            b.proxied.load_cpu_s / gib,
            b.proxied.proxy_cpu_s.unwrap_or(0.0) / gib,
            b.proxied.server_cpu_s / gib,
        );
        let cores = (m.cores as f64).max(1.0);
        let ceiling = cpu_bound_s(&[dl, ds], cores) / cpu_bound_s(&[pl, pp, ps], cores);
        println!(
            "bulk CPU per GiB: direct load {dl:.2} + server {ds:.2} = {:.2} s; proxied load {pl:.2} + proxy {pp:.2} + server {ps:.2} = {:.2} s",
            dl + ds,
            pl + pp + ps
        );
        println!(
            "on {cores} cores that CPU alone allows a bulk ratio of at most {ceiling:.2}x (measured {:.2}x)",
            b.ratio_mb_per_s
        );
    }
    if let Some(conc) = conc {
        println!(
            "proxy peak RSS in the concurrency scenario: {proxy_mib:.1} MiB = {:.1} KiB per concurrent transfer",
            proxy_mib * 1024.0 / conc_clients
        );
        let shown = |v: Option<usize>| v.map_or("null".to_string(), |n| n.to_string());
        println!(
            "concurrency reached (from the daemons' /metrics): proxy {} transfers, server {} connections (proxied run), server {} (direct run)",
            shown(conc.proxied.proxy_peak_conns),
            shown(conc.proxied.server_peak_conns),
            shown(conc.direct.server_peak_conns)
        );
    }
    // Peak RSS of every relay, scenario by scenario ("the smallest in
    // memory"). socat's is its listening process only (it forks one per
    // connection), so it is shown but not compared.
    for r in &rows {
        let mut cells = vec![format!(
            "stopover {}",
            r.proxied
                .proxy_peak_rss_mib
                .map_or("-".into(), |m| format!("{m:.1}"))
        )];
        for (name, x) in &r.references {
            if let Some(m) = x.row.proxy_peak_rss_mib {
                cells.push(format!("{name} {m:.1}"));
            }
        }
        println!("relay peak RSS MiB, {}: {}", r.scenario, cells.join(", "));
    }
    if preset != Preset::Full {
        println!("({preset:?} run: the targets are set for the full run; at these sizes they are only indicative)");
    }
    for t in &targets {
        let verdict = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "n/a   ",
        };
        println!("target {verdict}: {}", t.target);
    }
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
    fs::write(&svg_path, svg_report(&report.rows, m, preset)).expect("write report.svg");
    println!("wrote {} and {}", json_path.display(), svg_path.display());
}

/// The chart's colour for each path.
const COLORS: [(&str, &str); 7] = [
    ("direct", "#4c78a8"),
    ("proxied", "#f58518"),
    ("haproxy", "#54a24b"),
    ("nginx", "#b279a2"),
    ("socat", "#9d755d"),
    ("direct-t", "#72b7b2"),
    ("proxied-t", "#e45756"),
];

/// A self-contained SVG: for each scenario, throughput and latency bars
/// for every path that ran (reference relays and the threaded receiver
/// included), with min-max whiskers over the repetitions, and the paired
/// ratios to direct under the title. Each panel has its own scale.
fn svg_report(rows: &[ScenarioRow], machine: &Machine, preset: Preset) -> String {
    const W: f64 = 300.0;
    const H: f64 = 230.0;
    let (cols, panel_rows) = (rows.len().max(1) as f64, 2.0);
    let width = 40.0 + cols * W;
    let height = 100.0 + panel_rows * H;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"20\" y=\"24\" font-size=\"16\">stopover bench ({preset:?}): every path, medians with min-max whiskers</text>\n\
         <text x=\"20\" y=\"42\" fill=\"#555\">{} cores, {}, kernel {}; ratios are paired medians against direct (-t: the threaded receiver)</text>\n",
        machine.cores,
        xml_escape(&machine.cpu),
        xml_escape(&machine.kernel),
    );
    for (i, (name, color)) in COLORS.iter().enumerate() {
        let x = 20.0 + i as f64 * 90.0;
        svg += &format!(
            "<rect x=\"{x}\" y=\"52\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"61\">{name}</text>\n",
            x + 14.0
        );
    }
    for (i, row) in rows.iter().enumerate() {
        let x0 = 30.0 + i as f64 * W;
        let paths = row_paths(row);
        // Throughput: MB/s, or transfers/s where small payloads make MB/s
        // meaningless.
        let per_transfer = row.scenario == "small" || row.scenario == "concurrency";
        let unit = if per_transfer { "transfers/s" } else { "MB/s" };
        let bars: Vec<Bar> = paths
            .iter()
            .map(|(name, p)| Bar {
                color: color_of(name),
                value: if per_transfer {
                    p.transfers_per_s
                } else {
                    p.mb_per_s
                },
                low: if per_transfer {
                    p.transfers_per_s_min
                } else {
                    p.mb_per_s_min
                },
                high: if per_transfer {
                    p.transfers_per_s_max
                } else {
                    p.mb_per_s_max
                },
            })
            .collect();
        let ratio = if per_transfer {
            row.ratio_transfers_per_s
        } else {
            row.ratio_mb_per_s
        };
        // Three lines under the title: what ran, stopover's ratios, the
        // reference relays' ratios.
        let mut ours = format!("ratio: proxied {ratio:.2}x");
        if let Some(r) = if per_transfer {
            row.threaded_ratio_transfers_per_s
        } else {
            row.threaded_ratio_mb_per_s
        } {
            ours += &format!(", proxied-t {r:.2}x");
        }
        let theirs: Vec<String> = row
            .references
            .iter()
            .map(|(name, r)| {
                let r = if per_transfer {
                    r.ratio_transfers_per_s
                } else {
                    r.ratio_mb_per_s
                };
                format!("{name} {r:.2}x")
            })
            .collect();
        let subtitle = format!("{}\n{ours}\n{}", row.what, theirs.join(", "));
        svg += &bar_panel(
            x0,
            80.0,
            &format!("{}: {unit}", row.scenario),
            &subtitle,
            &[("", bars)],
            |v| format!("{v:.0}"),
        );
        let lat = |f: fn(&PathRow) -> f64| -> Vec<Bar> {
            paths
                .iter()
                .map(|(name, p)| Bar {
                    color: color_of(name),
                    value: f(p),
                    low: f(p),
                    high: f(p),
                })
                .collect()
        };
        svg += &bar_panel(
            x0,
            80.0 + H,
            &format!("{}: latency ms (median run)", row.scenario),
            "",
            &[("p50", lat(|p| p.p50_ms)), ("p99", lat(|p| p.p99_ms))],
            |v| format!("{v:.1}"),
        );
    }
    svg += "</svg>\n";
    svg
}

/// Every path of a scenario that ran, in table order.
fn row_paths(row: &ScenarioRow) -> Vec<(&'static str, &PathRow)> {
    let mut v = vec![("direct", &row.direct), ("proxied", &row.proxied)];
    for name in REFERENCES {
        if let Some(r) = row.references.get(name) {
            v.push((name, &r.row));
        }
    }
    if let Some(p) = &row.direct_threaded {
        v.push(("direct-t", p));
    }
    if let Some(p) = &row.proxied_threaded {
        v.push(("proxied-t", p));
    }
    v
}

fn color_of(path: &str) -> &'static str {
    COLORS
        .iter()
        .find(|(n, _)| *n == path)
        .map_or("#888", |(_, c)| c)
}

/// One bar: the median, and the whisker from the slowest to the fastest
/// repetition.
struct Bar {
    color: &'static str,
    value: f64,
    low: f64,
    high: f64,
}

/// One panel: groups of bars on a shared scale, a whisker on each bar
/// whose repetitions spread.
fn bar_panel(
    x0: f64,
    y0: f64,
    title: &str,
    subtitle: &str,
    groups: &[(&str, Vec<Bar>)],
    fmt: impl Fn(f64) -> String,
) -> String {
    let plot_h = 120.0;
    let base = y0 + 60.0 + plot_h;
    let max = groups
        .iter()
        .flat_map(|g| g.1.iter().map(|b| b.high.max(b.value)))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let mut s = format!(
        "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">{}</text>\n\
         <line x1=\"{x0}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#999\"/>\n",
        y0 + 4.0,
        xml_escape(title),
        x0 + 270.0
    );
    for (i, line) in subtitle.lines().enumerate() {
        s += &format!(
            "<text x=\"{x0}\" y=\"{}\" fill=\"#555\" font-size=\"10\">{}</text>\n",
            y0 + 18.0 + 12.0 * i as f64,
            xml_escape(line)
        );
    }
    let group_w = 260.0 / groups.len() as f64;
    for (gi, (label, bars)) in groups.iter().enumerate() {
        let gx = x0 + 6.0 + gi as f64 * group_w;
        let bw = (group_w - 12.0) / bars.len().max(1) as f64;
        for (j, bar) in bars.iter().enumerate() {
            let h = bar.value / max * plot_h;
            let x = gx + j as f64 * bw;
            let mid = x + (bw - 2.0) / 2.0;
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\n",
                base - h,
                bw - 2.0,
                bar.color
            );
            if bar.high > bar.low {
                let (y_lo, y_hi) = (
                    base - bar.low / max * plot_h,
                    base - bar.high / max * plot_h,
                );
                s += &format!(
                    "<line x1=\"{mid:.1}\" y1=\"{y_lo:.1}\" x2=\"{mid:.1}\" y2=\"{y_hi:.1}\" stroke=\"#222\"/>\n\
                     <line x1=\"{:.1}\" y1=\"{y_hi:.1}\" x2=\"{:.1}\" y2=\"{y_hi:.1}\" stroke=\"#222\"/>\n\
                     <line x1=\"{:.1}\" y1=\"{y_lo:.1}\" x2=\"{:.1}\" y2=\"{y_lo:.1}\" stroke=\"#222\"/>\n",
                    mid - 3.0,
                    mid + 3.0,
                    mid - 3.0,
                    mid + 3.0
                );
            }
            let top = base - (bar.high.max(bar.value) / max * plot_h) - 3.0;
            s += &format!(
                "<text x=\"{mid:.1}\" y=\"{top:.1}\" text-anchor=\"middle\" font-size=\"7\">{}</text>\n",
                fmt(bar.value)
            );
        }
        if !label.is_empty() {
            s += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n",
                gx + (group_w - 12.0) / 2.0,
                base + 14.0
            );
        }
    }
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
