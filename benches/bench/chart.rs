//! The chart (`report.svg`): every path of every scenario, with min-max
//! whiskers and the paired ratios under each title.

use crate::measure::Machine;
use crate::report::{PathRow, ScenarioRow, REFERENCES};
use crate::scenarios::Preset;

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
pub fn svg_report(rows: &[ScenarioRow], machine: &Machine, preset: Preset) -> String {
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
