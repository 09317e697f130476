//! The proxy: accepts clients, stores each upload in a spool file while
//! streaming it to the upstream server, and relays the server's answer back.
//!
//! This is the seed's proxy (accept, read, store, connect, send, wait for
//! the answer, pass it on, close both, keep listening), done for many
//! clients at once by one thread. The loop has the same shape as the
//! server's; what differs is that each transfer has *two* sockets, so
//! events must be routed to the right side of the right transfer:
//!
//! ```text
//!   loop {
//!       poll(events, timeout)
//!       for each event:
//!           LISTENER      -> accept until WouldBlock; for each client:
//!                              create the spool file, start connecting upstream
//!           client_token  -> transfer.on_event(Client) ; transfer.drive()
//!           upstream_token-> transfer.on_event(Upstream); transfer.drive()
//!       fire due timers
//!   }
//! ```
//!
//! A transfer's slab key is its identity; its two tokens are derived from
//! the key by [`client_token`] and [`upstream_token`]. All the per-transfer
//! logic (the state machine, back-pressure, half-close) lives in
//! [`transfer`]; this file is only the loop around it.

pub mod transfer;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Registry, Token};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::error::{is_interrupted, is_would_block, Context};
use crate::event_loop::{self, AcceptGate, GracefulStop, Shutdown, Timers, LISTENER, SCRATCH_SIZE};
use crate::store::Store;

use transfer::{Ctx, Next, Outcome, Policy, Side, Transfer};

/// Settings for [`Proxy`].
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The server every upload is forwarded to.
    pub upstream: SocketAddr,
    /// Directory for spool files (created if missing).
    pub dir: PathBuf,
    /// Hold mode: store each whole upload, wait this long, then forward the
    /// file as it is on disk. `None` streams.
    pub hold: Option<Duration>,
    /// Most transfers at once (`None`: as many as descriptors allow).
    pub max_conns: Option<usize>,
    /// Largest upload accepted, in bytes (`None`: no limit).
    pub max_bytes: Option<u64>,
    /// Close a transfer that moves no byte for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Give up on an upstream connect after this long.
    pub connect_timeout: Duration,
    /// On shutdown, how long transfers in flight may take to finish.
    pub grace: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            upstream: SocketAddr::from(([127, 0, 0, 1], 9000)),
            dir: PathBuf::from("spool"),
            hold: None,
            max_conns: None,
            max_bytes: None,
            idle_timeout: Some(Duration::from_secs(60)),
            connect_timeout: Duration::from_secs(5),
            grace: Duration::from_secs(10),
        }
    }
}

/// The client socket of transfer `key`.
///
/// Each transfer owns two sockets, so its slab key maps to two tokens:
/// even for the client, odd for the upstream. The reserved tokens
/// ([`LISTENER`], [`WAKER`]) sit at the top of the range, out of reach.
pub fn client_token(key: usize) -> Token {
    Token(key * 2)
}

/// The upstream socket of transfer `key`. See [`client_token`].
pub fn upstream_token(key: usize) -> Token {
    Token(key * 2 + 1)
}

/// The transfer and side a (non-reserved) token belongs to.
pub fn token_owner(token: Token) -> (usize, Side) {
    let side = if token.0 % 2 == 0 {
        Side::Client
    } else {
        Side::Upstream
    };
    (token.0 / 2, side)
}

/// What the proxy's timers can be for. Timers about a transfer carry its
/// slab key *and* its identity, because slab keys are reused: a timer is
/// cancelled when its transfer ends, and the identity makes doubly sure a
/// deadline never lands on a newer transfer with the same key.
#[derive(Debug, Clone, Copy)]
pub enum Timer {
    /// The pause after running out of file descriptors is over.
    ResumeAccept,
    /// Hold mode: the transfer has been held long enough.
    HoldOver { key: usize, id: u64 },
    /// The upstream connect has taken too long.
    ConnectTimeout { key: usize, id: u64 },
    /// Check whether the transfer has been idle too long.
    Idle { key: usize, id: u64 },
    /// The shutdown grace period is over (wakes the loop to notice).
    GraceOver,
}

/// Counters reported when the proxy stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Transfers whose upload reached the upstream and answer the client.
    pub relayed: u64,
    /// Transfers answered `ERR` by the proxy itself.
    pub refused: u64,
    /// Transfers the client abandoned.
    pub aborted: u64,
}

/// A bound proxy, ready to [`run`](Proxy::run).
pub struct Proxy {
    poll: Poll,
    core: Core,
}

/// Everything the loop works on (the poll instance itself stays outside,
/// so [`event_loop::run`] can borrow both).
struct Core {
    registry: Registry,
    /// `None` once shutting down: closed, so new clients are refused at
    /// once instead of waiting in a backlog nobody will accept from.
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    upstream: SocketAddr,
    transfers: Slab<Transfer>,
    store: Store,
    scratch: Box<[u8]>,
    shutdown: Shutdown,
    timers: Timers<Timer>,
    gate: AcceptGate,
    stats: Stats,
    hold: Option<Duration>,
    signals: Option<Signals>,
    policy: Policy,
    idle_timeout: Option<Duration>,
    stop: GracefulStop,
    /// Identity for the next transfer (slab keys are reused; ids are not).
    next_id: u64,
}

impl Proxy {
    /// Opens the spool directory, binds the listener and sets up the loop.
    pub fn bind(config: &ProxyConfig) -> io::Result<Proxy> {
        let store = Store::open(&config.dir)?;
        let poll = Poll::new().context("proxy: creating poll")?;
        let mut listener = event_loop::bind_listener(config.listen, "proxy")?;
        let local_addr = listener
            .local_addr()
            .context("proxy: reading bound address")?;
        let registry = poll
            .registry()
            .try_clone()
            .context("proxy: cloning registry")?;
        registry
            .register(&mut listener, LISTENER, Interest::READABLE)
            .context("proxy: registering listener")?;
        let shutdown = Shutdown::new(&registry)?;
        // Three descriptors per transfer: client, upstream, spool file.
        let gate = AcceptGate::new("proxy", 3, config.max_conns);
        if let Some(hold) = config.hold {
            log::info!(
                "proxy: hold mode: each upload is stored whole, held {} for editing, then forwarded",
                humantime::format_duration(hold)
            );
        }
        log::info!(
            "proxy: forwarding to {}, spooling to {}",
            config.upstream,
            store.dir().display()
        );
        Ok(Proxy {
            poll,
            core: Core {
                registry,
                listener: Some(listener),
                local_addr,
                upstream: config.upstream,
                transfers: Slab::with_capacity(1024),
                store,
                scratch: vec![0u8; SCRATCH_SIZE].into_boxed_slice(),
                shutdown,
                timers: Timers::new(),
                gate,
                stats: Stats::default(),
                hold: config.hold,
                signals: None,
                policy: Policy {
                    max_bytes: config.max_bytes,
                    connect_timeout: config.connect_timeout,
                },
                idle_timeout: config.idle_timeout,
                stop: GracefulStop::new("proxy", config.grace),
                next_id: 0,
            },
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.core.local_addr
    }

    /// A handle that stops [`Proxy::run`] from another thread.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.core.shutdown.clone()
    }

    /// Makes SIGINT and SIGTERM shut the proxy down (gracefully the first
    /// time, at once the second). The binary does this; in-process users
    /// (tests) use [`Proxy::shutdown_handle`] instead.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        self.core.signals = Some(event_loop::register_signals(&self.core.registry)?);
        Ok(())
    }

    /// Runs the loop until shut down. Transfers still open then are closed
    /// as aborted (an unfinished spool is kept as `.incomplete`).
    pub fn run(mut self) -> io::Result<Stats> {
        // This line tells tests and scripts that we are ready: everything is
        // set up (signals included) and the loop is about to wait.
        log::info!("proxy listening on {}", self.core.local_addr);
        event_loop::run(&mut self.poll, &mut self.core).context("proxy")?;
        let core = &mut self.core;
        let open = core.transfers.len();
        for t in core.transfers.drain() {
            t.abandon();
            core.stats.aborted += 1;
        }
        log::info!(
            "proxy: stopped: {} relayed, {} refused, {} aborted ({open} open at shutdown)",
            core.stats.relayed,
            core.stats.refused,
            core.stats.aborted
        );
        Ok(core.stats)
    }
}

impl event_loop::Handler for Core {
    type Timer = Timer;
    const ROLE: &'static str = "proxy";

    fn timers(&mut self) -> &mut Timers<Timer> {
        &mut self.timers
    }

    fn accept_ready(&mut self) {
        self.accept_all();
    }

    fn connection_event(&mut self, event: &Event) {
        let (key, side) = token_owner(event.token());
        log::trace!("proxy: #{key} {side} event{}", event_loop::flags(event));
        // A stale event (for a transfer closed earlier in this batch) finds
        // no transfer, or a new one whose flags it merely sets: at worst a
        // read that returns WouldBlock.
        if let Some(t) = self.transfers.get_mut(key) {
            t.on_event(side, event);
            self.drive(key);
        }
    }

    fn timer_fired(&mut self, timer: Timer) {
        match timer {
            Timer::ResumeAccept => {
                self.gate.backoff_over();
                self.accept_all();
            }
            Timer::HoldOver { key, id } => {
                if self.transfers.get(key).is_some_and(|t| t.id() == id) {
                    let mut ctx = Ctx {
                        scratch: &mut self.scratch,
                        timers: &mut self.timers,
                        registry: &self.registry,
                        policy: self.policy,
                    };
                    self.transfers[key].hold_over(&mut ctx);
                    self.drive(key);
                }
            }
            Timer::ConnectTimeout { key, id } => {
                if let Some(t) = self.transfers.get_mut(key).filter(|t| t.id() == id) {
                    t.connect_timed_out(self.policy.connect_timeout);
                    self.drive(key);
                }
            }
            Timer::Idle { key, id } => {
                let Some(idle) = self.idle_timeout else {
                    return;
                };
                if let Some(t) = self.transfers.get_mut(key).filter(|t| t.id() == id) {
                    if let Some(at) = t.check_idle(idle) {
                        t.set_idle_timer(self.timers.schedule(at, Timer::Idle { key, id }));
                    }
                    self.drive(key);
                }
            }
            Timer::GraceOver => {} // should_stop notices
        }
    }

    fn signals_ready(&mut self) {
        event_loop::on_signals("proxy", self.signals.as_mut(), &self.shutdown);
    }

    fn should_stop(&mut self) -> bool {
        self.stop.should_stop(
            &self.shutdown,
            self.transfers.len(),
            &mut self.listener,
            &self.registry,
            &mut self.timers,
            Timer::GraceOver,
        )
    }
}

impl Core {
    /// Seed steps 1 and 4: accept every waiting client (until `WouldBlock`:
    /// edge-triggered readiness will not remind us, or until the gate says
    /// we are at capacity), and for each, create its spool file and start
    /// the non-blocking connect upstream.
    fn accept_all(&mut self) {
        while !self.stop.is_draining() && self.gate.admits(self.transfers.len()) {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (client, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if is_would_block(&e) => {
                    log::trace!("proxy: accept WouldBlock");
                    return;
                }
                Err(e) if is_interrupted(&e) => continue,
                Err(e) if event_loop::is_out_of_descriptors(&e) => {
                    self.back_off(&e);
                    return;
                }
                Err(e) => {
                    log::debug!("proxy: accept: {e}");
                    continue;
                }
            };
            let spool = match self.store.create() {
                Ok(spool) => spool,
                Err(e) => {
                    // Without a spool we could lose the upload: refuse it
                    // by closing before reading a byte.
                    log::warn!("proxy: refusing {peer}: {e}");
                    self.stats.refused += 1;
                    if event_loop::is_out_of_descriptors(&e) {
                        self.back_off(&e);
                        return;
                    }
                    continue;
                }
            };
            let _ = client.set_nodelay(true);
            let entry = self.transfers.vacant_entry();
            let key = entry.key();
            self.next_id += 1;
            let id = self.next_id;
            let mut transfer = match self.hold {
                // Hold mode: the upstream waits until the upload is whole
                // and the hold is over.
                Some(hold) => Transfer::new_held(key, id, client, peer, self.upstream, spool, hold),
                None => {
                    // Seed step 4, non-blocking: connect() returns at once
                    // with the handshake in flight; WRITABLE on the upstream
                    // token says when it is over.
                    let upstream = TcpStream::connect(self.upstream);
                    Transfer::new(key, id, client, peer, upstream, self.upstream, spool)
                }
            };
            if let Some(idle) = self.idle_timeout {
                transfer.set_idle_timer(
                    self.timers
                        .schedule(Instant::now() + idle, Timer::Idle { key, id }),
                );
            }
            let registered = self
                .registry
                .register(
                    &mut transfer.client.sock,
                    client_token(key),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .and_then(|()| match transfer.upstream.as_mut() {
                    Some(up) => self.registry.register(
                        &mut up.sock,
                        upstream_token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ),
                    None => Ok(()),
                });
            if let Err(e) = registered {
                log::warn!("proxy: registering {peer}: {e}");
                transfer.abandon();
                continue;
            }
            log::trace!(
                "proxy: accept {peer} -> #{key}, register client READABLE|WRITABLE{}",
                if transfer.upstream.is_some() {
                    ", register upstream READABLE|WRITABLE (connect in progress)"
                } else {
                    ""
                }
            );
            log::debug!("proxy: accepted {peer} as #{key}");
            entry.insert(transfer);
            // Bytes may already be waiting; the registration will report
            // them, but driving now saves a trip through poll.
            self.drive(key);
        }
    }

    fn back_off(&mut self, e: &io::Error) {
        if self.gate.out_of_descriptors(e, self.transfers.len()) {
            self.timers
                .schedule(Instant::now() + AcceptGate::BACKOFF, Timer::ResumeAccept);
        }
    }

    /// Drives one transfer and closes it if it is finished.
    fn drive(&mut self, key: usize) {
        let mut ctx = Ctx {
            scratch: &mut self.scratch,
            timers: &mut self.timers,
            registry: &self.registry,
            policy: self.policy,
        };
        let next = self.transfers[key].drive(&mut ctx);
        if let Next::Close(outcome) = next {
            let transfer = self.transfers.remove(key);
            // A transfer that ends takes its pending timers with it, so no
            // deadline fires for a slab key that a new transfer may reuse.
            for id in transfer.timers() {
                self.timers.cancel(id);
            }
            log::trace!("proxy: #{key} closed ({outcome:?})");
            match outcome {
                Outcome::Relayed => self.stats.relayed += 1,
                Outcome::Refused => self.stats.refused += 1,
                Outcome::Aborted => self.stats.aborted += 1,
            }
            // Seed step 8: close both connections (dropping them closes
            // them and removes them from the poll set); the listener stays.
            drop(transfer);
            if self.gate.connection_closed() {
                self.accept_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::WAKER;

    #[test]
    fn tokens_round_trip_and_avoid_reserved() {
        for key in [0usize, 1, 2, 4999, 1 << 20] {
            assert_eq!(token_owner(client_token(key)), (key, Side::Client));
            assert_eq!(token_owner(upstream_token(key)), (key, Side::Upstream));
            assert_ne!(upstream_token(key), LISTENER);
            assert_ne!(upstream_token(key), WAKER);
        }
    }
}
