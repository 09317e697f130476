//! One server connection: a socket, a file, and the three states between
//! accept and close.
//!
//! ```text
//!   accept ──> Receiving ──── client EOF ───> Finishing ──── named ────> Answering ──> close
//!              read until WouldBlock into     last writes, trim,       our line, then
//!              chunks the ring writes to      (fsync,) rename,         a clean close
//!              <name>.part                    (fsync the directory)
//!                 │  (refused: too large, the file not created, a write       ▲
//!                 │   or a sync or the rename failed: the file removed) ──────┘ ERR
//!      └─ client resets or goes idle: remove <name>.part, close
//! ```
//!
//! Every file operation goes through the loop's `Disk` (see `upload`): a
//! connection asks, and its completions come back to it through the loop
//! (`server::files`), which drives it again. `Receiving` reads only
//! while its file exists and has room (memory, writes in flight); while it
//! waits for us, its bytes wait in the kernel.
//!
//! `Answering` is a [`Reply`]: the `OK` line (or `ERR`), and the bounded
//! drain that keeps a refused client from turning our close into a reset
//! that would destroy the line before it is read (see `event_loop::reply`).

use std::net::SocketAddr;
use std::time::Instant;

use crate::answer::Answer;
use crate::error::brief;
use crate::event_loop::disk::{Disk, Done};
use crate::event_loop::{Io, Peer, RateWindow, Reply, ReplyStep, Throttle, TimerId};
use crate::human::mb_per_s;
use crate::store::Store;

use super::sink::Sink;
use super::upload::{Trouble, Upload};
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
    /// The upload is complete: its file is being written out, synced and
    /// named (see `upload`). Nothing is read.
    Finishing(Box<Upload>),
    /// Refused: the file is being removed (through the ring), and the
    /// `ERR` waits until it is gone, so that no `.part` outlives the answer.
    Removing(Box<Upload>, Reply),
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

/// What closing a connection left behind.
pub(super) enum Closed {
    /// An upload in progress, aborted: its file is being removed.
    Aborted,
    /// A complete upload still being named: the loop finishes it (see
    /// `server::files`).
    Finishing(Box<Upload>),
    /// Nothing.
    Done,
}

/// What the loop lends a connection while it is driven: its rules, the
/// disk, the scratch buffer, the counters.
pub(super) struct Lent<'a> {
    pub policy: Policy,
    pub disk: &'a mut Disk,
    pub scratch: &'a mut [u8],
    pub stats: &'a mut Stats,
    pub aborts: &'a mut Throttle,
}

impl State {
    /// Upload bytes received so far, while receiving.
    pub fn received(&self) -> Option<u64> {
        match self {
            State::Receiving(sink) => Some(sink.bytes()),
            State::Finishing(_) | State::Removing(..) | State::Answering(_) => None,
        }
    }

    /// True when the server, not the client, is why nothing was read
    /// lately (see `Upload::held_back`): no window is judged, no idle
    /// time counted.
    pub fn held_back(&mut self) -> bool {
        match self {
            State::Receiving(Sink::File(upload)) => upload.held_back(),
            State::Finishing(_) | State::Removing(..) => true,
            State::Receiving(Sink::Discard { .. }) | State::Answering(_) => false,
        }
    }

    /// True while the server, not the client, is why nothing is read: the
    /// file is being created, memory or writes are at their bound, or the
    /// upload is being named.
    pub fn paused(&self) -> bool {
        match self {
            State::Receiving(Sink::File(upload)) => upload.paused(),
            State::Finishing(_) | State::Removing(..) => true,
            State::Receiving(Sink::Discard { .. }) | State::Answering(_) => false,
        }
    }

    /// The state for refusing an upload with `reason`.
    pub fn refusal(reason: &str) -> State {
        State::Answering(Reply::new(&Answer::err(reason)))
    }

    fn name(&self) -> &'static str {
        match self {
            State::Receiving(_) => "Receiving",
            State::Finishing(_) => "Finishing",
            State::Removing(..) => "Removing",
            State::Answering(_) => "Answering",
        }
    }
}

impl Conn {
    /// Moves to the state `step` makes of the current one, which it takes
    /// by value (so what each state owns is handed on or disposed of in
    /// one place), tracing the change. Every transition goes through here.
    fn set_state(&mut self, step: impl FnOnce(State) -> State) {
        let old = std::mem::replace(&mut self.state, State::refusal(""));
        let from = old.name();
        self.state = step(old);
        log::trace!("{} state {from} -> {}", self.peer.who(), self.state.name());
    }

    /// Refuses the upload in progress: removes its partial file (through
    /// the ring) and queues `ERR reason`, to be sent once the file is gone.
    fn refuse(&mut self, reason: &str, stats: &mut Stats, disk: &mut Disk) {
        stats.refused += 1;
        let reply = Reply::new(&Answer::err(reason));
        self.set_state(|old| match old {
            State::Receiving(Sink::File(mut upload)) | State::Finishing(mut upload) => {
                upload.remove(disk);
                State::Removing(upload, reply)
            }
            _ => State::Answering(reply),
        });
    }

    /// Refuses the upload for what went wrong with its file, saying so the
    /// way each stage always has.
    fn refuse_for(&mut self, trouble: Trouble, lent: &mut Lent<'_>) {
        let fate = match &self.state {
            State::Receiving(sink) => sink.fate().to_string(),
            State::Finishing(upload) => Sink::fate_of(upload),
            _ => String::new(),
        };
        let reason = match trouble {
            Trouble::Create(e) => {
                log::warn!("server: refusing upload from {}: {e}", self.addr);
                format!("cannot store upload: {}", brief(&e))
            }
            Trouble::Write(e) => {
                log::warn!(
                    "server: writing the upload from {}: {e}; upload refused, {fate}",
                    self.addr
                );
                format!("storing upload failed: {}", brief(&e))
            }
            Trouble::Finish(e) => {
                log::warn!("server: {e}; upload from {} refused", self.addr);
                format!("storing upload failed: {}", brief(&e))
            }
        };
        self.refuse(&reason, lent.stats, lent.disk);
    }

    /// One of this connection's disk operations has completed. Returns it
    /// if the connection has no file to take it (the caller removes a file
    /// made for nobody).
    pub fn on_done(&mut self, done: Done, store: &mut Store, disk: &mut Disk) -> Option<Done> {
        match &mut self.state {
            State::Receiving(Sink::File(upload))
            | State::Finishing(upload)
            | State::Removing(upload, _) => {
                upload.on_done(done, store, disk);
                None
            }
            _ => Some(done),
        }
    }

    /// True when a disk completion must drive this connection (see
    /// `Upload::wants_drive`): finishing and refusals move on only so.
    pub fn wants_drive(&self) -> bool {
        match &self.state {
            State::Receiving(Sink::File(upload)) => upload.wants_drive(),
            State::Finishing(_) | State::Removing(..) => true,
            State::Receiving(Sink::Discard { .. }) | State::Answering(_) => false,
        }
    }

    /// Makes all the progress the socket's readiness and the file allow.
    pub fn drive(&mut self, lent: &mut Lent<'_>) -> Next {
        loop {
            match &mut self.state {
                State::Receiving(sink) => {
                    if let Sink::File(upload) = sink {
                        if let Some(trouble) = upload.take_trouble() {
                            self.refuse_for(trouble, lent);
                            continue;
                        }
                    }
                    // Seed step 2: read the data. Drain until WouldBlock:
                    // edge-triggered readiness will not tell us again about
                    // bytes we leave behind. A file's bytes go straight into
                    // the chunk its disk write will take; with no room (the
                    // file not there yet, or memory or writes at their
                    // bound), reading waits for a completion, and the
                    // readiness flag stays set.
                    let read = match sink {
                        Sink::File(upload) => match upload.room(lent.disk) {
                            Some(room) => self.peer.read(room),
                            None => return Next::Keep,
                        },
                        Sink::Discard { .. } => self.peer.read(lent.scratch),
                    };
                    match read {
                        Io::Data(n) => {
                            self.last_active = Instant::now();
                            lent.stats.received += n as u64;
                            if let Some(limit) = lent.policy.max_bytes {
                                if sink.bytes() + n as u64 > limit {
                                    log::warn!(
                                        "server: upload from {} passed --max-bytes {limit}: refused",
                                        self.addr
                                    );
                                    let reason = format!("too large: limit {limit} bytes");
                                    self.refuse(&reason, lent.stats, lent.disk);
                                    continue;
                                }
                            }
                            // Seed step 3: store the data (in the chunk, and
                            // to the disk once it is full).
                            match sink {
                                Sink::File(upload) => upload.commit(n, lent.disk),
                                Sink::Discard { .. } => sink.discard_more(&lent.scratch[..n]),
                            }
                        }
                        Io::Eof => {
                            // The client's half-close: the upload is complete.
                            self.last_active = Instant::now();
                            let (addr, started) = (self.addr, self.started);
                            self.set_state(|old| match old {
                                State::Receiving(Sink::File(mut upload)) => {
                                    upload.eof(lent.disk);
                                    State::Finishing(upload)
                                }
                                State::Receiving(discard) => {
                                    let answer = finish_upload(discard, addr, started, lent);
                                    State::Answering(Reply::new(&answer))
                                }
                                other => other,
                            });
                        }
                        Io::Blocked => {
                            // Nothing more for now: what was read goes to
                            // the disk, so an idle connection holds no chunk.
                            if let Sink::File(upload) = sink {
                                upload.flush(lent.disk);
                            }
                            return Next::Keep;
                        }
                        Io::Failed(e) => {
                            // A reset (or any error) before EOF: the upload
                            // is not complete, so it must not get a final
                            // name. Nobody is left to answer. (A connection
                            // reset before its first byte is a port scan or
                            // a change of mind: not worth a warning.)
                            if sink.bytes() == 0 {
                                log::debug!(
                                    "server: {} reset before sending anything ({e})",
                                    self.addr
                                );
                            } else {
                                lent.aborts.warn(format_args!(
                                    "server: upload from {} aborted after {} bytes ({e}); {}",
                                    self.addr,
                                    sink.bytes(),
                                    sink.fate()
                                ));
                            }
                            lent.stats.aborted += 1;
                            return Next::Abort;
                        }
                    }
                }
                State::Finishing(upload) => match upload.advance_to_end(lent.disk) {
                    None => return Next::Keep,
                    Some(Err(trouble)) => self.refuse_for(trouble, lent),
                    Some(Ok(())) => {
                        let (addr, started) = (self.addr, self.started);
                        self.set_state(|old| match old {
                            State::Finishing(upload) => {
                                let answer = finish_upload(Sink::File(upload), addr, started, lent);
                                State::Answering(Reply::new(&answer))
                            }
                            other => other,
                        });
                    }
                },
                State::Removing(upload, _) => {
                    if !upload.settled() {
                        return Next::Keep;
                    }
                    self.set_state(|old| match old {
                        State::Removing(upload, reply) => {
                            upload.close(lent.disk);
                            State::Answering(reply)
                        }
                        other => other,
                    });
                }
                // Seed steps 4 and 5: send the answer, close.
                State::Answering(reply) => match reply.drive(&mut self.peer, lent.scratch) {
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
    /// loses its partial file: it must never get a final name. A complete
    /// one still being named is handed back, to be finished.
    pub fn close(self, clean: bool, disk: &mut Disk) -> Closed {
        let closed = match self.state {
            State::Receiving(sink) => {
                sink.abandon(disk);
                Closed::Aborted
            }
            State::Finishing(upload) => Closed::Finishing(upload),
            State::Removing(upload, _) => {
                upload.abandon(disk);
                Closed::Done
            }
            State::Answering(_) => Closed::Done,
        };
        if clean {
            self.peer.close();
        }
        closed
    }
}

/// The upload in `part` is complete (a file named, or a discarded upload
/// counted): counts and logs it, lets go of its file (through the ring),
/// and returns the `OK` answer.
fn finish_upload(part: Sink, addr: SocketAddr, started: Instant, lent: &mut Lent<'_>) -> Answer {
    let stats = &mut *lent.stats;
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
    let answer = Answer::Ok {
        bytes: part.bytes(),
        crc32c: part.crc32c(),
        file: part.name().to_string(),
    };
    if let Sink::File(upload) = part {
        upload.close(lent.disk);
    }
    answer
}
