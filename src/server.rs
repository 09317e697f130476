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
//!                          append to <name>.part       // seed step 3
//!                          on EOF: rename, queue "OK"
//!               Answering: write the line              // seed step 4
//!               done     -> drop the socket            // seed step 5
//!   }
//! ```
//!
//! Each connection is a [`State`]: `Receiving` (the upload is streaming into
//! `<name>.part`), `Answering` (the line is being written, possibly over
//! several WRITABLE events) and `Discarding` (we refused the upload and are
//! reading the rest of it, so that closing does not turn into a reset that
//! destroys our `ERR` line in the client's receive buffer).
//!
//! Protections, all on the loop's timers or counters: at most
//! `--max-conns` connections (the rest wait in the listen backlog); uploads
//! over `--max-bytes` are refused; a connection that moves no byte for
//! `--idle-timeout` is closed as aborted (the slowloris defence); and on
//! SIGINT/SIGTERM the server stops accepting, lets transfers in flight
//! finish for up to `--grace`, then closes what is left as aborted.
//!
//! Connections live in a [`Slab`]; the slab key is the connection's
//! [`Token`]. No connection owns a read buffer: the loop owns one large
//! scratch buffer and lends it to whichever connection is being served,
//! because between events a server connection has nothing in flight.

use std::io::{self, Read, Write};
use std::net::{Shutdown as Direction, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Registry, Token};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::answer::Answer;
use crate::error::{brief, is_interrupted, is_would_block, Context};
use crate::event_loop::{
    self, AcceptGate, GracefulStop, Shutdown, TimerId, Timers, DISCARD_LIMIT, LISTENER,
    SCRATCH_SIZE,
};
use crate::store::{PartFile, Store};

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
    /// On shutdown, how long transfers in flight may take to finish.
    pub grace: Duration,
    /// Sync each file and its directory entry before answering `OK`.
    pub fsync: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            dir: PathBuf::from("received"),
            max_conns: None,
            max_bytes: None,
            idle_timeout: Some(Duration::from_secs(60)),
            grace: Duration::from_secs(10),
            fsync: false,
        }
    }
}

/// What the server's timers can be for.
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// The pause after running out of file descriptors is over.
    ResumeAccept,
    /// Check whether connection `key` (identity `id`) has been idle too long.
    Idle { key: usize, id: u64 },
    /// The shutdown grace period is over (wakes the loop to notice).
    GraceOver,
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
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
    conns: Slab<Conn>,
    store: Store,
    scratch: Box<[u8]>,
    shutdown: Shutdown,
    signals: Option<Signals>,
    timers: Timers<Timer>,
    gate: AcceptGate,
    stats: Stats,
    policy: Policy,
    idle_timeout: Option<Duration>,
    stop: GracefulStop,
    /// Identity for the next connection (slab keys are reused; ids are not).
    next_id: u64,
}

/// The per-upload rules a connection needs while it is driven.
#[derive(Debug, Clone, Copy)]
struct Policy {
    max_bytes: Option<u64>,
    fsync: bool,
}

/// Counters reported when the server stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Uploads stored and answered `OK`.
    pub stored: u64,
    /// Uploads refused with `ERR` (too large, a write error on the file).
    pub refused: u64,
    /// Uploads abandoned before finishing (reset, idle, shutdown).
    pub aborted: u64,
    /// Payload bytes stored.
    pub bytes: u64,
}

/// One client connection.
struct Conn {
    key: usize,
    id: u64,
    sock: TcpStream,
    peer: SocketAddr,
    started: Instant,
    /// Last time a byte moved either way (for the idle timeout).
    last_active: Instant,
    idle_timer: Option<TimerId>,
    /// A read may make progress: set by READABLE events, cleared by
    /// `WouldBlock`. Edge-triggered readiness tells us once; we remember.
    readable: bool,
    /// A write may make progress; same bookkeeping as `readable`.
    writable: bool,
    /// Bytes thrown away after refusing the upload.
    discarded: u64,
    state: State,
}

/// The life of one server connection.
enum State {
    /// The upload is streaming into `<name>.part`.
    Receiving(PartFile),
    /// Writing the answer line; `refused` means the upload was not stored,
    /// so after the line we half-close and discard the rest of the upload.
    Answering {
        line: Vec<u8>,
        sent: usize,
        refused: bool,
    },
    /// `ERR` sent and write side shut: read and drop input until the
    /// client's EOF, then close.
    Discarding,
}

/// What the loop should do with a connection after driving it.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Keep,
    Close,
}

impl Server {
    /// Opens the storage directory, binds the listener and sets up the poll
    /// loop. Errors name what failed ("binding 127.0.0.1:9000: Address in
    /// use").
    pub fn bind(config: &ServerConfig) -> io::Result<Server> {
        let store = Store::open(&config.dir)?;
        let poll = Poll::new().context("server: creating poll")?;
        let mut listener = event_loop::bind_listener(config.listen, "server")?;
        let local_addr = listener
            .local_addr()
            .context("server: reading bound address")?;
        let registry = poll
            .registry()
            .try_clone()
            .context("server: cloning registry")?;
        registry
            .register(&mut listener, LISTENER, Interest::READABLE)
            .context("server: registering listener")?;
        let shutdown = Shutdown::new(&registry)?;
        // Two descriptors per connection: its socket and its file.
        let gate = AcceptGate::new("server", 2, config.max_conns);
        if config.fsync {
            log::info!("server: --fsync: each file and its directory entry are synced before OK");
        }
        Ok(Server {
            poll,
            core: Core {
                registry,
                listener: Some(listener),
                local_addr,
                conns: Slab::with_capacity(1024),
                store,
                scratch: vec![0u8; SCRATCH_SIZE].into_boxed_slice(),
                shutdown,
                signals: None,
                timers: Timers::new(),
                gate,
                stats: Stats::default(),
                policy: Policy {
                    max_bytes: config.max_bytes,
                    fsync: config.fsync,
                },
                idle_timeout: config.idle_timeout,
                stop: GracefulStop::new("server", config.grace),
                next_id: 0,
            },
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.core.local_addr
    }

    /// A handle that stops [`Server::run`] from another thread.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.core.shutdown.clone()
    }

    /// Makes SIGINT and SIGTERM shut the server down (gracefully the first
    /// time, at once the second). The binary does this; in-process users
    /// (tests) use [`Server::shutdown_handle`] instead.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        self.core.signals = Some(event_loop::register_signals(&self.core.registry)?);
        Ok(())
    }

    /// Runs the loop until shut down. Connections still open at that point
    /// are closed as aborted, and their partial files removed.
    pub fn run(mut self) -> io::Result<Stats> {
        // This line tells tests and scripts that we are ready: everything is
        // set up (signals included) and the loop is about to wait.
        log::info!("server listening on {}", self.core.local_addr);
        event_loop::run(&mut self.poll, &mut self.core).context("server")?;
        let core = &mut self.core;
        let open = core.conns.len();
        for conn in core.conns.drain() {
            if let State::Receiving(part) = conn.state {
                log::warn!(
                    "server: upload from {} aborted by shutdown; removed {}",
                    conn.peer,
                    part.path().display()
                );
                part.discard();
                core.stats.aborted += 1;
            }
        }
        log::info!(
            "server: stopped: {} stored ({} bytes), {} refused, {} aborted ({open} open at shutdown)",
            core.stats.stored,
            core.stats.bytes,
            core.stats.refused,
            core.stats.aborted
        );
        Ok(core.stats)
    }
}

impl event_loop::Handler for Core {
    type Timer = Timer;
    const ROLE: &'static str = "server";

    fn timers(&mut self) -> &mut Timers<Timer> {
        &mut self.timers
    }

    fn accept_ready(&mut self) {
        self.accept_all();
    }

    fn connection_event(&mut self, event: &Event) {
        let key = event.token().0;
        log::trace!("server: #{key} event{}", event_loop::flags(event));
        let Some(conn) = self.conns.get_mut(key) else {
            return; // an event for a connection closed earlier in this batch
        };
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            conn.readable = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            conn.writable = true;
        }
        self.drive(key);
    }

    fn timer_fired(&mut self, timer: Timer) {
        match timer {
            Timer::ResumeAccept => {
                self.gate.backoff_over();
                self.accept_all();
            }
            Timer::Idle { key, id } => self.check_idle(key, id),
            Timer::GraceOver => {} // should_stop notices
        }
    }

    fn signals_ready(&mut self) {
        event_loop::on_signals("server", self.signals.as_mut(), &self.shutdown);
    }

    fn should_stop(&mut self) -> bool {
        self.stop.should_stop(
            &self.shutdown,
            self.conns.len(),
            &mut self.listener,
            &self.registry,
            &mut self.timers,
            Timer::GraceOver,
        )
    }
}

impl Core {
    /// Seed step 1: accept every connection that is waiting. Readiness is
    /// edge-triggered, so we must accept until `WouldBlock`: a connection
    /// left in the queue would produce no second event. (The gate may stop
    /// us earlier, at capacity; closing a connection brings us back.)
    fn accept_all(&mut self) {
        while !self.stop.is_draining() && self.gate.admits(self.conns.len()) {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (mut sock, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if is_would_block(&e) => {
                    log::trace!("server: accept WouldBlock");
                    return;
                }
                Err(e) if is_interrupted(&e) => continue,
                Err(e) if event_loop::is_out_of_descriptors(&e) => {
                    if self.gate.out_of_descriptors(&e, self.conns.len()) {
                        let at = Instant::now() + AcceptGate::BACKOFF;
                        self.timers.schedule(at, Timer::ResumeAccept);
                    }
                    return;
                }
                // ECONNABORTED and friends: that one connection is gone,
                // the listener is fine.
                Err(e) => {
                    log::debug!("server: accept: {e}");
                    continue;
                }
            };
            let state = match self.store.create() {
                Ok(part) => State::Receiving(part),
                Err(e) => {
                    // Cannot store: refuse this upload, saying why.
                    log::warn!("server: refusing upload from {peer}: {e}");
                    self.stats.refused += 1;
                    refusal(&format!("cannot store upload: {}", brief(&e)))
                }
            };
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            // Both interests, once: with edge-triggered readiness there is
            // no cost to being told about writability we do not need, and
            // it saves a `reregister` syscall on every change of plan.
            if let Err(e) = self.registry.register(
                &mut sock,
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("server: registering connection from {peer}: {e}");
                if let State::Receiving(part) = state {
                    part.discard();
                }
                continue;
            }
            let _ = sock.set_nodelay(true);
            // Wake for uploads in batches of at least RECV_LOW_WATER bytes
            // (or at EOF): fewer, larger reads. See check_idle for the cost.
            if let Err(e) = event_loop::set_recv_low_water(&sock, RECV_LOW_WATER) {
                log::debug!("server: SO_RCVLOWAT: {e}");
            }
            self.next_id += 1;
            let id = self.next_id;
            log::trace!("server: accept {peer} -> #{key}, register READABLE|WRITABLE");
            let mut conn = Conn::new(key, id, sock, peer, state);
            if let Some(idle) = self.idle_timeout {
                conn.idle_timer = Some(
                    self.timers
                        .schedule(conn.last_active + idle, Timer::Idle { key, id }),
                );
            }
            log::debug!("server: accepted {peer} as #{key}");
            entry.insert(conn);
            // Data may have arrived with the connection; the registration
            // reports it too, but reading now saves a trip through poll.
            self.drive(key);
        }
    }

    /// Runs one connection as far as it can go without blocking, and closes
    /// it if it is finished.
    fn drive(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.drive(&mut self.scratch, &mut self.stats, self.policy) == Next::Close {
            self.close(key);
        }
    }

    /// Seed step 5: close. Dropping the socket closes it, which also
    /// removes it from the poll set.
    fn close(&mut self, key: usize) {
        let conn = self.conns.remove(key);
        log::trace!("server: #{key} closed ({})", conn.peer);
        if let Some(id) = conn.idle_timer {
            self.timers.cancel(id);
        }
        drop(conn);
        if self.gate.connection_closed() {
            self.accept_all();
        }
    }

    /// The idle timer of connection `key` fired. The timer is coarse: it is
    /// not moved on every byte (that would cost a tree update per read);
    /// instead, when it fires, we look at when the connection last moved a
    /// byte and either close it or re-arm for the remainder.
    fn check_idle(&mut self, key: usize, id: u64) {
        let (Some(idle), Some(conn)) = (self.idle_timeout, self.conns.get_mut(key)) else {
            return;
        };
        if conn.id != id {
            return; // a newer connection reuses the key; its own timer runs
        }
        let due = conn.last_active + idle;
        if Instant::now() < due {
            conn.idle_timer = Some(self.timers.schedule(due, Timer::Idle { key, id }));
            return;
        }
        // Bytes below the receive low-water mark wake nobody, so a client
        // trickling slowly looks silent from here. Look before judging: a
        // non-blocking read returns whatever is queued.
        conn.idle_timer = None;
        conn.readable = true;
        self.drive(key);
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == id) else {
            return; // finished (or failed) after all
        };
        let due = conn.last_active + idle;
        if Instant::now() < due {
            conn.idle_timer = Some(self.timers.schedule(due, Timer::Idle { key, id }));
            return;
        }
        match &conn.state {
            State::Receiving(part) => log::warn!(
                "server: {} idle for {}: upload aborted after {} bytes; removed {}",
                conn.peer,
                humantime::format_duration(idle),
                part.bytes(),
                part.path().display()
            ),
            _ => log::warn!(
                "server: {} idle for {}: closed",
                conn.peer,
                humantime::format_duration(idle)
            ),
        }
        if let State::Receiving(_) = conn.state {
            self.stats.aborted += 1;
        }
        let conn = self.conns.remove(key);
        if let State::Receiving(part) = conn.state {
            part.discard();
        }
        if self.gate.connection_closed() {
            self.accept_all();
        }
    }
}

/// The state for refusing an upload with `reason`.
fn refusal(reason: &str) -> State {
    State::Answering {
        line: Answer::err(reason).to_line().into_bytes(),
        sent: 0,
        refused: true,
    }
}

impl Conn {
    fn new(key: usize, id: u64, sock: TcpStream, peer: SocketAddr, state: State) -> Conn {
        let now = Instant::now();
        Conn {
            key,
            id,
            sock,
            peer,
            started: now,
            last_active: now,
            idle_timer: None,
            // Optimistic: a fresh socket can usually take a write, and a
            // read that finds nothing just returns WouldBlock.
            readable: true,
            writable: true,
            discarded: 0,
            state,
        }
    }

    /// Refuses the upload in progress: removes its partial file and
    /// queues `ERR reason`.
    fn refuse(&mut self, reason: String, stats: &mut Stats) {
        log::trace!(
            "server: #{} state Receiving -> Answering (refused)",
            self.key
        );
        stats.refused += 1;
        if let State::Receiving(part) = std::mem::replace(&mut self.state, refusal(&reason)) {
            part.discard();
        }
    }

    /// Makes all the progress the socket's readiness allows.
    fn drive(&mut self, scratch: &mut [u8], stats: &mut Stats, policy: Policy) -> Next {
        loop {
            match &mut self.state {
                State::Receiving(part) => {
                    if !self.readable {
                        return Next::Keep;
                    }
                    // Seed step 2: read the data. Drain until WouldBlock:
                    // edge-triggered readiness will not tell us again about
                    // bytes we leave behind.
                    match self.sock.read(scratch) {
                        Ok(0) => {
                            // The client's half-close: the upload is complete.
                            log::trace!("server: #{} read EOF", self.key);
                            self.last_active = Instant::now();
                            self.state = self.finish_upload(stats, policy);
                            log::trace!("server: #{} state Receiving -> Answering", self.key);
                        }
                        Ok(n) => {
                            log::trace!("server: #{} read {n}", self.key);
                            self.last_active = Instant::now();
                            if let Some(limit) = policy.max_bytes {
                                if part.bytes() + n as u64 > limit {
                                    log::warn!("server: upload from {} passed --max-bytes {limit}: refused", self.peer);
                                    self.refuse(format!("too large: limit {limit} bytes"), stats);
                                    continue;
                                }
                            }
                            // Seed step 3: store the data.
                            if let Err(e) = part.write(&scratch[..n]) {
                                log::warn!(
                                    "server: writing {} for {}: {e}; upload refused",
                                    part.path().display(),
                                    self.peer
                                );
                                self.refuse(format!("storing upload failed: {}", brief(&e)), stats);
                            }
                        }
                        Err(e) if is_would_block(&e) => {
                            log::trace!("server: #{} read WouldBlock", self.key);
                            self.readable = false;
                            return Next::Keep;
                        }
                        Err(e) if is_interrupted(&e) => {}
                        Err(e) => {
                            // A reset (or any error) before EOF: the upload
                            // is not complete, so it must not get a final
                            // name. Nobody is left to answer.
                            log::warn!(
                                "server: upload from {} aborted after {} bytes ({e}); removed {}",
                                self.peer,
                                part.bytes(),
                                part.path().display()
                            );
                            stats.aborted += 1;
                            if let State::Receiving(part) =
                                std::mem::replace(&mut self.state, State::Discarding)
                            {
                                part.discard();
                            }
                            return Next::Close;
                        }
                    }
                }
                State::Answering {
                    line,
                    sent,
                    refused,
                } => {
                    if *refused && self.readable {
                        // Keep the client's bytes flowing into the void so
                        // its blocking write() cannot wedge before it reads
                        // our answer.
                        match discard_input(
                            &mut self.sock,
                            scratch,
                            &mut self.readable,
                            &mut self.discarded,
                        ) {
                            Ok(_) if self.discarded <= DISCARD_LIMIT => {}
                            _ => return Next::Close,
                        }
                    }
                    if !self.writable {
                        return Next::Keep;
                    }
                    // Seed step 4: send the answer. A short write means the
                    // socket buffer is full; the rest goes on WRITABLE.
                    match self.sock.write(&line[*sent..]) {
                        Ok(n) => {
                            log::trace!("server: #{} write {n}", self.key);
                            *sent += n;
                            self.last_active = Instant::now();
                            if *sent < line.len() {
                                continue;
                            }
                            if !*refused {
                                // Seed step 5: close. The client half-closed
                                // long ago, so nothing is left unread.
                                return Next::Close;
                            }
                            log::trace!(
                                "server: #{} shutdown(Write); state Answering -> Discarding",
                                self.key
                            );
                            let _ = self.sock.shutdown(Direction::Write);
                            self.state = State::Discarding;
                        }
                        Err(e) if is_would_block(&e) => {
                            log::trace!("server: #{} write WouldBlock", self.key);
                            self.writable = false;
                            return Next::Keep;
                        }
                        Err(e) if is_interrupted(&e) => {}
                        Err(e) => {
                            log::warn!("server: sending answer to {}: {e}", self.peer);
                            return Next::Close;
                        }
                    }
                }
                State::Discarding => {
                    // Until EOF, but not forever: a peer that keeps sending
                    // after being refused gets closed on.
                    return match discard_input(
                        &mut self.sock,
                        scratch,
                        &mut self.readable,
                        &mut self.discarded,
                    ) {
                        Ok(false) if self.discarded <= DISCARD_LIMIT => {
                            self.last_active = Instant::now();
                            Next::Keep
                        }
                        _ => Next::Close,
                    };
                }
            }
        }
    }

    /// On the client's EOF: give the file its final name and prepare the
    /// `OK` line; on failure, an `ERR` line.
    fn finish_upload(&mut self, stats: &mut Stats, policy: Policy) -> State {
        let State::Receiving(mut part) = std::mem::replace(&mut self.state, State::Discarding)
        else {
            unreachable!("finish_upload outside Receiving")
        };
        let finished = if policy.fsync {
            part.finish_durable()
        } else {
            part.finish()
        };
        if let Err(e) = finished {
            log::warn!("server: {e}; upload from {} refused", self.peer);
            stats.refused += 1;
            part.discard();
            return State::Answering {
                line: Answer::err(format!("storing upload failed: {}", brief(&e)))
                    .to_line()
                    .into_bytes(),
                sent: 0,
                // The client has half-closed already: nothing to discard.
                refused: false,
            };
        }
        stats.stored += 1;
        stats.bytes += part.bytes();
        let elapsed = self.started.elapsed();
        log::info!(
            "server: stored {} from {}: {} bytes in {:.3}s ({:.1} MB/s) crc32c={:08x}",
            part.name(),
            self.peer,
            part.bytes(),
            elapsed.as_secs_f64(),
            mb_per_s(part.bytes(), elapsed),
            part.crc32c()
        );
        let answer = Answer::Ok {
            bytes: part.bytes(),
            crc32c: part.crc32c(),
            file: part.name().to_string(),
        };
        State::Answering {
            line: answer.to_line().into_bytes(),
            sent: 0,
            refused: false,
        }
    }
}

/// Reads and drops input until `WouldBlock` (returns `Ok(false)`) or EOF
/// (returns `Ok(true)`), counting what it dropped.
fn discard_input(
    sock: &mut TcpStream,
    scratch: &mut [u8],
    readable: &mut bool,
    count: &mut u64,
) -> io::Result<bool> {
    loop {
        match sock.read(scratch) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                *count += n as u64;
                if *count > DISCARD_LIMIT {
                    return Ok(false);
                }
            }
            Err(e) if is_would_block(&e) => {
                *readable = false;
                return Ok(false);
            }
            Err(e) if is_interrupted(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Megabytes (10^6 bytes) per second, for log lines.
pub(crate) fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / 1e6 / secs
    } else {
        0.0
    }
}
