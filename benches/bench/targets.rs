//! The targets the issues set, judged on this run (reported, never
//! enforced: speed is not a test), and the summary lines that explain
//! them: the bulk CPU bound, the file floor, memory per transfer.

use crate::measure::{cpu_bound_s, Machine};
use crate::report::{Extras, ScenarioRow, Target};
use crate::scenarios::{Preset, Scenario};

/// Prints the summary lines and every target's verdict; returns the targets.
pub fn judge(
    preset: Preset,
    scenarios: &[Scenario],
    rows: &[ScenarioRow],
    errors: u64,
    extras: &Extras,
    m: &Machine,
) -> Vec<Target> {
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
    // Issue 20's: stopover's small and bulk against the references'.
    let shown_x = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}x"));
    let small = row("small");
    let small_nginx = small.and_then(|r| r.references.get("nginx"));
    let small_vs_nginx = small
        .zip(small_nginx)
        .map(|(r, n)| r.ratio_transfers_per_s / n.ratio_transfers_per_s.max(1e-9));
    let small_cpu_vs_nginx = small.zip(small_nginx).and_then(|(r, n)| {
        Some(r.proxied.relay_cpu_us_per_transfer? / n.row.relay_cpu_us_per_transfer?.max(1e-9))
    });
    let small_syscalls = small.and_then(|r| r.proxied.relay_syscalls_per_transfer);
    let bulk_vs_best = ratio("bulk")
        .zip(best_reference("bulk"))
        .map(|(m, b)| m / b.max(1e-9));
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
            target: format!(
                "small: ratio >= 0.9x nginx's (is {})",
                shown_x(small_vs_nginx)
            ),
            met: small_vs_nginx.map(|x| x >= 0.9),
        },
        Target {
            target: format!(
                "small: relay CPU per transfer <= 1.25x nginx's (is {})",
                shown_x(small_cpu_vs_nginx)
            ),
            met: small_cpu_vs_nginx.map(|x| x <= 1.25),
        },
        Target {
            target: format!(
                "small: at most 18 system calls per transfer in the proxy (is {})",
                small_syscalls.map_or("-".into(), |n| format!("{n:.1}"))
            ),
            met: small_syscalls.map(|n| n <= 18.0),
        },
        Target {
            target: "medium: ratio >= the best reference relay's".into(),
            met: at_least(ratio("medium"), best_reference("medium")),
        },
        Target {
            target: format!(
                "bulk: ratio >= 0.9x the best reference relay's (is {})",
                shown_x(bulk_vs_best)
            ),
            met: bulk_vs_best.map(|x| x >= 0.9),
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
    if let Some((us, entries)) = extras.file_floor {
        let relay = small.and_then(|r| r.proxied.relay_cpu_us_per_transfer);
        let nginx = small_nginx.and_then(|n| n.row.relay_cpu_us_per_transfer);
        println!(
            "file floor: storing 1 KiB (create .part, write, rename, close) takes {us:.0} us here, in a directory of {entries} entries{}",
            match (relay, nginx) {
                (Some(r), Some(n)) => format!(
                    "; stopover's relay CPU per small transfer is {r:.0} us, nginx's {n:.0} us: {:.0} us more, of which the floor could be {:.0}%",
                    r - n,
                    (us / (r - n).max(1e-9) * 100.0).min(100.0)
                ),
                (Some(r), None) => format!("; stopover's relay CPU per small transfer is {r:.0} us"),
                _ => String::new(),
            }
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
    for r in rows {
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
    targets
}
