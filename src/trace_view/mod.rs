//! `stopover trace-view`: a `-vv` trace, drawn as a timeline.
//!
//! A trace of one small transfer is forty lines of text, and what it shows
//! (two sockets read and written in turn, the WouldBlocks that end each
//! drain, the disk, the timers) is easier to see than to read. This turns
//! the text into a self-contained SVG: one column (lane) per socket of each
//! transfer (`client`, `upstream`), one for each role's loop (wake-ups,
//! the listener, accepts), one for the spool's disk writes and one for the
//! timers; time flows down, one row per traced line.
//!
//! Rows are in log order, not to scale: the loop does a transfer's whole
//! round in microseconds, below what the timestamps resolve, so a true
//! scale would stack every row on one line. The left margin gives each
//! row's time since the first line instead, and a gap of a millisecond or
//! more is drawn as a break.
//!
//! The parser keys on the *message* (`proxy: #0 client read 1024`,
//! `server: #3 state Receiving -> Answering`, `proxy: timer fired: ...`),
//! and takes whatever comes before it (a timestamp, a level, a
//! `[module::path]`, the demo's `proxy | `) as it comes: only a timestamp,
//! if there is one, is used. Lines it does not know are skipped.

mod svg;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub use svg::render;

/// Which column of the picture an event belongs in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// The role's loop: poll wake-ups, the listener, accepts.
    Loop,
    /// Socket `side` (`client`, `upstream`) of transfer `key`.
    Socket { key: usize, side: String },
    /// Disk writes and renames.
    Disk,
    /// Timers firing.
    Timers,
}

/// What kind of thing happened (it decides the colour and the glyph).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `poll` returned: a new round of events.
    Wake,
    /// A readiness event (`READABLE`, `WRITABLE`, ...) or a connect that
    /// completed.
    Ready,
    /// An accepted connection.
    Accept,
    /// Bytes read.
    Read,
    /// Bytes written (or sent with `sendfile`).
    Write,
    /// A call found nothing to do: the drain is over.
    WouldBlock,
    /// The peer's FIN, read.
    Eof,
    /// Our FIN: `shutdown(Write)`, or the one a close sends.
    Fin,
    /// Reading paused on purpose (back-pressure).
    Pause,
    /// A transfer (or connection) changed state: drawn across its lanes.
    State,
    /// A transfer (or connection) closed: drawn across its lanes.
    Closed,
    /// A timer fired.
    Timer,
    /// A disk write queued, done, or a file renamed.
    Disk,
    /// A call that failed.
    Failed,
}

/// One traced line, understood.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Seconds since midnight (UTC), if the line had a timestamp.
    pub at: Option<f64>,
    /// `proxy` or `server`.
    pub role: String,
    /// The transfer (connection) it is about, if any.
    pub key: Option<usize>,
    pub lane: Lane,
    pub kind: Kind,
    /// What the picture says next to it.
    pub label: String,
}

/// `stopover trace-view`: reads the logs (standard input if none, or
/// `-`), writes the picture to `output` (standard output if none).
pub fn run(logs: &[PathBuf], output: Option<&Path>) -> Result<(), String> {
    let mut texts = Vec::new();
    if logs.is_empty() || logs.iter().any(|p| p.as_os_str() == "-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("reading standard input: {e}"))?;
        texts.push(text);
    }
    for log in logs.iter().filter(|p| p.as_os_str() != "-") {
        let text = std::fs::read(log).map_err(|e| format!("reading {}: {e}", log.display()))?;
        texts.push(String::from_utf8_lossy(&text).into_owned());
    }
    let events = timeline(&texts);
    if events.is_empty() {
        return Err("no trace lines found: was the log written with -vv?".into());
    }
    let svg = render(&events);
    match output {
        Some(path) => {
            std::fs::write(path, svg).map_err(|e| format!("writing {}: {e}", path.display()))
        }
        None => std::io::stdout()
            .write_all(svg.as_bytes())
            .map_err(|e| format!("writing the picture: {e}")),
    }
}

/// The events of one or more logs (a proxy's and its server's, say) on
/// one timeline, by timestamp. Lines of the same instant keep their logs'
/// order: across processes, their order within a millisecond is not known.
pub fn timeline(texts: &[String]) -> Vec<Event> {
    let mut events: Vec<Event> = texts.iter().flat_map(|t| parse(t)).collect();
    if texts.len() > 1 {
        events.sort_by(|a, b| a.at.partial_cmp(&b.at).unwrap_or(std::cmp::Ordering::Equal));
    }
    events
}

/// Every line of `text` that the parser understands, in order.
pub fn parse(text: &str) -> Vec<Event> {
    text.lines().filter_map(parse_line).collect()
}

/// One line, or `None` if it is not one the picture shows.
pub fn parse_line(line: &str) -> Option<Event> {
    let (role, message) = message(line)?;
    let at = timestamp(line);
    let event = |key, lane, kind, label: &str| Event {
        at,
        role: role.to_string(),
        key,
        lane,
        kind,
        label: label.to_string(),
    };
    if let Some(n) = message.strip_prefix("poll woke: ") {
        return Some(event(
            None,
            Lane::Loop,
            Kind::Wake,
            &format!("poll woke: {n}"),
        ));
    }
    if message == "listener READABLE" {
        return Some(event(None, Lane::Loop, Kind::Ready, "listener READABLE"));
    }
    if message == "accept WouldBlock" {
        return Some(event(
            None,
            Lane::Loop,
            Kind::WouldBlock,
            "accept WouldBlock",
        ));
    }
    if let Some(rest) = message.strip_prefix("accept ") {
        // `accept 127.0.0.1:5000 -> #0, register ...`
        let key = rest.split_once("-> #").and_then(|(_, k)| number(k));
        let label = key.map_or("accept".to_string(), |k| format!("accept -> #{k}"));
        return Some(event(key, Lane::Loop, Kind::Accept, &label));
    }
    if let Some(timer) = message.strip_prefix("timer fired: ") {
        // `Idle { key: 0, id: 1 }`
        let name = timer.split([' ', '{']).next().unwrap_or(timer);
        let key = timer.split_once("key: ").and_then(|(_, k)| number(k));
        let label = match key {
            Some(k) => format!("{name} #{k}"),
            None => name.to_string(),
        };
        return Some(event(key, Lane::Timers, Kind::Timer, &label));
    }
    if let Some(stored) = message.strip_prefix("stored ") {
        // The server's info line: its file got its final name.
        let name = stored.split(' ').next().unwrap_or("");
        return Some(event(
            None,
            Lane::Disk,
            Kind::Disk,
            &format!("stored {name}"),
        ));
    }
    let rest = message.strip_prefix('#')?;
    let key = number(rest)?;
    let rest = rest
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start();
    let on = |lane, kind, label: &str| Some(event(Some(key), lane, kind, label));
    if let Some(change) = rest.strip_prefix("state ") {
        return on(
            Lane::Loop,
            Kind::State,
            &format!("#{key} {}", arrows(change)),
        );
    }
    if let Some(how) = rest.strip_prefix("closed") {
        return on(Lane::Loop, Kind::Closed, &format!("#{key} closed{how}"));
    }
    if let Some(what) = rest.strip_prefix("timer fired: ") {
        return on(Lane::Timers, Kind::Timer, &format!("#{key} {what}"));
    }
    if let Some(what) = rest.strip_prefix("disk ") {
        let kind = if what.contains("failed") {
            Kind::Failed
        } else {
            Kind::Disk
        };
        return on(Lane::Disk, kind, &format!("#{key} {what}"));
    }
    if let Some(what) = rest.strip_prefix("register upstream") {
        let socket = Lane::Socket {
            key,
            side: "upstream".into(),
        };
        let label = if what.contains("connect") {
            "connect started"
        } else {
            "registered"
        };
        return on(socket, Kind::Ready, label);
    }
    // Socket calls and events: `client read 1024`; the server's own lines
    // have no side (`#0 read 1024`): its one socket is its client.
    let (side, call) = match rest.split_once(' ') {
        Some((side @ ("client" | "upstream"), call)) => (side, call),
        _ => ("client", rest),
    };
    let socket = Lane::Socket {
        key,
        side: side.to_string(),
    };
    let kind = call_kind(call)?;
    let label = match kind {
        Kind::Ready => call.replace("event ", "").replace("READ_CLOSED", "RDHUP"),
        _ => call.to_string(),
    };
    on(socket, kind, &label)
}

/// The kind of a socket call's line (`read 1024`, `write WouldBlock`, ...).
fn call_kind(call: &str) -> Option<Kind> {
    Some(if call.starts_with("event") || call == "connected" {
        Kind::Ready
    } else if call.ends_with("WouldBlock") {
        Kind::WouldBlock
    } else if call.starts_with("read EOF") {
        Kind::Eof
    } else if call.starts_with("read paused") {
        Kind::Pause
    } else if call.contains(" failed") {
        Kind::Failed
    } else if call.starts_with("read ") {
        Kind::Read
    } else if call.starts_with("write ") || call.starts_with("sendfile ") {
        Kind::Write
    } else if call.starts_with("shutdown") || call.starts_with("FIN") {
        Kind::Fin
    } else {
        return None;
    })
}

/// `Connecting -> Streaming` as `Connecting → Streaming`.
fn arrows(change: &str) -> String {
    change.replace(" -> ", " \u{2192} ")
}

/// The role and the message of a log line: what follows the first
/// `proxy: ` or `server: ` that starts a word.
fn message(line: &str) -> Option<(&'static str, &str)> {
    let mut best: Option<(usize, &'static str)> = None;
    for role in ["proxy", "server"] {
        let marker = format!("{role}: ");
        let mut from = 0;
        while let Some(i) = line[from..].find(&marker) {
            let at = from + i;
            let starts_word = at == 0 || line.as_bytes()[at - 1] == b' ';
            if starts_word {
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, role));
                }
                break;
            }
            from = at + marker.len();
        }
    }
    let (at, role) = best?;
    Some((role, line[at + role.len() + 2..].trim_end()))
}

/// Seconds since midnight from the first `YYYY-MM-DDTHH:MM:SS[.frac]`
/// in the line.
pub fn timestamp(line: &str) -> Option<f64> {
    let t = line.find('T').filter(|&t| t >= 10)?;
    let date = line.get(t - 10..t)?;
    let well_formed = date.as_bytes().iter().enumerate().all(|(i, b)| match i {
        4 | 7 => *b == b'-',
        _ => b.is_ascii_digit(),
    });
    if !well_formed {
        return None;
    }
    let time = &line[t + 1..];
    let end = time
        .find(|c: char| !(c.is_ascii_digit() || c == ':' || c == '.'))
        .unwrap_or(time.len());
    let mut parts = time[..end].split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The number at the start of `s`.
fn number(s: &str) -> Option<usize> {
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests;
