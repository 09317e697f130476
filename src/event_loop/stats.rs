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
//!
//! The proxy's toxiproxy-compatible API (`--api-addr`, see `proxy::api`)
//! rides on the same plumbing: its own listener ([`API_LISTENER`]), its
//! connections in the same bounded table, a request body read up to its
//! `Content-Length` (at most [`MAX_API_REQUEST`]). An API request does
//! not need the metrics but the role: [`StatsServer::event`] hands it back
//! ([`ApiRequest`]) and the loop answers it with the role's help
//! ([`StatsServer::answer`]).

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
/// Token of the API listener (`--api-addr`).
pub const API_LISTENER: Token = Token(usize::MAX - 33);
/// The largest API request (line, headers and body): a `/populate` of
/// dozens of proxies.
pub const MAX_API_REQUEST: usize = 64 * 1024;

/// A complete API request, for the role to answer.
#[derive(Debug)]
pub struct ApiRequest {
    key: usize,
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

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
    /// An API connection (`--api-addr`), not a metrics one.
    api: bool,
}

/// What reading a request came to.
enum Parsed {
    /// Not complete yet.
    Partial,
    /// Answered here (metrics, or an error).
    Answered,
    /// An API request for the role.
    Api(ApiRequest),
}

/// The stats listener and its connections.
pub struct StatsServer {
    role: &'static str,
    /// `None` with only `--stats-interval`.
    listener: Option<TcpListener>,
    /// `--api-addr`.
    api: Option<TcpListener>,
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
        api: Option<SocketAddr>,
        registry: &Registry,
    ) -> io::Result<StatsServer> {
        let api = listen(
            role,
            ("API", "toxiproxy API"),
            api,
            API_LISTENER,
            "proxies",
            registry,
        )?;
        let listener = listen(
            role,
            ("stats", "metrics"),
            addr,
            STATS_LISTENER,
            "metrics",
            registry,
        )?;
        let now = Instant::now();
        Ok(StatsServer {
            role,
            listener,
            api,
            conns: Slab::with_capacity(MAX_CONNS),
            interval: interval.map(|d| (d, now + d)),
            report_requested: false,
        })
    }

    /// The address the stats listener is bound to, if there is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The address the API listener is bound to, if there is one.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|l| l.local_addr().ok())
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
        self.accept_from(registry, false);
        self.accept_from(registry, true);
    }

    fn accept_from(&mut self, registry: &Registry, api: bool) {
        let listener = if api { &self.api } else { &self.listener };
        let Some(listener) = listener.as_ref() else {
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
                api,
            });
        }
        // At the limit: the rest wait in the backlog; a closing connection
        // calls accept again (see `event`).
    }

    /// An event for stats connection `token`: read the request, answer it
    /// with `metrics()` (called only for a complete `GET /metrics`), close.
    /// A complete API request is handed back, for [`StatsServer::answer`].
    pub fn event(
        &mut self,
        registry: &Registry,
        token: Token,
        event: &mio::event::Event,
        scratch: &mut [u8],
        metrics: impl FnOnce() -> String,
    ) -> Option<ApiRequest> {
        let key = FIRST_CONN - token.0;
        let conn = self.conns.get_mut(key)?;
        conn.peer.on_event(event);
        let room = MAX_API_REQUEST.min(scratch.len());
        let mut api = None;
        let finished = match read_request(conn, key, &mut scratch[..room], metrics) {
            Ok(Parsed::Partial) => false,
            Ok(Parsed::Answered) => send(conn),
            Ok(Parsed::Api(request)) => {
                api = Some(request);
                false
            }
            Err(()) => true,
        };
        if finished {
            self.close(key);
            self.accept(registry);
        }
        api
    }

    /// Answers an API request with `status` and a JSON `body` (empty for
    /// 204), and closes once it is sent.
    pub fn answer(&mut self, registry: &Registry, request: ApiRequest, status: u16, body: &str) {
        let Some(conn) = self.conns.get_mut(request.key) else {
            return;
        };
        conn.response = Some((respond_as(status, "application/json", body), 0));
        if send(conn) {
            self.close(request.key);
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

/// Binds and registers one of the HTTP listeners (`what`: stats, API,
/// and what it serves), and says where it serves `path`.
fn listen(
    role: &str,
    (what, serves): (&str, &str),
    addr: Option<SocketAddr>,
    token: Token,
    path: &str,
    registry: &Registry,
) -> io::Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let mut listener = TcpListener::bind(addr)
        .with_context(|| format!("{role}: binding {what} address {addr}"))?;
    let local = listener.local_addr()?;
    registry
        .register(&mut listener, token, Interest::READABLE)
        .with_context(|| format!("{role}: registering the {what} listener"))?;
    log::info!("{role}: {serves} at http://{local}/{path}");
    Ok(Some(listener))
}

/// Reads a stats or API connection's request, and answers what can be
/// answered here; `Err` when the connection is over (it left).
fn read_request(
    conn: &mut Conn,
    key: usize,
    scratch: &mut [u8],
    metrics: impl FnOnce() -> String,
) -> Result<Parsed, ()> {
    if conn.response.is_some() {
        return Ok(Parsed::Answered); // sending it
    }
    let most = if conn.api {
        MAX_API_REQUEST
    } else {
        MAX_REQUEST
    };
    loop {
        match conn.peer.read(scratch) {
            Io::Data(n) => {
                if conn.request.len() + n > most {
                    conn.response = Some((respond(431, "request too large\n"), 0));
                    return Ok(Parsed::Answered);
                }
                conn.request.extend_from_slice(&scratch[..n]);
            }
            Io::Blocked => break,
            Io::Eof | Io::Failed(_) => {
                if conn.request.is_empty() {
                    return Err(()); // connected and left: nothing to answer
                }
                break;
            }
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    conn.response = match request.parse(&conn.request) {
        Ok(httparse::Status::Partial) if conn.peer.eof() => {
            Some((respond(400, "incomplete request\n"), 0))
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial), // more to come
        Ok(httparse::Status::Complete(head)) if conn.api => {
            let length = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .unwrap_or(0);
            if head + length > most {
                Some((respond(431, "request too large\n"), 0))
            } else if conn.request.len() < head + length {
                if conn.peer.eof() {
                    Some((respond(400, "incomplete request\n"), 0))
                } else {
                    return Ok(Parsed::Partial);
                }
            } else {
                let api = ApiRequest {
                    key,
                    method: request.method.unwrap_or_default().to_string(),
                    path: request.path.unwrap_or_default().to_string(),
                    body: conn.request[head..head + length].to_vec(),
                };
                conn.request = Vec::new();
                return Ok(Parsed::Api(api));
            }
        }
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
    Ok(Parsed::Answered)
}

/// Sends what the kernel takes of a connection's answer; true when it is
/// all sent (or the peer broke).
fn send(conn: &mut Conn) -> bool {
    let Some((response, sent)) = conn.response.as_mut() else {
        return false;
    };
    let (n, failed) = conn.peer.write_ready(&response[*sent..]);
    *sent += n;
    failed.is_some() || *sent == response.len()
}

fn respond(status: u16, body: &str) -> Vec<u8> {
    respond_as(status, "text/plain", body)
}

fn respond_as(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
