//! One direction's toxics at work: a delay queue that never sleeps.
//!
//! Bytes go in as they are read ([`Pipe::push`]), stamped with the time
//! they arrived. Each toxic of the chain, in order, says when each piece
//! may leave: `latency` adds its delay to the piece's time (so a chunk
//! waits `latency` from when *it* arrived, and delays do not add up from
//! one chunk to the next, but two latency toxics in a chain do add up,
//! like toxiproxy's, whose chunks carry their timestamp from toxic to
//! toxic); `bandwidth` is a token bucket kept as "the link is free at"
//! (each piece leaves `len / rate` after the later of its arrival and the
//! previous piece's departure); `slicer` cuts a chunk into slices `delay`
//! apart. The pieces then wait in one queue, in order, each with the
//! instant it is due ([`Pipe::ready`]); the caller writes what is due and
//! arms one loop timer for [`Pipe::next_due`]. Nothing here sleeps or
//! touches a socket, so every rule is testable with a made-up clock.
//!
//! **Memory is bounded**: the queue holds at most [`MAX_QUEUED`] bytes;
//! [`Pipe::room`] says how much more it takes, and the caller stops
//! reading its source when it is zero, which pushes back on the sender
//! through TCP as the proxy's other back-pressure does.
//!
//! The toxics that end a connection (`timeout`, `reset_peer`,
//! `limit_data`, `limit_time`) do not close anything themselves: they set
//! [`Pipe::end`], and the transfer closes both sides when it is due.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Kind, Rng, Toxic};

/// Most bytes a direction holds back at once (per connection, per
/// direction): past that its source is not read.
pub const MAX_QUEUED: usize = 64 * 1024;

/// How a toxic ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed with a FIN (`timeout`, `limit_data`, `limit_time`).
    Close,
    /// Both sides reset (`reset_peer`).
    Reset,
}

/// One toxic of the chain, with what it remembers about this connection.
#[derive(Debug)]
struct Stage {
    name: String,
    kind: Kind,
    /// When this toxic started acting on the connection.
    started: Instant,
    /// When its last piece left (latency, bandwidth, slicer keep order).
    last_out: Option<Instant>,
    /// Bytes it has let through (`limit_data`).
    passed: u64,
    /// `limit_data` has let its bytes through.
    reached: bool,
}

/// A piece of data and the instant it may leave.
#[derive(Debug)]
struct Segment {
    due: Instant,
    data: Vec<u8>,
}

/// The toxics of one direction of one connection.
#[derive(Debug)]
pub struct Pipe {
    stages: Vec<Stage>,
    queue: VecDeque<Segment>,
    /// Bytes in `queue`.
    queued: usize,
    /// The source's EOF has come in; it may pass at `eof_at`, once the
    /// queue is empty.
    eof_at: Option<Instant>,
    eof_passed: bool,
    /// A toxic ends the connection at this instant.
    end: Option<(Instant, End)>,
    /// `limit_data` reached its bytes: close once the queue is written.
    close_when_drained: bool,
    /// Bytes that had to wait (their due instant was later than their
    /// arrival), for the metrics.
    pub delayed: u64,
    /// Bytes dropped (`timeout`, `reset_peer`, past `limit_data`).
    pub dropped: u64,
    rng: Rng,
}

impl Pipe {
    /// The pipeline of the toxics in `chain` that this connection draws
    /// (each with its toxicity), starting at `now`.
    pub fn draw<'a>(
        chain: impl IntoIterator<Item = &'a Toxic>,
        now: Instant,
        mut rng: Rng,
    ) -> Pipe {
        let stages = chain
            .into_iter()
            .filter(|t| rng.chance(t.toxicity))
            .map(|t| Stage::new(t, now))
            .collect();
        let mut pipe = Pipe {
            stages,
            queue: VecDeque::new(),
            queued: 0,
            eof_at: None,
            eof_passed: false,
            end: None,
            close_when_drained: false,
            delayed: 0,
            dropped: 0,
            rng,
        };
        pipe.plan_end();
        pipe
    }

    /// True when this direction has nothing to do: no toxic, nothing
    /// queued, no EOF or end pending. Its bytes then take the fast path.
    pub fn is_idle(&self) -> bool {
        self.stages.is_empty()
            && self.queue.is_empty()
            && self.eof_at.is_none()
            && self.end.is_none()
            && !self.close_when_drained
    }

    /// True when the connection drew no toxic for this direction.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// The names of the toxics drawn, in chain order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.stages.iter().map(|s| s.name.as_str())
    }

    /// The proxy's toxics changed (the API): keep the stages still there
    /// (with their attributes updated and their state kept), drop the
    /// removed ones, and draw the new ones. Bytes already queued keep
    /// their due instants: nothing is lost or reordered.
    pub fn rechain<'a>(&mut self, chain: impl IntoIterator<Item = &'a Toxic>, now: Instant) {
        let mut old = std::mem::take(&mut self.stages);
        for t in chain {
            match old.iter().position(|s| s.name == t.name) {
                Some(i) if old[i].kind.type_name() == t.kind.type_name() => {
                    let mut stage = old.swap_remove(i);
                    stage.kind = t.kind;
                    self.stages.push(stage);
                }
                _ if self.rng.chance(t.toxicity) => self.stages.push(Stage::new(t, now)),
                _ => {}
            }
        }
        self.plan_end();
    }

    /// The earliest end the toxics of the chain set: `timeout` and
    /// `limit_time` from when they started, a `reset_peer` already
    /// triggered, a `limit_data` already reached. A removed toxic ends
    /// nothing.
    fn plan_end(&mut self) {
        let resets = self
            .stages
            .iter()
            .any(|s| matches!(s.kind, Kind::ResetPeer { .. }));
        self.end = self.end.filter(|(_, how)| resets && *how == End::Reset);
        self.close_when_drained = self.stages.iter().any(|s| s.reached);
        let timed: Vec<Instant> = self
            .stages
            .iter()
            .filter_map(|s| match s.kind {
                Kind::Timeout { timeout } if timeout > 0 => Some(s.started + ms(timeout)),
                Kind::LimitTime { duration } if duration > 0 => Some(s.started + ms(duration)),
                _ => None,
            })
            .collect();
        for at in timed {
            self.end_at(at, End::Close);
        }
    }

    fn end_at(&mut self, at: Instant, how: End) {
        if self.end.is_none_or(|(t, _)| at < t) {
            self.end = Some((at, how));
        }
    }

    /// How many more bytes the queue takes now.
    pub fn room(&self) -> usize {
        if self.eof_at.is_some() || self.close_when_drained {
            return 0;
        }
        MAX_QUEUED.saturating_sub(self.queued)
    }

    /// Bytes held back now.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Takes `data` (at most [`Pipe::room`] bytes), read at `now`, through
    /// the chain into the queue.
    pub fn push(&mut self, now: Instant, data: &[u8]) {
        let mut pieces = vec![(now, data.to_vec())];
        for i in 0..self.stages.len() {
            pieces = self.apply(i, pieces);
        }
        for (due, data) in pieces {
            if data.is_empty() {
                continue;
            }
            let due = match self.queue.back() {
                Some(last) => due.max(last.due),
                None => due,
            };
            if due > now {
                self.delayed += data.len() as u64;
            }
            self.queued += data.len();
            self.queue.push_back(Segment { due, data });
        }
    }

    /// Stage `i`'s rule applied to the pieces coming out of stage `i - 1`.
    fn apply(&mut self, i: usize, pieces: Vec<(Instant, Vec<u8>)>) -> Vec<(Instant, Vec<u8>)> {
        let mut out = Vec::with_capacity(pieces.len());
        let kind = self.stages[i].kind;
        for (at, data) in pieces {
            let s = &mut self.stages[i];
            let after = |s: &Stage, t: Instant| s.last_out.map_or(t, |l| l.max(t));
            match kind {
                Kind::Latency { latency, jitter } => {
                    let mut delay = latency as i64;
                    if jitter > 0 {
                        delay += self.rng.below(2 * jitter) as i64 - jitter as i64;
                    }
                    let due = after(s, at + ms(delay.max(0) as u64));
                    s.last_out = Some(due);
                    out.push((due, data));
                }
                Kind::Bandwidth { rate } if rate > 0 => {
                    // rate KB/s = rate bytes per ms; pieces of at most
                    // 100 ms of it, like toxiproxy's.
                    let most = (rate * 100).max(1) as usize;
                    for piece in data.chunks(most) {
                        let start = after(s, at);
                        let due =
                            start + Duration::from_nanos(piece.len() as u64 * 1_000_000 / rate);
                        s.last_out = Some(due);
                        out.push((due, piece.to_vec()));
                    }
                }
                Kind::Slicer {
                    average_size,
                    size_variation,
                    delay,
                } if average_size > 0 => {
                    let mut cuts = vec![0];
                    slice(
                        &mut self.rng,
                        0,
                        data.len(),
                        average_size as usize,
                        size_variation as usize,
                        &mut cuts,
                    );
                    let s = &mut self.stages[i];
                    let mut due = after(s, at);
                    for (k, w) in cuts.windows(2).enumerate() {
                        if k > 0 {
                            due += Duration::from_micros(delay);
                        }
                        out.push((due, data[w[0]..w[1]].to_vec()));
                    }
                    s.last_out = Some(due);
                }
                Kind::Timeout { .. } => self.dropped += data.len() as u64,
                Kind::ResetPeer { timeout } => {
                    self.dropped += data.len() as u64;
                    if !data.is_empty() {
                        self.end_at(at + ms(timeout), End::Reset);
                    }
                }
                Kind::LimitData { bytes } => {
                    let take = (bytes - s.passed.min(bytes)).min(data.len() as u64) as usize;
                    s.passed += take as u64;
                    self.dropped += (data.len() - take) as u64;
                    if s.passed >= bytes {
                        s.reached = true;
                        self.close_when_drained = true;
                    }
                    out.push((at, data[..take].to_vec()));
                }
                _ => out.push((at, data)),
            }
        }
        out
    }

    /// The source's EOF came in at `now`: it passes after the bytes before
    /// it, and `slow_close`'s delays.
    pub fn push_eof(&mut self, now: Instant) {
        if self.eof_at.is_some() {
            return;
        }
        let mut at = now;
        for s in &self.stages {
            at = match s.kind {
                Kind::SlowClose { delay } => at + ms(delay),
                _ => s.last_out.map_or(at, |l| l.max(at)),
            };
        }
        self.eof_at = Some(at);
    }

    /// The bytes due at `now` (empty if none).
    pub fn ready(&self, now: Instant) -> &[u8] {
        match self.queue.front() {
            Some(seg) if seg.due <= now => &seg.data,
            _ => &[],
        }
    }

    /// The destination took `n` bytes of [`Pipe::ready`].
    pub fn consume(&mut self, n: usize) {
        let Some(front) = self.queue.front_mut() else {
            return;
        };
        self.queued -= n;
        if n >= front.data.len() {
            self.queue.pop_front();
        } else {
            front.data.drain(..n);
        }
    }

    /// True once the EOF may be passed on (it is due, and every byte
    /// before it is written); true once only.
    pub fn take_eof(&mut self, now: Instant) -> bool {
        match self.eof_at {
            Some(at) if !self.eof_passed && self.queue.is_empty() && at <= now => {
                self.eof_passed = true;
                true
            }
            _ => false,
        }
    }

    /// Whether the EOF has been passed on.
    pub fn eof_passed(&self) -> bool {
        self.eof_passed
    }

    /// Whether a toxic may end the connection (an end is planned or
    /// `limit_data` was reached): when not, there is no clock to read.
    pub fn may_end(&self) -> bool {
        self.end.is_some() || self.close_when_drained
    }

    /// A toxic's end of the connection, if it is due at `now`.
    pub fn end(&self, now: Instant) -> Option<End> {
        match self.end {
            Some((at, how)) if at <= now => Some(how),
            _ if self.close_when_drained && self.queue.is_empty() => Some(End::Close),
            _ => None,
        }
    }

    /// When something is next due (a queued piece, the EOF, an end), for
    /// the caller's timer; `None` when nothing waits on time.
    pub fn next_due(&self) -> Option<Instant> {
        let front = self.queue.front().map(|s| s.due);
        let eof = self
            .eof_at
            .filter(|_| !self.eof_passed && self.queue.is_empty());
        [front, eof, self.end.map(|(at, _)| at)]
            .into_iter()
            .flatten()
            .min()
    }
}

impl Stage {
    fn new(t: &Toxic, now: Instant) -> Stage {
        Stage {
            name: t.name.clone(),
            kind: t.kind,
            started: now,
            last_out: None,
            passed: 0,
            reached: false,
        }
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// toxiproxy's slicer: halve `start..end` (moved by up to +-`variation`)
/// until each piece is within `variation` of `average`; pushes the cuts.
fn slice(
    rng: &mut Rng,
    start: usize,
    end: usize,
    average: usize,
    variation: usize,
    cuts: &mut Vec<usize>,
) {
    if (end - start).saturating_sub(average) <= variation || end - start < 2 {
        cuts.push(end);
        return;
    }
    let mut mid = start + (end - start) / 2;
    if variation > 0 {
        let shift = rng.below(2 * variation as u64) as usize;
        mid = (mid + shift)
            .saturating_sub(variation)
            .clamp(start + 1, end - 1);
    }
    slice(rng, start, mid, average, variation, cuts);
    slice(rng, mid, end, average, variation, cuts);
}

#[cfg(test)]
#[path = "pipe_tests.rs"]
mod tests;
