//! The upload direction: client -> spool -> upstream, with back-pressure.
//!
//! **Every byte is in memory once, and goes both ways from there.** A read
//! from the client lands straight in the spool's staging chunk (see
//! `spool`); the upstream is sent the bytes from that same memory, and the
//! disk is handed whole chunks of it. Forwarding starts with the first byte
//! read: the upstream is connected before the client is read at all (see
//! `Connecting`), so the server works on each piece while the next one
//! arrives.
//!
//! **Back-pressure.** We stop reading the client when it is [`LAG_LIMIT`]
//! bytes ahead of what the upstream has taken. The client's data then waits
//! in the kernel, its TCP window closes, and its `write()` blocks: the slow
//! upstream has slowed the client, as it should. The client's readiness
//! flag stays set while we are not reading, because no new event will come
//! for bytes that are already waiting; when the upstream drains, the same
//! `drive` call resumes reading. (A disk slower than the client does not
//! slow it: with `spool::MAX_IN_FLIGHT` direct writes outstanding, a full
//! chunk overflows through the page cache instead, still through the ring;
//! see `spool`. Only the memory budget can make it wait.) So a transfer
//! holds at most `LAG_LIMIT` bytes plus its staging chunk and the chunks the
//! disk is writing, however slow its upstream or its disk.
//!
//! (Until issue 12, the backlog lived in the spool's page cache and went
//! out with `sendfile`: no memory of ours, but every recorded byte copied
//! into the page cache, which under load cost more than anything else the
//! proxy did; see GUIDE section 13.)
//!
//! In hold mode the bytes come from the held file instead (see `hold`).

use std::io;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use crate::error::brief;
use crate::event_loop::disk::{Disk, CHUNK};
use crate::event_loop::{Context, Io, Peer, Who};

use super::hold::Held;
use super::spool::Spool;
use super::toxic::Toxics;
use super::{Happened, Policy, Side, State, Step, Timer, Transfer};

/// How far (in bytes) the client may run ahead of the upstream before we
/// stop reading it: memory a transfer may hold for a slow upstream, beyond
/// its staging chunk.
pub const LAG_LIMIT: u64 = CHUNK as u64;

/// Where the bytes sent upstream come from.
#[derive(Debug)]
pub(super) enum Source {
    /// The spool's memory, as the upload arrives (streaming).
    Spool,
    /// The held file, reopened after the hold (hold mode).
    Held(Held),
}

/// The upstream half of a transfer, in the states that have one.
#[derive(Debug)]
pub(super) struct Link {
    pub up: Peer,
    pub source: Source,
    /// Bytes of the source the upstream has taken.
    pub forwarded: u64,
    /// Answer bytes read from the upstream but not yet taken by the client.
    pub answer: Vec<u8>,
    /// Answer bytes read from the upstream in total.
    pub answer_bytes: u64,
    /// The toxics this transfer drew (`None`: the proxy has none; see
    /// `toxic`).
    pub toxics: Option<Box<Toxics>>,
    /// Through toxics only: the upstream failed after answering, and the
    /// answer bytes still in the toxics' pipe go to the client first; why,
    /// for the cut that follows them (see `cut`). Without toxics the cut
    /// comes at once: there is no pipe to empty first.
    pub cut: Option<String>,
}

impl Link {
    pub fn new(up: Peer, source: Source, toxics: Option<Box<Toxics>>) -> Link {
        Link {
            up,
            source,
            forwarded: 0,
            answer: Vec::new(),
            answer_bytes: 0,
            toxics,
            cut: None,
        }
    }

    /// Bytes to forward that the upstream has not taken yet.
    pub fn lag(&self, spool: &Spool) -> u64 {
        match &self.source {
            Source::Spool => spool.bytes() - self.forwarded,
            Source::Held(held) => held.len - self.forwarded,
        }
    }

    /// True while upload bytes can still go to the upstream.
    pub fn forwarding(&self) -> bool {
        !self.up.broken() && !self.up.shut()
    }

    /// The connect-in-progress dance (see `Peer::connect_finished`):
    /// `Ok(false)` while it is still in flight.
    pub fn check_connect(&mut self, policy: &Policy) -> Step {
        match self.up.connect_finished() {
            Ok(false) => Ok(false),
            Ok(true) => {
                let _ = self.up.sock().set_nodelay(true);
                log::trace!("{} connected", self.up.who());
                log::debug!(
                    "proxy: #{} connected to upstream {}",
                    self.up.who().key,
                    policy.upstream
                );
                Err(Happened::Connected)
            }
            Err(e) => Err(Happened::UpstreamFailed(format!(
                "connecting to {}: {}",
                policy.upstream,
                brief(&e)
            ))),
        }
    }

    /// Sends the upstream what it has not taken yet: the upload bytes in
    /// the spool's memory, or the held file.
    pub fn forward(&mut self, spool: &mut Spool, disk: &mut Disk, scratch: &mut [u8]) -> Step {
        match self.source {
            Source::Spool => self.forward_spool(spool, disk),
            Source::Held(_) => self.forward_held(scratch),
        }
    }

    /// Writes the upload bytes the upstream has not taken, straight from
    /// the spool's chunks, until it has them all or would block; then lets
    /// the spool release what is no longer needed.
    fn forward_spool(&mut self, spool: &mut Spool, disk: &mut Disk) -> Step {
        if self.up_pipe().is_some() {
            let moved = self.forward_spool_toxic(spool);
            spool.release(self.released_upto(spool), disk);
            return moved;
        }
        let mut moved = false;
        while self.forwarding() && self.lag(spool) > 0 && self.up.is_writable() {
            let data = spool.bytes_at(self.forwarded);
            if data.is_empty() {
                // Every byte not yet forwarded is held until it is; this
                // would be a bug, and must not become a spinning loop.
                debug_assert!(false, "upload bytes at {} not held", self.forwarded);
                let e = io::Error::other(format!("lost upload bytes at {}", self.forwarded));
                return Err(Happened::SpoolFailed(e));
            }
            let (sent, failed) = self.up.write_ready(data);
            self.forwarded += sent as u64;
            moved |= sent > 0;
            if let Some(e) = failed {
                self.upstream_broke(&e);
                break;
            }
            if sent < data.len() {
                break; // the upstream is full; WRITABLE brings us back
            }
        }
        spool.release(self.released_upto(spool), disk);
        Ok(moved)
    }

    /// How far the spool may let go of its bytes: what the upstream has
    /// taken, or all of them once it will take no more.
    fn released_upto(&self, spool: &Spool) -> u64 {
        if self.forwarding() {
            self.forwarded
        } else {
            spool.bytes()
        }
    }

    /// Hold mode: forwards the reopened file, reading it back chunk by
    /// chunk (`pread` at the forwarded offset, so a slow upstream costs no
    /// memory) and computing the CRC-32C of exactly what is sent.
    fn forward_held(&mut self, scratch: &mut [u8]) -> Step {
        // Through the upload's toxics, the bytes go into the pipe while it
        // has room, and the pipe's due bytes upstream.
        let toxic = self.held_room().is_some();
        let mut moved = toxic && self.drain_up();
        let Link {
            up,
            source: Source::Held(held),
            forwarded,
            toxics,
            ..
        } = self
        else {
            return Ok(false);
        };
        let mut pipe = toxics.as_deref_mut().map(|t| &mut t.up).filter(|_| toxic);
        while !up.broken() && !up.shut() && *forwarded < held.len {
            let room = match &pipe {
                Some(p) => p.room(),
                None if up.is_writable() => scratch.len(),
                None => 0,
            };
            if room == 0 {
                break;
            }
            let want = (held.len - *forwarded).min(room.min(scratch.len()) as u64) as usize;
            let n = match held.file.read_at(&mut scratch[..want], *forwarded) {
                Ok(0) => {
                    let e =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "it shrank while being sent");
                    return Err(Happened::HeldFileFailed(e));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Happened::HeldFileFailed(e)),
            };
            let (sent, failed) = match pipe.as_deref_mut() {
                Some(p) => {
                    p.push(std::time::Instant::now(), &scratch[..n]);
                    (n, None)
                }
                None => up.write_ready(&scratch[..n]),
            };
            held.crc = crc32c::crc32c_append(held.crc, &scratch[..sent]);
            *forwarded += sent as u64;
            moved |= sent > 0;
            if let Some(e) = failed {
                self.upstream_broke(&e);
                return Ok(true);
            }
            if sent < n {
                break; // the upstream is full; WRITABLE brings us back
            }
        }
        if toxic {
            moved |= self.drain_up();
        }
        Ok(moved)
    }

    /// The upstream will take nothing more. It may have said why (an early
    /// `ERR` answer), so look for an answer before deciding it failed.
    pub(super) fn upstream_broke(&mut self, e: &io::Error) {
        log::debug!("proxy: #{} upstream write failed: {e}", self.up.who().key);
        self.up.mark_readable();
    }

    /// Passes the client's FIN on, once every byte has been forwarded and
    /// the spool is complete under its final name: the server is told the
    /// upload is whole only when our record of it is, so a spool that fails
    /// at its last write still resets the upstream (see `failure`).
    pub fn pass_eof(&mut self, client: &Peer, spool: &Spool) -> bool {
        let ready =
            client.eof() && self.lag(spool) == 0 && self.forwarding() && spool.is_finished();
        if self.up_pipe().is_some() {
            // After the pipe's bytes, when `slow_close` lets it.
            return self.forwarding() && self.pass_eof_toxic(ready);
        }
        if ready {
            self.up.shutdown_write();
            return true;
        }
        false
    }
}

/// Reads the client until `WouldBlock`, EOF, or back-pressure, each read
/// landing in the spool's memory and, when there is an upstream, going on
/// to it at once (seed steps 2, 3 and 5 together).
///
/// `link` is the upstream while there is one (`Streaming`); without one
/// (`Receiving`, `Salvaging`) the bytes go to the spool only.
pub(super) fn read_client(
    client: &mut Peer,
    spool: &mut Spool,
    mut link: Option<&mut Link>,
    disk: &mut Disk,
    policy: &Policy,
) -> Step {
    let mut moved = false;
    loop {
        if client.eof() {
            return Ok(moved); // the upload is over (reported once, below)
        }
        if !client.is_readable() {
            spool.settle(disk, true); // nothing to read: hold no chunk
            return Ok(moved);
        }
        // Read no more than the upstream can be behind by.
        let room = match link.as_deref() {
            Some(link) if link.forwarding() => LAG_LIMIT.saturating_sub(link.lag(spool)),
            _ => LAG_LIMIT,
        };
        let read = if room == 0 {
            Err("the upstream")
        } else if spool.is_opening() {
            Err("the spool file") // being created: the loop wakes us
        } else if spool.waiting_for_direct() {
            Err("the disk") // O_DIRECT being opened: the completion wakes us
        } else {
            match spool.spare(disk, room as usize) {
                [] => Err("memory"), // queued for a chunk: the loop wakes us
                buf => Ok(client.read(buf)),
            }
        };
        let read = match read {
            Ok(read) => read,
            Err(why) => {
                // Back-pressure: leave the bytes in the kernel. The readiness
                // flag stays set, so we come back when the upstream drains
                // or a chunk is free.
                log::trace!("{} read paused: waiting for {why}", client.who());
                spool.settle(disk, false);
                return Ok(moved);
            }
        };
        let n = match read {
            Io::Data(n) => n,
            Io::Eof => {
                // The client's half-close: the upload is complete. The rest
                // goes to the disk; the file is renamed once it is all there.
                spool.end(disk);
                match link {
                    Some(link) => {
                        link.forward_spool(spool, disk)?;
                    }
                    None => spool.release(spool.bytes(), disk),
                }
                return Ok(true);
            }
            Io::Blocked => {
                spool.settle(disk, true);
                return Ok(moved);
            }
            Io::Failed(e) => return Err(Happened::ClientLost(e)),
        };
        moved = true;
        if let Some(limit) = policy.max_bytes {
            if spool.bytes() + n as u64 > limit {
                return Err(Happened::TooLarge(limit));
            }
        }
        spool.commit(n, disk);
        match link.as_deref_mut() {
            // Straight on to the server, which works on these bytes while
            // we read the next ones.
            Some(link) => {
                link.forward_spool(spool, disk)?;
            }
            None => spool.release(spool.bytes(), disk),
        }
    }
}

/// Reports the end of the upload once, when the spool has it all on disk
/// under its final name; reports a failed disk write as soon as it is known.
pub(super) fn spool_finished(
    client: &Peer,
    spool: &mut Spool,
    disk: &mut Disk,
) -> Result<(), Happened> {
    if let Some(e) = spool.take_failure() {
        return Err(Happened::SpoolFailed(e));
    }
    if !client.eof() || spool.is_finished() {
        return Ok(());
    }
    match spool.try_finish(disk) {
        Ok(true) => Err(Happened::UploadComplete),
        Ok(false) => Ok(()),
        Err(e) => Err(Happened::SpoolFailed(e)),
    }
}

impl Transfer {
    /// Starts the upstream connect for `spool`'s bytes (from `source`):
    /// `Connecting` with its time limit armed, or, if the connect cannot
    /// even start, the upstream is unavailable.
    pub(super) fn connect(
        &mut self,
        spool: Spool,
        source: Source,
        cx: &mut Context<Timer>,
        policy: &Policy,
    ) -> State {
        match super::super::connect_upstream(&cx.registry, self.key, policy.upstream) {
            Ok(sock) => {
                let who = Who {
                    role: "proxy",
                    key: self.key,
                    side: Side::Upstream.name(),
                };
                let at = Instant::now() + policy.connect_timeout;
                let (key, id) = (self.key, self.id);
                State::Connecting {
                    spool,
                    link: Link::new(Peer::connecting(sock, who), source, self.drawn.take()),
                    timer: cx.timers.schedule(at, Timer::ConnectTimeout { key, id }),
                }
            }
            Err(e) => self.upstream_unavailable(
                spool,
                &format!(
                    "connecting to {}: {}",
                    policy.upstream,
                    crate::error::brief(&e)
                ),
            ),
        }
    }
}
