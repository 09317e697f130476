//! The answer direction: upstream -> client.
//!
//! A plain relay: read into the loop's scratch buffer, write to the client
//! at once, and keep only what the client did not take, in a small buffer
//! that exists only while it is not empty. When the upstream's FIN arrives
//! and every answer byte is delivered, the FIN is passed on.
//!
//! **Transparent, at any size.** The proxy relays whatever the upstream
//! sends back, byte for byte and as long as it goes on: an HTTP server's
//! megabytes, an echo server's copy of the whole upload. It does not parse
//! the answer; the one-line rule (`answer::MAX_LINE`) is our *client's*,
//! which checks it exactly as it would directly. What the proxy does bound
//! is its memory: it holds at most [`ANSWER_CHUNK`] answer bytes per
//! transfer, and while it holds that much it does not read the upstream.
//! The answer then waits in the kernel, the upstream's window closes and
//! its `write()` blocks: a slow client slows the upstream, as it would
//! directly. The upstream's readiness flag stays set while we are not
//! reading, so the next `drive` (the client draining, or the spool
//! becoming final) resumes where we stopped.
//!
//! Once any answer byte has reached the client, the proxy never adds a
//! line of its own (see `failure`).

use crate::error::brief;
use crate::event_loop::{Io, Peer};

use super::spool::Spool;

use super::hold::Held;
use super::upload::{Link, Source};
use super::{Happened, Policy, Step, Transfer};

/// Largest read of answer bytes from the upstream at once, and the most
/// answer bytes a transfer holds while its client is slow to take them (or
/// while they wait for the spool to be final): past that, the upstream is
/// not read. 64 KiB is one socket buffer's worth at the kernel's default,
/// a few system calls per MiB relayed, and 64 MiB for 1,000 stalled
/// transfers at the very worst.
pub(super) const ANSWER_CHUNK: usize = 64 * 1024;

impl Link {
    /// Relays answer bytes as they come, and the upstream's FIN after them.
    /// Unless `deliver`, they are only read and kept (at most
    /// [`ANSWER_CHUNK`] bytes), for when the spool is final.
    pub fn relay_answer(
        &mut self,
        client: &mut Peer,
        scratch: &mut [u8],
        deliver: bool,
        policy: &Policy,
    ) -> Step {
        if self.down_pipe().is_some() {
            return self.relay_answer_toxic(client, scratch, deliver);
        }
        let mut moved = false;
        loop {
            if deliver && !self.answer.is_empty() {
                match client.write(&self.answer) {
                    Io::Data(n) => {
                        self.answer.drain(..n);
                        if self.answer.is_empty() {
                            self.answer = Vec::new(); // give the memory back
                        }
                        moved = true;
                        continue;
                    }
                    Io::Failed(e) => return Err(Happened::ClientLost(e)),
                    Io::Blocked | Io::Eof => break,
                }
            }
            if self.up.eof() {
                break;
            }
            if self.answer.len() >= ANSWER_CHUNK {
                // Back-pressure: hold no more. The rest waits in the kernel;
                // the upstream's readiness flag stays set for when we resume.
                break;
            }
            let chunk_len = (ANSWER_CHUNK - self.answer.len()).min(scratch.len());
            let chunk = &mut scratch[..chunk_len];
            match self.up.read(chunk) {
                Io::Eof => {
                    moved = true;
                    if self.answer_bytes == 0 {
                        let why = "closed the connection without answering".to_string();
                        return Err(Happened::UpstreamFailed(why));
                    }
                }
                Io::Data(n) => {
                    self.answer_bytes += n as u64;
                    moved = true;
                    // Straight to the client; keep only what it won't take.
                    let (taken, failed) = if deliver {
                        client.write_ready(&chunk[..n])
                    } else {
                        (0, None)
                    };
                    if let Some(e) = failed {
                        return Err(Happened::ClientLost(e));
                    }
                    self.answer.extend_from_slice(&chunk[taken..n]);
                }
                Io::Blocked => break,
                Io::Failed(e) => {
                    // Before any answer byte: the upstream failed, and we
                    // answer ERR ourselves; after some: the client's
                    // connection is reset (see `failure::upstream_failed`).
                    self.up.end_reads();
                    log::debug!(
                        "proxy: #{} upstream {} failed after {} answer bytes: {e}",
                        self.up.who().key,
                        policy.upstream,
                        self.answer_bytes
                    );
                    return Err(Happened::UpstreamFailed(brief(&e)));
                }
            }
        }
        // The answer is over and relayed: pass the upstream's FIN on. If
        // that ends the transfer, the graceful close that follows at once
        // sends it (one system call less); a client still sending (HTTP,
        // say) needs it now.
        if self.up.eof() && self.answer.is_empty() && !client.shut() {
            self.finish_answer(client);
            moved = true;
        }
        Ok(moved)
    }

    /// True while answer bytes wait for the client here (in our buffer, or
    /// in the toxics' pipe).
    pub fn answer_held(&self) -> bool {
        !self.answer.is_empty() || self.toxics.as_ref().is_some_and(|t| t.down.queued() > 0)
    }

    /// Passes the upstream's FIN on to the client.
    pub(super) fn finish_answer(&self, client: &mut Peer) {
        if self.upload_done(client) {
            client.fin_with_close();
        } else {
            client.shutdown_write();
        }
    }

    /// The upload direction is over: the whole upload went upstream (or
    /// the upstream stopped taking it after answering) with our FIN after
    /// it, and the upstream's FIN has been read.
    fn upload_done(&self, client: &Peer) -> bool {
        client.eof() && (self.up.shut() || self.up.broken()) && self.up.eof()
    }

    /// Streaming is over when both directions are: the upload (see
    /// `upload_done`), and the whole answer to the client with its FIN.
    pub fn is_done(&self, client: &Peer) -> bool {
        self.upload_done(client) && client.shut()
    }
}

impl Transfer {
    /// The transfer's one info line, once the answer has reached the client.
    pub(super) fn log_relayed(&self, spool: &Spool, link: &Link, policy: &Policy) {
        if !log::log_enabled!(log::Level::Info) {
            return;
        }
        let elapsed = self.started.elapsed();
        if let Source::Held(Held { len, crc, .. }) = &link.source {
            let edited = *len != spool.bytes() || *crc != spool.crc32c();
            log::info!(
                "proxy: relayed held {} -> {}: received {} bytes crc32c={:08x}, forwarded {} bytes crc32c={crc:08x}{}, answer {} bytes, {:.3}s in all",
                spool.name(),
                policy.upstream,
                spool.bytes(),
                spool.crc32c(),
                link.forwarded,
                if edited { " (edited during hold)" } else { "" },
                link.answer_bytes,
                elapsed.as_secs_f64()
            );
            return;
        }
        log::info!(
            "proxy: relayed {} -> {}: up {} bytes, down {} bytes in {:.3}s ({:.1} MB/s) spool={} crc32c={:08x}",
            self.client_addr,
            policy.upstream,
            spool.bytes(),
            link.answer_bytes,
            elapsed.as_secs_f64(),
            crate::human::mb_per_s(spool.bytes(), elapsed),
            spool.name(),
            spool.crc32c()
        );
    }
}
