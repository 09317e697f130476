//! Drawing parsed trace events as an SVG timeline (see the module docs of
//! `trace_view`). Plain text out, no dependencies: the picture is one
//! self-contained file, with its styles inside.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{Event, Kind, Lane};

/// Width of one lane, in pixels.
const LANE_W: usize = 210;
/// Height of one row (one traced line).
const ROW_H: usize = 18;
/// The time margin on the left.
const GUTTER: usize = 86;
/// Title, legend and lane titles.
const HEADER: usize = 104;
/// Characters of a label that fit beside a glyph (11px monospace).
const LABEL_CHARS: usize = 28;
/// A pause between two lines at least this long (seconds) is drawn as a break.
const BREAK_AFTER: f64 = 0.001;

/// A lane in the picture: which role's, and what.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Column {
    role: String,
    lane: Lane,
}

impl Column {
    fn title(&self) -> String {
        match &self.lane {
            Lane::Loop => format!("{} loop", self.role),
            Lane::Socket { key, side } => format!("{} #{key} {side}", self.role),
            Lane::Disk => format!("{} disk", self.role),
            Lane::Timers => format!("{} timers", self.role),
        }
    }
}

/// The colour and glyph of each kind, and its name in the legend.
fn style(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Wake => ("wake", "poll woke"),
        Kind::Ready => ("ready", "readiness event"),
        Kind::Accept => ("accept", "accept"),
        Kind::Read => ("read", "read"),
        Kind::Write => ("write", "write"),
        Kind::WouldBlock => ("block", "WouldBlock"),
        Kind::Eof => ("fin", "EOF read"),
        Kind::Fin => ("fin", "FIN sent"),
        Kind::Pause => ("pause", "paused"),
        Kind::State => ("state", "state change"),
        Kind::Closed => ("closed", "closed"),
        Kind::Timer => ("timer", "timer fired"),
        Kind::Disk => ("disk", "disk"),
        Kind::Failed => ("failed", "failed"),
    }
}

const CSS: &str = "
text { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 11px; fill: #222; }
.title { font-size: 14px; font-weight: bold; }
.lane-title { font-weight: bold; font-size: 12px; }
.time { fill: #666; font-size: 10px; }
.band0 { fill: #f7f7f7; } .band1 { fill: #ffffff; }
.rule { stroke: #bbb; stroke-width: 1; }
.gap { stroke: #999; stroke-width: 1; stroke-dasharray: 2 3; }
.wake { fill: #999; } .ready { fill: #e6a100; } .accept { fill: #e6a100; }
.read { fill: #1f6fd1; } .write { fill: #1a9850; } .block { fill: #fff; stroke: #888; stroke-width: 1.5; }
.fin { fill: #000; } .pause { fill: #d73027; } .timer { fill: #c51b7d; } .disk { fill: #8c510a; }
.failed { fill: #d73027; } .state { fill: #6a3d9a; } .closed { fill: #444; }
.state-line { stroke: #6a3d9a; stroke-width: 1.5; stroke-dasharray: 6 3; }
.closed-line { stroke: #444; stroke-width: 1.5; }
.flow { stroke: #1f6fd1; stroke-width: 1.2; fill: none; opacity: 0.6; marker-end: url(#arrow); }
";

/// Draws `events` as a self-contained SVG timeline.
pub fn render(events: &[Event]) -> String {
    let columns = columns(events);
    let index: BTreeMap<&Column, usize> = columns.iter().enumerate().map(|(i, c)| (c, i)).collect();
    let column_of = |e: &Event| {
        index[&Column {
            role: e.role.clone(),
            lane: e.lane.clone(),
        }]
    };
    // Rows: one per event, and half a row more before a break in time.
    let start = events.iter().find_map(|e| e.at);
    let mut rows = Vec::with_capacity(events.len());
    let mut y = HEADER as f64 + ROW_H as f64;
    let mut last_at: Option<f64> = None;
    let mut breaks = Vec::new();
    for e in events {
        if let (Some(prev), Some(at)) = (last_at, e.at) {
            if at - prev >= BREAK_AFTER {
                breaks.push((y - ROW_H as f64 * 0.25, at - prev));
                y += ROW_H as f64 * 0.75;
            }
        }
        rows.push(y);
        y += ROW_H as f64;
        last_at = e.at.or(last_at);
    }
    let width = GUTTER + columns.len().max(1) * LANE_W + 10;
    let height = y as usize + ROW_H;

    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">\n<style>{CSS}</style>\n"
    );
    out.push_str("<defs><marker id=\"arrow\" viewBox=\"0 0 8 8\" refX=\"7\" refY=\"4\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\"><path d=\"M0,0 L8,4 L0,8 z\" fill=\"#1f6fd1\"/></marker></defs>\n");
    out.push_str("<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n");
    header(&mut out, events, &columns, height);
    for (y, gap) in &breaks {
        let _ = writeln!(
            out,
            "<line class=\"gap\" x1=\"0\" y1=\"{y:.1}\" x2=\"{width}\" y2=\"{y:.1}\"/><text class=\"time\" x=\"4\" y=\"{:.1}\">{}</text>",
            y - 2.0,
            escape(&format!("\u{22ee} {:.1} ms later", gap * 1000.0))
        );
    }
    flows(&mut out, events, &rows, &column_of);
    // Milliseconds with the precision the timestamps have.
    let sub_ms = events
        .iter()
        .filter_map(|e| e.at)
        .any(|at| ((at * 1000.0) - (at * 1000.0).round()).abs() > 0.01);
    let mut last_time = String::new();
    for (i, e) in events.iter().enumerate() {
        let y = rows[i];
        if let (Some(at), Some(start)) = (e.at, start) {
            let ms = (at - start) * 1000.0;
            let time = if sub_ms {
                format!("{ms:.3} ms")
            } else {
                format!("{ms:.0} ms")
            };
            if time != last_time {
                let _ = writeln!(
                    out,
                    "<text class=\"time\" x=\"4\" y=\"{:.1}\">{time}</text>",
                    y + 4.0
                );
                last_time = time;
            }
        }
        let col = column_of(e);
        match e.kind {
            Kind::Wake => wake(&mut out, e, &columns, col, y),
            Kind::State | Kind::Closed => across(&mut out, e, &columns, y),
            _ => glyph(&mut out, e, col, y),
        }
    }
    out.push_str("</svg>\n");
    out
}

/// The lanes, in order: per role (as they first appear), its loop, the
/// sockets of each transfer, its disk, its timers.
fn columns(events: &[Event]) -> Vec<Column> {
    let mut roles: Vec<&str> = Vec::new();
    for e in events {
        if !roles.contains(&e.role.as_str()) {
            roles.push(&e.role);
        }
    }
    let mut columns = Vec::new();
    for role in roles {
        let mut sockets: Vec<Lane> = events
            .iter()
            .filter(|e| e.role == role && matches!(e.lane, Lane::Socket { .. }))
            .map(|e| e.lane.clone())
            .collect();
        sockets.sort();
        sockets.dedup();
        let lanes = std::iter::once(Lane::Loop)
            .chain(sockets)
            .chain([Lane::Disk, Lane::Timers]);
        columns.extend(lanes.map(|lane| Column {
            role: role.to_string(),
            lane,
        }));
    }
    columns
}

/// Title, legend, lane titles and lane backgrounds.
fn header(out: &mut String, events: &[Event], columns: &[Column], height: usize) {
    let times: Vec<f64> = events.iter().filter_map(|e| e.at).collect();
    let span = match (times.first(), times.last()) {
        (Some(a), Some(b)) => format!(", {:.3} ms", (b - a) * 1000.0),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "<text class=\"title\" x=\"8\" y=\"20\">stopover trace: {} events{span} (time flows down; one row per traced line)</text>",
        events.len()
    );
    let legend = [
        Kind::Ready,
        Kind::Read,
        Kind::Write,
        Kind::WouldBlock,
        Kind::Fin,
        Kind::Pause,
        Kind::Disk,
        Kind::Timer,
        Kind::Failed,
    ];
    let mut x = 8;
    for kind in legend {
        let (class, name) = style(kind);
        let name = if kind == Kind::Fin { "EOF / FIN" } else { name };
        let _ = writeln!(
            out,
            "{}<text x=\"{}\" y=\"44\">{name}</text>",
            shape(kind, class, x as f64 + 5.0, 40.0),
            x + 14
        );
        x += 14 + name.len() * 7 + 16;
    }
    let _ = writeln!(
        out,
        "<line class=\"state-line\" x1=\"{x}\" y1=\"40\" x2=\"{}\" y2=\"40\"/><text x=\"{}\" y=\"44\">state change</text>",
        x + 20,
        x + 26
    );
    let _ = writeln!(
        out,
        "<path class=\"flow\" d=\"M8,60 L40,60\"/><text x=\"46\" y=\"64\">bytes read on one socket, written on the other</text>"
    );
    let top = HEADER - 22;
    for (i, c) in columns.iter().enumerate() {
        let x = GUTTER + i * LANE_W;
        let _ = writeln!(
            out,
            "<rect class=\"band{}\" x=\"{x}\" y=\"{top}\" width=\"{LANE_W}\" height=\"{}\"/><text class=\"lane-title\" x=\"{}\" y=\"{}\">{}</text>",
            i % 2,
            height - top,
            x + 6,
            top + 15,
            escape(&c.title())
        );
        let used = events.iter().any(|e| {
            e.role == c.role && e.lane == c.lane && e.kind != Kind::State && e.kind != Kind::Closed
        });
        if !used {
            let _ = writeln!(
                out,
                "<text class=\"time\" x=\"{}\" y=\"{}\">(nothing traced)</text>",
                x + 6,
                top + 32
            );
        }
        if i > 0 && columns[i - 1].role != c.role {
            let _ = writeln!(
                out,
                "<line class=\"closed-line\" x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{height}\"/>"
            );
        }
    }
}

/// A `poll woke` row: a thin rule across the role's lanes, labelled in
/// its loop lane. Everything under it until the next rule is one round.
fn wake(out: &mut String, e: &Event, columns: &[Column], col: usize, y: f64) {
    let (first, last) = role_span(columns, &e.role);
    let (x1, x2) = (GUTTER + first * LANE_W, GUTTER + (last + 1) * LANE_W);
    let _ = writeln!(
        out,
        "<line class=\"rule\" x1=\"{x1}\" y1=\"{:.1}\" x2=\"{x2}\" y2=\"{:.1}\"/>",
        y - 9.0,
        y - 9.0
    );
    glyph(out, e, col, y);
}

/// A state change or a close: a line across the lanes of the role, with
/// the label on it.
fn across(out: &mut String, e: &Event, columns: &[Column], y: f64) {
    let (first, last) = role_span(columns, &e.role);
    let (x1, x2) = (
        GUTTER + first * LANE_W + 4,
        GUTTER + (last + 1) * LANE_W - 4,
    );
    let class = if e.kind == Kind::State {
        "state-line"
    } else {
        "closed-line"
    };
    let label = escape(&e.label);
    let text_x = GUTTER + (first + 1) * LANE_W + 8;
    let _ = writeln!(
        out,
        "<line class=\"{class}\" x1=\"{x1}\" y1=\"{y:.1}\" x2=\"{x2}\" y2=\"{y:.1}\"/><rect x=\"{}\" y=\"{:.1}\" width=\"{}\" height=\"14\" fill=\"#fff\"/><text class=\"{}\" x=\"{text_x}\" y=\"{:.1}\">{label}</text>",
        text_x - 3,
        y - 7.0,
        e.label.chars().count() * 7 + 6,
        style(e.kind).0,
        y + 4.0
    );
}

/// The first and last column of `role`.
fn role_span(columns: &[Column], role: &str) -> (usize, usize) {
    let first = columns.iter().position(|c| c.role == role).unwrap_or(0);
    let last = columns
        .iter()
        .rposition(|c| c.role == role)
        .unwrap_or(first);
    (first, last)
}

/// One event in its lane: a glyph and its label.
fn glyph(out: &mut String, e: &Event, col: usize, y: f64) {
    let x = (GUTTER + col * LANE_W) as f64 + 12.0;
    let (class, _) = style(e.kind);
    let mut label: String = e.label.chars().take(LABEL_CHARS).collect();
    if e.label.chars().count() > LABEL_CHARS {
        label.pop();
        label.push('\u{2026}');
    }
    let _ = writeln!(
        out,
        "{}<text x=\"{:.1}\" y=\"{:.1}\"><title>{}</title>{}</text>",
        shape(e.kind, class, x, y),
        x + 10.0,
        y + 4.0,
        escape(&e.label),
        escape(&label)
    );
}

/// The glyph of a kind at (x, y).
fn shape(kind: Kind, class: &str, x: f64, y: f64) -> String {
    match kind {
        Kind::Ready | Kind::Accept => format!(
            "<path class=\"{class}\" d=\"M{x:.1},{:.1} L{:.1},{y:.1} L{x:.1},{:.1} L{:.1},{y:.1} z\"/>",
            y - 5.0,
            x + 5.0,
            y + 5.0,
            x - 5.0
        ),
        Kind::Timer | Kind::Disk | Kind::Wake => format!(
            "<rect class=\"{class}\" x=\"{:.1}\" y=\"{:.1}\" width=\"8\" height=\"8\"/>",
            x - 4.0,
            y - 4.0
        ),
        _ => format!("<circle class=\"{class}\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\"/>"),
    }
}

/// Arrows for relayed bytes: a read on one socket of a transfer, and the
/// next write on the other socket of the same transfer soon after.
fn flows(out: &mut String, events: &[Event], rows: &[f64], column_of: &dyn Fn(&Event) -> usize) {
    for (i, read) in events.iter().enumerate() {
        if read.kind != Kind::Read {
            continue;
        }
        let later = events.iter().enumerate().skip(i + 1).take(4);
        let Some((j, write)) = later
            .filter(|(_, w)| w.kind == Kind::Write && w.role == read.role && w.key == read.key)
            .find(|(_, w)| w.lane != read.lane)
        else {
            continue;
        };
        let x1 = (GUTTER + column_of(read) * LANE_W) as f64 + 12.0;
        let x2 = (GUTTER + column_of(write) * LANE_W) as f64 + 12.0;
        let (y1, y2) = (rows[i], rows[j]);
        let dir = if x2 > x1 { 1.0 } else { -1.0 };
        // Rightwards from the end of the read's label; leftwards from its glyph.
        let label_end = x1 + 10.0 + read.label.chars().count().min(LABEL_CHARS) as f64 * 6.7;
        let x1 = if dir > 0.0 { label_end - 5.0 } else { x1 };
        let _ = writeln!(
            out,
            "<path class=\"flow\" d=\"M{:.1},{y1:.1} C{:.1},{y1:.1} {:.1},{y2:.1} {:.1},{y2:.1}\"/>",
            x1 + 5.0 * dir,
            x1 + 60.0 * dir,
            x2 - 60.0 * dir,
            x2 - 6.0 * dir
        );
    }
}

/// Text made safe for XML.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
