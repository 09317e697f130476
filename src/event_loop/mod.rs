//! Plumbing shared by the two poll loops (server and proxy).
//!
//! Each role is one thread running one `mio::Poll`. Everything here is the
//! part of that loop that does not depend on the role:
//!
//! - [`run`] and [`Handler`]: the loop itself, which both roles plug into,
//!   and [`Context`], what the loop lends a role while it handles an event;
//! - [`accept`]: the listener, the accept gate, back-off, graceful stop,
//!   signals and the [`StopHandle`];
//! - [`peer`]: a socket and its readiness, where every read and write goes
//!   through one verdict, [`Io`];
//! - [`reply`]: our own answer line, then a clean close;
//! - [`guard`]: the minimum upload rate, and throttled warnings;
//! - [`stats`]: `GET /metrics` on the same loop, and the stats log line;
//! - [`timer`]: deadlines the loop waits on instead of sleeping;
//! - [`disk`]: asynchronous `O_DIRECT` file writes (and every other disk
//!   operation that can wait for the device) through `io_uring`, whose
//!   completions arrive as one more kind of readiness;
//! - [`health`]: how long each event's handling takes, on `/metrics`.
//!
//! Reserved tokens live here too. Connection tokens are derived from slab
//! keys by each role (small numbers counting up from zero), so the reserved
//! ones sit at the very top of the token space where no key can reach.

pub mod accept;
pub mod disk;
pub mod guard;
pub mod health;
pub mod peer;
pub mod reply;
pub mod stats;
pub mod stop;
pub mod timer;

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Events, Poll, Registry, Token};

use crate::error::Context as _;

pub use accept::{AcceptConfig, Acceptor};
pub use guard::{MinRate, RateWindow, Throttle};
pub use peer::{Io, Peer, Who};
pub use reply::{Reply, ReplyStep, DISCARD_LIMIT};
pub use stats::{Exposition, StatsServer};
pub use stop::StopHandle;
pub use timer::{TimerId, Timers};

/// Token of the listening socket.
pub const LISTENER: Token = Token(usize::MAX);
/// Token of the waker that [`StopHandle::shutdown`] pokes.
pub const WAKER: Token = Token(usize::MAX - 1);
/// Token of the signal pipe (SIGINT, SIGTERM), when signals are handled.
pub const SIGNALS: Token = Token(usize::MAX - 2);

/// Token of the `io_uring` that disk writes complete on (see [`disk`]).
/// Below the stats connections' tokens.
pub const DISK: Token = Token(usize::MAX - 32);

/// Size of the read buffer each loop owns and lends to whichever connection
/// is being served. Large reads mean few syscalls per megabyte.
pub const SCRATCH_SIZE: usize = 1024 * 1024;

/// What the loop lends a role while the role handles an event: everything
/// the loop owns that is not the role's connections.
pub struct Context<T> {
    /// For registering sockets created after accept.
    pub registry: Registry,
    /// The role's deadlines.
    pub timers: Timers<T>,
    /// The loop's one read buffer, lent to whichever connection is served.
    pub scratch: Box<[u8]>,
    /// The listening side: accept, gate, stop.
    pub acceptor: Acceptor,
    /// Warnings about aborted uploads, throttled (see [`Throttle`]).
    pub aborts: Throttle,
    /// `--stats-addr` / `--stats-interval`, when asked for.
    pub stats: Option<StatsServer>,
    /// When the loop was set up (for the uptime metric).
    pub started: Instant,
    /// Asynchronous disk operations (the proxy's spool, the server's
    /// uploads).
    pub disk: disk::Disk,
    /// How long each event's handling takes (see [`health`]).
    pub health: health::Health,
    /// Accepting stopped at [`ACCEPT_BATCH`] with clients still waiting:
    /// accept again on the next turn (no new event will say so).
    pub accept_more: bool,
    /// Counts the batches of events `poll` has returned. A connection made
    /// while a batch is handled can receive none of that batch's events:
    /// any event in it for the connection's token was for the socket that
    /// token named before (a slab key freed and reused within the batch),
    /// and is stale (see `proxy`'s `connection_event`).
    pub batch: u64,
}

impl<T> Context<T> {
    /// Binds the role's listener on `poll` and sets up the rest.
    pub fn bind(
        poll: &Poll,
        config: &AcceptConfig,
        disk_budget: Option<usize>,
    ) -> io::Result<Context<T>> {
        let registry = poll
            .registry()
            .try_clone()
            .with_context(|| format!("{}: cloning registry", config.role))?;
        let acceptor = Acceptor::bind(config, &registry)?;
        let stats = match (
            config.stats_listen,
            config.stats_interval,
            config.api_listen,
        ) {
            (None, None, None) => None,
            (listen, interval, api) => Some(StatsServer::bind(
                config.role,
                listen,
                interval,
                api,
                &registry,
            )?),
        };
        let disk = match disk_budget {
            Some(budget) => disk::Disk::new(&registry, DISK, config.role, budget),
            None => disk::Disk::blocking(0),
        };
        Ok(Context {
            registry,
            timers: Timers::new(),
            scratch: vec![0u8; SCRATCH_SIZE].into_boxed_slice(),
            acceptor,
            aborts: Throttle::default(),
            disk,
            stats,
            started: Instant::now(),
            health: health::Health::default(),
            accept_more: false,
            batch: 0,
        })
    }
}

/// An event's readiness flags for the trace: ` READABLE WRITABLE ...`.
pub fn flags(event: &Event) -> String {
    let mut out = String::new();
    for (set, name) in [
        (event.is_readable(), " READABLE"),
        (event.is_writable(), " WRITABLE"),
        (event.is_read_closed(), " READ_CLOSED"),
        (event.is_error(), " ERROR"),
    ] {
        if set {
            out.push_str(name);
        }
    }
    out
}

/// What a role plugs into [`run`]: the shared shape of both loops.
pub trait Handler {
    /// What the role's timers carry.
    type Timer: std::fmt::Debug;
    /// The counters the role reports when it stops.
    type Stats;
    /// The role's name, for log lines.
    const ROLE: &'static str;

    /// How many connections are open (the gate and the stop count them).
    fn open(&self) -> usize;
    /// A connection was accepted: set it up (and drive it: bytes may be
    /// waiting already).
    fn accepted(&mut self, cx: &mut Context<Self::Timer>, sock: TcpStream, addr: SocketAddr);
    /// An event for one of the role's connection tokens.
    fn connection_event(&mut self, cx: &mut Context<Self::Timer>, event: &Event);
    /// A timer is due.
    fn timer_fired(&mut self, cx: &mut Context<Self::Timer>, timer: Self::Timer);
    /// For a role that writes through [`Context::disk`] (it gets an
    /// `io_uring`): the memory budget of its chunks. The others write files
    /// the ordinary way.
    fn disk_budget(&self) -> Option<usize> {
        None
    }
    /// A disk operation has completed (see [`disk`]).
    fn written(&mut self, _cx: &mut Context<Self::Timer>, _done: disk::Done) {}
    /// A chunk this owner queued for may be free (see `Disk::wait`).
    fn wake(&mut self, _cx: &mut Context<Self::Timer>, _owner: disk::Owner) {}
    /// The graceful stop has begun: connections have until `until` to
    /// finish. A role may end at once what cannot finish by then.
    fn draining(&mut self, _cx: &mut Context<Self::Timer>, _until: Instant) {}
    /// Work the role does a little of on every turn, before `poll` (the
    /// retention keeper's deletions, see `retention`). Returns when it
    /// wants the next turn at the latest (`None`: no sooner than an event).
    fn chores(&mut self, _now: Instant) -> Option<Instant> {
        None
    }
    /// The loop has ended: hand what is still open to the disk's care, if
    /// the role writes through it (called before [`Handler::stopped`];
    /// the loop then lets the disk finish, see [`Daemon::run`]).
    fn close_all(&mut self, _cx: &mut Context<Self::Timer>) {}
    /// The loop has ended: close what is still open, log the summary, and
    /// return the counters.
    fn stopped(&mut self) -> Self::Stats;
    /// The role's own metrics (the loop adds its own: accepted, at
    /// capacity, back-offs, open connections, uptime).
    fn metrics(&self, out: &mut Exposition);
    /// An API request (`--api-addr`): the status and JSON body to answer.
    fn api(
        &mut self,
        _cx: &mut Context<Self::Timer>,
        _request: &stats::ApiRequest,
    ) -> (u16, String) {
        (404, r#"{"error":"no API here","status":404}"#.to_string())
    }
}

/// A role bound and ready to run: its poll instance, what the loop owns
/// ([`Context`]) and the role's own part ([`Handler`]). `Server` and
/// `Proxy` are this type; each adds only its own `bind`.
pub struct Daemon<H: Handler> {
    poll: Poll,
    cx: Context<H::Timer>,
    handler: H,
}

impl<H: Handler> Daemon<H> {
    /// Binds the listener described by `config` for `handler`.
    pub fn new(config: &AcceptConfig, handler: H) -> io::Result<Daemon<H>> {
        let budget = handler.disk_budget();
        Daemon::bind_then(config, budget, || Ok(handler))
    }

    /// Binds the listener first, then builds the handler: a daemon that
    /// cannot listen (an address in use) leaves nothing behind, not even
    /// the storage directory its handler would have created.
    pub fn bind_then(
        config: &AcceptConfig,
        disk_budget: Option<usize>,
        build: impl FnOnce() -> io::Result<H>,
    ) -> io::Result<Daemon<H>> {
        let poll = Poll::new().with_context(|| format!("{}: creating poll", H::ROLE))?;
        let cx = Context::bind(&poll, config, disk_budget)?;
        let handler = build()?;
        Ok(Daemon { poll, cx, handler })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.cx.acceptor.local_addr()
    }

    /// Where `GET /metrics` is served, with `--stats-addr`.
    pub fn stats_addr(&self) -> Option<SocketAddr> {
        self.cx.stats.as_ref().and_then(StatsServer::local_addr)
    }

    /// The role's own part (for its `bind` to finish setting up).
    pub fn handler(&mut self) -> &mut H {
        &mut self.handler
    }

    /// Where the toxiproxy API is served, with `--api-addr`.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.cx.stats.as_ref().and_then(StatsServer::api_addr)
    }

    /// A handle that stops [`Daemon::run`] from another thread.
    pub fn shutdown_handle(&self) -> StopHandle {
        self.cx.acceptor.stop_handle()
    }

    /// Makes SIGINT and SIGTERM stop the daemon (gracefully the first time,
    /// at once the second). The binary does this; in-process users (tests)
    /// use [`Daemon::shutdown_handle`] instead.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        self.cx.acceptor.handle_signals(&self.cx.registry)
    }

    /// Runs the loop until stopped, then lets the role close what is left
    /// and returns its counters.
    pub fn run(mut self) -> io::Result<H::Stats> {
        self.cx.acceptor.log_capacity();
        // This line tells tests and scripts that we are ready: everything is
        // set up (signals included) and the loop is about to wait.
        log::info!("{}: listening on {}", H::ROLE, self.local_addr());
        let ran = run(&mut self.poll, &mut self.cx, &mut self.handler).context(H::ROLE);
        // Even when the loop failed: every connection still open goes
        // through the role's abandon path (kept, removed, reset).
        self.handler.close_all(&mut self.cx);
        let stats = self.handler.stopped();
        // Operations still in flight belong to files the role is finishing:
        // let them land (bounded), and let the role take each file on to
        // its end (which may take one more operation, a trim).
        // Without a ring, operations complete at once and wait only to be
        // reaped: each may lead to the next (write, trim, rename), so go
        // round until nothing is in flight and nothing is left to hand out.
        let deadline = Instant::now() + disk::DROP_WAIT;
        while Instant::now() < deadline {
            let done = if self.cx.disk.in_flight() > 0 {
                self.cx.disk.drain(deadline)
            } else {
                self.cx.disk.reap()
            };
            if done.is_empty() && self.cx.disk.in_flight() == 0 {
                break;
            }
            for done in done {
                self.handler.written(&mut self.cx, done);
            }
            self.cx.disk.submit();
        }
        for done in self.cx.disk.reap() {
            self.handler.written(&mut self.cx, done);
        }
        ran.map(|()| stats)
    }
}

/// The loop both daemons run: wait for readiness or the next deadline,
/// dispatch each event by token, fire due timers, repeat.
///
/// `poll` is the only place the thread blocks. Everything a handler does
/// must return promptly, or every other connection waits.
pub fn run<H: Handler>(
    poll: &mut Poll,
    cx: &mut Context<H::Timer>,
    handler: &mut H,
) -> io::Result<()> {
    let mut events = Events::with_capacity(1024);
    let mut told_draining = false;
    loop {
        let now = Instant::now();
        let chores = handler.chores(now);
        let stats_deadline = cx.stats.as_ref().and_then(StatsServer::deadline);
        let timeout = [
            cx.timers.timeout(now),
            chores.map(|t| t.saturating_duration_since(now)),
            cx.acceptor
                .deadline()
                .map(|t| t.saturating_duration_since(now)),
            stats_deadline.map(|t| t.saturating_duration_since(now)),
        ]
        .into_iter()
        .flatten()
        .min();
        // Completions already waiting, or chunks free for transfers that
        // wait for one: look at the sockets, do not sleep.
        let timeout = if cx.disk.has_completions() || cx.disk.has_wakeups() || cx.accept_more {
            Some(std::time::Duration::ZERO)
        } else {
            timeout
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue; // a signal arrived; just wait again
            }
            return Err(e).context("poll");
        }
        cx.batch += 1;
        // From here on, every event's handling is timed (see `health`).
        cx.health.start();
        if log::log_enabled!(log::Level::Trace) {
            let n = events.iter().count();
            log::trace!(
                "{}: poll woke: {n} event(s){}",
                H::ROLE,
                if n == 0 { " (a deadline)" } else { "" }
            );
        }
        for event in events.iter() {
            match event.token() {
                LISTENER => {
                    log::trace!("{}: listener READABLE", H::ROLE);
                    accept_all(cx, handler);
                }
                WAKER | DISK => {} // DISK: completions are delivered at the top
                SIGNALS => {
                    if cx.acceptor.on_signals() {
                        if let Some(stats) = cx.stats.as_mut() {
                            stats.report_requested = true;
                        }
                    }
                }
                stats::STATS_LISTENER | stats::API_LISTENER => {
                    if let Some(stats) = cx.stats.as_mut() {
                        stats.accept(&cx.registry);
                    }
                }
                token if stats::is_stats_conn(token) => stats_event(cx, handler, event),
                _ => handler.connection_event(cx, event),
            }
            resume_accepting(cx, handler);
            cx.health.lap(match event.token() {
                LISTENER => "accepting",
                _ => "an event",
            });
        }
        if cx.acceptor.should_stop(handler.open(), &cx.registry) {
            return Ok(());
        }
        if let (false, Some(until)) = (told_draining, cx.acceptor.draining_until()) {
            told_draining = true;
            handler.draining(cx, until);
            if cx.acceptor.should_stop(handler.open(), &cx.registry) {
                return Ok(());
            }
        }
        let now = Instant::now();
        if let Some(stats) = cx.stats.as_mut() {
            if stats.tick(&cx.registry, now) {
                let line = exposition(cx, handler).one_line();
                log::info!("{}: stats: {line}", H::ROLE);
            }
        }
        cx.acceptor.backoff_due(now);
        resume_accepting(cx, handler);
        if cx.accept_more {
            accept_all(cx, handler);
        }
        cx.health.lap("accepting and stats");
        while let Some((_, timer)) = cx.timers.pop_due(now) {
            log::trace!("{}: timer fired: {timer:?}", H::ROLE);
            handler.timer_fired(cx, timer);
            resume_accepting(cx, handler);
            cx.health.lap("a timer");
        }
        // Disk completions go to their owners (which may queue more); then
        // everything queued goes to the kernel in one call.
        deliver_written(cx, handler);
        cx.disk.submit();
        cx.health.lap("the disk submit");
    }
}

/// Hands every completed disk write to the role.
/// Then wakes the owners waiting for memory that the writes gave back.
fn deliver_written<H: Handler>(cx: &mut Context<H::Timer>, handler: &mut H) {
    while cx.disk.has_completions() {
        for done in cx.disk.reap() {
            handler.written(cx, done);
            resume_accepting(cx, handler);
            cx.health.lap("a disk completion");
        }
    }
    for owner in cx.disk.wakeups() {
        handler.wake(cx, owner);
        cx.health.lap("a wake-up for memory");
    }
}

/// Every metric: the loop's, then the role's.
fn exposition<H: Handler>(cx: &Context<H::Timer>, handler: &H) -> Exposition {
    let mut e = Exposition::new();
    let c = cx.acceptor.counters;
    e.counter(
        "stopover_connections_accepted_total",
        "Connections accepted.",
        c.accepted,
    );
    e.gauge(
        "stopover_connections_open",
        "Connections open now.",
        handler.open() as f64,
    );
    e.counter(
        "stopover_at_capacity_total",
        "Times accepting stopped because every slot was taken.",
        c.at_capacity,
    );
    e.counter(
        "stopover_accept_backoffs_total",
        "Times accepting paused after running out of descriptors or memory.",
        c.backoffs,
    );
    e.gauge(
        "stopover_connections_open_peak",
        "The most connections open at once so far.",
        c.peak_open as f64,
    );
    e.gauge(
        "stopover_uptime_seconds",
        "Seconds since the daemon started.",
        cx.started.elapsed().as_secs_f64(),
    );
    e.counter(
        "stopover_log_lines_dropped_total",
        "Log lines lost because stderr was closed, failing or too slow (see logging).",
        crate::logging::dropped(),
    );
    cx.health.metrics(&mut e);
    cx.disk.metrics(&mut e);
    handler.metrics(&mut e);
    e
}

/// An event for a stats connection: it may need the metrics to answer.
fn stats_event<H: Handler>(cx: &mut Context<H::Timer>, handler: &mut H, event: &Event) {
    let Some(mut stats) = cx.stats.take() else {
        return;
    };
    let text = std::cell::OnceCell::new();
    let mut scratch = std::mem::take(&mut cx.scratch);
    let api = stats.event(&cx.registry, event.token(), event, &mut scratch, || {
        text.get_or_init(|| exposition(cx, handler).into_text())
            .clone()
    });
    cx.scratch = scratch;
    if let Some(request) = api {
        let (status, body) = handler.api(cx, &request);
        stats.answer(&cx.registry, request, status, &body);
    }
    cx.stats = Some(stats);
}

/// Most connections accepted in one go. Setting one up costs a file
/// creation (the proxy's spool), a connect and a first drive: measured with
/// 1,000 clients arriving at once, accepting them all in one go held the
/// loop for 4.8 s (`stopover_loop_event_seconds_max`) while every transfer
/// already running waited. The rest are accepted on the loop's next turn,
/// after the events that came meanwhile.
pub const ACCEPT_BATCH: usize = 16;

/// Accepts the connections the acceptor allows, up to [`ACCEPT_BATCH`],
/// handing each to the role; says (in `Context::accept_more`) whether to
/// come back for more.
fn accept_all<H: Handler>(cx: &mut Context<H::Timer>, handler: &mut H) {
    cx.accept_more = false;
    let mut n = 0;
    while let Some((sock, addr)) = cx.acceptor.accept(handler.open()) {
        // Counted before the role runs it: a small upload can be over
        // before `accepted` returns.
        let open = handler.open() as u64 + 1;
        let peak = &mut cx.acceptor.counters.peak_open;
        *peak = (*peak).max(open);
        handler.accepted(cx, sock, addr);
        n += 1;
        if n == ACCEPT_BATCH {
            cx.accept_more = true;
            return;
        }
    }
}

/// If the gate has reopened (a connection closed at capacity, or a back-off
/// ended), look at the listener again: the clients that queued meanwhile
/// will not produce a fresh event.
fn resume_accepting<H: Handler>(cx: &mut Context<H::Timer>, handler: &mut H) {
    if cx.acceptor.take_resume() {
        accept_all(cx, handler);
    }
}
