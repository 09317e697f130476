//! The listening side of a loop, the same for both roles: bind, accept until
//! `WouldBlock`, the accept gate, out-of-descriptors back-off, and the
//! graceful stop (with the signals and the handle that start it).
//!
//! ```text
//!   Acceptor
//!     listener     None once stopping: new clients are refused, not queued
//!     AcceptGate   at capacity? backing off after EMFILE? then do not accept
//!     GracefulStop first request: close the listener, give transfers `grace`
//!     StopHandle   another thread's (or a signal's) way to ask for a stop
//! ```
//!
//! (The last two live in `stop`; the acceptor holds them.)
//!
//! The loop ([`super::run`]) asks [`Acceptor::accept`] for connections until
//! it says `None`, hands each to the role, and asks [`Acceptor::should_stop`]
//! after every round of events. The acceptor's two deadlines (end of a
//! back-off, end of the grace period) are few and fixed, so they are plain
//! fields that the loop folds into its `poll` timeout, not timers.

use std::io;
use std::net::SocketAddr;

use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};
use signal_hook_mio::v1_0::Signals;
use socket2::{Domain, Protocol, Socket, Type};

use super::stats::LoopCounters;
use super::stop::{GracefulStop, StopHandle};
use super::{LISTENER, SIGNALS};
use crate::error::Context;
use crate::sys;

/// How many not-yet-accepted connections the kernel may queue for us. The
/// kernel caps it at `net.core.somaxconn` (4096 on current kernels). A load
/// test opening thousands of connections at once needs a deep queue: with
/// the common default of 128, the excess SYNs are dropped and retried a full
/// second later, which shows up as a 1 s latency cliff.
pub const LISTEN_BACKLOG: i32 = 4096;

/// What a role tells the acceptor about itself.
#[derive(Debug, Clone)]
pub struct AcceptConfig {
    /// The role's name, for log lines.
    pub role: &'static str,
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Descriptors one connection costs (sockets and files).
    pub per_conn: u64,
    /// `--max-conns`, if given.
    pub max_conns: Option<usize>,
    /// `--grace`: how long transfers in flight may take on shutdown.
    pub grace: Duration,
    /// `--stats-addr`: serve `GET /metrics` here.
    pub stats_listen: Option<SocketAddr>,
    /// `--stats-interval`: log the counters this often.
    pub stats_interval: Option<Duration>,
    /// `SO_RCVLOWAT` for every accepted socket (the server's batching of
    /// upload reads), set once on the listener.
    pub recv_low_water: Option<usize>,
    /// `--api-addr` (the proxy's toxiproxy API): serve it here.
    pub api_listen: Option<SocketAddr>,
}

/// The listening side of a loop. See the module docs.
pub struct Acceptor {
    role: &'static str,
    /// `None` once stopping.
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    gate: AcceptGate,
    stop: GracefulStop,
    handle: StopHandle,
    signals: Option<Signals>,
    /// A connection closed while the gate was shut: look at the listener
    /// again (edge-triggered readiness will not repeat itself).
    resume: bool,
    /// Whether accepted sockets inherit the listener's options (see
    /// [`set_options`]): checked on the first one, `None` until then.
    inherits: Option<bool>,
    /// `SO_RCVLOWAT` to set per socket where they do not.
    recv_low_water: Option<usize>,
    /// Accepted, at capacity, backed off: for the metrics.
    pub counters: LoopCounters,
}

impl Acceptor {
    /// Binds the listener and registers it (and the stop handle's waker).
    pub fn bind(config: &AcceptConfig, registry: &Registry) -> io::Result<Acceptor> {
        let role = config.role;
        let mut listener = bind_listener(config.listen, role)?;
        set_options(&listener, config.recv_low_water)
            .with_context(|| format!("{role}: setting socket options on the listener"))?;
        let local_addr = listener
            .local_addr()
            .with_context(|| format!("{role}: reading bound address"))?;
        registry
            .register(&mut listener, LISTENER, Interest::READABLE)
            .with_context(|| format!("{role}: registering listener"))?;
        let handle = StopHandle::new(registry)?;
        let gate = AcceptGate::new(role, config.per_conn, config.max_conns);
        Ok(Acceptor {
            role,
            listener: Some(listener),
            local_addr,
            gate,
            stop: GracefulStop::new(role, config.grace),
            handle,
            signals: None,
            resume: false,
            inherits: None,
            recv_low_water: config.recv_low_water,
            counters: LoopCounters::default(),
        })
    }

    /// Closes the listener (`on` false: new clients are refused, as by a
    /// port nobody listens on) or binds it again at the same address: a
    /// toxiproxy proxy's `enabled`. Nothing changes once stopping.
    pub fn set_listening(&mut self, on: bool, registry: &Registry) -> io::Result<()> {
        if self.stop.is_draining() {
            return Ok(());
        }
        match (on, self.listener.take()) {
            (false, Some(mut listener)) => {
                let _ = registry.deregister(&mut listener);
                log::info!("{}: disabled: listener closed", self.role);
            }
            (true, None) => {
                let mut listener = bind_listener(self.local_addr, self.role)?;
                set_options(&listener, self.recv_low_water)?;
                registry.register(&mut listener, LISTENER, Interest::READABLE)?;
                self.listener = Some(listener);
                self.resume = true;
                log::info!("{}: enabled: listening on {}", self.role, self.local_addr);
            }
            (_, listener) => self.listener = listener,
        }
        Ok(())
    }

    /// Logs how many connections the daemon will take at once.
    pub fn log_capacity(&self) {
        log::info!("{}", self.gate.note);
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops the loop from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.handle.clone()
    }

    /// Makes SIGINT and SIGTERM stop the loop (gracefully the first time,
    /// at once the second). Signal handlers cannot safely do anything but
    /// write to a pipe; the pipe's read end is what the loop polls
    /// (signal-hook-mio does this), on the [`SIGNALS`] token.
    pub fn handle_signals(&mut self, registry: &Registry) -> io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
        let mut signals =
            Signals::new([SIGINT, SIGTERM, SIGUSR1]).context("installing signal handlers")?;
        registry
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .context("registering signals")?;
        self.signals = Some(signals);
        Ok(())
    }

    /// The signal pipe is readable: SIGINT and SIGTERM are stop requests;
    /// returns true if SIGUSR1 asked for the counters to be logged.
    pub fn on_signals(&mut self) -> bool {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
        let Some(signals) = self.signals.as_mut() else {
            return false;
        };
        let mut report = false;
        for signal in signals.pending() {
            let name = match signal {
                SIGUSR1 => {
                    report = true;
                    continue;
                }
                SIGINT => "SIGINT",
                SIGTERM => "SIGTERM",
                _ => "a signal",
            };
            log::info!("{}: received {name}", self.role);
            self.handle.shutdown();
        }
        report
    }

    /// The next connection to accept while `open` are open, or `None` when
    /// the loop should stop accepting for now: nobody is waiting
    /// (`WouldBlock`), the gate is shut (capacity, back-off), or the loop is
    /// stopping. Call until `None`: readiness is edge-triggered, so a
    /// connection left in the queue would produce no second event.
    pub fn accept(&mut self, open: usize) -> Option<(TcpStream, SocketAddr)> {
        loop {
            if self.stop.is_draining() {
                return None;
            }
            let was_at_capacity = self.gate.at_capacity;
            if !self.gate.admits(open) {
                if self.gate.at_capacity && !was_at_capacity {
                    self.counters.at_capacity += 1;
                }
                return None;
            }
            let listener = self.listener.as_ref()?;
            match listener.accept() {
                Ok((sock, addr)) => {
                    self.count_accepted(&sock);
                    return Some((sock, addr));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    log::trace!("{}: accept WouldBlock", self.role);
                    return None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ECONNABORTED and friends: that one connection is gone,
                // the listener is fine; take the next.
                Err(e) if is_per_connection(&e) => log::debug!("{}: accept: {e}", self.role),
                // Out of descriptors, of memory or buffers, or anything we
                // do not know: the pending connection stays queued and the
                // listener stays readable, so retrying now would spin.
                Err(e) => {
                    self.out_of_descriptors(&e, open);
                    return None;
                }
            }
        }
    }

    /// Counts a connection accepted by a listener of this loop that has
    /// [`set_options`]'s options (ours, or one of the proxy's routes'), and
    /// makes sure the socket has them: see [`Acceptor::check_inherited`].
    pub fn count_accepted(&mut self, sock: &TcpStream) {
        self.counters.accepted += 1;
        self.check_inherited(sock);
    }

    /// Makes sure `sock` has the options [`set_options`] put on the
    /// listener. Linux copies them to every accepted socket; this looks
    /// once, at the first connection (one `getsockopt`), and where they
    /// were not copied sets them on every socket from then on. The verdict
    /// is the kernel's, not one listener's: it serves every listener of
    /// the loop given the same options (the proxy's routes use
    /// `recv_low_water` `None`, as the proxy's own listener does).
    fn check_inherited(&mut self, sock: &TcpStream) {
        let inherits = *self.inherits.get_or_insert_with(|| {
            let linger = socket2::SockRef::from(sock).linger();
            let inherited = matches!(linger, Ok(Some(d)) if d.is_zero());
            if !inherited {
                log::debug!(
                    "{}: accepted sockets do not inherit the listener's options ({linger:?}): setting them on each",
                    self.role
                );
            }
            inherited
        });
        if !inherits {
            if let Err(e) = set_options(sock, self.recv_low_water) {
                log::debug!("{}: socket options: {e}", self.role);
            }
        }
    }

    /// Something ran out of descriptors or other resources (`accept`, or a
    /// role creating a file): stop accepting for a moment
    /// (`AcceptGate::BACKOFF`).
    pub fn out_of_descriptors(&mut self, e: &io::Error, open: usize) {
        if self.gate.out_of_descriptors(e, open) {
            self.counters.backoffs += 1;
        }
    }

    /// A connection closed. If the gate had stopped accepting, the loop
    /// looks at the listener again ([`Acceptor::take_resume`]).
    pub fn connection_closed(&mut self) {
        if self.gate.connection_closed() {
            self.resume = true;
        }
    }

    /// Ends a back-off whose time is up at `now` (the loop then looks at
    /// the listener again, see [`Acceptor::take_resume`]).
    pub fn backoff_due(&mut self, now: Instant) {
        if self.gate.backoff_over(now) {
            self.resume = true;
        }
    }

    /// True (once) when the loop should try to accept again.
    pub fn take_resume(&mut self) -> bool {
        std::mem::take(&mut self.resume)
    }

    /// The acceptor's next deadline, for the loop's `poll` timeout.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.gate.backoff_until, self.stop.until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Once the graceful stop has begun: when its grace period ends.
    pub fn draining_until(&self) -> Option<Instant> {
        self.stop.until
    }

    /// Checked after each round of events: starts the graceful stop at the
    /// first request, and says whether the loop should end now.
    pub fn should_stop(&mut self, open: usize, registry: &Registry) -> bool {
        self.stop
            .should_stop(&self.handle, open, &mut self.listener, registry)
    }
}

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

/// The options every accepted socket needs, set once on the listener:
/// Linux copies a listening socket's options to each socket `accept`
/// returns, so one call here saves three per connection (issue 20 counted
/// 28 system calls per proxied transfer; these were three of them).
///
/// - `SO_LINGER` {on, 0}: a socket closes abortively, with a reset, unless
///   it is closed gracefully on purpose (`Peer::close`). So when the process
///   dies, no peer mistakes a half-sent upload or answer for a whole one.
/// - `TCP_NODELAY`: our writes are whole answers and relayed chunks; Nagle
///   would hold a last small segment back for a delayed ACK.
/// - `SO_RCVLOWAT`, where the role asks for it (the server).
pub fn set_options(sock: &impl std::os::fd::AsFd, recv_low_water: Option<usize>) -> io::Result<()> {
    let sock = socket2::SockRef::from(sock);
    sock.set_linger(Some(Duration::ZERO))?;
    sock.set_nodelay(true)?;
    if let Some(bytes) = recv_low_water {
        sys::set_recv_low_water(&*sock, bytes)?;
    }
    Ok(())
}

/// True for the errors that mean "out of file descriptors".
///
/// After a failed `accept` the pending connection stays in the kernel's
/// queue, so the listener stays readable: a loop that simply retries would
/// spin at 100% CPU. The remedy is to stop accepting for a moment.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// True for the `accept` errors that concern only the one connection being
/// accepted (it was aborted, refused by a firewall, or hit a network error
/// that Linux reports on accept): the listener is fine. Every other error
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM, ...) is the loop's problem, and the
/// loop backs off instead of retrying at once.
pub fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
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
/// descriptors), the gate backs off for [`AcceptGate::BACKOFF`] instead of
/// retrying in a hot loop.
///
/// Both situations are logged at most once a minute as a warning, so a
/// sustained overload cannot flood the log.
#[derive(Debug)]
struct AcceptGate {
    role: &'static str,
    capacity: usize,
    /// The capacity and where it comes from, for the log when the loop
    /// starts (not at bind: a daemon that fails after binding, on its
    /// directory, says only why).
    note: String,
    at_capacity: bool,
    /// While backing off after running out of descriptors: until when.
    backoff_until: Option<Instant>,
    last_warning: Option<Instant>,
}

impl AcceptGate {
    /// How long to stop accepting after running out of descriptors.
    const BACKOFF: Duration = Duration::from_millis(50);
    /// Descriptors kept free for everything that is not a connection
    /// (stdio, the poll instance, the waker, the listener, log files...).
    const RESERVED: u64 = 16;
    /// The descriptor table is grown at startup up to this many entries
    /// (8 bytes each) at most.
    const PRESIZE_MAX: u64 = 65536;

    fn new(role: &'static str, per_conn: u64, max_conns: Option<usize>) -> AcceptGate {
        let limit = match sys::raise_nofile_limit() {
            Ok(limit) => limit,
            Err(e) => {
                log::warn!("{role}: raising RLIMIT_NOFILE: {e}");
                1024
            }
        };
        let in_use =
            std::fs::read_dir("/proc/self/fd").map_or(Self::RESERVED, |d| d.count() as u64);
        let budget =
            (limit.saturating_sub(in_use + Self::RESERVED) / per_conn.max(1)).max(1) as usize;
        let capacity = max_conns.map_or(budget, |m| m.min(budget));
        // The descriptor table, grown now rather than under load (see
        // `sys::grow_descriptor_table`), up to a size that costs little.
        let needed = (in_use + Self::RESERVED + capacity as u64 * per_conn).min(limit);
        if let Err(e) = sys::grow_descriptor_table(needed.min(Self::PRESIZE_MAX)) {
            log::debug!("{role}: growing the descriptor table: {e}");
        }
        let note = format!(
            "{role}: up to {capacity} concurrent connections (open-files limit {limit}, {per_conn} descriptors per connection{})",
            max_conns.map_or(String::new(), |m| format!(", --max-conns {m}"))
        );
        AcceptGate {
            role,
            capacity,
            note,
            at_capacity: false,
            backoff_until: None,
            last_warning: None,
        }
    }

    /// May the loop accept another connection while `open` are open?
    fn admits(&mut self, open: usize) -> bool {
        if self.backoff_until.is_some() {
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

    /// Out of descriptors: back off (unless already backing off). True if
    /// this starts a back-off.
    fn out_of_descriptors(&mut self, err: &io::Error, open: usize) -> bool {
        if self.backoff_until.is_some() {
            return false;
        }
        self.backoff_until = Some(Instant::now() + Self::BACKOFF);
        self.warn(format!(
            "accept failed ({err}) with {open} connections open: pausing accepts until descriptors free up"
        ));
        true
    }

    /// True (once) when a back-off has run its course at `now`.
    fn backoff_over(&mut self, now: Instant) -> bool {
        if self.backoff_until.is_some_and(|t| now >= t) {
            self.backoff_until = None;
            return true;
        }
        false
    }

    /// A connection closed, freeing descriptors. Returns true if the gate
    /// had stopped accepting.
    fn connection_closed(&mut self) -> bool {
        let was_stopped = self.at_capacity || self.backoff_until.is_some();
        self.at_capacity = false;
        self.backoff_until = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener of the loop whose sockets lack the options (a kernel
    /// that does not copy them, or a listener nobody set them on): the
    /// acceptor's check gives them their options itself, and from then on
    /// to every socket of every listener it is shown.
    #[test]
    fn sockets_that_did_not_inherit_the_options_get_them() {
        let poll = mio::Poll::new().unwrap();
        let config = AcceptConfig {
            role: "test",
            listen: "127.0.0.1:0".parse().unwrap(),
            per_conn: 2,
            max_conns: None,
            grace: Duration::ZERO,
            stats_listen: None,
            stats_interval: None,
            recv_low_water: None,
            api_listen: None,
        };
        let mut acceptor = Acceptor::bind(&config, poll.registry()).unwrap();
        // A listener without set_options.
        let bare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = bare.local_addr().unwrap();
        for _ in 0..2 {
            let _client = std::net::TcpStream::connect(addr).unwrap();
            let (sock, _) = bare.accept().unwrap();
            let sock = TcpStream::from_std(sock);
            let linger = || socket2::SockRef::from(&sock).linger().unwrap();
            assert_eq!(linger(), None, "a bare listener's socket lingers normally");
            acceptor.count_accepted(&sock);
            assert_eq!(linger(), Some(Duration::ZERO), "SO_LINGER 0 set on it");
            assert!(socket2::SockRef::from(&sock).nodelay().unwrap());
        }
        assert_eq!(acceptor.inherits, Some(false));
        assert_eq!(acceptor.counters.accepted, 2);
    }

    #[test]
    fn only_per_connection_accept_errors_are_retried_at_once() {
        let err = io::Error::from_raw_os_error;
        for errno in [libc::ECONNABORTED, libc::EPROTO, libc::ENETDOWN] {
            assert!(is_per_connection(&err(errno)), "errno {errno}");
        }
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EINVAL,
        ] {
            assert!(
                !is_per_connection(&err(errno)),
                "errno {errno} must back off"
            );
        }
    }
}
