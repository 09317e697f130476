//! One proxied transfer: a client socket, an upstream socket, a spool file,
//! and the state machine that moves bytes between them.
//!
//! ```text
//!        accept: create spool           accept (--hold): create spool
//!        start non-blocking connect        |
//!                 |                        v
//!                 |                    Receiving  client -> spool only
//!                 |                        | client EOF: rename spool, arm timer
//!                 |                        v
//!                 |                    Holding    a person may edit the file
//!                 |                        | timer fires: reopen file by name,
//!                 v                        v        start non-blocking connect
//!   +------- Connecting <------------------+
//!   |   client bytes -> spool (up to LAG_LIMIT ahead)
//!   |             | connect completes              connect fails
//!   |             v                                    |
//!   |         Streaming ---- upstream fails ------> Salvaging
//!   |   client -> upstream + spool;   before       client -> spool only;
//!   |   answer upstream -> client;    answering    on client EOF:
//!   |   each FIN passed on once its                "ERR upstream unavailable"
//!   |   direction is drained                             |
//!   |             | both directions done                 v
//!   |             v                                  Replying --> (close)
//!   |      (close: Relayed)                      our own line to the client
//!   |
//!   +-- spool write fails, held file gone --> Replying ("ERR ...") --> Discarding
//!   client resets before its FIN: upstream reset, spool kept as .incomplete, close
//!   client resets while Holding: timer cancelled, nothing sent upstream, close
//! ```
//!
//! **The spool file is the buffer.** Each chunk read from the client (into
//! the loop's one scratch buffer) is written to the upstream straight away,
//! then appended to the spool. Whatever the upstream did not take is *not*
//! copied anywhere: it is in the spool already, and goes out from there with
//! `sendfile(2)` when the upstream drains (from the page cache, by
//! reference, no user-space copy). A transfer therefore owns no buffer at
//! all for the upload direction, however slow its upstream.
//!
//! Why this order: sending first lets the server work on a chunk while we
//! write it to disk; sending fresh bytes from the buffer in hand (rather
//! than always from the file) measured about 5% faster on a 1 GiB transfer,
//! because a receiver reading page-cache-backed packets costs more CPU than
//! it saves the sender on this 2-core machine (see `make bench`).
//!
//! **Back-pressure.** We stop reading the client when the spool is more than
//! [`LAG_LIMIT`] bytes ahead of what the upstream has taken. The client's
//! data then waits in the kernel, its TCP window closes, and its `write()`
//! blocks: the slow upstream has slowed the client, as it should. The
//! client's `readable` flag stays set while we are not reading, because no
//! new event will come for bytes that are already waiting; when the upstream
//! drains, the same `drive` call resumes reading.
//!
//! **The answer direction** (upstream -> client) is a plain relay: read into
//! the loop's scratch buffer, write to the client, and keep only what the
//! client did not take in a small buffer that exists only while non-empty.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown as Direction, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry};

use crate::answer::Answer;
use crate::error::{brief, is_interrupted, is_would_block};
use crate::event_loop::{TimerId, Timers, DISCARD_LIMIT};
use crate::server::mb_per_s;
use crate::store::PartFile;

use super::{upstream_token, Timer};

/// How far (in bytes) the spool may run ahead of the upstream before we
/// stop reading the client.
pub const LAG_LIMIT: u64 = 1024 * 1024;

/// Largest single `sendfile` from the spool to the upstream.
const MAX_SENDFILE: u64 = 4 * 1024 * 1024;

/// Largest read of answer bytes from the upstream at once; also the bound on
/// the answer bytes a transfer may hold while its client is slow to take them.
const ANSWER_CHUNK: usize = 64 * 1024;

/// Which socket of a transfer an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// The facts we keep about one socket of a transfer. Client and upstream
/// use the same struct, so the code for each direction reads the same.
#[derive(Debug)]
pub struct Peer {
    pub sock: TcpStream,
    /// A read may make progress: set by a READABLE event, cleared when a
    /// read returns `WouldBlock`. Edge-triggered readiness says it once.
    readable: bool,
    /// A write may make progress; same bookkeeping.
    writable: bool,
    /// We have read this peer's EOF: it will send nothing more.
    eof: bool,
    /// We have shut our write side (sent our FIN).
    shut: bool,
    /// A write failed: the peer will take nothing more.
    broken: bool,
}

impl Peer {
    fn new(sock: TcpStream, writable: bool) -> Peer {
        Peer {
            sock,
            readable: false,
            writable,
            eof: false,
            shut: false,
            broken: false,
        }
    }

    fn shutdown_write(&mut self) {
        if !self.shut {
            self.shut = true;
            if let Err(e) = self.sock.shutdown(Direction::Write) {
                log::debug!("shutdown(Write): {e}");
            }
        }
    }

    /// Closes abortively: with SO_LINGER set to zero, `close` sends a reset
    /// instead of a FIN, so the other end sees an error rather than an EOF
    /// that would make a truncated upload look complete.
    fn reset(self) {
        if let Err(e) = socket2::SockRef::from(&self.sock).set_linger(Some(Duration::ZERO)) {
            log::debug!("setting SO_LINGER 0: {e}");
        }
        drop(self);
    }
}

/// Where a transfer is in its life. See the module docs for the diagram.
#[derive(Debug)]
enum State {
    /// Hold mode: the upload goes to the spool only; the upstream is not
    /// contacted until the hold is over.
    Receiving,
    /// Hold mode: the upload is complete and final in the spool; waiting for
    /// the deadline (a timer in the loop, never a sleep) while a person may
    /// edit the file. `timer` is set once the loop has scheduled it.
    Holding {
        until: Instant,
        timer: Option<TimerId>,
    },
    /// The upstream connect is in flight. Client bytes go to the spool.
    Connecting,
    /// Both sockets up: upload to spool and upstream, answer back.
    Streaming,
    /// The upstream failed before answering. The rest of the upload goes to
    /// the spool only; at the client's EOF we answer `ERR` ourselves.
    Salvaging { reason: String },
    /// Writing our own answer line to the client (then closing, or first
    /// discarding the rest of an upload we refused).
    Replying { line: Vec<u8>, sent: usize },
    /// Our line is sent and our write side shut; reading the client's
    /// remaining bytes into the void until its EOF, so that closing does not
    /// send a reset that would destroy the line in the client's buffer.
    Discarding,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Receiving => "Receiving",
            State::Holding { .. } => "Holding",
            State::Connecting => "Connecting",
            State::Streaming => "Streaming",
            State::Salvaging { .. } => "Salvaging",
            State::Replying { .. } => "Replying",
            State::Discarding => "Discarding",
        }
    }
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upload reached the upstream and its answer reached the client.
    Relayed,
    /// We answered `ERR` ourselves (upstream unavailable, spool failure).
    Refused,
    /// The client went away; the upload was abandoned or never answered.
    Aborted,
}

/// What the loop should do with a transfer after driving it.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Keep,
    Close(Outcome),
}

/// The per-transfer rules, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Largest upload accepted (`--max-bytes`).
    pub max_bytes: Option<u64>,
    /// Longest an upstream connect may take (`--connect-timeout`).
    pub connect_timeout: Duration,
}

/// What a transfer borrows from the loop while it is driven.
pub struct Ctx<'a> {
    /// The loop's one read buffer.
    pub scratch: &'a mut [u8],
    /// The loop's timers (hold deadlines).
    pub timers: &'a mut Timers<Timer>,
    /// For registering an upstream socket created after accept (hold mode).
    pub registry: &'a Registry,
    /// The rules.
    pub policy: Policy,
}

/// In hold mode, the file being forwarded once the hold is over: the spool
/// reopened by name, as it is on disk at that moment.
#[derive(Debug)]
struct Held {
    file: File,
    /// Its length when reopened: exactly this much is sent.
    len: u64,
    /// CRC-32C of what has been sent so far.
    crc: u32,
}

/// One client's transfer through the proxy.
pub struct Transfer {
    key: usize,
    /// Unique for the proxy's lifetime (slab keys are reused).
    id: u64,
    /// Last time a byte moved either way (for the idle timeout).
    last_active: Instant,
    idle_timer: Option<TimerId>,
    connect_timer: Option<TimerId>,
    /// Bytes thrown away after refusing the upload.
    discarded: u64,
    client_addr: SocketAddr,
    upstream_addr: SocketAddr,
    started: Instant,
    pub client: Peer,
    /// `None` once the upstream has failed and been dropped.
    pub upstream: Option<Peer>,
    /// The spool file; `None` once handed off (kept incomplete).
    spool: Option<PartFile>,
    /// Bytes of the spool the upstream has taken.
    forwarded: u64,
    /// Answer bytes read from the upstream but not yet taken by the client.
    answer: Vec<u8>,
    /// Answer bytes read from the upstream in total.
    answer_bytes: u64,
    state: State,
    /// Set when the transfer must end now, whatever the state.
    ending: Option<Outcome>,
    /// Hold mode: how long to hold a complete upload before forwarding.
    hold: Option<Duration>,
    /// `--max-bytes`, copied from the policy when driven.
    max_bytes: Option<u64>,
    /// Hold mode: the reopened file being forwarded.
    held: Option<Held>,
}

impl Transfer {
    /// A new streaming transfer for an accepted client. `upstream` is the
    /// result of starting the non-blocking connect: on error we start out
    /// salvaging.
    pub fn new(
        key: usize,
        id: u64,
        client: TcpStream,
        client_addr: SocketAddr,
        upstream: io::Result<TcpStream>,
        upstream_addr: SocketAddr,
        spool: PartFile,
    ) -> Transfer {
        let (upstream, state) = match upstream {
            Ok(sock) => (Some(Peer::new(sock, false)), State::Connecting),
            Err(e) => (
                None,
                State::Salvaging {
                    reason: format!("connecting to {upstream_addr}: {}", brief(&e)),
                },
            ),
        };
        Self::with_state(
            key,
            id,
            client,
            client_addr,
            upstream,
            upstream_addr,
            spool,
            state,
            None,
        )
    }

    /// A new hold-mode transfer: the upstream is contacted only after the
    /// whole upload is in the spool and `hold` has passed.
    pub fn new_held(
        key: usize,
        id: u64,
        client: TcpStream,
        client_addr: SocketAddr,
        upstream_addr: SocketAddr,
        spool: PartFile,
        hold: Duration,
    ) -> Transfer {
        Self::with_state(
            key,
            id,
            client,
            client_addr,
            None,
            upstream_addr,
            spool,
            State::Receiving,
            Some(hold),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn with_state(
        key: usize,
        id: u64,
        client: TcpStream,
        client_addr: SocketAddr,
        upstream: Option<Peer>,
        upstream_addr: SocketAddr,
        spool: PartFile,
        state: State,
        hold: Option<Duration>,
    ) -> Transfer {
        Transfer {
            key,
            id,
            last_active: Instant::now(),
            idle_timer: None,
            connect_timer: None,
            discarded: 0,
            client_addr,
            upstream_addr,
            started: Instant::now(),
            client: Peer::new(client, true),
            upstream,
            spool: Some(spool),
            forwarded: 0,
            answer: Vec::new(),
            answer_bytes: 0,
            state,
            ending: None,
            hold,
            held: None,
            max_bytes: None,
        }
    }

    /// Records what an event says about one of our sockets.
    pub fn on_event(&mut self, side: Side, event: &Event) {
        let peer = match side {
            Side::Client => &mut self.client,
            Side::Upstream => match self.upstream.as_mut() {
                Some(p) => p,
                None => return, // stale event for an upstream we dropped
            },
        };
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            peer.readable = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            peer.writable = true;
        }
    }

    /// Makes all the progress readiness allows, and says whether the
    /// transfer is over. Each step returns whether it moved anything; we
    /// go round until nothing moves, because progress on one side can
    /// unblock the other (the upstream draining lets us read the client).
    pub fn drive(&mut self, ctx: &mut Ctx) -> Next {
        self.max_bytes = ctx.policy.max_bytes;
        let scratch = &mut *ctx.scratch;
        loop {
            let moved = match self.state {
                State::Receiving => self.read_client(scratch),
                State::Holding { .. } => self.watch_client(scratch),
                State::Connecting => self.check_connect() | self.read_client(scratch),
                State::Streaming => {
                    self.forward_held(scratch)
                        | self.forward_spool()
                        | self.read_client(scratch)
                        | self.forward_eof()
                        | self.relay_answer(scratch)
                }
                State::Salvaging { .. } => self.read_client(scratch),
                State::Replying { .. } => self.write_reply(scratch),
                State::Discarding => self.discard_client(scratch),
            };
            if let Some(outcome) = self.ending {
                return Next::Close(outcome);
            }
            if moved {
                self.last_active = Instant::now();
            }
            // A hold that just began needs its deadline in the loop's timers,
            // and a connect that just began needs its time limit.
            let (key, id) = (self.key, self.id);
            if let State::Holding {
                until,
                timer: timer @ None,
            } = &mut self.state
            {
                *timer = Some(ctx.timers.schedule(*until, Timer::HoldOver { key, id }));
            }
            if let (State::Connecting, None) = (&self.state, self.connect_timer) {
                let at = Instant::now() + ctx.policy.connect_timeout;
                self.connect_timer =
                    Some(ctx.timers.schedule(at, Timer::ConnectTimeout { key, id }));
            }
            if self.streaming_is_done() {
                self.log_relayed();
                return Next::Close(Outcome::Relayed);
            }
            if !moved {
                return Next::Keep;
            }
        }
    }

    fn set_state(&mut self, next: State) {
        log::trace!(
            "proxy: #{} state {} -> {}",
            self.key,
            self.state.name(),
            next.name()
        );
        self.state = next;
    }

    /// Bytes to forward that the upstream has not taken yet: of the spool
    /// as it grows (streaming), or of the reopened file (hold mode).
    fn lag(&self) -> u64 {
        if let Some(held) = &self.held {
            return held.len - self.forwarded;
        }
        self.spool
            .as_ref()
            .map_or(0, |s| s.bytes() - self.forwarded)
    }

    /// This transfer's identity (slab keys are reused; ids are not).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The timers this transfer may have pending, for the loop to cancel
    /// when the transfer ends.
    pub fn timers(&self) -> impl Iterator<Item = TimerId> {
        let hold = match self.state {
            State::Holding { timer, .. } => timer,
            _ => None,
        };
        [hold, self.idle_timer, self.connect_timer]
            .into_iter()
            .flatten()
    }

    /// Records the transfer's (re-armed) idle timer.
    pub fn set_idle_timer(&mut self, id: TimerId) {
        self.idle_timer = Some(id);
    }

    /// The connect timer fired: if still connecting, the upstream failed.
    pub fn connect_timed_out(&mut self, limit: Duration) {
        self.connect_timer = None;
        if let State::Connecting = self.state {
            log::trace!("proxy: #{} timer fired: connect timeout", self.key);
            self.upstream_failed(format!(
                "connect timed out after {}",
                humantime::format_duration(limit)
            ));
        }
    }

    /// The idle timer fired. Returns when to check again, or `None` when
    /// the transfer is being ended.
    ///
    /// Nothing moved for `idle`: whose fault is it? If we are waiting on
    /// the upstream (it will not take the upload, or will not answer), the
    /// upstream has failed: salvage the upload and answer `ERR`. Otherwise
    /// the client has gone quiet mid-upload (or will not read our answer):
    /// abort. A held transfer is idle on purpose and is left alone.
    pub fn check_idle(&mut self, idle: Duration) -> Option<Instant> {
        self.idle_timer = None;
        let now = Instant::now();
        if let State::Holding { .. } = self.state {
            return Some(now + idle);
        }
        let due = self.last_active + idle;
        if now < due {
            return Some(due);
        }
        log::trace!("proxy: #{} timer fired: idle", self.key);
        let waiting_on_upstream = matches!(self.state, State::Connecting | State::Streaming)
            && self.upstream.is_some()
            && (self.client.eof || (self.forwarding() && self.lag() >= LAG_LIMIT));
        let for_how_long = humantime::format_duration(idle);
        if waiting_on_upstream {
            self.upstream_failed(format!("no progress for {for_how_long}"));
            self.last_active = now;
            return Some(now + idle);
        }
        match self.state {
            State::Replying { .. } | State::Discarding => {
                log::warn!(
                    "proxy: client {} idle for {for_how_long} after our answer: closed",
                    self.client_addr
                );
                self.ending = Some(Outcome::Refused);
            }
            _ => self.client_lost(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("idle for {for_how_long}"),
            )),
        }
        None
    }

    // ---- Hold mode -----------------------------------------------------

    /// While holding, the client has nothing to send (it half-closed), but
    /// it may go away. Because its FIN has already arrived, a read after a
    /// reset still says EOF; the reset shows only as a pending socket error
    /// (`SO_ERROR`), so that is what we ask for.
    fn watch_client(&mut self, scratch: &mut [u8]) -> bool {
        if !self.client.readable {
            return false;
        }
        self.client.readable = false;
        let error = match self.client.sock.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match self.client.sock.read(scratch) {
                Err(e) if !is_would_block(&e) && !is_interrupted(&e) => Some(e),
                _ => None,
            },
        };
        match error {
            Some(e) => {
                self.client_lost(e);
                true
            }
            None => false,
        }
    }

    /// The hold is over: reopen the spool by name (a person may have
    /// edited or replaced it) and start connecting to the upstream.
    pub fn hold_over(&mut self, ctx: &mut Ctx) {
        let State::Holding { .. } = self.state else {
            return;
        };
        let Some(spool) = self.spool.as_ref() else {
            return;
        };
        let (name, path) = (spool.name().to_string(), spool.path().to_path_buf());
        log::trace!("proxy: #{} timer fired: hold over", self.key);
        let reopened = File::open(&path).and_then(|f| {
            let meta = f.metadata()?;
            if meta.is_file() {
                Ok((f, meta.len()))
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file",
                ))
            }
        });
        let (file, len) = match reopened {
            Ok(pair) => pair,
            Err(e) => {
                log::warn!(
                    "proxy: held file {} is gone: {e}; answering ERR",
                    path.display()
                );
                self.reply(Answer::err(format!(
                    "held file {name} is gone: {}",
                    brief(&e)
                )));
                return;
            }
        };
        self.held = Some(Held { file, len, crc: 0 });
        self.forwarded = 0;
        // Seed step 4, after the hold: connect, non-blocking as ever.
        log::trace!(
            "proxy: #{} register upstream READABLE|WRITABLE (connect in progress)",
            self.key
        );
        let connected = TcpStream::connect(self.upstream_addr).and_then(|mut sock| {
            ctx.registry
                .register(
                    &mut sock,
                    upstream_token(self.key),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map(|()| sock)
        });
        match connected {
            Ok(sock) => {
                self.upstream = Some(Peer::new(sock, false));
                self.set_state(State::Connecting);
            }
            Err(e) => self.upstream_failed(format!(
                "connecting to {}: {}",
                self.upstream_addr,
                brief(&e)
            )),
        }
    }

    /// True while upload bytes can still go to the upstream.
    fn forwarding(&self) -> bool {
        self.upstream.as_ref().is_some_and(|u| !u.broken && !u.shut)
    }

    // ---- Connecting ----------------------------------------------------

    /// The connect-in-progress dance: a non-blocking `connect` returns at
    /// once, and the socket becomes WRITABLE when the handshake is over,
    /// successfully or not. `SO_ERROR` (take_error) says which; a writable
    /// event with no error and no peer yet was spurious.
    fn check_connect(&mut self) -> bool {
        let Some(up) = self.upstream.as_mut() else {
            return false;
        };
        if !up.writable {
            return false;
        }
        let result = match up.sock.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match up.sock.peer_addr() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotConnected || is_would_block(&e) => {
                    Ok(false)
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(true) => {
                let _ = up.sock.set_nodelay(true);
                log::trace!("proxy: #{} upstream connected", self.key);
                log::debug!(
                    "proxy: #{} connected to upstream {}",
                    self.key,
                    self.upstream_addr
                );
                self.set_state(State::Streaming);
                true
            }
            Ok(false) => {
                up.writable = false;
                false
            }
            Err(e) => {
                self.upstream_failed(format!(
                    "connecting to {}: {}",
                    self.upstream_addr,
                    brief(&e)
                ));
                true
            }
        }
    }

    // ---- The upload direction: client -> spool -> upstream ---------------

    /// Reads the client until `WouldBlock`, EOF, or back-pressure.
    fn read_client(&mut self, scratch: &mut [u8]) -> bool {
        let mut moved = false;
        while self.client.readable && !self.client.eof && self.ending.is_none() {
            let held_back = match self.state {
                State::Receiving => false,
                State::Holding { .. } => true,
                State::Connecting => self.lag() >= LAG_LIMIT,
                State::Streaming => self.forwarding() && self.lag() >= LAG_LIMIT,
                State::Salvaging { .. } => false,
                State::Replying { .. } | State::Discarding => true,
            };
            if held_back {
                // Back-pressure: leave the bytes in the kernel. `readable`
                // stays set, so we come back here when the upstream drains.
                log::trace!(
                    "proxy: #{} client read paused, lag {}",
                    self.key,
                    self.lag()
                );
                break;
            }
            match self.client.sock.read(scratch) {
                Ok(0) => {
                    log::trace!("proxy: #{} client read EOF", self.key);
                    self.client.eof = true;
                    self.on_client_eof();
                    return true;
                }
                Ok(n) => {
                    log::trace!("proxy: #{} client read {n}", self.key);
                    moved = true;
                    self.take_upload(&scratch[..n]);
                }
                Err(e) if is_would_block(&e) => {
                    log::trace!("proxy: #{} client read WouldBlock", self.key);
                    self.client.readable = false;
                }
                Err(e) if is_interrupted(&e) => {}
                Err(e) => {
                    self.client_lost(e);
                    return true;
                }
            }
        }
        moved
    }

    /// Seed steps 3 and 5 at once: store the bytes, and send them on.
    fn take_upload(&mut self, data: &[u8]) {
        let Some(spool) = self.spool.as_ref() else {
            return;
        };
        if let Some(limit) = self.max_bytes {
            if spool.bytes() + data.len() as u64 > limit {
                self.too_large(limit);
                return;
            }
        }
        // Forward first, when the upstream is caught up: the server gets to
        // work on these bytes while we write them to disk. What it does not
        // take now goes out from the spool later.
        let streaming = matches!(self.state, State::Streaming);
        let sent = if streaming && self.lag() == 0 && self.forwarding() {
            self.write_upstream(data)
        } else {
            0
        };
        if let Some(spool) = self.spool.as_mut() {
            if let Err(e) = spool.write(data) {
                self.spool_failed(e);
                return;
            }
        }
        self.forwarded += sent as u64;
        if streaming {
            self.forward_spool();
        }
    }

    /// Writes fresh upload bytes to the upstream until it takes them all or
    /// would block, and returns how many it took. (The caller counts them as
    /// forwarded once they are in the spool too.)
    fn write_upstream(&mut self, data: &[u8]) -> usize {
        let Some(up) = self.upstream.as_mut() else {
            return 0;
        };
        let mut off = 0;
        while off < data.len() && up.writable {
            match up.sock.write(&data[off..]) {
                Ok(n) => {
                    log::trace!("proxy: #{} upstream write {n}", self.key);
                    off += n;
                }
                Err(e) if is_would_block(&e) => {
                    log::trace!("proxy: #{} upstream write WouldBlock", self.key);
                    up.writable = false;
                }
                Err(e) if is_interrupted(&e) => {}
                Err(e) => {
                    // The upstream will take nothing more. It may have said
                    // why (an early `ERR` answer), so look for an answer
                    // before deciding it failed.
                    log::debug!("proxy: #{} upstream write failed: {e}", self.key);
                    up.broken = true;
                    up.readable = true;
                    break;
                }
            }
        }
        off
    }

    /// Sends the upstream what it has not taken yet, straight from the
    /// spool file with `sendfile(2)`.
    ///
    /// Why from the file and not from the buffer we just read into: the
    /// bytes are in the page cache anyway (we just wrote them), and over
    /// TCP `sendfile` hands those pages to the socket by reference instead
    /// of copying them, which saves one of the three copies a proxied byte
    /// would otherwise cost. And whatever the upstream does not take now is
    /// simply still in the file: no per-transfer buffer, however slow the
    /// upstream.
    fn forward_spool(&mut self) -> bool {
        if self.held.is_some() {
            return false; // hold mode forwards with forward_held
        }
        let mut moved = false;
        while self.forwarding() && self.lag() > 0 {
            let want = self.lag().min(MAX_SENDFILE) as usize;
            let (Some(up), Some(spool)) = (self.upstream.as_mut(), self.spool.as_ref()) else {
                break;
            };
            if !up.writable {
                break;
            }
            match send_file(&up.sock, spool.file(), self.forwarded, want) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "spool file shrank");
                    self.spool_failed(e);
                    return true;
                }
                Ok(n) => {
                    log::trace!("proxy: #{} upstream sendfile {n}", self.key);
                    self.forwarded += n as u64;
                    moved = true;
                }
                Err(e) if is_would_block(&e) => {
                    log::trace!("proxy: #{} upstream sendfile WouldBlock", self.key);
                    up.writable = false;
                }
                Err(e) if is_interrupted(&e) => {}
                Err(e) if is_connection_error(&e) => {
                    // The upstream will take nothing more. It may have said
                    // why (an early `ERR` answer), so look for an answer
                    // before deciding it failed.
                    log::debug!("proxy: #{} upstream write failed: {e}", self.key);
                    up.broken = true;
                    up.readable = true;
                    return true;
                }
                Err(e) => {
                    self.spool_failed(e);
                    return true;
                }
            }
        }
        moved
    }

    /// Hold mode: forwards the reopened file, reading it back chunk by
    /// chunk (`pread` at the forwarded offset, so a slow upstream costs no
    /// memory) and computing the CRC-32C of exactly what is sent.
    fn forward_held(&mut self, scratch: &mut [u8]) -> bool {
        if self.held.is_none() {
            return false; // streaming mode forwards with forward_spool
        }
        let mut moved = false;
        while self.forwarding()
            && self.lag() > 0
            && self.upstream.as_ref().is_some_and(|u| u.writable)
        {
            let Some(held) = self.held.as_ref() else {
                break;
            };
            let want = self.lag().min(scratch.len() as u64) as usize;
            let n = match held.file.read_at(&mut scratch[..want], self.forwarded) {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "it shrank while being sent",
                )),
                Ok(n) => Ok(n),
                Err(e) if is_interrupted(&e) => continue,
                Err(e) => Err(e),
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    let name = self.spool.as_ref().map_or("?", |s| s.name()).to_string();
                    log::warn!("proxy: #{} reading held file {name}: {e}", self.key);
                    if let Some(up) = self.upstream.take() {
                        up.reset(); // the upstream must not take a partial file for whole
                    }
                    self.reply(Answer::err(format!(
                        "held file {name} is gone: {}",
                        brief(&e)
                    )));
                    return true;
                }
            };
            let sent = self.write_upstream(&scratch[..n]);
            if let Some(held) = self.held.as_mut() {
                held.crc = crc32c::crc32c_append(held.crc, &scratch[..sent]);
            }
            self.forwarded += sent as u64;
            moved |= sent > 0;
            if sent < n {
                break; // the upstream is full (or broke); WRITABLE brings us back
            }
        }
        moved
    }

    /// The client's EOF is the end of the upload: the spool is complete.
    fn on_client_eof(&mut self) {
        if let Some(spool) = self.spool.as_mut() {
            if let Err(e) = spool.finish() {
                self.spool_failed(e);
                return;
            }
        }
        if let (State::Receiving, Some(hold), Some(spool)) =
            (&self.state, self.hold, self.spool.as_ref())
        {
            log::info!(
                "holding {} for {}: edit it now ({} bytes from {}, crc32c={:08x})",
                spool.path().display(),
                humantime::format_duration(hold),
                spool.bytes(),
                self.client_addr,
                spool.crc32c()
            );
            self.set_state(State::Holding {
                until: Instant::now() + hold,
                timer: None,
            });
            return;
        }
        if let State::Salvaging { reason } = &self.state {
            let reason = reason.clone();
            self.reply_upstream_unavailable(&reason);
        }
    }

    /// Passes the client's FIN on, once every byte has been forwarded.
    fn forward_eof(&mut self) -> bool {
        if self.client.eof && self.lag() == 0 && self.forwarding() {
            if let Some(up) = self.upstream.as_mut() {
                log::trace!("proxy: #{} upstream shutdown(Write)", self.key);
                up.shutdown_write();
                return true;
            }
        }
        false
    }

    // ---- The answer direction: upstream -> client ------------------------

    /// Relays answer bytes as they come, and the upstream's FIN after them.
    fn relay_answer(&mut self, scratch: &mut [u8]) -> bool {
        let mut moved = false;
        loop {
            if !self.answer.is_empty() {
                if !self.client.writable {
                    break;
                }
                match self.client.sock.write(&self.answer) {
                    Ok(n) => {
                        log::trace!("proxy: #{} client write {n}", self.key);
                        self.answer.drain(..n);
                        if self.answer.is_empty() {
                            self.answer = Vec::new(); // give the memory back
                        }
                        moved = true;
                    }
                    Err(e) if is_would_block(&e) => self.client.writable = false,
                    Err(e) if is_interrupted(&e) => {}
                    Err(e) => {
                        self.client_lost(e);
                        return true;
                    }
                }
                continue;
            }
            let Some(up) = self.upstream.as_mut() else {
                break;
            };
            if !up.readable || up.eof {
                break;
            }
            let chunk_len = ANSWER_CHUNK.min(scratch.len());
            let chunk = &mut scratch[..chunk_len];
            match up.sock.read(chunk) {
                Ok(0) => {
                    log::trace!("proxy: #{} upstream read EOF", self.key);
                    up.eof = true;
                    moved = true;
                    if self.answer_bytes == 0 {
                        self.upstream_failed("closed the connection without answering".to_string());
                        return true;
                    }
                }
                Ok(n) => {
                    log::trace!("proxy: #{} upstream read {n}", self.key);
                    self.answer_bytes += n as u64;
                    moved = true;
                    // Straight to the client; keep only what it won't take.
                    let mut off = 0;
                    while off < n && self.client.writable {
                        match self.client.sock.write(&chunk[off..n]) {
                            Ok(w) => {
                                log::trace!("proxy: #{} client write {w}", self.key);
                                off += w;
                            }
                            Err(e) if is_would_block(&e) => self.client.writable = false,
                            Err(e) if is_interrupted(&e) => {}
                            Err(e) => {
                                self.client_lost(e);
                                return true;
                            }
                        }
                    }
                    self.answer.extend_from_slice(&chunk[off..n]);
                }
                Err(e) if is_would_block(&e) => {
                    log::trace!("proxy: #{} upstream read WouldBlock", self.key);
                    up.readable = false;
                }
                Err(e) if is_interrupted(&e) => {}
                Err(e) => {
                    up.eof = true;
                    moved = true;
                    if self.answer_bytes == 0 {
                        self.upstream_failed(brief(&e));
                        return true;
                    }
                    log::warn!(
                        "proxy: #{} upstream {} failed after {} answer bytes: {e}",
                        self.key,
                        self.upstream_addr,
                        self.answer_bytes
                    );
                }
            }
        }
        // The answer is over and relayed: pass the upstream's FIN on.
        let answer_over = self.upstream.as_ref().is_some_and(|u| u.eof);
        if answer_over && self.answer.is_empty() && !self.client.shut {
            log::trace!("proxy: #{} client shutdown(Write)", self.key);
            self.client.shutdown_write();
            moved = true;
        }
        moved
    }

    /// Streaming is over when both directions are: the whole upload went
    /// upstream (or the upstream stopped taking it after answering) with our
    /// FIN after it, and the whole answer went to the client with its FIN.
    fn streaming_is_done(&self) -> bool {
        let State::Streaming = self.state else {
            return false;
        };
        let Some(up) = self.upstream.as_ref() else {
            return false;
        };
        self.client.eof && (up.shut || up.broken) && up.eof && self.client.shut
    }

    // ---- Failures ----------------------------------------------------------

    /// The upstream failed before it answered: drop it and salvage.
    fn upstream_failed(&mut self, reason: String) {
        log::debug!(
            "proxy: #{} upstream {} failed: {reason}",
            self.key,
            self.upstream_addr
        );
        if let Some(up) = self.upstream.take() {
            if self.client.eof {
                drop(up);
            } else {
                // It holds part of an upload that will never be finished
                // through it: a reset keeps it from mistaking it for whole.
                up.reset();
            }
        }
        self.set_state(State::Salvaging {
            reason: reason.clone(),
        });
        if self.client.eof {
            self.reply_upstream_unavailable(&reason);
        }
    }

    fn reply_upstream_unavailable(&mut self, reason: &str) {
        let name = self.spool.as_ref().map_or("?", |s| s.name()).to_string();
        log::warn!(
            "proxy: {} upload of {} bytes not delivered: upstream unavailable: {reason}; kept as {}",
            self.client_addr,
            self.spool.as_ref().map_or(0, |s| s.bytes()),
            self.spool.as_ref().map_or_else(String::new, |s| s.path().display().to_string())
        );
        self.reply(Answer::err(format!(
            "upstream unavailable: {reason} (kept as {name})"
        )));
    }

    /// The upload passed `--max-bytes`: refuse it. The partial spool is
    /// removed (a refused upload is nobody's copy), the upstream reset so
    /// the server discards its partial too.
    fn too_large(&mut self, limit: u64) {
        log::warn!(
            "proxy: upload from {} passed --max-bytes {limit}: refused",
            self.client_addr
        );
        if let Some(up) = self.upstream.take() {
            up.reset();
        }
        if let Some(spool) = self.spool.take() {
            spool.discard();
        }
        self.reply(Answer::err(format!("too large: limit {limit} bytes")));
    }

    /// The spool file could not be written: refuse the upload.
    fn spool_failed(&mut self, e: io::Error) {
        log::warn!(
            "proxy: {} spool write failed: {e}; upload refused",
            self.client_addr
        );
        if let Some(up) = self.upstream.take() {
            if up.shut {
                drop(up);
            } else {
                up.reset();
            }
        }
        if let Some(spool) = self.spool.take() {
            match spool.keep_incomplete() {
                Ok(path) => log::warn!("proxy: partial spool kept as {}", path.display()),
                Err(e) => log::warn!("proxy: {e}"),
            }
        }
        self.reply(Answer::err(format!(
            "proxy cannot store upload: {}",
            brief(&e)
        )));
    }

    /// The client's connection failed (reset, or lost while we wrote to it).
    fn client_lost(&mut self, e: io::Error) {
        self.ending = Some(Outcome::Aborted);
        if let State::Holding { .. } = self.state {
            log::warn!(
                "proxy: client {} went away during its hold ({e}); nothing was sent upstream; upload kept as {}",
                self.client_addr,
                self.spool.as_ref().map_or_else(String::new, |s| s.path().display().to_string())
            );
            return;
        }
        if self.client.eof {
            // The upload was complete; only the answer could not be given.
            log::warn!(
                "proxy: client {} went away before its answer ({e}); upload kept as {}",
                self.client_addr,
                self.spool
                    .as_ref()
                    .map_or_else(String::new, |s| s.path().display().to_string())
            );
            return;
        }
        if let Some(up) = self.upstream.take() {
            up.reset();
        }
        let bytes = self.spool.as_ref().map_or(0, |s| s.bytes());
        let kept = match self.spool.take().map(PartFile::keep_incomplete) {
            Some(Ok(path)) => path.display().to_string(),
            Some(Err(e)) => format!("(not kept: {e})"),
            None => "(no spool)".to_string(),
        };
        log::warn!(
            "proxy: client {} aborted its upload after {bytes} bytes ({e}); kept as {kept}",
            self.client_addr
        );
    }

    // ---- Our own answer ----------------------------------------------------

    fn reply(&mut self, answer: Answer) {
        self.set_state(State::Replying {
            line: answer.to_line().into_bytes(),
            sent: 0,
        });
    }

    fn write_reply(&mut self, scratch: &mut [u8]) -> bool {
        // Keep swallowing upload bytes meanwhile, so a client blocked in
        // write() cannot wedge before it reads our line.
        let mut moved = self.discard_some(scratch);
        let State::Replying { line, sent } = &mut self.state else {
            return moved;
        };
        while *sent < line.len() && self.client.writable {
            match self.client.sock.write(&line[*sent..]) {
                Ok(n) => {
                    log::trace!("proxy: #{} client write {n}", self.key);
                    *sent += n;
                    moved = true;
                }
                Err(e) if is_would_block(&e) => self.client.writable = false,
                Err(e) if is_interrupted(&e) => {}
                Err(e) => {
                    log::debug!("proxy: #{} sending reply: {e}", self.key);
                    self.ending = Some(Outcome::Refused);
                    return true;
                }
            }
        }
        if *sent == line.len() {
            if self.client.eof {
                self.ending = Some(Outcome::Refused);
            } else {
                self.client.shutdown_write();
                self.set_state(State::Discarding);
            }
            return true;
        }
        moved
    }

    fn discard_client(&mut self, scratch: &mut [u8]) -> bool {
        let moved = self.discard_some(scratch);
        if self.client.eof {
            self.ending = Some(Outcome::Refused);
            return true;
        }
        moved
    }

    /// Reads and drops client bytes until `WouldBlock` or EOF.
    fn discard_some(&mut self, scratch: &mut [u8]) -> bool {
        let mut moved = false;
        while self.client.readable && !self.client.eof {
            match self.client.sock.read(scratch) {
                Ok(0) => {
                    self.client.eof = true;
                    moved = true;
                }
                Ok(n) => {
                    moved = true;
                    self.discarded += n as u64;
                    if self.discarded > DISCARD_LIMIT {
                        log::warn!(
                            "proxy: client {} kept sending after being refused: closed",
                            self.client_addr
                        );
                        self.ending = Some(Outcome::Refused);
                        return true;
                    }
                }
                Err(e) if is_would_block(&e) => self.client.readable = false,
                Err(e) if is_interrupted(&e) => {}
                Err(_) => {
                    self.client.eof = true;
                    moved = true;
                }
            }
        }
        moved
    }

    // ---- Reporting ---------------------------------------------------------

    fn log_relayed(&self) {
        if !log::log_enabled!(log::Level::Info) {
            return;
        }
        if let (Some(held), Some(spool)) = (&self.held, &self.spool) {
            let edited = held.len != spool.bytes() || held.crc != spool.crc32c();
            log::info!(
                "proxy: relayed held {} -> {}: received {} bytes crc32c={:08x}, forwarded {} bytes crc32c={:08x}{}, answer {} bytes, {:.3}s in all",
                spool.name(),
                self.upstream_addr,
                spool.bytes(),
                spool.crc32c(),
                self.forwarded,
                held.crc,
                if edited { " (edited during hold)" } else { "" },
                self.answer_bytes,
                self.started.elapsed().as_secs_f64()
            );
            return;
        }
        let elapsed = self.started.elapsed();
        let (name, bytes, crc) = self
            .spool
            .as_ref()
            .map_or(("?", 0, 0), |s| (s.name(), s.bytes(), s.crc32c()));
        log::info!(
            "proxy: relayed {} -> {}: up {bytes} bytes, down {} bytes in {:.3}s ({:.1} MB/s) spool={name} crc32c={crc:08x}",
            self.client_addr,
            self.upstream_addr,
            self.answer_bytes,
            elapsed.as_secs_f64(),
            mb_per_s(bytes, elapsed)
        );
    }

    /// Called when the proxy shuts down with this transfer unfinished.
    pub fn abandon(mut self) {
        if let Some(up) = self.upstream.take() {
            if up.shut {
                drop(up);
            } else {
                up.reset();
            }
        }
        if let Some(spool) = self.spool.take() {
            if !spool.is_finished() {
                match spool.keep_incomplete() {
                    Ok(path) => log::warn!(
                        "proxy: unfinished upload from {} kept as {}",
                        self.client_addr,
                        path.display()
                    ),
                    Err(e) => log::warn!("proxy: {e}"),
                }
            }
        }
    }
}

/// `sendfile(2)`: copies `len` bytes of `file` at `offset` to `sock`
/// without passing them through user space. Returns the bytes sent; a
/// non-blocking socket that is full gives `WouldBlock`, like `write`.
fn send_file(sock: &TcpStream, file: &File, offset: u64, len: usize) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: both descriptors are open for the duration of the call, and
    // `off` is a valid off_t the kernel may update.
    let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Errors that mean the connection is gone (as opposed to a file error
/// reported by the same call).
fn is_connection_error(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe
            | ConnectionReset
            | ConnectionAborted
            | NotConnected
            | TimedOut
            | HostUnreachable
            | NetworkUnreachable
    )
}
