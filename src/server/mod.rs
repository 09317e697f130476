//! The server: stores each upload in its own file and answers with what it
//! stored.
//!
//! This is the seed's server (create a listening socket, accept, read the
//! data, store it in a file, answer, close, keep listening) turned inside
//! out for non-blocking sockets. Instead of one blocking call after another
//! for one client at a time, one thread waits in `poll` for *any* socket to
//! become ready, does whatever work that readiness allows without blocking,
//! and goes back to waiting:
//!
//! ```text
//!   loop {
//!       poll(events, timeout)                         // the only place we block
//!       for each event:
//!           LISTENER -> accept until WouldBlock        // seed step 1
//!           conn key -> drive(conn):
//!               Receiving: read until WouldBlock,      // seed step 2
//!                          into chunks the ring writes
//!                          to <name>.part              // seed step 3
//!                          on EOF: Finishing
//!               Finishing: (fsync,) rename (, fsync the directory)
//!                          through the ring, then queue "OK"
//!               Answering: write the line              // seed step 4
//!               done     -> drop the socket            // seed step 5
//!           DISK -> completions: each to its connection, which is driven
//!       submit what was queued to the ring             // one io_uring_enter
//!   }
//! ```
//!
//! Each connection is a `conn::State`: `Receiving` (the upload is
//! streaming into `<name>.part`), `Finishing` (complete: its file is being
//! synced and named) or `Answering` (our line is being written, then the
//! connection closed cleanly; see `event_loop::reply`). This file is the
//! loop around the connections: config, accept, events, disk completions,
//! timers, stop. `conn` is one connection; `upload` its file.
//!
//! **The loop never waits for the disk.** Creating `<name>.part`, every
//! write, the space reserved ahead, the trim, the `fsync`s, the rename, the
//! removal of an aborted upload and the last `close` all go through the
//! loop's `Disk` (an `io_uring`, see `event_loop::disk`); a plain `write`
//! on the loop waited up to 292 ms in dirty-page throttling when the disk
//! was behind, and every connection with it. A connection asks, goes on
//! with what does not depend on the answer (nothing is read before its
//! file exists, nor beyond its memory), and its completions drive it again.
//! Without `io_uring` (`STOPOVER_NO_IO_URING=1`, or a kernel without it)
//! the same operations are done at once, on the loop, as they used to be.
//!
//! With `--discard` the store is not opened at all: each upload goes into
//! a `sink::Sink` that only counts and checksums it, and the answer says
//! `file=-` (see `sink`).
//!
//! Protections, all on the loop's timers or counters: at most
//! `--max-conns` connections (the rest wait in the listen backlog); uploads
//! over `--max-bytes` are refused; a connection that moves no byte for
//! `--idle-timeout` is closed as aborted (the slowloris defence); and on
//! SIGINT/SIGTERM the server stops accepting, lets transfers in flight
//! finish for up to `--grace`, then closes what is left as aborted.
//!
//! Connections live in a [`Slab`]; the slab key is the connection's
//! [`Token`], and with its identity the owner of its disk operations (a
//! completion for a connection that is gone is dropped; a file created for
//! one is removed). An upload's bytes are read straight into chunks of the
//! disk's budget (`upload::WRITE_MEMORY`), which the ring owns until the
//! write completes; the loop's scratch buffer serves `--discard` and the
//! drain after an answer.
//! Listening, accepting, the accept gate and the graceful stop are the
//! shared `event_loop::Acceptor`'s.

mod conn;
mod files;
mod sink;
mod upload;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Token};
use slab::Slab;

use crate::event_loop::disk::{Done, Owner};
use crate::event_loop::{
    self, AcceptConfig, Context, Daemon, Exposition, MinRate, Peer, RateWindow, Who,
};
use crate::retention::{self, Keeper};
use crate::store::Store;

use conn::{Closed, Conn, Lent, Next, Policy, State};
use sink::Sink;
use upload::Upload;

/// The receive low-water mark (`SO_RCVLOWAT`) of client sockets: readiness
/// is reported once this many bytes are queued, or at EOF or an error.
///
/// Why: fed by a proxy, which sends in bursts, the server used to wake for
/// every few segments, about 550 times per GiB, and spend 0.2 s more CPU
/// per GiB than when fed by a client directly; on a 2-core machine that CPU
/// comes out of the proxy's share. With 64 KiB, proxied bulk throughput
/// went from a median of 852 to 1012 MB/s, and 1018 to 1255 MB/s, in two
/// rounds of five interleaved 1 GiB runs (direct unchanged).
///
/// The cost: a client sending fewer bytes than this wakes nobody until it
/// sends more or finishes. Nothing is lost (the bytes wait in the kernel,
/// and the idle check reads them before calling a connection idle).
pub const RECV_LOW_WATER: usize = 64 * 1024;

/// Settings for [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Directory uploads are stored in (created if missing).
    pub dir: PathBuf,
    /// Most connections at once (`None`: as many as descriptors allow).
    pub max_conns: Option<usize>,
    /// Largest upload accepted, in bytes (`None`: no limit).
    pub max_bytes: Option<u64>,
    /// Close a connection that moves no byte for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Abort an upload slower than this (`None`: no minimum).
    pub min_rate: Option<MinRate>,
    /// On shutdown, how long transfers in flight may take to finish.
    pub grace: Duration,
    /// Serve `GET /metrics` here (`None`: no stats endpoint).
    pub stats_addr: Option<SocketAddr>,
    /// Log the counters this often (`None`: never).
    pub stats_interval: Option<Duration>,
    /// When to delete old recordings (`--retain-*`, `--min-free`).
    pub retention: retention::Limits,
    /// Sync each file and its directory entry before answering `OK`.
    pub fsync: bool,
    /// Store nothing: answer with the count and CRC-32C of what arrived
    /// (`file=-`); `dir` is neither created nor used.
    pub discard: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            dir: PathBuf::from("received"),
            max_conns: None,
            max_bytes: None,
            idle_timeout: Some(Duration::from_secs(60)),
            min_rate: Some(MinRate::DEFAULT),
            grace: Duration::from_secs(10),
            stats_addr: None,
            stats_interval: None,
            retention: retention::Limits::default(),
            fsync: false,
            discard: false,
        }
    }
}

/// What the server's timers can be for.
#[derive(Debug, Clone, Copy)]
pub enum Timer {
    /// Check whether connection `key` (identity `id`) has been idle too long.
    Idle { key: usize, id: u64 },
    /// A `--min-rate` window of connection `key` is over.
    Rate { key: usize, id: u64 },
}

/// Counters reported when the server stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Uploads stored and answered `OK`.
    pub stored: u64,
    /// Uploads received whole and answered `OK` without storing them
    /// (`--discard`).
    pub discarded: u64,
    /// Uploads refused with `ERR` (too large, a write error on the file).
    pub refused: u64,
    /// Uploads abandoned before finishing (reset, idle, shutdown).
    pub aborted: u64,
    /// Payload bytes stored.
    pub bytes: u64,
    /// Upload bytes received, stored or not.
    pub received: u64,
}

/// A bound server, ready to [`run`](Daemon::run).
pub type Server = Daemon<Core>;

/// The server's own part of the loop: its connections and its rules.
pub struct Core {
    /// Deletes old recordings from the store's directory (see
    /// `retention`); `None` with `--discard`.
    retention: Option<Keeper>,
    conns: Slab<Conn>,
    /// `None` with `--discard`.
    store: Option<Store>,
    stats: Stats,
    policy: Policy,
    idle_timeout: Option<Duration>,
    min_rate: Option<MinRate>,
    /// Identity for the next connection (slab keys are reused; ids are not).
    next_id: u64,
    /// Complete uploads still being named whose connections were closed
    /// (at a stop), by connection identity: finished as their completions
    /// come in.
    closing: std::collections::HashMap<u64, Box<Upload>>,
    /// Connections open when the loop ended.
    open_at_stop: usize,
}

impl Server {
    /// Binds the listener, opens the storage directory and sets up the
    /// poll loop. Errors name what failed ("binding 127.0.0.1:9000: Address in
    /// use").
    pub fn bind(config: &ServerConfig) -> io::Result<Server> {
        // Bind first: a server that cannot listen creates no directory.
        let accept = AcceptConfig {
            role: "server",
            listen: config.listen,
            // Two descriptors per connection: its socket and its file.
            per_conn: 2,
            max_conns: config.max_conns,
            grace: config.grace,
            stats_listen: config.stats_addr,
            stats_interval: config.stats_interval,
            // Wake for uploads in batches of at least RECV_LOW_WATER
            // bytes (or at EOF): fewer, larger reads. See check_idle
            // for the cost.
            recv_low_water: Some(RECV_LOW_WATER),
            api_listen: None,
        };
        let mut storing = String::new();
        // The disk (a ring) only for a server that stores.
        let disk_budget = (!config.discard).then_some(upload::WRITE_MEMORY);
        let server = Daemon::bind_then(&accept, disk_budget, || {
            // With --discard there is no directory: no store, nothing to
            // retain.
            let (store, retention) = match config.discard {
                false => {
                    let mut store = Store::open(&config.dir)?;
                    let retention = Keeper::open("server", store.dir(), config.retention)?;
                    store.record_to(retention.recorder());
                    (Some(store), Some(retention))
                }
                true => (None, None),
            };
            storing = match &store {
                Some(store) => format!("storing uploads in {}", store.dir().display()),
                None => "--discard: uploads are counted and checksummed, never stored".into(),
            };
            Ok(Core {
                retention,
                conns: Slab::with_capacity(1024),
                store,
                stats: Stats::default(),
                policy: Policy {
                    max_bytes: config.max_bytes,
                    fsync: config.fsync,
                },
                idle_timeout: config.idle_timeout,
                min_rate: config.min_rate,
                next_id: 0,
                closing: std::collections::HashMap::new(),
                open_at_stop: 0,
            })
        })?;
        log::info!("server: {storing}");
        if config.fsync && !config.discard {
            log::info!("server: --fsync: each file and its directory entry are synced before OK");
        }
        Ok(server)
    }
}

impl event_loop::Handler for Core {
    type Timer = Timer;
    type Stats = Stats;
    const ROLE: &'static str = "server";

    fn open(&self) -> usize {
        self.conns.len()
    }

    fn chores(&mut self, now: Instant) -> Option<Instant> {
        self.retention.as_mut().and_then(|k| k.turn(now))
    }

    fn metrics(&self, out: &mut Exposition) {
        if let Some(keeper) = &self.retention {
            keeper.metrics(out);
        }
        let s = &self.stats;
        out.counter_labelled(
            "stopover_uploads_total",
            "Uploads by outcome: stored (answered OK), discarded (answered OK, --discard), refused (answered ERR), aborted (no answer).",
            &[
                ("outcome", "stored", s.stored),
                ("outcome", "discarded", s.discarded),
                ("outcome", "refused", s.refused),
                ("outcome", "aborted", s.aborted),
            ],
        );
        out.counter(
            "stopover_bytes_received_total",
            "Upload bytes received.",
            s.received,
        );
        out.counter(
            "stopover_bytes_stored_total",
            "Bytes of stored uploads.",
            s.bytes,
        );
    }

    /// Connections still open are closed as aborted, and their partial
    /// files removed (through the ring: the loop then lets what is in
    /// flight land, see `Daemon::run`); a complete upload still being
    /// named is finished, unanswered.
    fn close_all(&mut self, cx: &mut Context<Timer>) {
        self.open_at_stop = self.conns.len();
        let conns: Vec<Conn> = self.conns.drain().collect();
        for conn in conns {
            let (addr, id) = (conn.addr, conn.id);
            let fate = match &conn.state {
                State::Receiving(sink) => sink.fate().to_string(),
                State::Finishing(_) | State::Removing(..) | State::Answering(_) => String::new(),
            };
            match conn.close(false, &mut cx.disk) {
                Closed::Aborted => {
                    log::warn!("server: upload from {addr} aborted by shutdown; {fate}");
                    self.stats.aborted += 1;
                }
                Closed::Finishing(upload) => {
                    self.closing.insert(id, upload);
                    self.advance_closing(cx, id);
                }
                Closed::Done => {}
            }
        }
    }

    fn stopped(&mut self) -> Stats {
        let open = self.open_at_stop;
        log::info!(
            "server: stopped: {} stored ({} bytes), {}{} refused, {} aborted ({open} open at shutdown)",
            self.stats.stored,
            self.stats.bytes,
            match self.stats.discarded {
                0 => String::new(),
                n => format!("{n} discarded, "),
            },
            self.stats.refused,
            self.stats.aborted
        );
        self.stats
    }

    /// Seed step 1: a client connected. Register it, ask the ring for its
    /// file (it is read once the file exists), and wait for its bytes.
    fn accepted(&mut self, cx: &mut Context<Timer>, mut sock: TcpStream, addr: SocketAddr) {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        // Both interests, once: with edge-triggered readiness there is
        // no cost to being told about writability we do not need, and
        // it saves a `reregister` syscall on every change of plan.
        if let Err(e) = cx.registry.register(
            &mut sock,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("server: registering connection from {addr}: {e}");
            return;
        }
        // TCP_NODELAY, SO_LINGER 0 and SO_RCVLOWAT came from the listener
        // (see `event_loop::accept`'s set_options).
        self.next_id += 1;
        let id = self.next_id;
        log::trace!("server: accept {addr} -> #{key}, register READABLE|WRITABLE");
        let state = State::Receiving(match self.store.as_mut() {
            Some(store) => Sink::File(Box::new(Upload::create(
                store,
                &mut cx.disk,
                Owner { key, id },
                self.policy.fsync,
            ))),
            None => Sink::discard(),
        });
        let now = Instant::now();
        let who = Who {
            role: "server",
            key,
            side: "",
        };
        let idle_timer = self
            .idle_timeout
            .map(|idle| cx.timers.schedule(now + idle, Timer::Idle { key, id }));
        let rate_timer = self.min_rate.map(|rate| {
            cx.timers
                .schedule(now + rate.window, Timer::Rate { key, id })
        });
        // Not read now: the registration reports data that is already
        // there (it starts from the socket's current state), and with
        // SO_RCVLOWAT the first event comes with a batch or the EOF. A read
        // on the off chance usually found nothing (measured: one wasted
        // `recvfrom` per connection behind the proxy).
        let peer = Peer::inherited(sock, who);
        entry.insert(Conn {
            id,
            peer,
            addr,
            started: now,
            last_active: now,
            idle_timer,
            rate: RateWindow::new(now, 0),
            rate_timer,
            state,
        });
        log::debug!("server: accepted {addr} as #{key}");
    }

    fn connection_event(&mut self, cx: &mut Context<Timer>, event: &Event) {
        let key = event.token().0;
        log::trace!("server: #{key} event{}", event_loop::flags(event));
        let Some(conn) = self.conns.get_mut(key) else {
            return; // an event for a connection closed earlier in this batch
        };
        conn.peer.on_event(event);
        self.drive(cx, key);
    }

    fn timer_fired(&mut self, cx: &mut Context<Timer>, timer: Timer) {
        match timer {
            Timer::Idle { key, id } => self.check_idle(cx, key, id),
            Timer::Rate { key, id } => self.check_rate(cx, key, id),
        }
    }

    fn written(&mut self, cx: &mut Context<Timer>, done: Done) {
        self.on_written(cx, done);
    }

    fn wake(&mut self, cx: &mut Context<Timer>, owner: Owner) {
        self.on_wake(cx, owner);
    }
}

impl Core {
    /// Runs one connection as far as it can go without blocking, and closes
    /// it if it is finished.
    fn drive(&mut self, cx: &mut Context<Timer>, key: usize) {
        let conn = &mut self.conns[key];
        let mut lent = Lent {
            policy: self.policy,
            disk: &mut cx.disk,
            scratch: &mut cx.scratch,
            stats: &mut self.stats,
            aborts: &mut cx.aborts,
        };
        match conn.drive(&mut lent) {
            Next::Keep => {}
            Next::Close => self.close(cx, key, true),
            Next::Abort => self.close(cx, key, false),
        }
    }

    /// Seed step 5: close. Dropping the socket closes it, which also
    /// removes it from the poll set; an unfinished upload's file goes too.
    fn close(&mut self, cx: &mut Context<Timer>, key: usize, clean: bool) {
        let conn = self.conns.remove(key);
        let id = conn.id;
        log::trace!("server: #{key} closed ({})", conn.addr);
        for timer in [conn.idle_timer, conn.rate_timer].into_iter().flatten() {
            cx.timers.cancel(timer);
        }
        if let Closed::Finishing(upload) = conn.close(clean, &mut cx.disk) {
            self.closing.insert(id, upload);
            self.advance_closing(cx, id);
        }
        cx.acceptor.connection_closed();
    }

    /// The idle timer of connection `key` fired. The timer is coarse: it is
    /// not moved on every byte (that would cost a tree update per read);
    /// instead, when it fires, we look at when the connection last moved a
    /// byte and either close it or re-arm for the remainder.
    fn check_idle(&mut self, cx: &mut Context<Timer>, key: usize, id: u64) {
        let Some(idle) = self.idle_timeout else {
            return;
        };
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == id) else {
            return; // gone; a newer connection reusing the key has its own timer
        };
        conn.idle_timer = None;
        if conn.state.paused() {
            // We are the one not reading (its file, memory, the disk): the
            // client is not idle, it waits for us.
            conn.last_active = Instant::now();
        }
        if Instant::now() < conn.last_active + idle {
            conn.idle_timer = Some(
                cx.timers
                    .schedule(conn.last_active + idle, Timer::Idle { key, id }),
            );
            return;
        }
        // Bytes below the receive low-water mark wake nobody, so a client
        // trickling slowly looks silent from here. Look before judging: a
        // non-blocking read returns whatever is queued.
        conn.peer.mark_readable();
        self.drive(cx, key);
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == id) else {
            return; // finished (or failed) after all
        };
        let due = conn.last_active + idle;
        if Instant::now() < due {
            conn.idle_timer = Some(cx.timers.schedule(due, Timer::Idle { key, id }));
            return;
        }
        let for_how_long = humantime::format_duration(idle);
        match &conn.state {
            State::Receiving(sink) => {
                cx.aborts.warn(format_args!(
                    "server: {} idle for {for_how_long}: upload aborted after {} bytes; {}",
                    conn.addr,
                    sink.bytes(),
                    sink.fate()
                ));
                self.stats.aborted += 1;
            }
            State::Finishing(_) | State::Removing(..) | State::Answering(_) => {
                log::warn!("server: {} idle for {for_how_long}: closed", conn.addr)
            }
        }
        self.close(cx, key, false);
    }

    /// A `--min-rate` window of connection `key` is over: an upload that
    /// brought in too little is aborted (the slowloris defence: see
    /// `event_loop::guard`).
    fn check_rate(&mut self, cx: &mut Context<Timer>, key: usize, id: u64) {
        let Some(rate) = self.min_rate else {
            return;
        };
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == id) else {
            return;
        };
        conn.rate_timer = None;
        // Count what is queued too (see check_idle: the low-water mark).
        conn.peer.mark_readable();
        self.drive(cx, key);
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == id) else {
            return;
        };
        let Some(received) = conn.state.received() else {
            return; // the upload is over: nothing left to judge
        };
        if conn.state.held_back() {
            // We did not read (its file, memory, the disk): a new window,
            // the client is not to blame for this one.
            let next = conn.rate.restart(Instant::now(), received, &rate);
            conn.rate_timer = Some(cx.timers.schedule(next, Timer::Rate { key, id }));
            return;
        }
        match conn.rate.check(&rate, Instant::now(), received) {
            Ok(next) => conn.rate_timer = Some(cx.timers.schedule(next, Timer::Rate { key, id })),
            Err(came) => {
                cx.aborts.warn(format_args!(
                    "server: {} too slow: {came} bytes in {}, below --min-rate {rate}; upload aborted",
                    conn.addr,
                    humantime::format_duration(rate.window)
                ));
                self.stats.aborted += 1;
                self.close(cx, key, false);
            }
        }
    }
}
