//! Plumbing shared by the two poll loops (server and proxy).
//!
//! Each role is one thread running one `mio::Poll`. Everything here is the
//! part of that loop that does not depend on the role:
//!
//! - [`bind_listener`]: a non-blocking listening socket with a deep backlog;
//! - [`Shutdown`]: a handle another thread can use to stop a loop (a
//!   `mio::Waker` plus a flag), used by tests, benches and signals;
//! - [`Timers`](timer::Timers): deadlines the loop waits on instead of sleeping;
//! - [`run`] and [`Handler`]: the loop itself, which both roles plug into;
//! - [`AcceptGate`]: when to accept, so that a loop never runs out of file
//!   descriptors half-way through setting up a connection;
//! - [`raise_nofile_limit`]: lift the soft open-files limit to the hard one.
//!
//! Reserved tokens live here too. Connection tokens are derived from slab
//! keys by each role (small numbers counting up from zero), so the reserved
//! ones sit at the very top of the token space where no key can reach.

pub mod timer;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpListener;
use mio::{Events, Poll, Registry, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::error::Context;

pub use timer::{TimerId, Timers};

/// Token of the listening socket.
pub const LISTENER: Token = Token(usize::MAX);
/// Token of the waker that [`Shutdown::shutdown`] pokes.
pub const WAKER: Token = Token(usize::MAX - 1);
/// Token of the signal pipe (SIGINT, SIGTERM), when signals are handled.
pub const SIGNALS: Token = Token(usize::MAX - 2);

/// How many not-yet-accepted connections the kernel may queue for us. The
/// kernel caps it at `net.core.somaxconn` (4096 on current kernels). A load
/// test opening thousands of connections at once needs a deep queue: with
/// the common default of 128, the excess SYNs are dropped and retried a full
/// second later, which shows up as a 1 s latency cliff.
pub const LISTEN_BACKLOG: i32 = 4096;

/// How long `drain` keeps swallowing a refused upload (so the client can
/// read our `ERR` line before we close) before giving up and closing.
pub const DISCARD_LIMIT: u64 = 4 * 1024 * 1024;

/// Size of the read buffer each loop owns and lends to whichever connection
/// is being served. Large reads mean few syscalls per megabyte.
pub const SCRATCH_SIZE: usize = 1024 * 1024;

/// Binds a non-blocking TCP listener on `addr` (port 0 picks a free port).
/// The role logs `listening on <addr>` once it is completely ready, since
/// tests and scripts take that line as the signal to connect.
pub fn bind_listener(addr: SocketAddr, role: &str) -> io::Result<TcpListener> {
    let what = || format!("{role}: binding {addr}");
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .with_context(what)?;
    // SO_REUSEADDR: a restarted server can bind while old connections of
    // the previous run sit in TIME_WAIT.
    socket.set_reuse_address(true).with_context(what)?;
    socket.bind(&addr.into()).with_context(what)?;
    socket.listen(LISTEN_BACKLOG).with_context(what)?;
    socket.set_nonblocking(true).with_context(what)?;
    let listener = TcpListener::from_std(socket.into());
    let local = listener.local_addr().with_context(what)?;
    if !local.ip().is_loopback() {
        log::warn!(
            "{role}: bound to non-loopback address {local}: anyone who can reach it can write files to this disk"
        );
    }
    Ok(listener)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new
/// soft limit. Each connection costs the server one descriptor and the proxy
/// three (two sockets and a spool file), and the usual soft default of 1024
/// would cap us far below what the machine allows.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Sets `SO_RCVLOWAT`: readiness for reading is reported only once `bytes`
/// are queued (or at EOF or an error). A non-blocking read still returns
/// whatever is there.
pub fn set_recv_low_water(sock: &impl std::os::fd::AsRawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is open for the duration of the call; we pass
    // a pointer to a c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A handle that stops a running loop from another thread.
///
/// The first request starts a graceful shutdown (stop accepting, let
/// transfers in flight finish for up to the grace period); a second one
/// stops at once. SIGINT and SIGTERM, when the role handles signals, count
/// as requests too.
#[derive(Clone, Debug)]
pub struct Shutdown {
    waker: Arc<Waker>,
    requests: Arc<AtomicUsize>,
}

impl Shutdown {
    /// Creates the handle, registering a waker on the loop's registry.
    pub fn new(registry: &Registry) -> io::Result<Shutdown> {
        Ok(Shutdown {
            waker: Arc::new(Waker::new(registry, WAKER).context("creating waker")?),
            requests: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Asks the loop to stop: gracefully the first time, at once the second.
    pub fn shutdown(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::warn!("waking loop for shutdown: {e}");
        }
    }

    /// Asks the loop to stop at once, whatever is in flight.
    pub fn shutdown_now(&self) {
        self.requests.fetch_add(2, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::warn!("waking loop for shutdown: {e}");
        }
    }

    /// How many times a stop was asked for (0: keep running).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Registers SIGINT and SIGTERM with the loop, on the [`SIGNALS`] token.
/// Signal handlers cannot safely do anything but write to a pipe; the
/// pipe's read end is what the loop polls (signal-hook-mio does this).
pub fn register_signals(registry: &Registry) -> io::Result<signal_hook_mio::v1_0::Signals> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    registry
        .register(&mut signals, SIGNALS, mio::Interest::READABLE)
        .context("registering signals")?;
    Ok(signals)
}

/// Turns pending signals into shutdown requests; returns their names.
pub fn take_signals(
    signals: &mut signal_hook_mio::v1_0::Signals,
    shutdown: &Shutdown,
) -> Vec<&'static str> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut names = Vec::new();
    for signal in signals.pending() {
        names.push(match signal {
            SIGINT => "SIGINT",
            SIGTERM => "SIGTERM",
            _ => "a signal",
        });
        shutdown.shutdown();
    }
    names
}

/// True for the `accept` errors that mean "out of file descriptors".
///
/// The pending connection stays in the kernel's queue, so the listener stays
/// readable: a loop that simply retries would spin at 100% CPU. The remedy
/// is to stop accepting for a moment ([`AcceptGate::out_of_descriptors`]).
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Decides when the listener may accept, so that a loop never runs out of
/// file descriptors in the middle of setting up a connection.
///
/// Each connection costs a known number of descriptors (the server: socket
/// and file; the proxy: two sockets and a spool file). At startup the gate
/// raises the soft open-files limit to the hard one and works out how many
/// connections fit; with `--max-conns`, the smaller of the two is the
/// *capacity*. At capacity the loop simply stops calling `accept`: new
/// clients wait in the kernel's listen backlog (their connect succeeds, and
/// their first bytes sit in socket buffers) until a connection closes.
///
/// If `accept` fails with `EMFILE`/`ENFILE` anyway (something else took
/// descriptors), the gate backs off for [`AcceptGate::BACKOFF`] (the caller
/// arms a timer) instead of retrying in a hot loop.
///
/// Both situations are logged at most once a minute as a warning, so a
/// sustained overload cannot flood the log.
#[derive(Debug)]
pub struct AcceptGate {
    role: &'static str,
    capacity: usize,
    at_capacity: bool,
    backing_off: bool,
    last_warning: Option<Instant>,
}

impl AcceptGate {
    /// How long to stop accepting after running out of descriptors.
    pub const BACKOFF: Duration = Duration::from_millis(50);
    /// Descriptors kept free for everything that is not a connection
    /// (stdio, the poll instance, the waker, the listener, log files...).
    const RESERVED: u64 = 16;

    /// A gate for connections costing `per_conn` descriptors each, with an
    /// optional explicit limit.
    pub fn new(role: &'static str, per_conn: u64, max_conns: Option<usize>) -> AcceptGate {
        let limit = match raise_nofile_limit() {
            Ok(limit) => limit,
            Err(e) => {
                log::warn!("{role}: {e}");
                1024
            }
        };
        let in_use =
            std::fs::read_dir("/proc/self/fd").map_or(Self::RESERVED, |d| d.count() as u64);
        let budget =
            (limit.saturating_sub(in_use + Self::RESERVED) / per_conn.max(1)).max(1) as usize;
        let capacity = max_conns.map_or(budget, |m| m.min(budget));
        log::info!(
            "{role}: up to {capacity} concurrent connections (open-files limit {limit}, {per_conn} descriptors per connection{})",
            max_conns.map_or(String::new(), |m| format!(", --max-conns {m}"))
        );
        AcceptGate {
            role,
            capacity,
            at_capacity: false,
            backing_off: false,
            last_warning: None,
        }
    }

    /// The most connections the loop will hold at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// May the loop accept another connection while `open` are open?
    pub fn admits(&mut self, open: usize) -> bool {
        if self.backing_off {
            return false;
        }
        if open >= self.capacity {
            if !self.at_capacity {
                self.at_capacity = true;
                self.warn(format!(
                    "at capacity ({open} connections): new clients wait in the listen backlog until one finishes"
                ));
            }
            return false;
        }
        true
    }

    /// `accept` failed for lack of descriptors. Returns true if this starts
    /// a back-off, in which case the caller arms a timer for
    /// [`AcceptGate::BACKOFF`] and calls [`AcceptGate::backoff_over`] then.
    pub fn out_of_descriptors(&mut self, err: &io::Error, open: usize) -> bool {
        if self.backing_off {
            return false;
        }
        self.backing_off = true;
        self.warn(format!(
            "accept failed ({err}) with {open} connections open: pausing accepts until descriptors free up"
        ));
        true
    }

    /// The back-off timer fired: the caller should try to accept again.
    pub fn backoff_over(&mut self) {
        self.backing_off = false;
    }

    /// A connection closed, freeing descriptors. Returns true if the loop
    /// had stopped accepting and should look at the listener again: since
    /// readiness is edge-triggered, the clients that queued up meanwhile
    /// will not produce a fresh event.
    pub fn connection_closed(&mut self) -> bool {
        let was_stopped = self.at_capacity || self.backing_off;
        self.at_capacity = false;
        self.backing_off = false;
        was_stopped
    }

    fn warn(&mut self, message: String) {
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.last_warning = Some(now);
            log::warn!("{}: {message}", self.role);
        } else {
            log::debug!("{}: {message}", self.role);
        }
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

/// Graceful shutdown, the same for both roles.
///
/// The first shutdown request (a signal, or [`Shutdown::shutdown`]) closes
/// the listener at once, so new clients are refused rather than left in a
/// backlog nobody will accept from, and gives the transfers in flight
/// `grace` to finish. The loop stops when none are left, when the grace
/// period is over, or at a second request.
#[derive(Debug)]
pub struct GracefulStop {
    role: &'static str,
    grace: Duration,
    until: Option<Instant>,
}

impl GracefulStop {
    /// No shutdown requested yet.
    pub fn new(role: &'static str, grace: Duration) -> GracefulStop {
        GracefulStop {
            role,
            grace,
            until: None,
        }
    }

    /// True once a shutdown has begun (the role must not accept).
    pub fn is_draining(&self) -> bool {
        self.until.is_some()
    }

    /// The body of [`Handler::should_stop`]: starts draining at the first
    /// request (closing `listener` and arming `grace_timer` so the loop
    /// wakes when the grace period ends), and says whether to stop now.
    pub fn should_stop<T>(
        &mut self,
        shutdown: &Shutdown,
        in_flight: usize,
        listener: &mut Option<TcpListener>,
        registry: &Registry,
        timers: &mut Timers<T>,
        grace_timer: T,
    ) -> bool {
        let requests = shutdown.requests();
        if requests == 0 {
            return false;
        }
        let now = Instant::now();
        if self.until.is_none() {
            let until = now + self.grace;
            self.until = Some(until);
            if let Some(mut listener) = listener.take() {
                let _ = registry.deregister(&mut listener);
            }
            timers.schedule(until, grace_timer);
            log::info!(
                "{}: shutting down: not accepting; {in_flight} transfer(s) in flight get up to {} to finish (again to stop now)",
                self.role,
                humantime::format_duration(self.grace)
            );
        }
        requests >= 2 || in_flight == 0 || self.until.is_some_and(|t| now >= t)
    }
}

/// The body of [`Handler::signals_ready`]: each pending signal becomes a
/// shutdown request, and is logged.
pub fn on_signals(
    role: &str,
    signals: Option<&mut signal_hook_mio::v1_0::Signals>,
    shutdown: &Shutdown,
) {
    if let Some(signals) = signals {
        for name in take_signals(signals, shutdown) {
            log::info!("{role}: received {name}");
        }
    }
}

/// What a role plugs into [`run`]: the shared shape of both loops.
pub trait Handler {
    /// What the role's timers carry.
    type Timer: std::fmt::Debug;
    /// The role's name, for log lines.
    const ROLE: &'static str;

    /// The role's timers; [`run`] waits no longer than the earliest.
    fn timers(&mut self) -> &mut Timers<Self::Timer>;
    /// The listener is readable: accept what the gate allows.
    fn accept_ready(&mut self);
    /// An event for one of the role's connection tokens.
    fn connection_event(&mut self, event: &Event);
    /// A timer is due.
    fn timer_fired(&mut self, timer: Self::Timer);
    /// The signal pipe is readable (see [`register_signals`]).
    fn signals_ready(&mut self) {}
    /// Checked after each round of events: true ends [`run`].
    fn should_stop(&mut self) -> bool;
}

/// The loop both daemons run: wait for readiness or the next deadline,
/// dispatch each event by token, fire due timers, repeat.
///
/// `poll` is the only place the thread blocks. Everything a handler does
/// must return promptly, or every other connection waits.
pub fn run<H: Handler>(poll: &mut Poll, handler: &mut H) -> io::Result<()> {
    let mut events = Events::with_capacity(1024);
    loop {
        let timeout = handler.timers().timeout(Instant::now());
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
                    handler.accept_ready()
                }
                WAKER => {}
                SIGNALS => handler.signals_ready(),
                _ => handler.connection_event(event),
            }
        }
        if handler.should_stop() {
            return Ok(());
        }
        let now = Instant::now();
        while let Some((_, timer)) = handler.timers().pop_due(now) {
            log::trace!("{}: timer fired: {timer:?}", H::ROLE);
            handler.timer_fired(timer);
        }
    }
}
