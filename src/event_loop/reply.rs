//! Our own answer line to a peer, and a clean close after it.
//!
//! Both roles end some connections by writing one line of their own: the
//! server its `OK ...` or `ERR ...`, the proxy an `ERR ...` when the server
//! could not answer. Writing the line is the easy part. Closing after it is
//! where the trap is:
//!
//! **Closing a socket with unread input sends a reset, not a FIN**, and a
//! reset can destroy the line in the peer's receive buffer before the peer
//! has read it. A client we refuse half-way through its upload is still
//! sending, and, blocked in `write()`, it will not read our line until its
//! bytes are taken. So a [`Reply`] does three things, in this order:
//!
//! ```text
//!   swallow   read and drop whatever the peer sends, so it never blocks
//!   send      write the line (over several WRITABLE events if need be)
//!   close     if the peer has finished (its EOF was read): done;
//!             otherwise half-close, keep swallowing until its EOF, done
//! ```
//!
//! Swallowing is bounded by [`DISCARD_LIMIT`]: a peer that goes on
//! sending after it was told no is cut off ([`ReplyStep::Flooded`]).

use std::io;

use super::peer::{Io, Peer};
use crate::answer::Answer;

/// How many bytes of a refused upload we read into the void (so the client
/// can read our line before we close) before giving up and closing.
pub const DISCARD_LIMIT: u64 = 4 * 1024 * 1024;

/// One answer line on its way to a peer. See the module docs.
#[derive(Debug)]
pub struct Reply {
    line: Box<[u8]>,
    sent: usize,
    discarded: u64,
}

/// What [`Reply::drive`] achieved.
#[derive(Debug)]
pub enum ReplyStep {
    /// Still going; `true` if any byte moved (either way).
    Pending(bool),
    /// The line is delivered and the peer has finished: close now.
    Done,
    /// The peer broke while we wrote or read: close now.
    Failed(io::Error),
    /// The peer sent more than [`DISCARD_LIMIT`] after being refused.
    Flooded,
}

impl Reply {
    /// A reply carrying `answer`.
    pub fn new(answer: &Answer) -> Reply {
        Reply {
            line: answer.to_line().into_bytes().into_boxed_slice(),
            sent: 0,
            discarded: 0,
        }
    }

    /// True once the whole line has been written.
    pub fn line_sent(&self) -> bool {
        self.sent == self.line.len()
    }

    /// Makes all the progress `peer`'s readiness allows.
    pub fn drive(&mut self, peer: &mut Peer, scratch: &mut [u8]) -> ReplyStep {
        let mut moved = false;
        // Swallow first: a client blocked in write() reads nothing.
        while peer.is_readable() {
            match peer.read(scratch) {
                Io::Data(n) => {
                    moved = true;
                    self.discarded += n as u64;
                    if self.discarded > DISCARD_LIMIT {
                        return ReplyStep::Flooded;
                    }
                }
                Io::Eof => moved = true,
                Io::Blocked => break,
                Io::Failed(e) => return ReplyStep::Failed(e),
            }
        }
        if !self.line_sent() {
            let (n, failed) = peer.write_ready(&self.line[self.sent..]);
            self.sent += n;
            moved |= n > 0;
            if let Some(e) = failed {
                return ReplyStep::Failed(e);
            }
            if !self.line_sent() {
                return ReplyStep::Pending(moved); // WRITABLE brings us back
            }
        }
        if peer.eof() {
            return ReplyStep::Done;
        }
        // The peer is still sending: our FIN says "that is all", and we
        // swallow the rest until its own FIN.
        if !peer.shut() {
            peer.shutdown_write();
            moved = true;
        }
        ReplyStep::Pending(moved)
    }
}
