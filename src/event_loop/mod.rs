//! Plumbing shared by the two poll loops (server and proxy).
//!
//! Each role is one thread running one `mio::Poll`. Everything here is the
//! part of that loop that does not depend on the role:
//!
//! - [`run`] and [`Handler`]: the loop itself, which both roles plug into,
//!   and [`Context`], what the loop lends a role while it handles an event;
//! - [`accept`]: the listener, the accept gate, back-off, graceful stop,
//!   signals and the [`StopHandle`];
//! - [`peer`]: a socket and its readiness, where every read, write and
//!   `sendfile` goes through one verdict, [`Io`];
//! - [`reply`]: our own answer line, then a clean close;
//! - [`guard`]: the minimum upload rate, and throttled warnings;
//! - [`timer`]: deadlines the loop waits on instead of sleeping.
//!
//! Reserved tokens live here too. Connection tokens are derived from slab
//! keys by each role (small numbers counting up from zero), so the reserved
//! ones sit at the very top of the token space where no key can reach.

pub mod accept;
pub mod guard;
pub mod peer;
pub mod reply;
pub mod timer;

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Events, Poll, Registry, Token};

use crate::error::Context as _;

pub use accept::{AcceptConfig, Acceptor, StopHandle};
pub use guard::{MinRate, RateWindow, Throttle};
pub use peer::{Io, Peer, Who};
pub use reply::{Reply, ReplyStep, DISCARD_LIMIT};
pub use timer::{TimerId, Timers};

/// Token of the listening socket.
pub const LISTENER: Token = Token(usize::MAX);
/// Token of the waker that [`StopHandle::shutdown`] pokes.
pub const WAKER: Token = Token(usize::MAX - 1);
/// Token of the signal pipe (SIGINT, SIGTERM), when signals are handled.
pub const SIGNALS: Token = Token(usize::MAX - 2);

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
}

impl<T> Context<T> {
    /// Binds the role's listener on `poll` and sets up the rest.
    pub fn bind(poll: &Poll, config: &AcceptConfig) -> io::Result<Context<T>> {
        let registry = poll
            .registry()
            .try_clone()
            .with_context(|| format!("{}: cloning registry", config.role))?;
        let acceptor = Acceptor::bind(config, &registry)?;
        Ok(Context {
            registry,
            timers: Timers::new(),
            scratch: vec![0u8; SCRATCH_SIZE].into_boxed_slice(),
            acceptor,
            aborts: Throttle::default(),
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
    /// The loop has ended: close what is still open, log the summary, and
    /// return the counters.
    fn stopped(&mut self) -> Self::Stats;
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
        let poll = Poll::new().with_context(|| format!("{}: creating poll", H::ROLE))?;
        let cx = Context::bind(&poll, config)?;
        Ok(Daemon { poll, cx, handler })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.cx.acceptor.local_addr()
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
        // This line tells tests and scripts that we are ready: everything is
        // set up (signals included) and the loop is about to wait.
        log::info!("{} listening on {}", H::ROLE, self.local_addr());
        let ran = run(&mut self.poll, &mut self.cx, &mut self.handler).context(H::ROLE);
        // Even when the loop failed: every connection still open goes
        // through the role's abandon path (kept, removed, reset).
        let stats = self.handler.stopped();
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
    loop {
        let now = Instant::now();
        let timeout = [
            cx.timers.timeout(now),
            cx.acceptor
                .deadline()
                .map(|t| t.saturating_duration_since(now)),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue; // a signal arrived; just wait again
            }
            return Err(e).context("poll");
        }
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
                WAKER => {}
                SIGNALS => cx.acceptor.on_signals(),
                _ => handler.connection_event(cx, event),
            }
            resume_accepting(cx, handler);
        }
        if cx.acceptor.should_stop(handler.open(), &cx.registry) {
            return Ok(());
        }
        let now = Instant::now();
        cx.acceptor.backoff_due(now);
        resume_accepting(cx, handler);
        while let Some((_, timer)) = cx.timers.pop_due(now) {
            log::trace!("{}: timer fired: {timer:?}", H::ROLE);
            handler.timer_fired(cx, timer);
            resume_accepting(cx, handler);
        }
    }
}

/// Accepts every connection the acceptor allows, handing each to the role.
fn accept_all<H: Handler>(cx: &mut Context<H::Timer>, handler: &mut H) {
    while let Some((sock, addr)) = cx.acceptor.accept(handler.open()) {
        handler.accepted(cx, sock, addr);
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
