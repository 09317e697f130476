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

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use super::spool::Spool;
use crate::answer::Answer;
use crate::error::brief;
use crate::event_loop::{Context, Peer, Reply};

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
    /// True while the upload is held and its hold ends after `t`.
    pub fn held_past(&self, t: Instant) -> bool {
        matches!(self.state, State::Holding { until, .. } if until > t)
    }

    /// True if the upload is complete under its final name but was never
    /// forwarded (held, or connecting after the hold): what the proxy keeps
    /// whole when it stops.
    pub fn kept_whole(&self) -> bool {
        match &self.state {
            State::Holding { .. } => true,
            State::Connecting { link, .. } => matches!(link.source, Source::Held(_)),
            _ => false,
        }
    }

    /// The upload is complete (and renamed): hold it, with the deadline
    /// armed in the loop's timers.
    pub(super) fn hold(&mut self, spool: Spool, cx: &mut Context<Timer>, policy: &Policy) -> State {
        let hold = policy.hold.unwrap_or_default();
        log::info!(
            "proxy: holding {} for {}: edit it now ({} bytes from {}, crc32c={:08x})",
            spool.path().unwrap_or(std::path::Path::new("-")).display(),
            humantime::format_duration(hold),
            spool.bytes(),
            self.client_addr,
            spool.crc32c()
        );
        let (key, id) = (self.key, self.id);
        let until = Instant::now() + hold;
        let timer = cx.timers.schedule(until, Timer::HoldOver { key, id });
        State::Holding {
            spool,
            timer,
            until,
        }
    }

    /// The hold is over: reopen the spool by name (a person may have
    /// edited or replaced it) and start connecting to the upstream.
    pub(super) fn resume(
        &mut self,
        spool: Spool,
        cx: &mut Context<Timer>,
        policy: &Policy,
    ) -> State {
        log::trace!("proxy: #{} timer fired: hold over", self.key);
        // Nothing moved during the hold on purpose: the idle clock starts
        // again now, so the first idle check cannot blame an upstream whose
        // connect has barely begun.
        self.last_active = Instant::now();
        // Hold mode always records (a spool that cannot be written refuses
        // the upload), so a held spool has its file.
        let path = spool.path().unwrap_or(Path::new("")).to_path_buf();
        match reopen(&path) {
            Ok((file, len)) => {
                let held = Held { file, len, crc: 0 };
                // Seed step 4, after the hold: connect, non-blocking as ever.
                self.connect(spool, Source::Held(held), cx, policy)
            }
            Err(e) => {
                let why = match (e.kind(), e.raw_os_error()) {
                    (io::ErrorKind::NotFound, _) => format!("is gone: {}", brief(&e)),
                    // ELOOP: O_NOFOLLOW met a symlink; no errno: fstat said so.
                    (_, Some(libc::ELOOP)) | (_, None) => "is not a regular file".to_string(),
                    _ => format!("cannot be opened: {}", brief(&e)),
                };
                // The reason once: `why` already says it unless it is the
                // symlink or FIFO case, where the errno is worth a look.
                let detail = match e.raw_os_error() {
                    Some(errno) if why.ends_with(&brief(&e)) => format!(" (os error {errno})"),
                    Some(_) => format!(" ({e})"),
                    None => String::new(),
                };
                log::warn!(
                    "proxy: held file {} {why}{detail}; answering ERR",
                    path.display()
                );
                State::Replying(Reply::new(&Answer::err(format!(
                    "held file {} {why}",
                    spool.name()
                ))))
            }
        }
    }
}

/// Reopens the held file by name, safely: a name is only a name, and
/// anyone who can write the spool directory can point it elsewhere.
///
/// - `O_NOFOLLOW`: a symlink is refused (`ELOOP`), so the proxy cannot be
///   made to send a file it can read but the uploader never sent;
/// - `O_NONBLOCK`: opening a FIFO (or a device) returns at once instead of
///   freezing the loop's one thread until a writer appears;
/// - `fstat` on what was opened: only a regular file is sent.
///
/// An editor that saves by writing a new file and renaming it over the old
/// name still works: the name then points at a new regular file.
fn reopen(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((file, meta.len()))
}
