//! A second protocol on the same loop: `GET /metrics` over HTTP, in the
//! Prometheus text format, served by the daemon's own poll loop.
//!
//! Nothing here blocks and nothing here gets a thread. The stats listener
//! is one more registered socket (the [`STATS_LISTENER`] token), and each
//! stats connection one more [`Peer`] on a reserved token, driven by the
//! same readiness rules as a transfer: read until `WouldBlock`, parse what
//! has arrived (`httparse` does the parsing; a request that is not complete
//! yet just waits for more), write the answer over as many WRITABLE events
//! as it takes, close.
//!
//! A stats client cannot disturb transfers: at most [`MAX_CONNS`] at once
//! (more wait in the backlog), a request larger than [`MAX_REQUEST`] is
//! refused, and a connection that has not finished within [`DEADLINE`] is
//! closed. All of them together cost a few KiB.
//!
//! The same counters are logged as one line every `--stats-interval`, and
//! on SIGUSR1.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::peer::{Io, Peer, Who};
use crate::error::Context as _;

/// Token of the stats listener.
pub const STATS_LISTENER: Token = Token(usize::MAX - 3);
/// The most stats connections served at once.
pub const MAX_CONNS: usize = 16;
/// Stats connection `i` has token `FIRST_CONN - i`: reserved tokens at the
/// top of the range, below the others, where no slab key reaches.
const FIRST_CONN: usize = usize::MAX - 4;
/// The largest request accepted (line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a stats connection may take from accept to close.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// True for the tokens of stats connections.
pub fn is_stats_conn(token: Token) -> bool {
    (FIRST_CONN + 1 - MAX_CONNS..=FIRST_CONN).contains(&token.0)
}

fn conn_token(key: usize) -> Token {
    Token(FIRST_CONN - key)
}

/// Counters that belong to the loop rather than a role.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoopCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Times the accept gate closed at capacity.
    pub at_capacity: u64,
    /// Times accepting paused after running out of descriptors (or other
    /// resources).
    pub backoffs: u64,
    /// The most connections open at once so far.
    pub peak_open: u64,
}

/// Writes Prometheus text: `# HELP`, `# TYPE` and one sample per metric.
pub struct Exposition {
    text: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition {
            text: String::with_capacity(2048),
        }
    }

    /// A counter (only ever goes up).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.sample(name, help, "counter", None, value as f64);
    }

    /// A counter with one label, e.g. `kind="refused"`.
    pub fn counter_labelled(&mut self, name: &str, help: &str, values: &[(&str, &str, u64)]) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} counter");
        for (label, value, n) in values {
            let _ = writeln!(self.text, "{name}{{{label}=\"{value}\"}} {n}");
        }
    }

    /// A histogram: `buckets` are (upper bound, cumulative count), in
    /// increasing order; `+Inf` is added with `count`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (le, n) in buckets {
            let _ = writeln!(self.text, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(self.text, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.text, "{name}_sum {sum}\n{name}_count {count}");
    }

    /// A gauge (a value now).
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.sample(name, help, "gauge", None, value);
    }

    fn sample(&mut self, name: &str, help: &str, kind: &str, label: Option<&str>, value: f64) {
        let _ = writeln!(
            self.text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{} {value}",
            label.unwrap_or("")
        );
    }

    /// The samples as one log line: `name=value ...` (HELP and TYPE left
    /// out, and histogram buckets: their max and count say enough there).
    pub fn one_line(&self) -> String {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("_bucket{"))
            .map(|l| l.replacen(' ', "=", 1))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

impl Default for Exposition {
    fn default() -> Self {
        Self::new()
    }
}

/// One stats connection.
struct Conn {
    peer: Peer,
    deadline: Instant,
    request: Vec<u8>,
    /// The answer once the request is read, and how much of it is sent.
    response: Option<(Vec<u8>, usize)>,
}

/// The stats listener and its connections.
pub struct StatsServer {
    role: &'static str,
    /// `None` with only `--stats-interval`.
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    /// `--stats-interval`: the next log line is due then.
    interval: Option<(Duration, Instant)>,
    /// SIGUSR1 asked for a log line.
    pub report_requested: bool,
}

impl StatsServer {
    /// Binds the stats listener on `addr` (if given) and arms the
    /// interval log line (if asked for).
    pub fn bind(
        role: &'static str,
        addr: Option<SocketAddr>,
        interval: Option<Duration>,
        registry: &Registry,
    ) -> io::Result<StatsServer> {
        let listener = match addr {
            Some(addr) => {
                let mut listener = TcpListener::bind(addr)
                    .with_context(|| format!("{role}: binding stats address {addr}"))?;
                let local_addr = listener.local_addr()?;
                registry
                    .register(&mut listener, STATS_LISTENER, Interest::READABLE)
                    .with_context(|| format!("{role}: registering the stats listener"))?;
                log::info!("{role}: metrics at http://{local_addr}/metrics");
                Some(listener)
            }
            None => None,
        };
        let now = Instant::now();
        Ok(StatsServer {
            role,
            listener,
            conns: Slab::with_capacity(MAX_CONNS),
            interval: interval.map(|d| (d, now + d)),
            report_requested: false,
        })
    }

    /// The address the stats listener is bound to, if there is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The earliest deadline: a stats connection's, or the next log line.
    pub fn deadline(&self) -> Option<Instant> {
        let conns = self.conns.iter().map(|(_, c)| c.deadline).min();
        let line = self.interval.map(|(_, at)| at);
        match (conns, line) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Accepts stats connections while there is room.
    pub fn accept(&mut self, registry: &Registry) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        while self.conns.len() < MAX_CONNS {
            let (mut sock, addr) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("{}: stats accept: {e}", self.role);
                    return;
                }
            };
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) = registry.register(
                &mut sock,
                conn_token(key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::debug!("{}: registering stats client {addr}: {e}", self.role);
                continue;
            }
            let who = Who {
                role: self.role,
                key,
                side: "stats",
            };
            let mut peer = Peer::accepted(sock, who);
            peer.mark_readable();
            entry.insert(Conn {
                peer,
                deadline: Instant::now() + DEADLINE,
                request: Vec::new(),
                response: None,
            });
        }
        // At the limit: the rest wait in the backlog; a closing connection
        // calls accept again (see `event`).
    }

    /// An event for stats connection `token`: read the request, answer it
    /// with `metrics()` (called only for a complete `GET /metrics`), close.
    pub fn event(
        &mut self,
        registry: &Registry,
        token: Token,
        event: &mio::event::Event,
        scratch: &mut [u8],
        metrics: impl FnOnce() -> String,
    ) {
        let key = FIRST_CONN - token.0;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.peer.on_event(event);
        let room = MAX_REQUEST.min(scratch.len());
        if drive(conn, &mut scratch[..room], metrics) {
            self.close(key);
            self.accept(registry);
        }
    }

    /// Closes stats connections past their deadline, and says whether a
    /// log line is due (interval or SIGUSR1).
    pub fn tick(&mut self, registry: &Registry, now: Instant) -> bool {
        let overdue: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(k, _)| k)
            .collect();
        for key in &overdue {
            log::debug!("{}: stats client too slow: closed", self.role);
            self.close(*key);
        }
        if !overdue.is_empty() {
            self.accept(registry);
        }
        let mut due = std::mem::take(&mut self.report_requested);
        if let Some((every, at)) = &mut self.interval {
            if now >= *at {
                *at = now + *every;
                due = true;
            }
        }
        due
    }

    fn close(&mut self, key: usize) {
        let conn = self.conns.remove(key);
        conn.peer.close();
    }
}

/// Moves one stats connection along; true when it is finished.
fn drive(conn: &mut Conn, scratch: &mut [u8], metrics: impl FnOnce() -> String) -> bool {
    if conn.response.is_none() {
        loop {
            match conn.peer.read(scratch) {
                Io::Data(n) => {
                    if conn.request.len() + n > MAX_REQUEST {
                        conn.response = Some((respond(431, "request too large\n"), 0));
                        break;
                    }
                    conn.request.extend_from_slice(&scratch[..n]);
                }
                Io::Blocked => break,
                Io::Eof | Io::Failed(_) => {
                    if conn.request.is_empty() {
                        return true; // connected and left: nothing to answer
                    }
                    break;
                }
            }
        }
        if conn.response.is_none() {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            conn.response = match request.parse(&conn.request) {
                Ok(httparse::Status::Partial) if conn.peer.eof() => {
                    Some((respond(400, "incomplete request\n"), 0))
                }
                Ok(httparse::Status::Partial) => return false, // more to come
                Ok(httparse::Status::Complete(_)) => {
                    let response = match (request.method, request.path) {
                        (Some("GET"), Some("/metrics")) => {
                            let body = metrics();
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .into_bytes()
                        }
                        (Some("GET"), _) => respond(404, "try /metrics\n"),
                        _ => respond(405, "only GET\n"),
                    };
                    Some((response, 0))
                }
                Err(e) => Some((respond(400, &format!("bad request: {e}\n")), 0)),
            };
            conn.request = Vec::new();
        }
    }
    let Some((response, sent)) = conn.response.as_mut() else {
        return false;
    };
    let (n, failed) = conn.peer.write_ready(&response[*sent..]);
    *sent += n;
    failed.is_some() || *sent == response.len()
}

fn respond(status: u16, body: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_tokens_are_reserved_and_distinct() {
        for key in 0..MAX_CONNS {
            let t = conn_token(key);
            assert!(is_stats_conn(t));
            assert!(![
                super::super::LISTENER,
                super::super::WAKER,
                super::super::SIGNALS,
                STATS_LISTENER
            ]
            .contains(&t));
        }
        assert!(!is_stats_conn(Token(0)) && !is_stats_conn(STATS_LISTENER));
    }

    #[test]
    fn exposition_is_prometheus_text_and_one_log_line() {
        let mut e = Exposition::new();
        e.counter("stopover_accepted_total", "Connections accepted.", 3);
        e.counter_labelled(
            "stopover_transfers_total",
            "Transfers by outcome.",
            &[("outcome", "stored", 2), ("outcome", "aborted", 1)],
        );
        e.gauge("stopover_open", "Open now.", 1.0);
        let line = e.one_line();
        let text = e.into_text();
        assert!(
            text.contains("# TYPE stopover_accepted_total counter\nstopover_accepted_total 3\n")
        );
        assert!(text.contains("stopover_transfers_total{outcome=\"aborted\"} 1\n"));
        assert_eq!(
            line,
            "stopover_accepted_total=3 stopover_transfers_total{outcome=\"stored\"}=2 stopover_transfers_total{outcome=\"aborted\"}=1 stopover_open=1"
        );
    }
}
