//! One server connection: a socket, a file, and the two states between
//! accept and close.
//!
//! ```text
//!   accept ──> Receiving ──── client EOF: rename <name>.part to <name> ───> Answering ──> close
//!              read until WouldBlock,           (or refuse: too large,     our line, then
//!              append to <name>.part             write failed) ──────────> a clean close
//!      └─ client resets or goes idle: remove <name>.part, close
//! ```
//!
//! `Answering` is a [`Reply`]: the `OK` line (or `ERR`), and the bounded
//! drain that keeps a refused client from turning our close into a reset
//! that would destroy the line before it is read (see `event_loop::reply`).

use std::net::SocketAddr;
use std::time::Instant;

use crate::answer::Answer;
use crate::error::brief;
use crate::event_loop::{Io, Peer, RateWindow, Reply, ReplyStep, Throttle, TimerId};
use crate::human::mb_per_s;

use super::sink::Sink;
use super::Stats;

/// One client connection.
pub(super) struct Conn {
    /// Unique for the server's lifetime (slab keys are reused; ids are not).
    pub id: u64,
    pub peer: Peer,
    pub addr: SocketAddr,
    pub started: Instant,
    /// Last time a byte moved either way (for the idle timeout).
    pub last_active: Instant,
    pub idle_timer: Option<TimerId>,
    /// The `--min-rate` window, and its timer while the upload runs.
    pub rate: RateWindow,
    pub rate_timer: Option<TimerId>,
    pub state: State,
}

/// The life of one server connection. See the module docs.
pub(super) enum State {
    /// The upload is streaming into `<name>.part` (or, with `--discard`,
    /// only into its count and checksum).
    Receiving(Sink),
    /// Writing our answer line, then closing cleanly.
    Answering(Reply),
}

/// The per-upload rules a connection needs while it is driven.
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    pub max_bytes: Option<u64>,
    pub fsync: bool,
}

/// What the loop should do with a connection after driving it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Keep,
    /// Done well: close gracefully (our answer, then a FIN).
    Close,
    /// Broken or refused past saving: close with a reset.
    Abort,
}

impl State {
    /// Upload bytes received so far, while receiving.
    pub fn received(&self) -> Option<u64> {
        match self {
            State::Receiving(part) => Some(part.bytes()),
            State::Answering(_) => None,
        }
    }

    /// The state for refusing an upload with `reason`.
    pub fn refusal(reason: &str) -> State {
        State::Answering(Reply::new(&Answer::err(reason)))
    }

    fn name(&self) -> &'static str {
        match self {
            State::Receiving(_) => "Receiving",
            State::Answering(_) => "Answering",
        }
    }
}

impl Conn {
    /// Moves to `next`, tracing the change. Every transition goes through
    /// here; the old state is returned for the caller to dispose of.
    fn set_state(&mut self, next: State) -> State {
        log::trace!(
            "{} state {} -> {}",
            self.peer.who(),
            self.state.name(),
            next.name()
        );
        std::mem::replace(&mut self.state, next)
    }

    /// Refuses the upload in progress: removes its partial file and
    /// queues `ERR reason`.
    fn refuse(&mut self, reason: &str, stats: &mut Stats) {
        stats.refused += 1;
        if let State::Receiving(part) = self.set_state(State::refusal(reason)) {
            part.abandon();
        }
    }

    /// Makes all the progress the socket's readiness allows.
    pub fn drive(
        &mut self,
        scratch: &mut [u8],
        stats: &mut Stats,
        policy: Policy,
        aborts: &mut Throttle,
    ) -> Next {
        loop {
            match &mut self.state {
                State::Receiving(part) => {
                    // Seed step 2: read the data. Drain until WouldBlock:
                    // edge-triggered readiness will not tell us again about
                    // bytes we leave behind.
                    match self.peer.read(scratch) {
                        Io::Data(n) => {
                            self.last_active = Instant::now();
                            stats.received += n as u64;
                            if let Some(limit) = policy.max_bytes {
                                if part.bytes() + n as u64 > limit {
                                    log::warn!(
                                        "server: upload from {} passed --max-bytes {limit}: refused",
                                        self.addr
                                    );
                                    self.refuse(&format!("too large: limit {limit} bytes"), stats);
                                    continue;
                                }
                            }
                            // Seed step 3: store the data.
                            if let Err(e) = part.write(&scratch[..n]) {
                                log::warn!(
                                    "server: writing the upload from {}: {e}; upload refused, {}",
                                    self.addr,
                                    part.fate()
                                );
                                self.refuse(
                                    &format!("storing upload failed: {}", brief(&e)),
                                    stats,
                                );
                            }
                        }
                        Io::Eof => {
                            // The client's half-close: the upload is complete.
                            self.last_active = Instant::now();
                            let finished =
                                finish_upload(part, self.addr, self.started, stats, policy);
                            let answer = finished.as_ref().unwrap_or_else(|refusal| refusal);
                            let old = self.set_state(State::Answering(Reply::new(answer)));
                            if let (Err(_), State::Receiving(part)) = (finished, old) {
                                part.abandon();
                            }
                        }
                        Io::Blocked => return Next::Keep,
                        Io::Failed(e) => {
                            // A reset (or any error) before EOF: the upload
                            // is not complete, so it must not get a final
                            // name. Nobody is left to answer. (A connection
                            // reset before its first byte is a port scan or
                            // a change of mind: not worth a warning.)
                            if part.bytes() == 0 {
                                log::debug!(
                                    "server: {} reset before sending anything ({e})",
                                    self.addr
                                );
                            } else {
                                aborts.warn(format_args!(
                                    "server: upload from {} aborted after {} bytes ({e}); {}",
                                    self.addr,
                                    part.bytes(),
                                    part.fate()
                                ));
                            }
                            stats.aborted += 1;
                            return Next::Abort;
                        }
                    }
                }
                // Seed steps 4 and 5: send the answer, close.
                State::Answering(reply) => match reply.drive(&mut self.peer, scratch) {
                    ReplyStep::Pending(moved) => {
                        if moved {
                            self.last_active = Instant::now();
                        }
                        return Next::Keep;
                    }
                    ReplyStep::Done => return Next::Close,
                    ReplyStep::Failed(e) => {
                        if !reply.line_sent() {
                            log::warn!("server: sending answer to {}: {e}", self.addr);
                        }
                        return Next::Abort;
                    }
                    ReplyStep::Flooded => {
                        log::warn!(
                            "server: client {} kept sending after being refused: closed",
                            self.addr
                        );
                        return Next::Abort;
                    }
                },
            }
        }
    }

    /// Closes the connection: gracefully if `clean`, with a reset
    /// otherwise. An upload still in progress (reset, idle, shutdown)
    /// loses its partial file: it must never get a final name. Returns
    /// true if one was.
    pub fn close(self, clean: bool) -> bool {
        let receiving = match self.state {
            State::Receiving(part) => {
                part.abandon();
                true
            }
            State::Answering(_) => false,
        };
        if clean {
            self.peer.close();
        }
        receiving
    }
}

/// On the client's EOF: give the file its final name and return the
/// `OK` answer, or, if that fails, the `ERR` answer (the caller removes
/// the file).
fn finish_upload(
    part: &mut Sink,
    addr: SocketAddr,
    started: Instant,
    stats: &mut Stats,
    policy: Policy,
) -> Result<Answer, Answer> {
    if let Err(e) = part.finish(policy.fsync) {
        log::warn!("server: {e}; upload from {} refused", addr);
        stats.refused += 1;
        return Err(Answer::err(format!("storing upload failed: {}", brief(&e))));
    }
    let elapsed = started.elapsed();
    let what = match part {
        Sink::File(_) => {
            stats.stored += 1;
            stats.bytes += part.bytes();
            format!("stored {}", part.name())
        }
        Sink::Discard { .. } => {
            stats.discarded += 1;
            "discarded upload".to_string()
        }
    };
    log::info!(
        "server: {what} from {}: {} bytes in {:.3}s ({:.1} MB/s) crc32c={:08x}",
        addr,
        part.bytes(),
        elapsed.as_secs_f64(),
        mb_per_s(part.bytes(), elapsed),
        part.crc32c()
    );
    Ok(Answer::Ok {
        bytes: part.bytes(),
        crc32c: part.crc32c(),
        file: part.name().to_string(),
    })
}
