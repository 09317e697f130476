//! The proxy's files, seen from the loop: each spool file is **created
//! through the ring**, and each recording whose transfer has gone is
//! **finished by the loop** (the closing table).
//!
//! **Creating a spool file never waits.** `openat(O_CREAT)` allocates an
//! inode, and on a busy ext4 that may mean reading bitmaps from the disk:
//! under 1,000 streaming uploads, `strace -T` saw it take up to 255 ms on
//! the loop's thread, the largest stall left once the writes had moved to
//! the ring (issue 18). So accepting a client only asks the ring for its
//! file ([`Core::create_spool`]); the transfer starts connecting upstream
//! meanwhile (which takes a round trip anyway), and its client is not read
//! until the file exists (`Spool::opening`): its bytes wait in the kernel,
//! as with any back-pressure. The completion ([`Core::spool_created`])
//! gives the transfer its file; a name that is taken (`EEXIST`: another
//! process with our pid in the same directory in the same microsecond)
//! moves on to the next name; any other error is a recording that failed,
//! handled as `--on-disk-error` says: relayed without a recording, or
//! refused with `ERR` (always, in hold mode). A file made for a transfer
//! that has already ended is removed.
//!
//! **The closing table.** A transfer may end (or give up recording, see
//! `--on-disk-error`) while its spool's disk writes are still in flight;
//! its recording then hands itself over (`transfer::spool::Closing`) and
//! is finished here as its completions come in: renamed, kept as a trimmed
//! `.incomplete`, or removed. So no `.part` outlives its transfer.

use std::io;

use super::transfer::spool::{Ended, Goal, Spool};
use super::{accept, Core, OnDiskError, Timer};
use crate::event_loop::disk::{Done, Owner};
use crate::event_loop::Context;
use crate::store::Store;

/// A file created for a transfer that has ended meanwhile (a client that
/// reset, a stop): nobody will write it, so it goes.
fn remove_orphan(store: &Store, done: &Done) {
    if let (Some(_), Some(name)) = (&done.opened, &done.name) {
        log::debug!(
            "proxy: #{} gone before its spool file: removing it",
            done.owner.key
        );
        store.remove_part(name);
    }
}

/// What went wrong, without where (the spool's path is none of the
/// client's business): `No space left on device`.
pub(super) fn cause(e: &io::Error) -> String {
    let text = crate::error::brief(e);
    match text.rsplit_once(": ") {
        Some((_, cause)) => cause.to_string(),
        None => text,
    }
}

impl Core {
    /// Asks the ring to create the spool file of transfer `owner`, and
    /// returns its spool, waiting for the file.
    pub(super) fn create_spool(&mut self, cx: &mut Context<Timer>, owner: Owner) -> Spool {
        let name = self.store.next_name();
        cx.disk
            .open(self.store.dir_file(), Store::part_name(&name), owner);
        Spool::opening(name, owner)
    }

    /// A spool file's creation has completed: it goes to its transfer,
    /// or, if that has ended meanwhile, it is removed.
    pub(super) fn spool_created(&mut self, cx: &mut Context<Timer>, done: Done) {
        let Owner { key, id } = done.owner;
        let Some(t) = self
            .transfers
            .get_mut(key)
            .filter(|t| t.id() == id && t.spool_opening())
        else {
            remove_orphan(&self.store, &done);
            return;
        };
        let result = match (done.result, done.opened) {
            (Ok(()), Some(file)) => {
                let part = self.store.adopt(t.spool_name().to_string(), file);
                Ok(part)
            }
            (Err(e), _) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Taken: the next name, through the ring again.
                let name = self.store.next_name();
                cx.disk
                    .open(self.store.dir_file(), Store::part_name(&name), done.owner);
                t.spool_renamed(name);
                return;
            }
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(io::Error::other("the ring made no file")),
        };
        match result {
            Ok(part) => {
                log::trace!("proxy: #{key} disk created {}.part", part.name());
                if let Some(part) = t.spool_opened(part, &self.closing_inbox) {
                    part.discard(); // the transfer has no spool any more
                }
            }
            Err(e) => {
                let e = io::Error::new(e.kind(), format!("creating {}: {e}", t.spool_name()));
                self.stats.recordings_failed += 1;
                let addr = t.client_addr();
                if accept::is_out_of_descriptors(&e) {
                    let open = self.transfers.len();
                    cx.acceptor.out_of_descriptors(&e, open);
                }
                if self.policy.hold.is_some() || self.policy.on_disk_error == OnDiskError::Refuse {
                    cx.aborts.warn(format_args!("proxy: refusing {addr}: {e}"));
                } else {
                    cx.aborts.warn(format_args!(
                        "proxy: relaying {addr} without recording: {e}"
                    ));
                }
                let t = &mut self.transfers[key];
                t.spool_open_failed(e, cause, cx, &self.policy);
            }
        }
        self.drive(cx, key);
        self.adopt_closing(cx);
    }
    /// Takes in the recordings that spools have let go of since the last
    /// call, and moves each on at once (one with nothing in flight may be
    /// done already).
    pub(super) fn adopt_closing(&mut self, cx: &mut Context<Timer>) {
        for rec in self.closing_inbox.take_new() {
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
        let Some(rec) = self.closing.remove(&id) else {
            return;
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::disk::Disk;

    #[test]
    fn a_file_made_for_a_transfer_that_has_ended_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut disk = Disk::blocking(1 << 24); // creates at once
        let name = store.next_name();
        disk.open(
            store.dir_file(),
            Store::part_name(&name),
            Owner { key: 1, id: 2 },
        );
        let done = disk.reap().pop().expect("the open completed");
        assert!(done.opened.is_some(), "{done:?}");
        let part = dir.path().join(format!("{name}.part"));
        assert!(part.exists());
        remove_orphan(&store, &done);
        assert!(!part.exists(), "no .part outlives its transfer");
    }
}
