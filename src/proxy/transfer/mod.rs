//! One proxied transfer: a client socket, an upstream socket, a spool file,
//! and the state machine that moves bytes between them.
//!
//! ```text
//!        accept: create spool,                 accept (--hold): create spool
//!        start non-blocking connect               |
//!                 |                               v
//!                 |                           Receiving   client -> spool only
//!                 |                               | client EOF: rename spool, arm the hold timer
//!                 |                               v
//!                 |                           Holding     a person may edit the file
//!                 |                               | timer fires: reopen the file by name, connect
//!                 v                               v
//!   +------- Connecting <-------------------------+
//!   |   the client is not read: its bytes wait in the kernel
//!   |             | connect completes              connect fails or times out
//!   |             v                                    |
//!   |         Streaming ---- upstream fails ------> Salvaging
//!   |   client -> upstream + spool;   before       client -> spool only;
//!   |   answer upstream -> client;    answering    on client EOF:
//!   |   each FIN passed on once its                "ERR upstream unavailable"
//!   |   direction is drained                             |
//!   |             | both directions done                 v
//!   |             v                                  Replying --> Done(Refused)
//!   |        Done(Relayed)                       our own line, then a clean close
//!   |
//!   |   Streaming -- upstream fails after answer bytes --> Cutting --> Done(Aborted)
//!   |   the answer bytes held to the client; once it has acknowledged every
//!   |   byte (or is idle too long), its connection is reset (see `cut`)
//!   |
//!   +-- too large, spool write fails, held file unreadable --> Replying
//!   client resets before its FIN: upstream reset, spool kept as .incomplete, Done(Aborted)
//!   client resets while Holding: timer cancelled, nothing sent upstream, Done(Aborted)
//! ```
//!
//! **Everything that decides what happens next is in `State`.** The spool
//! exists in the states that have one, the upstream link in the states
//! that have one, a hold's deadline in `Holding`, the end in `Done`. The
//! only other facts are per socket (readiness, EOF read, FIN sent), kept by
//! each side's [`Peer`]. Every transition goes through one function,
//! `Transfer::on`, which takes the old state by value and what happened
//! (`Happened`), and returns the new state; the I/O code never assigns a
//! state, it reports what happened.
//!
//! The code is split by concept: `upload` (client -> spool -> upstream,
//! with back-pressure), `answer` (upstream -> client), `hold` (store and
//! forward), `failure` (every way a transfer can go wrong, and what is kept),
//! `cut` (an answer the upstream cut short).

mod answer;
mod cut;
mod failure;
mod hold;
mod opening;
mod policy;
pub mod spool;
mod timers;
mod toxic;
mod upload;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;

use crate::answer::Answer;
use crate::event_loop::disk::{Disk, Done};
use crate::event_loop::{Context, Peer, RateWindow, Reply, ReplyStep, TimerId, Who};

use super::Timer;
use crate::toxics::pipe::End;
use crate::toxics::Toxic;
use cut::Cut;
use spool::Spool;
use toxic::Toxics;
use upload::Link;

pub use policy::{OnDiskError, Policy};
pub use toxic::ToxicFigures;
pub use upload::LAG_LIMIT;

/// Which socket of a transfer an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
    /// Close it: gracefully if `clean`, with a reset otherwise.
    Close {
        outcome: Outcome,
        clean: bool,
    },
}

/// Where a transfer is in its life. See the module docs for the diagram.
#[derive(Debug)]
enum State {
    /// Hold mode: the upload goes to the spool only; the upstream is not
    /// contacted until the hold is over.
    Receiving { spool: Spool },
    /// Hold mode: the upload is complete and final in the spool; waiting for
    /// the deadline (a timer in the loop, never a sleep) while a person may
    /// edit the file.
    Holding {
        spool: Spool,
        timer: TimerId,
        until: Instant,
    },
    /// The upstream connect is in flight; `timer` is its time limit. The
    /// client is not read: its bytes wait in the kernel until they can go
    /// upstream and to the spool together.
    Connecting {
        spool: Spool,
        link: Link,
        timer: TimerId,
    },
    /// Both sockets up: upload to spool and upstream, answer back.
    Streaming { spool: Spool, link: Link },
    /// The upstream failed before answering. The rest of the upload goes to
    /// the spool only; at the client's EOF we answer `ERR` ourselves.
    Salvaging { spool: Spool, reason: String },
    /// The upstream failed after answer bytes: the rest of them to the
    /// client, then its reset once it has acknowledged them all (`cut`).
    Cutting(Cut),
    /// Our own answer line to the client, then a clean close
    /// (`event_loop::reply`).
    Replying(Reply),
    /// Over: the loop closes the transfer; `clean` when the client's
    /// connection ended well and is closed gracefully (a FIN after our last
    /// byte), otherwise with a reset.
    Done { outcome: Outcome, clean: bool },
}

impl State {
    /// The end of a transfer whose client went away (also the placeholder
    /// while [`Transfer::on`] computes the next state).
    fn aborted() -> State {
        State::Done {
            outcome: Outcome::Aborted,
            clean: false,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            State::Receiving { .. } => "Receiving",
            State::Holding { .. } => "Holding",
            State::Connecting { .. } => "Connecting",
            State::Streaming { .. } => "Streaming",
            State::Salvaging { .. } => "Salvaging",
            State::Cutting(_) => "Cutting",
            State::Replying(_) => "Replying",
            State::Done { .. } => "Done",
        }
    }

    /// The timer this state owns, if any.
    fn timer(&self) -> Option<TimerId> {
        match self {
            State::Holding { timer, .. } | State::Connecting { timer, .. } => Some(*timer),
            State::Cutting(cut) => Some(cut.timer),
            _ => None,
        }
    }

    /// The spool, in the states that have one.
    fn spool(&self) -> Option<&Spool> {
        match self {
            State::Receiving { spool }
            | State::Holding { spool, .. }
            | State::Connecting { spool, .. }
            | State::Streaming { spool, .. }
            | State::Salvaging { spool, .. } => Some(spool),
            State::Cutting(_) | State::Replying(_) | State::Done { .. } => None,
        }
    }

    fn spool_mut(&mut self) -> Option<&mut Spool> {
        match self {
            State::Receiving { spool }
            | State::Holding { spool, .. }
            | State::Connecting { spool, .. }
            | State::Streaming { spool, .. }
            | State::Salvaging { spool, .. } => Some(spool),
            State::Cutting(_) | State::Replying(_) | State::Done { .. } => None,
        }
    }
}

/// What happened to a transfer: the input of [`Transfer::on`], reported by
/// the I/O code and the timers.
#[derive(Debug)]
enum Happened {
    /// The client's EOF: the upload is complete, and the spool has its
    /// final name.
    UploadComplete,
    /// The upstream connect completed.
    Connected,
    /// The upstream failed before answering (or a connect timed out).
    UpstreamFailed(String),
    /// The hold timer fired.
    HoldOver,
    /// The held file could not be read back while being forwarded.
    HeldFileFailed(io::Error),
    /// The upload passed `--max-bytes`.
    TooLarge(u64),
    /// The spool could not be written.
    SpoolFailed(io::Error),
    /// The client's connection failed (reset, idle, lost while we wrote).
    ClientLost(io::Error),
    /// Both directions are done: the answer reached the client.
    Relayed,
    /// The client has acknowledged every byte of a cut answer.
    CutDelivered,
    /// Our own reply is over: `delivered` (and the client finished), or
    /// the client gave up on it.
    ReplyEnded { delivered: bool },
    /// A toxic ends the connection (`timeout`, `reset_peer`, `limit_*`).
    ToxicEnd(End),
}

/// A step of the I/O code: `Ok(moved)` (did any byte move?), or `Err` with
/// what happened, for [`Transfer::on`] to turn into a new state.
type Step = Result<bool, Happened>;

/// One client's transfer through the proxy.
pub struct Transfer {
    key: usize,
    /// Unique for the proxy's lifetime (slab keys are reused).
    id: u64,
    client: Peer,
    client_addr: SocketAddr,
    started: Instant,
    /// Last time a byte moved either way (for the idle timeout).
    last_active: Instant,
    idle_timer: Option<TimerId>,
    /// The `--min-rate` window, and its timer while the upload runs.
    rate: RateWindow,
    rate_timer: Option<TimerId>,
    /// Upload bytes received and forwarded, as last seen by [`Transfer::on`]
    /// (for the metrics: the spool and the link go with their states).
    received: u64,
    forwarded: u64,
    /// The route (listen -> upstream pair) it came through.
    pub route: usize,
    /// The toxics drawn at the start, until the upstream link takes them.
    drawn: Option<Box<Toxics>>,
    /// The one toxic timer, and when it is due (see `toxic`).
    toxic_timer: Option<(TimerId, Instant)>,
    toxic_figures: ToxicFigures,
    /// The batch of events it was made in (see `Context::batch`): events of
    /// that batch for its tokens are stale.
    born: u64,
    state: State,
}

impl Transfer {
    /// A new transfer for an accepted (and registered) client: in hold
    /// mode it starts `Receiving`; otherwise it starts connecting upstream
    /// at once, so the upload can stream. It draws its toxics from `chain`
    /// now.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: usize,
        id: u64,
        client: TcpStream,
        client_addr: SocketAddr,
        spool: Spool,
        cx: &mut Context<Timer>,
        policy: &Policy,
        chain: &[Toxic],
    ) -> Transfer {
        let now = Instant::now();
        let drawn = Toxics::draw(chain, id, now);
        if let Some(t) = &drawn {
            log::debug!("proxy: #{key} {client_addr} drew toxics: {}", t.describe());
        }
        let who = Who {
            role: "proxy",
            key,
            side: Side::Client.name(),
        };
        let mut t = Transfer {
            key,
            id,
            client: Peer::inherited(client, who),
            client_addr,
            started: now,
            last_active: now,
            idle_timer: None,
            rate: RateWindow::new(now, 0),
            rate_timer: policy
                .min_rate
                .map(|r| cx.timers.schedule(now + r.window, Timer::Rate { key, id })),
            received: 0,
            forwarded: 0,
            route: 0,
            drawn,
            toxic_timer: None,
            toxic_figures: ToxicFigures::default(),
            born: cx.batch,
            state: State::aborted(),
        };
        let must_record = policy.hold.is_some() || policy.on_disk_error == OnDiskError::Refuse;
        t.state = match (policy.hold, spool.not_recorded()) {
            // No file to record into, and every byte must be recorded.
            (_, Some(why)) if must_record => State::Replying(Reply::new(&Answer::err(format!(
                "proxy cannot store upload: {why}"
            )))),
            (Some(_), _) => State::Receiving { spool },
            (None, _) => t.connect(spool, upload::Source::Spool, cx, policy),
        };
        t
    }

    /// This transfer's identity (slab keys are reused; ids are not).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True if an event of batch `batch` cannot be this transfer's: it was
    /// made while that batch was handled, so the event was for the socket
    /// its slab key named before (see `Context::batch`).
    pub fn is_newer_than(&self, batch: u64) -> bool {
        self.born == batch
    }

    /// Records what an event says about one of our sockets.
    pub fn on_event(&mut self, side: Side, event: &Event) {
        match (side, &mut self.state) {
            (Side::Client, _) => self.client.on_event(event),
            (Side::Upstream, State::Connecting { link, .. } | State::Streaming { link, .. }) => {
                link.up.on_event(event)
            }
            (Side::Upstream, _) => {} // stale: an upstream we dropped
        }
    }

    /// A disk operation of this transfer's spool has completed.
    pub fn on_done(&mut self, done: Done, disk: &mut Disk) {
        if let Some(spool) = self.state.spool_mut() {
            spool.on_done(done, disk);
        }
    }

    /// A chunk this transfer queued for may be free.
    pub fn woken(&mut self) {
        match &mut self.state {
            State::Receiving { spool }
            | State::Streaming { spool, .. }
            | State::Salvaging { spool, .. } => spool.woken(),
            _ => {}
        }
    }

    /// Makes all the progress readiness allows, and says whether the
    /// transfer is over. Each step reports whether it moved anything; we
    /// go round until nothing moves, because progress on one side can
    /// unblock the other (the upstream draining lets us read the client).
    pub fn drive(&mut self, cx: &mut Context<Timer>, policy: &Policy) -> Next {
        loop {
            // First: a timer (idle, connect, hold) may have ended it already.
            if let State::Done { outcome, clean } = self.state {
                return Next::Close { outcome, clean };
            }
            match self.step(&mut cx.scratch, &mut cx.disk, policy) {
                Ok(false) => {
                    self.arm_toxic_timer(cx);
                    return Next::Keep;
                }
                Ok(true) => self.last_active = Instant::now(),
                Err(what) => {
                    self.last_active = Instant::now();
                    self.on(what, cx, policy);
                }
            }
        }
    }

    /// One round of I/O in the current state.
    fn step(&mut self, scratch: &mut [u8], disk: &mut Disk, policy: &Policy) -> Step {
        let client = &mut self.client;
        match &mut self.state {
            State::Receiving { spool } | State::Salvaging { spool, .. } => {
                let moved = upload::read_client(client, spool, None, disk, policy)?;
                upload::spool_finished(client, spool, disk)?;
                Ok(moved)
            }
            State::Holding { .. } => hold::watch_client(client, scratch),
            State::Cutting(cut) => cut.step(client, &mut self.last_active),
            // The client is not read until the upstream is up: its bytes
            // wait in the kernel, and the first ones we read go to the
            // upstream and the spool together (see `upload`).
            State::Connecting { link, .. } => link.check_connect(policy),
            State::Streaming { spool, link } => {
                let mut moved = link.forward(spool, disk, scratch)?;
                moved |= upload::read_client(client, spool, Some(link), disk, policy)?;
                upload::spool_finished(client, spool, disk)?;
                moved |= link.pass_eof(client, spool);
                // The answer reaches the client only once the recording is
                // final (or early, while the upload is still coming: an
                // upstream that refuses mid-way).
                let deliver = !client.eof() || spool.is_finished();
                moved |= link.relay_answer(client, scratch, deliver, policy)?;
                if let Some(how) = link.toxic_end() {
                    return Err(Happened::ToxicEnd(how));
                }
                if link.is_done(client) {
                    return Err(Happened::Relayed);
                }
                Ok(moved)
            }
            State::Replying(reply) => match reply.drive(client, scratch) {
                ReplyStep::Pending(moved) => Ok(moved),
                ReplyStep::Done => Err(Happened::ReplyEnded { delivered: true }),
                ReplyStep::Failed(e) => {
                    log::debug!("proxy: #{} sending our answer: {e}", self.key);
                    Err(Happened::ReplyEnded { delivered: false })
                }
                ReplyStep::Flooded => {
                    log::warn!(
                        "proxy: client {} kept sending after being refused: closed",
                        self.client_addr
                    );
                    Err(Happened::ReplyEnded { delivered: false })
                }
            },
            State::Done { .. } => Ok(false),
        }
    }

    /// **The one place where a transfer changes state.** Takes the old state
    /// by value (so its spool and sockets can be handed on, kept or reset),
    /// and returns the new one. A state's timer is cancelled when the state
    /// is left.
    fn on(&mut self, what: Happened, cx: &mut Context<Timer>, policy: &Policy) {
        let old = std::mem::replace(&mut self.state, State::aborted());
        let (from, old_timer) = (old.name(), old.timer());
        self.note_bytes(&old);
        let next = match (old, what) {
            (State::Receiving { spool }, Happened::UploadComplete) => self.hold(spool, cx, policy),
            (State::Holding { spool, .. }, Happened::HoldOver) => self.resume(spool, cx, policy),
            (State::Connecting { spool, link, .. }, Happened::Connected) => {
                State::Streaming { spool, link }
            }
            // The upload ended while streaming: nothing changes until the
            // upstream has it all and has answered.
            (
                s @ (State::Connecting { .. } | State::Streaming { .. }),
                Happened::UploadComplete,
            ) => s,
            (State::Salvaging { spool, reason }, Happened::UploadComplete) => {
                self.upstream_unavailable(spool, &reason)
            }
            (
                State::Connecting { spool, link, .. } | State::Streaming { spool, link },
                Happened::UpstreamFailed(reason),
            ) => self.upstream_failed(spool, link, reason, cx, policy),
            (
                State::Connecting { spool, link, .. } | State::Streaming { spool, link },
                Happened::ToxicEnd(how),
            ) => self.toxic_ended(spool, link, how, cx),
            (State::Streaming { spool, link }, Happened::HeldFileFailed(e)) => {
                self.held_file_failed(spool, link, e)
            }
            (old, Happened::TooLarge(limit)) => self.too_large(old, limit),
            (old, Happened::SpoolFailed(e)) => self.spool_failed(old, e, cx, policy),
            (State::Cutting(cut), Happened::CutDelivered) => self.cut_delivered(cut),
            (State::Cutting(cut), Happened::ClientLost(e)) => self.cut_lost(cut, e, cx),
            (old, Happened::ClientLost(e)) => self.client_lost(old, e, cx),
            (State::Streaming { spool, link }, Happened::Relayed) => {
                self.log_relayed(&spool, &link, policy);
                link.up.close(); // both directions ended well
                State::Done {
                    outcome: Outcome::Relayed,
                    clean: true,
                }
            }
            (State::Replying(_), Happened::ReplyEnded { delivered }) => State::Done {
                outcome: Outcome::Refused,
                clean: delivered,
            },
            (old, what) => {
                log::debug!("proxy: #{} {what:?} ignored in {}", self.key, old.name());
                old
            }
        };
        if let Some(timer) = old_timer.filter(|t| next.timer() != Some(*t)) {
            cx.timers.cancel(timer);
        }
        if from != next.name() {
            log::trace!("proxy: #{} state {from} -> {}", self.key, next.name());
        }
        self.state = next;
    }

    /// Remembers how far `state` got, before it is handed on.
    fn note_bytes(&mut self, state: &State) {
        match state {
            State::Receiving { spool }
            | State::Holding { spool, .. }
            | State::Salvaging { spool, .. } => self.received = self.received.max(spool.bytes()),
            State::Connecting { spool, link, .. } | State::Streaming { spool, link } => {
                self.received = self.received.max(spool.bytes());
                self.forwarded = self.forwarded.max(link.forwarded);
                self.toxic_figures.note(link);
            }
            State::Cutting(_) | State::Replying(_) | State::Done { .. } => {}
        }
    }

    /// Upload bytes received from the client and forwarded upstream.
    pub fn bytes(&self) -> (u64, u64) {
        (self.received, self.forwarded)
    }

    /// True while the upload is held (`--hold`).
    pub fn is_held(&self) -> bool {
        matches!(self.state, State::Holding { .. })
    }

    /// Closes the client connection, gracefully when the transfer ended
    /// cleanly (see [`Next::Close`]).
    pub fn close(self, clean: bool) {
        if clean {
            self.client.close();
        }
    }

    /// The timers this transfer may have pending, for the loop to cancel
    /// when the transfer ends.
    pub fn timers(&self) -> impl Iterator<Item = TimerId> {
        [
            self.state.timer(),
            self.idle_timer,
            self.rate_timer,
            self.toxic_timer.map(|(id, _)| id),
        ]
        .into_iter()
        .flatten()
    }

    /// Records the transfer's (re-armed) idle timer.
    pub fn set_idle_timer(&mut self, id: TimerId) {
        self.idle_timer = Some(id);
    }
}
