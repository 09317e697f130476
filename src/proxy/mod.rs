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
//!                              ask the ring for its spool file, start connecting upstream
//!           client_token  -> transfer.on_event(Client) ; transfer.drive()
//!           upstream_token-> transfer.on_event(Upstream); transfer.drive()
//!       fire due timers
//!   }
//! ```
//!
//! A transfer's slab key is its identity; its two tokens are derived from
//! the key by [`client_token`] and [`upstream_token`]. All the per-transfer
//! logic (the state machine, back-pressure, half-close) lives in
//! [`transfer`]; this file is the loop around it: config, accept, events,
//! timers, and every socket registration ([`register_client`],
//! [`connect_upstream`]). Listening, the accept gate and the graceful stop
//! are the shared `event_loop::Acceptor`'s.
//!
//! The proxy's files are in `files`: each spool file is created through
//! the ring (the loop never waits for `openat`), and the **recordings
//! closing** table finishes the recordings whose transfers have ended while
//! their disk writes were in flight: renamed, kept as a trimmed
//! `.incomplete`, or removed. So no `.part` outlives its transfer, and a
//! full disk is counted (`stopover_recordings_failed_total`) and warned
//! about under the loop's throttle, never once per transfer.

mod admit;
mod api;
mod closing;
mod files;
mod metrics;
pub mod routes;
pub mod transfer;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::event_loop::disk::{Done, Op, Owner};
use crate::event_loop::{self, AcceptConfig, Context, Daemon, Exposition, MinRate};
use crate::retention::{self, Keeper};
use crate::store::Store;
use crate::toxics::pipe::End;
use crate::toxics::Toxic;

use routes::{Listener, Route};
use transfer::spool::{Closing, Recording};
use transfer::{Next, Outcome, Policy, Side, Transfer};

pub use transfer::OnDiskError;

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
    /// Abort an upload slower than this (`None`: no minimum).
    pub min_rate: Option<MinRate>,
    /// Give up on an upstream connect after this long.
    pub connect_timeout: Duration,
    /// On shutdown, how long transfers in flight may take to finish.
    pub grace: Duration,
    /// Serve `GET /metrics` here (`None`: no stats endpoint).
    pub stats_addr: Option<SocketAddr>,
    /// Log the counters this often (`None`: never).
    pub stats_interval: Option<Duration>,
    /// When to delete old recordings (`--retain-*`, `--min-free`).
    pub retention: retention::Limits,
    /// Memory for spool chunks, all transfers together (see
    /// `event_loop::disk`).
    pub spool_memory: usize,
    /// What a full or failing spool disk does (`--on-disk-error`).
    pub on_disk_error: OnDiskError,
    /// The toxics every transfer draws from (`--toxic`, `--config`), in
    /// chain order (see `crate::toxics`).
    pub toxics: Vec<Toxic>,
    /// This proxy's name in the toxiproxy API (`--name`).
    pub name: String,
    /// Serve the toxiproxy-compatible API here (`--api-addr`; `None`: off).
    pub api_addr: Option<SocketAddr>,
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
            min_rate: Some(MinRate::DEFAULT),
            connect_timeout: Duration::from_secs(5),
            grace: Duration::from_secs(10),
            stats_addr: None,
            stats_interval: None,
            retention: retention::Limits::default(),
            spool_memory: event_loop::disk::DEFAULT_BUDGET,
            on_disk_error: OnDiskError::default(),
            toxics: Vec::new(),
            name: "stopover".to_string(),
            api_addr: None,
        }
    }
}

/// The client socket of transfer `key`.
///
/// Each transfer owns two sockets, so its slab key maps to two tokens:
/// even for the client, odd for the upstream. The reserved tokens
/// (`event_loop::LISTENER`, `WAKER`, `SIGNALS`) sit at the top of the
/// range, out of reach.
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

/// Registers an accepted client socket for transfer `key`. Both interests,
/// once: with edge-triggered readiness, being told about writability we do
/// not need costs at most a spurious wake-up, while changing interests
/// costs a system call every time.
pub fn register_client(registry: &Registry, key: usize, sock: &mut TcpStream) -> io::Result<()> {
    registry.register(
        sock,
        client_token(key),
        Interest::READABLE | Interest::WRITABLE,
    )
}

/// Seed step 4, non-blocking: starts connecting to `addr` for transfer
/// `key` and registers the socket. `connect` returns at once with the
/// handshake in flight; WRITABLE on the upstream token says when it is
/// over, either way.
pub fn connect_upstream(
    registry: &Registry,
    key: usize,
    addr: SocketAddr,
) -> io::Result<TcpStream> {
    let mut sock = TcpStream::connect(addr)?;
    registry.register(
        &mut sock,
        upstream_token(key),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    log::trace!("proxy: #{key} register upstream READABLE|WRITABLE (connect in progress)");
    Ok(sock)
}

/// What the proxy's timers can be for. Timers about a transfer carry its
/// slab key *and* its identity, because slab keys are reused: a timer is
/// cancelled when its transfer ends, and the identity makes doubly sure a
/// deadline never lands on a newer transfer with the same key.
#[derive(Debug, Clone, Copy)]
pub enum Timer {
    /// Hold mode: the transfer has been held long enough.
    HoldOver { key: usize, id: u64 },
    /// The upstream connect has taken too long.
    ConnectTimeout { key: usize, id: u64 },
    /// Check whether the transfer has been idle too long.
    Idle { key: usize, id: u64 },
    /// A `--min-rate` window is over.
    Rate { key: usize, id: u64 },
    /// A toxic's delay queue has something due (see `transfer::toxic`).
    Toxic { key: usize, id: u64 },
    /// Look again whether a cut answer has reached the client (see
    /// `transfer::cut`).
    Cut { key: usize, id: u64 },
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
    /// Held uploads kept whole under their final name, not forwarded: the
    /// proxy stopped first (their clients are told so).
    pub kept: u64,
    /// Upload bytes received from clients (counted as transfers end).
    pub received: u64,
    /// Upload bytes sent to the upstream (counted as transfers end).
    pub forwarded: u64,
    /// Recordings given up or cut short by a disk error (or never started:
    /// no spool file could be created).
    pub recordings_failed: u64,
    /// Toxics drawn by transfers (each toxic a transfer got counts once).
    pub toxics_applied: u64,
    /// Transfers reset by a toxic (`reset_peer`).
    pub toxic_resets: u64,
    /// Transfers closed by a toxic (`timeout`, `limit_data`, `limit_time`).
    pub toxic_closes: u64,
    /// Bytes a toxic held back (latency, bandwidth, slicer).
    pub bytes_delayed: u64,
}

/// A bound proxy, ready to [`run`](Daemon::run).
pub type Proxy = Daemon<Core>;

/// The proxy's own part of the loop: its transfers and its rules.
pub struct Core {
    /// Deletes old recordings from the store's directory (see `retention`).
    retention: Keeper,
    transfers: Slab<Transfer>,
    store: Store,
    stats: Stats,
    policy: Policy,
    idle_timeout: Option<Duration>,
    /// Identity for the next transfer (slab keys are reused; ids are not).
    next_id: u64,
    /// `--spool-memory`: the budget of all spool chunks together.
    spool_memory: usize,
    /// Recordings handed over by spools that let go of them ...
    closing_inbox: Closing,
    /// ... and finished here as their last operations complete, by
    /// transfer id (see `transfer::spool::recording`).
    closing: std::collections::HashMap<u64, Recording>,
    /// Transfers still open when the loop stopped.
    open_at_stop: usize,
    /// The listen -> upstream pairs served (see `routes`): the command
    /// line's, and those the API added.
    routes: Slab<Route>,
}

impl Proxy {
    /// Binds the listener, opens the spool directory and sets up the loop.
    pub fn bind(config: &ProxyConfig) -> io::Result<Proxy> {
        // Bind first: a proxy that cannot listen creates no directory.
        let accept = AcceptConfig {
            role: "proxy",
            listen: config.listen,
            // Descriptors per transfer: client, upstream, spool file and
            // its O_DIRECT twin, and in hold mode the held file, reopened
            // when the hold ends.
            per_conn: if config.hold.is_some() { 5 } else { 4 },
            max_conns: config.max_conns,
            grace: config.grace,
            stats_listen: config.stats_addr,
            stats_interval: config.stats_interval,
            recv_low_water: None,
            api_listen: config.api_addr,
        };
        let mut spool_dir = String::new();
        let mut proxy = Daemon::bind_then(&accept, Some(config.spool_memory), || {
            let mut store = Store::open(&config.dir)?;
            let retention = Keeper::open("proxy", store.dir(), config.retention)?;
            store.record_to(retention.recorder());
            spool_dir = store.dir().display().to_string();
            Ok(Core {
                retention,
                transfers: Slab::with_capacity(1024),
                store,
                stats: Stats::default(),
                policy: Policy {
                    upstream: config.upstream,
                    hold: config.hold,
                    max_bytes: config.max_bytes,
                    min_rate: config.min_rate,
                    connect_timeout: config.connect_timeout,
                    on_disk_error: config.on_disk_error,
                },
                idle_timeout: config.idle_timeout,
                next_id: 0,
                spool_memory: config.spool_memory,
                closing_inbox: Closing::default(),
                closing: std::collections::HashMap::new(),
                open_at_stop: 0,
                routes: Slab::new(),
            })
        })?;
        let core = proxy.handler();
        let policy = core.policy;
        core.routes.insert(Route {
            name: config.name.clone(),
            listen: config.listen,
            upstream: config.upstream.to_string(),
            policy,
            toxics: config.toxics.clone(),
            enabled: true,
            listener: Listener::Main,
            store: None,
        });
        for t in &config.toxics {
            log::info!(
                "proxy: toxic {}: {} {} {:?}, toxicity {}",
                t.name,
                t.kind.type_name(),
                t.stream,
                t.kind.attributes(),
                t.toxicity
            );
        }
        if let Some(hold) = config.hold {
            log::info!(
                "proxy: hold mode: each upload is stored whole, held {} for editing, then forwarded",
                humantime::format_duration(hold)
            );
        }
        log::info!(
            "proxy: forwarding to {}, spooling to {spool_dir}",
            config.upstream
        );
        Ok(proxy)
    }
}

impl event_loop::Handler for Core {
    type Timer = Timer;
    type Stats = Stats;
    const ROLE: &'static str = "proxy";

    fn open(&self) -> usize {
        self.transfers.len()
    }

    fn chores(&mut self, now: Instant) -> Option<Instant> {
        self.retention.turn(now)
    }

    fn metrics(&self, out: &mut Exposition) {
        self.write_metrics(out);
    }

    /// The proxy is stopping: a held upload whose hold ends after the
    /// grace period could only wait it out and be cut off then. Its client
    /// is told now (`ERR proxy shutting down: kept as NAME, not
    /// forwarded`), and its upload stays whole under its final name.
    fn draining(&mut self, cx: &mut Context<Timer>, until: Instant) {
        // The routes the API added stop accepting too.
        self.stop_listening(cx);
        let past: Vec<usize> = self
            .transfers
            .iter()
            .filter(|(_, t)| t.held_past(until))
            .map(|(key, _)| key)
            .collect();
        for key in past {
            let transfer = self.transfers.remove(key);
            for id in transfer.timers() {
                cx.timers.cancel(id);
            }
            self.stats.received += transfer.bytes().0;
            self.stats.kept += 1;
            transfer.abandon(&mut cx.disk);
            cx.acceptor.connection_closed();
        }
        self.adopt_closing(cx);
    }

    /// Transfers still open are closed as aborted (an unfinished spool is
    /// kept as `.incomplete`, once its disk writes land), or kept (a held
    /// upload, whole, not forwarded).
    fn close_all(&mut self, cx: &mut Context<Timer>) {
        self.open_at_stop = self.transfers.len();
        for t in self.transfers.drain() {
            if t.kept_whole() {
                self.stats.kept += 1;
            } else {
                self.stats.aborted += 1;
            }
            t.abandon(&mut cx.disk);
        }
        self.adopt_closing(cx);
    }

    fn stopped(&mut self) -> Stats {
        let open = self.open_at_stop;
        log::info!(
            "proxy: stopped: {} relayed, {} refused, {} aborted, {} kept (held, not forwarded) ({open} open at shutdown)",
            self.stats.relayed,
            self.stats.refused,
            self.stats.aborted,
            self.stats.kept
        );
        self.stats
    }

    /// A client of the loop's own listener: the command-line route's
    /// (see `admit`).
    fn accepted(&mut self, cx: &mut Context<Timer>, client: TcpStream, addr: SocketAddr) {
        match self.main_route() {
            Some(r) => self.admit(cx, r, client, addr),
            None => Core::turn_away(client, addr),
        }
    }

    fn connection_event(&mut self, cx: &mut Context<Timer>, event: &Event) {
        if let Some(r) = routes::route_of_token(event.token()) {
            return self.accept_route(cx, r);
        }
        let (key, side) = token_owner(event.token());
        log::trace!("proxy: #{key} {side} event{}", event_loop::flags(event));
        // A stale event (for a transfer closed earlier in this batch) finds
        // no transfer, or a new one made in this batch that took its key:
        // that one's events all come in later batches, so this is dropped.
        // (Merely setting its flags would cost a read that says WouldBlock,
        // but a stale "FIN arrived" would end its upstream's answer early,
        // see `Peer::read`.)
        if let Some(t) = self
            .transfers
            .get_mut(key)
            .filter(|t| !t.is_newer_than(cx.batch))
        {
            t.on_event(side, event);
            self.drive(cx, key);
            self.adopt_closing(cx);
        }
    }

    fn api(
        &mut self,
        cx: &mut Context<Timer>,
        request: &event_loop::stats::ApiRequest,
    ) -> (u16, String) {
        self.api_request(cx, request)
    }
    fn disk_budget(&self) -> Option<usize> {
        Some(self.spool_memory)
    }

    fn wake(&mut self, cx: &mut Context<Timer>, owner: Owner) {
        let Owner { key, id } = owner;
        if let Some(t) = self.transfers.get_mut(key).filter(|t| t.id() == id) {
            t.woken();
            self.drive(cx, key);
            self.adopt_closing(cx);
        }
    }

    /// A spool's disk operation completed: tell its recording, which is
    /// either still its transfer's (which may now be able to finish its
    /// file and pass the answer on) or in the closing table.
    fn written(&mut self, cx: &mut Context<Timer>, done: Done) {
        if done.op == Op::Open {
            return self.spool_created(cx, done);
        }
        let Owner { key, id } = done.owner;
        if let Some(rec) = self.closing.get_mut(&id) {
            rec.on_done(done, &mut cx.disk);
            self.advance_closing(cx, id);
            return;
        }
        let Some(t) = self.transfers.get_mut(key).filter(|t| t.id() == id) else {
            // Its file was removed; a descriptor opened for it meanwhile
            // is closed through the ring too.
            if let Some(file) = done.opened {
                cx.disk.release(std::sync::Arc::new(file));
            }
            return;
        };
        t.on_done(done, &mut cx.disk);
        self.drive(cx, key);
        self.adopt_closing(cx);
    }

    fn timer_fired(&mut self, cx: &mut Context<Timer>, timer: Timer) {
        let (key, id) = match timer {
            Timer::HoldOver { key, id }
            | Timer::ConnectTimeout { key, id }
            | Timer::Idle { key, id }
            | Timer::Rate { key, id }
            | Timer::Toxic { key, id }
            | Timer::Cut { key, id } => (key, id),
        };
        let Some(t) = self.transfers.get_mut(key).filter(|t| t.id() == id) else {
            return; // its transfer is gone
        };
        let policy = &self.routes[t.route].policy;
        match timer {
            Timer::HoldOver { .. } => t.hold_over(cx, policy),
            Timer::ConnectTimeout { .. } => t.connect_timed_out(cx, policy),
            Timer::Idle { .. } => {
                let Some(idle) = self.idle_timeout else {
                    return;
                };
                if let Some(at) = t.check_idle(cx, policy, idle) {
                    t.set_idle_timer(cx.timers.schedule(at, Timer::Idle { key, id }));
                }
            }
            Timer::Rate { .. } => t.check_rate(cx, policy),
            Timer::Toxic { .. } => t.toxic_fired(),
            Timer::Cut { .. } => t.cut_look(cx),
        }
        self.drive(cx, key);
        self.adopt_closing(cx);
    }
}

impl Core {
    /// Drives one transfer and closes it if it is finished.
    fn drive(&mut self, cx: &mut Context<Timer>, key: usize) {
        let t = &mut self.transfers[key];
        let Next::Close { outcome, clean } = t.drive(cx, &self.routes[t.route].policy) else {
            return;
        };
        let transfer = self.transfers.remove(key);
        // A transfer that ends takes its pending timers with it, so no
        // deadline fires for a slab key that a new transfer may reuse.
        for id in transfer.timers() {
            cx.timers.cancel(id);
        }
        log::trace!("proxy: #{key} closed ({outcome:?})");
        let (received, forwarded) = transfer.bytes();
        let toxic = transfer.toxic_figures();
        self.stats.toxics_applied += toxic.applied;
        self.stats.bytes_delayed += toxic.delayed;
        match toxic.ended {
            Some(End::Reset) => self.stats.toxic_resets += 1,
            Some(End::Close) => self.stats.toxic_closes += 1,
            None => {}
        }
        self.stats.received += received;
        self.stats.forwarded += forwarded;
        match outcome {
            Outcome::Relayed => self.stats.relayed += 1,
            Outcome::Refused => self.stats.refused += 1,
            Outcome::Aborted => self.stats.aborted += 1,
        }
        // Seed step 8: close both connections; the listener stays.
        transfer.close(clean);
        cx.acceptor.connection_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::{LISTENER, SIGNALS, WAKER};

    #[test]
    fn tokens_round_trip_and_avoid_reserved() {
        for key in [0usize, 1, 2, 4999, 1 << 20] {
            assert_eq!(token_owner(client_token(key)), (key, Side::Client));
            assert_eq!(token_owner(upstream_token(key)), (key, Side::Upstream));
            for reserved in [LISTENER, WAKER, SIGNALS] {
                assert_ne!(client_token(key), reserved);
                assert_ne!(upstream_token(key), reserved);
            }
        }
    }
}
