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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::peer::tests::pair;
    use std::io::{Read, Write};
    use std::net::Shutdown;

    /// Drives `reply` until it stops making progress or ends, waking the
    /// peer's flags the way events would. Bounded.
    fn drive(reply: &mut Reply, peer: &mut Peer, scratch: &mut [u8]) -> ReplyStep {
        for _ in 0..10_000 {
            peer.mark_readable();
            match reply.drive(peer, scratch) {
                ReplyStep::Pending(_) => std::thread::yield_now(),
                end => return end,
            }
        }
        ReplyStep::Pending(false)
    }

    #[test]
    fn refusing_a_client_mid_upload_half_closes_and_drains_to_its_eof() {
        let (mut peer, mut client) = pair();
        let mut scratch = vec![0u8; 64 * 1024];
        client.write_all(&[1u8; 100_000]).unwrap(); // still uploading
        let mut reply = Reply::new(&Answer::err("too large"));
        // The line goes out, then our FIN; the reply waits for the client.
        assert!(matches!(
            drive(&mut reply, &mut peer, &mut scratch),
            ReplyStep::Pending(_)
        ));
        assert!(reply.line_sent() && peer.shut());
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "ERR too large\n", "the line survives, then EOF");
        // The client gives up its upload: its FIN ends the reply.
        client.shutdown(Shutdown::Write).unwrap();
        assert!(matches!(
            drive(&mut reply, &mut peer, &mut scratch),
            ReplyStep::Done
        ));
    }

    #[test]
    fn a_client_that_keeps_sending_after_being_refused_is_cut_off() {
        let (mut peer, client) = pair();
        let mut scratch = vec![0u8; 64 * 1024];
        let sender = std::thread::spawn(move || {
            let mut client = client;
            let chunk = [2u8; 64 * 1024];
            // Stops when the refusing side closes on it.
            for _ in 0..(2 * DISCARD_LIMIT as usize / chunk.len()) {
                if client.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut reply = Reply::new(&Answer::err("no"));
        let mut flooded = false;
        for _ in 0..1_000_000 {
            peer.mark_readable();
            match reply.drive(&mut peer, &mut scratch) {
                ReplyStep::Flooded => {
                    flooded = true;
                    break;
                }
                ReplyStep::Pending(_) => std::thread::yield_now(),
                other => panic!("expected Flooded, got {other:?}"),
            }
        }
        assert!(
            flooded,
            "more than DISCARD_LIMIT after a refusal must end it"
        );
        drop(peer);
        sender.join().unwrap();
    }
}
