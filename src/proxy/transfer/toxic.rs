//! Toxics on a transfer: the hooks between the per-direction pipelines of
//! `crate::toxics::pipe` and the transfer's sockets and timer.
//!
//! A transfer draws its toxics when it starts (each with its toxicity),
//! and its [`Link`] carries them: the upload goes spool -> `up` pipe ->
//! upstream, the answer upstream -> `down` pipe -> client. A pipe that
//! holds nothing and has no toxic is skipped (the fast path is the
//! untoxic code, unchanged: one `Option` check), so a proxy whose toxics
//! were not drawn (toxicity 0) costs what a proxy without toxics costs.
//!
//! The spool is written from the client's bytes as they arrive, as
//! always: **the recording is of what the client sent**, before any
//! upstream toxic.
//!
//! Time is a loop timer (`Timer::Toxic`), armed for the earliest instant
//! either pipe waits for, after every drive; never a sleep.

use std::io;
use std::time::Instant;

use crate::event_loop::{Context, Io, Peer};
use crate::toxics::pipe::{End, Pipe};
use crate::toxics::{Rng, Stream, Toxic};

use super::spool::Spool;
use super::upload::{Link, Source};
use super::{Happened, Outcome, State, Step, Timer, Transfer};

/// The toxics one transfer drew, per direction.
#[derive(Debug)]
pub struct Toxics {
    pub up: Pipe,
    pub down: Pipe,
}

/// What the toxics did to one transfer, for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct ToxicFigures {
    /// Toxics drawn (both directions).
    pub applied: u64,
    /// Bytes that waited in a pipe.
    pub delayed: u64,
    /// How a toxic ended the transfer, if one did.
    pub ended: Option<End>,
}

impl Toxics {
    /// Draws a new transfer's toxics from the proxy's `chain`; `None` when
    /// the proxy has none at all.
    pub fn draw(chain: &[Toxic], id: u64, now: Instant) -> Option<Box<Toxics>> {
        if chain.is_empty() {
            return None;
        }
        let of = |s: Stream| chain.iter().filter(move |t| t.stream == s);
        let t = Toxics {
            up: Pipe::draw(of(Stream::Upstream), now, Rng::seeded(id)),
            down: Pipe::draw(of(Stream::Downstream), now, Rng::seeded(!id)),
        };
        Some(Box::new(t))
    }

    /// Applies the proxy's new `chain` to a live transfer.
    pub fn rechain(&mut self, chain: &[Toxic], now: Instant) {
        self.up
            .rechain(chain.iter().filter(|t| t.stream == Stream::Upstream), now);
        self.down
            .rechain(chain.iter().filter(|t| t.stream == Stream::Downstream), now);
    }

    /// The drawn toxics, for the log: `latency_downstream, slicer_upstream`.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.up.names().chain(self.down.names()).collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    }
}

/// Writes what `pipe` has due at `now` to `to`, until it would block.
fn drain(pipe: &mut Pipe, to: &mut Peer, now: Instant) -> (bool, Option<io::Error>) {
    let mut moved = false;
    while to.is_writable() {
        let data = pipe.ready(now);
        if data.is_empty() {
            break;
        }
        let len = data.len();
        let (sent, failed) = to.write_ready(data);
        pipe.consume(sent);
        moved |= sent > 0;
        if failed.is_some() || sent < len {
            return (moved, failed);
        }
    }
    (moved, None)
}

impl Link {
    /// The upload pipe, when it has anything to do.
    pub(super) fn up_pipe(&mut self) -> Option<&mut Pipe> {
        self.toxics
            .as_deref_mut()
            .map(|t| &mut t.up)
            .filter(|p| !p.is_idle())
    }

    /// The answer pipe, when it has anything to do.
    pub(super) fn down_pipe(&mut self) -> Option<&mut Pipe> {
        self.toxics
            .as_deref_mut()
            .map(|t| &mut t.down)
            .filter(|p| !p.is_idle())
    }

    /// `forward_spool` through the upload's toxics: the spool's bytes go
    /// into the pipe while it has room (then back-pressure: the client is
    /// not read past `LAG_LIMIT`), and what is due goes upstream.
    pub(super) fn forward_spool_toxic(&mut self, spool: &mut Spool) -> Step {
        let now = Instant::now();
        let Link {
            up,
            toxics,
            forwarded,
            source: Source::Spool,
            ..
        } = self
        else {
            return Ok(false);
        };
        let Some(pipe) = toxics.as_deref_mut().map(|t| &mut t.up) else {
            return Ok(false);
        };
        let mut moved = false;
        while !up.broken() && !up.shut() && spool.bytes() > *forwarded && pipe.room() > 0 {
            let data = spool.bytes_at(*forwarded);
            if data.is_empty() {
                let e = io::Error::other(format!("lost upload bytes at {forwarded}"));
                return Err(Happened::SpoolFailed(e));
            }
            let n = data.len().min(pipe.room());
            pipe.push(now, &data[..n]);
            *forwarded += n as u64;
            moved = true;
        }
        if !up.broken() && !up.shut() {
            let (sent, failed) = drain(pipe, up, now);
            moved |= sent;
            if let Some(e) = failed {
                self.upstream_broke(&e);
            }
        }
        Ok(moved)
    }

    /// Room in the upload pipe (hold mode), `None` without toxics there.
    pub(super) fn held_room(&mut self) -> Option<usize> {
        self.up_pipe().map(|p| p.room())
    }

    /// Writes the upload pipe's due bytes upstream (hold mode).
    pub(super) fn drain_up(&mut self) -> bool {
        let now = Instant::now();
        let Some(t) = self.toxics.as_deref_mut() else {
            return false;
        };
        let (moved, failed) = drain(&mut t.up, &mut self.up, now);
        if let Some(e) = failed {
            self.upstream_broke(&e);
        }
        moved
    }

    /// `pass_eof` through the upload's toxics: the FIN goes after the
    /// pipe's bytes, when `slow_close` lets it.
    pub(super) fn pass_eof_toxic(&mut self, ready: bool) -> bool {
        let now = Instant::now();
        let Some(t) = self.toxics.as_deref_mut() else {
            return false;
        };
        if ready {
            t.up.push_eof(now);
        }
        if t.up.take_eof(now) {
            self.up.shutdown_write();
            return true;
        }
        false
    }

    /// `relay_answer` through the answer's toxics. Answer bytes go into the
    /// pipe (at most its room: then the upstream is not read), and what is
    /// due goes to the client when `deliver`.
    pub(super) fn relay_answer_toxic(
        &mut self,
        client: &mut Peer,
        scratch: &mut [u8],
        deliver: bool,
    ) -> Step {
        let now = Instant::now();
        let Some(t) = self.toxics.as_deref_mut() else {
            return Ok(false);
        };
        let pipe = &mut t.down;
        let mut moved = false;
        if !self.answer.is_empty() {
            // Bytes read before the toxic came: first in line.
            pipe.push(now, &self.answer);
            self.answer = Vec::new();
        }
        loop {
            if deliver {
                let (sent, failed) = drain(pipe, client, now);
                moved |= sent;
                if let Some(e) = failed {
                    return Err(Happened::ClientLost(e));
                }
            }
            if self.up.eof() || pipe.room() == 0 {
                break;
            }
            let want = pipe
                .room()
                .min(scratch.len())
                .min(super::answer::ANSWER_CHUNK);
            match self.up.read(&mut scratch[..want]) {
                Io::Data(n) => {
                    self.answer_bytes += n as u64;
                    pipe.push(now, &scratch[..n]);
                    moved = true;
                }
                Io::Eof => {
                    moved = true;
                    if self.answer_bytes == 0 {
                        let why = "closed the connection without answering".to_string();
                        return Err(Happened::UpstreamFailed(why));
                    }
                }
                Io::Blocked => break,
                Io::Failed(e) => {
                    self.up.end_reads();
                    moved = true;
                    if self.answer_bytes == 0 {
                        return Err(Happened::UpstreamFailed(crate::error::brief(&e)));
                    }
                    // The answer is cut: the bytes in the pipe go first, at
                    // their time; then, instead of the FIN, the cut.
                    log::debug!(
                        "proxy: #{} upstream failed after {} answer bytes: {e}; the toxics' {} first",
                        self.up.who().key,
                        self.answer_bytes,
                        pipe.queued()
                    );
                    self.cut = Some(crate::error::brief(&e));
                }
            }
        }
        if self.up.eof() {
            pipe.push_eof(now);
            if deliver && !client.shut() && pipe.take_eof(now) {
                if let Some(reason) = self.cut.take() {
                    return Err(Happened::UpstreamFailed(reason));
                }
                self.finish_answer(client);
                moved = true;
            }
        }
        Ok(moved)
    }

    /// A toxic's end of the connection, if one is due.
    pub(super) fn toxic_end(&self) -> Option<End> {
        let t = self.toxics.as_deref()?;
        if !t.up.may_end() && !t.down.may_end() {
            return None;
        }
        let now = Instant::now();
        t.up.end(now).or_else(|| t.down.end(now))
    }

    /// When the toxics next need the loop (strictly after `now`).
    fn toxic_due(&self, now: Instant) -> Option<Instant> {
        let t = self.toxics.as_deref()?;
        [t.up.next_due(), t.down.next_due()]
            .into_iter()
            .flatten()
            .filter(|at| *at > now)
            .min()
    }
}

impl Transfer {
    /// After a drive: arms (or moves) the one toxic timer for the earliest
    /// instant a pipe waits for.
    pub(super) fn arm_toxic_timer(&mut self, cx: &mut Context<Timer>) {
        let toxic = match &self.state {
            State::Connecting { link, .. } | State::Streaming { link, .. } => link
                .toxics
                .as_deref()
                .is_some_and(|t| !t.up.is_idle() || !t.down.is_idle()),
            _ => false,
        };
        if !toxic && self.toxic_timer.is_none() {
            return; // the fast path: no toxic at work, no clock read
        }
        let due = match &self.state {
            State::Connecting { link, .. } | State::Streaming { link, .. } => {
                link.toxic_due(Instant::now())
            }
            _ => None,
        };
        if let (Some((_, at)), Some(due)) = (self.toxic_timer, due) {
            if at == due {
                return;
            }
        }
        if let Some((id, _)) = self.toxic_timer.take() {
            cx.timers.cancel(id);
        }
        if let Some(due) = due {
            let (key, id) = (self.key, self.id);
            self.toxic_timer = Some((cx.timers.schedule(due, Timer::Toxic { key, id }), due));
        }
    }

    /// The toxic timer fired (it is gone from the loop's timers).
    pub fn toxic_fired(&mut self) {
        self.toxic_timer = None;
    }

    /// The proxy's toxics changed: apply them to this live transfer.
    pub fn rechain(&mut self, chain: &[Toxic]) {
        let now = Instant::now();
        match &mut self.state {
            State::Connecting { link, .. } | State::Streaming { link, .. } => {
                match link.toxics.as_deref_mut() {
                    Some(t) => t.rechain(chain, now),
                    None => link.toxics = Toxics::draw(chain, self.id, now),
                }
            }
            _ => match self.drawn.as_deref_mut() {
                Some(t) => t.rechain(chain, now),
                None => self.drawn = Toxics::draw(chain, self.id, now),
            },
        }
    }

    /// What the toxics did to this transfer so far.
    pub fn toxic_figures(&self) -> ToxicFigures {
        let mut f = self.toxic_figures;
        if let State::Connecting { link, .. } | State::Streaming { link, .. } = &self.state {
            f.note(link);
        }
        f
    }

    /// A toxic ends the transfer: both sides closed (`Close`: a FIN) or
    /// reset. What the client sent is kept, whole if it was whole.
    pub(super) fn toxic_ended(
        &mut self,
        spool: Spool,
        link: Link,
        how: End,
        cx: &mut Context<Timer>,
    ) -> State {
        self.toxic_figures.note(&link);
        self.toxic_figures.ended = Some(how);
        log::debug!("proxy: #{} ended by a toxic ({how:?})", self.key);
        match how {
            End::Close => link.up.close(),
            End::Reset => link.up.reset(),
        }
        if !self.client.eof() {
            if spool.bytes() == 0 {
                spool.discard();
            } else {
                spool.keep_incomplete(&mut cx.disk);
            }
        }
        State::Done {
            outcome: Outcome::Aborted,
            clean: how == End::Close,
        }
    }
}

impl ToxicFigures {
    /// Takes in a link's figures (keeping the larger: a link's counters
    /// only grow).
    pub(super) fn note(&mut self, link: &Link) {
        if let Some(t) = link.toxics.as_deref() {
            self.applied = self
                .applied
                .max((t.up.names().count() + t.down.names().count()) as u64);
            self.delayed = self.delayed.max(t.up.delayed + t.down.delayed);
        }
    }
}
