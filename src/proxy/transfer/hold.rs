//! Hold mode (`--hold`): store the whole upload, hold it, then forward the
//! file as it is on disk. This is the seed's "additional notes": a pause
//! between storing and sending, so a person can edit the file.
//!
//! ```text
//!   Receiving --client EOF--> Holding --timer--> reopen by name --> Connecting
//!   (spool only)              (a timer, never a sleep)   |
//!                                                        +-- cannot --> Replying "ERR held file NAME is gone"
//! ```
//!
//! The file is reopened **by name** when the hold ends, because an editor
//! may have replaced it rather than changed it in place; exactly the length
//! it has at that moment is sent, and the CRC-32C of what was sent is
//! logged beside the one received, so an edit shows in the log.

use std::fs::File;
use std::io;
use std::time::Instant;

use crate::answer::Answer;
use crate::error::brief;
use crate::event_loop::{Context, Peer, Reply};
use crate::store::PartFile;

use super::upload::Source;
use super::{Happened, Policy, State, Step, Timer, Transfer};

/// The file being forwarded once the hold is over: the spool reopened by
/// name, as it is on disk at that moment.
#[derive(Debug)]
pub(super) struct Held {
    pub file: File,
    /// Its length when reopened: exactly this much is sent.
    pub len: u64,
    /// CRC-32C of what has been sent so far.
    pub crc: u32,
}

/// While holding, the client has nothing to send (it half-closed), but it
/// may go away; a reset then shows only as a socket error.
pub(super) fn watch_client(client: &mut Peer, scratch: &mut [u8]) -> Step {
    match client.gone_after_eof(scratch) {
        Some(e) => Err(Happened::ClientLost(e)),
        None => Ok(false),
    }
}

impl Transfer {
    /// The upload is complete (and renamed): hold it, with the deadline
    /// armed in the loop's timers.
    pub(super) fn hold(
        &mut self,
        spool: PartFile,
        cx: &mut Context<Timer>,
        policy: &Policy,
    ) -> State {
        let hold = policy.hold.unwrap_or_default();
        log::info!(
            "holding {} for {}: edit it now ({} bytes from {}, crc32c={:08x})",
            spool.path().display(),
            humantime::format_duration(hold),
            spool.bytes(),
            self.client_addr,
            spool.crc32c()
        );
        let (key, id) = (self.key, self.id);
        let timer = cx
            .timers
            .schedule(Instant::now() + hold, Timer::HoldOver { key, id });
        State::Holding { spool, timer }
    }

    /// The hold is over: reopen the spool by name (a person may have
    /// edited or replaced it) and start connecting to the upstream.
    pub(super) fn resume(
        &mut self,
        spool: PartFile,
        cx: &mut Context<Timer>,
        policy: &Policy,
    ) -> State {
        log::trace!("proxy: #{} timer fired: hold over", self.key);
        let path = spool.path().to_path_buf();
        let reopened = File::open(&path).and_then(|f| {
            let meta = f.metadata()?;
            if meta.is_file() {
                Ok((f, meta.len()))
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file",
                ))
            }
        });
        match reopened {
            Ok((file, len)) => {
                let held = Held { file, len, crc: 0 };
                // Seed step 4, after the hold: connect, non-blocking as ever.
                self.connect(spool, Source::Held(held), cx, policy)
            }
            Err(e) => {
                log::warn!(
                    "proxy: held file {} is gone: {e}; answering ERR",
                    path.display()
                );
                State::Replying(Reply::new(&Answer::err(format!(
                    "held file {} is gone: {}",
                    spool.name(),
                    brief(&e)
                ))))
            }
        }
    }
}
