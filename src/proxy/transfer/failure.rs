//! Every way a transfer can go wrong, and what is kept when it does.
//!
//! Each function here is one arm of [`Transfer::on`]: it takes the parts
//! of the old state by value and returns the new state. The rules:
//!
//! - **Nothing acknowledged is lost, and nothing partial looks whole.** An
//!   upstream that holds part of an upload that will never be finished
//!   through it is *reset*, not closed, so it cannot mistake the part for
//!   the whole; our own copy is kept as `NAME.incomplete`.
//! - **The client always learns the outcome** when it is still there: our
//!   own `ERR` line (`Replying`), saying what was kept.
//! - **The upstream failing is not the client's problem** (`Salvaging`):
//!   we go on reading the upload into the spool and answer `ERR upstream
//!   unavailable ... (kept as NAME)` at its end.
//! - **The spool's disk failing is not the load test's problem** (by
//!   default, `--on-disk-error relay`): the transfer goes on relaying, its
//!   recording is given up (what landed is kept as `.incomplete`), counted
//!   and warned about under the loop's throttle. With `refuse`, and always
//!   in hold mode (which cannot forward what it could not store), the
//!   upload is refused.
//! - **No `.part` outlives a transfer.** A spool dropped on any path hands
//!   its recording to the loop, which finishes, keeps or removes it once
//!   its writes have landed (see `spool::recording`).

use std::io;

use super::spool::Spool;
use crate::answer::Answer;
use crate::error::brief;
use crate::event_loop::disk::Disk;
use crate::event_loop::{Context, Reply};

use super::upload::Link;
use super::{OnDiskError, Policy, State, Timer, Transfer};

impl State {
    /// The resources a state holds, for the failure paths to dispose of.
    fn into_parts(self) -> (Option<Spool>, Option<Link>) {
        match self {
            State::Receiving { spool }
            | State::Holding { spool, .. }
            | State::Salvaging { spool, .. } => (Some(spool), None),
            State::Connecting { spool, link, .. } | State::Streaming { spool, link } => {
                (Some(spool), Some(link))
            }
            State::Cutting(_) | State::Replying(_) | State::Done { .. } => (None, None),
        }
    }
}

/// Where a spool file is now, for log lines.
fn shown(spool: &Option<Spool>) -> String {
    match spool.as_ref().and_then(Spool::path) {
        Some(path) => path.display().to_string(),
        None => "(not recorded)".to_string(),
    }
}

impl Transfer {
    /// The upstream failed: before it answered, drop it and salvage; after
    /// some answer bytes, cut the answer (see `cut`).
    pub(super) fn upstream_failed(
        &mut self,
        spool: Spool,
        link: Link,
        reason: String,
        cx: &mut Context<Timer>,
        policy: &Policy,
    ) -> State {
        log::debug!(
            "proxy: #{} upstream {} failed: {reason}",
            self.key,
            policy.upstream
        );
        if link.answer_bytes > 0 {
            // Part of the server's answer is with the client already: a line
            // of ours after it would make two answers in one. Relay or cut,
            // never add: the client's connection ends in a reset, as the
            // upstream's failure would have reached it directly, so that a
            // cut answer (an HTTP body that ends at the close) never looks
            // whole; but only once it has every answer byte we received.
            return self.cut_answer(spool, link, &reason, cx, policy);
        }
        // If it does not have our FIN, it holds part of an upload that will
        // never be finished through it: a reset keeps it from mistaking
        // that part for the whole.
        link.up.close_or_reset();
        self.upstream_unavailable(spool, &reason)
    }

    /// No upstream: go on storing the upload (`Salvaging`), or, once it is
    /// complete and final, tell the client it was kept but not delivered.
    pub(super) fn upstream_unavailable(&mut self, spool: Spool, reason: &str) -> State {
        // Still coming, or its last disk writes still landing: the answer
        // waits for a complete file under its final name.
        if !self.client.eof() || !spool.is_finished() {
            return State::Salvaging {
                spool,
                reason: reason.to_string(),
            };
        }
        log::warn!(
            "proxy: {} upload of {} bytes not delivered: upstream unavailable: {reason}; {}",
            self.client_addr,
            spool.bytes(),
            spool.kept_as()
        );
        State::Replying(Reply::new(&Answer::err(format!(
            "upstream unavailable: {reason} ({})",
            spool.kept_as()
        ))))
    }

    /// Hold mode: the held file could not be read back mid-way. The
    /// upstream has part of it: reset it, and say so.
    pub(super) fn held_file_failed(&mut self, spool: Spool, link: Link, e: io::Error) -> State {
        log::warn!(
            "proxy: #{} reading held file {}: {e}",
            self.key,
            spool.name()
        );
        link.up.reset(); // the upstream must not take a partial file for whole
        State::Replying(Reply::new(&Answer::err(format!(
            "held file {} is gone: {}",
            spool.name(),
            brief(&e)
        ))))
    }

    /// The upload passed `--max-bytes`: refuse it. The partial spool is
    /// removed (a refused upload is nobody's copy), the upstream reset so
    /// the server discards its partial too.
    pub(super) fn too_large(&mut self, old: State, limit: u64) -> State {
        log::warn!(
            "proxy: upload from {} passed --max-bytes {limit}: refused",
            self.client_addr
        );
        let (spool, link) = old.into_parts();
        if let Some(link) = link {
            link.up.reset();
        }
        if let Some(spool) = spool {
            spool.discard();
        }
        State::Replying(Reply::new(&Answer::err(format!(
            "too large: limit {limit} bytes"
        ))))
    }

    /// The spool file could not be written. By default (and where there is
    /// an upstream to relay to) the transfer goes on without recording;
    /// otherwise the upload is refused. Either way what was written is kept
    /// as `.incomplete` (its valid prefix), or removed if empty, by the loop.
    pub(super) fn spool_failed(
        &mut self,
        mut old: State,
        e: io::Error,
        cx: &mut Context<Timer>,
        policy: &Policy,
    ) -> State {
        let relay = policy.on_disk_error == OnDiskError::Relay && policy.hold.is_none();
        if let (true, State::Streaming { spool, .. } | State::Salvaging { spool, .. }) =
            (relay, &mut old)
        {
            // Warned about (throttled) when the loop has finished the file.
            spool.give_up(&e, &mut cx.disk);
            return old;
        }
        cx.aborts.warn(format_args!(
            "proxy: {} spool write failed: {e}; upload refused",
            self.client_addr
        ));
        let (spool, link) = old.into_parts();
        if let Some(link) = link {
            link.up.close_or_reset();
        }
        if let Some(spool) = spool {
            spool.keep_incomplete(&mut cx.disk);
        }
        State::Replying(Reply::new(&Answer::err(format!(
            "proxy cannot store upload: {}",
            brief(&e)
        ))))
    }

    /// The client's connection failed (reset, idle, or lost while we wrote
    /// to it). Nobody is left to answer.
    pub(super) fn client_lost(
        &mut self,
        old: State,
        e: io::Error,
        cx: &mut Context<Timer>,
    ) -> State {
        let holding = matches!(old, State::Holding { .. });
        let (spool, link) = old.into_parts();
        if holding {
            log::warn!(
                "proxy: client {} went away during its hold ({e}); nothing was sent upstream; upload kept as {}",
                self.client_addr,
                shown(&spool)
            );
        } else if self.client.eof() {
            // The upload was complete; only the answer could not be given.
            // If its last disk writes had not all landed, the file cannot
            // take its final name now (nobody will be here when they do):
            // it is kept as `.incomplete`, with every byte.
            // If its last disk writes had not all landed, the loop gives
            // it its final name when they have (nobody will be here then).
            let kept = shown(&spool);
            cx.aborts.warn(format_args!(
                "proxy: client {} went away before its answer ({e}); upload kept as {kept}",
                self.client_addr,
            ));
        } else {
            if let Some(link) = link {
                link.up.reset();
            }
            match spool {
                // Nothing was sent: a port scan, or a change of mind. No
                // file and no warning; a flood of them must not fill the
                // directory or the log.
                Some(spool) if spool.bytes() == 0 => {
                    log::debug!(
                        "proxy: client {} went away before sending anything ({e})",
                        self.client_addr
                    );
                    spool.discard();
                }
                spool => {
                    let bytes = spool.as_ref().map_or(0, |s| s.bytes());
                    let kept = match &spool {
                        Some(s) if s.is_recording() => format!("kept as {}.incomplete", s.name()),
                        _ => "not recorded".to_string(),
                    };
                    if let Some(spool) = spool {
                        spool.keep_incomplete(&mut cx.disk);
                    }
                    cx.aborts.warn(format_args!(
                        "proxy: client {} aborted its upload after {bytes} bytes ({e}); {kept}",
                        self.client_addr
                    ));
                }
            }
        }
        State::aborted()
    }

    /// Called when the proxy shuts down with this transfer unfinished: an
    /// upstream that has not had our FIN is reset, an unfinished spool is
    /// kept as `.incomplete`. A held upload that was never forwarded is
    /// complete and kept under its final name, and its client is told so:
    /// `ERR proxy shutting down: kept as NAME, not forwarded`.
    pub fn abandon(self, disk: &mut Disk) {
        let never_forwarded = self.kept_whole();
        let (spool, link) = self.state.into_parts();
        if let Some(link) = link {
            link.up.close_or_reset();
        }
        if let (true, Some(spool)) = (never_forwarded, spool.as_ref()) {
            log::warn!(
                "proxy: shutting down: held upload from {} kept as {}, not forwarded",
                self.client_addr,
                spool.path().unwrap_or(std::path::Path::new("-")).display()
            );
            let answer = Answer::err(format!(
                "proxy shutting down: kept as {}, not forwarded",
                spool.name()
            ));
            // One short line into an idle socket's empty send buffer: it is
            // taken at once (and if not, the client learns from the close).
            let mut client = self.client;
            let (_, failed) = client.write_ready(answer.to_line().as_bytes());
            match failed {
                None => client.close(),
                Some(e) => log::debug!(
                    "proxy: telling {} about the shutdown: {e}",
                    self.client_addr
                ),
            }
            return;
        }
        if let Some(spool) = spool.filter(|s| s.is_recording() && !s.is_finished()) {
            log::warn!(
                "proxy: unfinished upload from {} kept as {}.incomplete",
                self.client_addr,
                spool.name()
            );
            spool.keep_incomplete(disk);
        }
    }
}
