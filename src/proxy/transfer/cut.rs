//! A cut answer: the upstream failed (a reset, an error, or silence past
//! `--idle-timeout`) after part of its answer had gone to the client.
//!
//! ```text
//!   Streaming --upstream fails after answer bytes--> Cutting --> Done(Aborted), client reset
//!              upstream reset, recording ended         the answer bytes we hold to the client;
//!              (finished or .incomplete, as ever)      wait until it has acknowledged them all
//! ```
//!
//! **The client's connection must end in a reset**, never a FIN: a FIN
//! after a cut answer would make it look whole (an HTTP body that ends at
//! the close), and a line of ours after answer bytes would make two
//! answers in one. So the client's socket is closed with `SO_LINGER` 0.
//!
//! **But a reset throws away what is still queued.** Closing with
//! `SO_LINGER` 0 discards the socket's send queue: every answer byte the
//! client has not acknowledged yet, however long ago the upstream sent it.
//! A client that reads slowly would lose most of an answer it would have
//! had in full directly from the upstream (traced: of 300,000 answer bytes,
//! 20,480 reached a client that read only after the reset; 113,152 in
//! `tests/cut.rs` before this state existed, when the reset came at
//! once). So the reset waits, in this state, until:
//!
//! 1. the answer bytes the proxy still holds (its answer buffer, at most
//!    `ANSWER_CHUNK`) are written to the client, as in `Streaming` (at
//!    once, even if the recording is not final yet: a cut answer is no
//!    success that the file's final name must precede); then
//! 2. the client's send queue is empty: `ioctl(SIOCOUTQ)` says 0, that is,
//!    the client's kernel has acknowledged every byte. They are then in
//!    its receive buffer, and stay readable before the reset's error.
//!
//! Nothing announces "the send queue is empty" (`WRITABLE` comes when a
//! third of the buffer is free, and only after a write was refused), so
//! the queue is looked at on a timer, [`FIRST_LOOK`] after the cut and
//! then twice as long each time, up to [`LAST_LOOK`] between looks, and
//! after each event of the client's. The ioctl never waits.
//!
//! **Bounded.** Each look that finds the queue shorter counts as progress;
//! a client that takes nothing for `--idle-timeout` is reset then with what
//! it has not taken (the idle timer, as in every state; with no idle
//! timeout, after [`NO_PROGRESS_MAX`] of no progress, as the looks go on). A client that
//! resets first simply ends the transfer. Shutting down resets it like
//! every transfer still open after the grace period.
//!
//! **The upload is not read meanwhile.** It has nowhere to go (the
//! upstream is gone, and the recording ended at the cut, as it would have
//! without this wait): a client still sending is slowed by TCP, and learns
//! from the reset. The outcome is `Aborted`, as before.
//!
//! Through toxics, the answer bytes still in the toxics' pipe are
//! delivered at their time first (`Link::cut`), and the cut comes where
//! the FIN would have.

use std::io;
use std::time::{Duration, Instant};

use crate::event_loop::{Context, Peer, TimerId};
use crate::sys;

use super::spool::Spool;
use super::upload::Link;
use super::{Happened, Outcome, Policy, State, Step, Timer, Transfer};

/// The first look at the client's send queue after the cut: short, so a
/// client that keeps up is reset soon after its last byte; one that is
/// slower is looked at less and less often.
pub(super) const FIRST_LOOK: Duration = Duration::from_millis(1);

/// The longest time between two looks: the most a reset can come after
/// the client has taken the last byte (the client sees it only after its
/// last byte, so this costs it nothing but the wait), and at most 20
/// timed `ioctl`s a second per transfer in this state.
pub(super) const LAST_LOOK: Duration = Duration::from_millis(50);

/// With no `--idle-timeout` (`0s`), how long a client may take nothing of
/// a cut answer before it is reset with what it has not taken: this state
/// looks at it on a timer, so it must end even where nothing else ends it.
pub(super) const NO_PROGRESS_MAX: Duration = Duration::from_secs(60);

/// What a transfer holds while its cut answer drains to the client.
#[derive(Debug)]
pub(super) struct Cut {
    /// Answer bytes read from the upstream that the client has not been
    /// given yet.
    rest: Vec<u8>,
    /// Answer bytes read from the upstream in all (for the log).
    answer_bytes: u64,
    /// Bytes in the client's send queue at the last look.
    unacked: usize,
    /// The next look, and how long after the previous one it comes.
    pub timer: TimerId,
    every: Duration,
    /// [`NO_PROGRESS_MAX`] when there is no idle timeout to end the wait.
    limit: Option<Duration>,
}

impl Cut {
    /// One round: the bytes we hold to the client, then a look at what it
    /// has not acknowledged. `Err(CutDelivered)` once it has them all. A
    /// shorter queue is progress for the idle clock (`last_active`), but
    /// not a move: nothing else waits for it, so the drive need not go
    /// round again for it.
    pub(super) fn step(&mut self, client: &mut Peer, last_active: &mut Instant) -> Step {
        let mut moved = false;
        if !self.rest.is_empty() {
            let (taken, failed) = client.write_ready(&self.rest);
            if taken > 0 {
                self.rest.drain(..taken);
                moved = true;
            }
            if let Some(e) = failed {
                return Err(Happened::ClientLost(e));
            }
            if !self.rest.is_empty() {
                return Ok(moved); // WRITABLE brings us back
            }
            self.rest = Vec::new(); // give the memory back
        }
        if let Some(limit) = self.limit.filter(|&l| last_active.elapsed() > l) {
            let e = io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "took nothing for {} (no --idle-timeout)",
                    humantime::format_duration(limit)
                ),
            );
            return Err(Happened::ClientLost(e));
        }
        // A client that reset while we wait would keep its unacknowledged
        // bytes counted in the queue forever: its reset is the socket's
        // pending error.
        if let Some(e) = client.failed_since_event() {
            return Err(Happened::ClientLost(e));
        }
        match sys::unacked_bytes(client.sock()) {
            Ok(0) => Err(Happened::CutDelivered),
            Ok(n) => {
                if n < self.unacked {
                    *last_active = Instant::now();
                }
                self.unacked = n;
                Ok(moved)
            }
            Err(e) => Err(Happened::ClientLost(io::Error::new(
                e.kind(),
                format!("reading its send queue (SIOCOUTQ): {e}"),
            ))),
        }
    }

    /// Answer bytes the client has not taken (held, or not acknowledged).
    fn untaken(&self) -> usize {
        self.rest.len() + self.unacked
    }
}

impl Transfer {
    /// The upstream failed after `link.answer_bytes` answer bytes: reset
    /// it, end the recording (finished if the upload was complete,
    /// `.incomplete` otherwise, by the loop once its writes land), and
    /// deliver what we hold before the client's reset (`Cutting`).
    pub(super) fn cut_answer(
        &mut self,
        spool: Spool,
        link: Link,
        reason: &str,
        cx: &mut Context<Timer>,
        policy: &Policy,
    ) -> State {
        let Link {
            up,
            answer,
            answer_bytes,
            ..
        } = link;
        up.reset();
        let unacked = sys::unacked_bytes(self.client.sock()).unwrap_or(0);
        log::warn!(
            "proxy: upstream {} failed after {answer_bytes} answer bytes ({reason}); the client has yet to take {} of them: delivering those, then resetting its connection; upload {}",
            policy.upstream,
            answer.len() + unacked,
            spool.kept_as()
        );
        spool.keep_incomplete(&mut cx.disk);
        let (key, id) = (self.key, self.id);
        State::Cutting(Cut {
            rest: answer,
            answer_bytes,
            unacked,
            timer: cx
                .timers
                .schedule(Instant::now() + FIRST_LOOK, Timer::Cut { key, id }),
            every: FIRST_LOOK,
            limit: self.idle_timer.is_none().then_some(NO_PROGRESS_MAX),
        })
    }

    /// The look timer fired: arm the next one, further off. (The loop
    /// drives the transfer next, which looks.)
    pub fn cut_look(&mut self, cx: &mut Context<Timer>) {
        let (key, id) = (self.key, self.id);
        if let State::Cutting(cut) = &mut self.state {
            cut.every = (cut.every * 2).min(LAST_LOOK);
            cut.timer = cx
                .timers
                .schedule(Instant::now() + cut.every, Timer::Cut { key, id });
        }
    }

    /// The client has every answer byte: reset its connection now.
    pub(super) fn cut_delivered(&mut self, cut: Cut) -> State {
        log::debug!(
            "proxy: #{} client {} has all {} bytes of the cut answer: resetting its connection",
            self.key,
            self.client_addr,
            cut.answer_bytes
        );
        State::Done {
            outcome: Outcome::Aborted,
            clean: false,
        }
    }

    /// The client reset, or took nothing for the idle timeout, while the
    /// cut answer drained.
    pub(super) fn cut_lost(&mut self, cut: Cut, e: io::Error, cx: &mut Context<Timer>) -> State {
        cx.aborts.warn(format_args!(
            "proxy: client {} did not take the rest of the cut answer ({e}): {} of its {} bytes not delivered; connection reset",
            self.client_addr,
            cut.untaken(),
            cut.answer_bytes
        ));
        State::aborted()
    }
}
