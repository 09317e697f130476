//! Recordings closing: a transfer may end (or give up recording) while its
//! spool's disk writes are still in flight; its recording is handed over
//! (`transfer::spool::Closing`) and finished here as its completions come
//! in (see the module docs of `proxy`).

use crate::event_loop::Context;

use super::transfer::spool::{Ended, Goal};
use super::{Core, Timer};

impl Core {
    /// Takes in the recordings that spools have let go of since the last
    /// call, and moves each on at once (one with nothing in flight may be
    /// done already).
    pub(super) fn adopt_closing(&mut self, cx: &mut Context<Timer>) {
        for mut rec in self.closing_inbox.take_new() {
            if rec.is_finished() {
                // Its transfer is done with a finished file: only its
                // descriptors are left to close.
                rec.close_files(&mut cx.disk);
                continue;
            }
            let id = rec.owner().id;
            self.closing.insert(id, rec);
            self.advance_closing(cx, id);
        }
    }

    /// Moves recording `id` of the closing table towards its end; once it
    /// is there, says so (a failed recording under the per-transfer
    /// warnings' throttle) and forgets it.
    pub(super) fn advance_closing(&mut self, cx: &mut Context<Timer>, id: u64) {
        let Some(rec) = self.closing.get_mut(&id) else {
            return;
        };
        let ended = match rec.advance_to_end(&mut cx.disk) {
            None => return, // operations still in flight
            Some(Ok(ended)) => ended,
            Some(Err(e)) if rec.goal == Goal::Finish => {
                // It could not take its final name: keep it as incomplete.
                cx.aborts.warn(format_args!("proxy: {e}"));
                rec.goal = Goal::Keep;
                return self.advance_closing(cx, id);
            }
            Some(Err(e)) => {
                // Not even kept (see `Recording::advance_to_end`).
                cx.aborts.warn(format_args!("proxy: {e}"));
                Ended::Removed
            }
        };
        let Some(mut rec) = self.closing.remove(&id) else {
            return;
        };
        rec.close_files(&mut cx.disk);
        let what = match &ended {
            Ended::Finished(path) => format!("finished as {}", path.display()),
            Ended::Kept(path, bytes) => format!("{bytes} bytes kept as {}", path.display()),
            Ended::Removed => "nothing kept".to_string(),
        };
        match rec.failure() {
            Some(why) => {
                self.stats.recordings_failed += 1;
                cx.aborts.warn(format_args!(
                    "proxy: recording {} failed ({why}){}; {what}",
                    rec.name(),
                    if rec.given_up.is_some() {
                        "; its transfer went on without it"
                    } else {
                        ""
                    }
                ));
            }
            None => log::debug!("proxy: recording {}: {what}", rec.name()),
        }
    }
}
