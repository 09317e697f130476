//! Each spool file is **created through the ring**, in its route's store.
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
//! that has already ended is removed. (Recordings whose transfers end with
//! writes in flight are finished by `closing`.)

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;

use super::transfer::spool::Spool;
use super::{Core, OnDiskError, Timer};
use crate::event_loop::disk::{Disk, Done, Owner};
use crate::event_loop::{accept, Context};
use crate::store::Store;

impl Core {
    /// The store route `r` records into (its own, or the spool directory).
    fn store_of(&mut self, r: usize) -> &mut Store {
        match self
            .routes
            .get_mut(r)
            .and_then(|route| route.store.as_mut())
        {
            Some(store) => store,
            None => &mut self.store,
        }
    }

    /// Asks the ring to create the spool file of transfer `owner` (of
    /// route `r`), and returns its spool, waiting for the file.
    pub(super) fn create_spool(
        &mut self,
        cx: &mut Context<Timer>,
        r: usize,
        owner: Owner,
    ) -> Spool {
        let store = self.store_of(r);
        let name = store.next_name();
        cx.disk
            .open(store.dir_file(), Store::part_name(&name), owner);
        Spool::opening(name, owner)
    }

    /// A spool file's creation has completed: it goes to its transfer,
    /// or, if that has ended meanwhile, it is removed.
    pub(super) fn spool_created(&mut self, cx: &mut Context<Timer>, done: Done) {
        let Owner { key, id } = done.owner;
        let Some(r) = self
            .transfers
            .get(key)
            .filter(|t| t.id() == id && t.spool_opening())
            .map(|t| t.route)
        else {
            self.remove_orphan(cx, done);
            return;
        };
        let policy = self.routes.get(r).map_or(self.policy, |route| route.policy);
        let result = match (done.result, done.opened) {
            (Ok(()), Some(file)) => {
                let name = self.transfers[key].spool_name().to_string();
                Ok(self.store_of(r).adopt(name, file))
            }
            (Err(e), _)
                if e.kind() == io::ErrorKind::AlreadyExists
                    && self.transfers[key].spool_open_tries() < crate::store::MAX_NAME_TRIES =>
            {
                // Taken: the next name, through the ring again.
                let store = self.store_of(r);
                let name = store.next_name();
                cx.disk
                    .open(store.dir_file(), Store::part_name(&name), done.owner);
                self.transfers[key].spool_renamed(name);
                return;
            }
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(io::Error::other("the ring made no file")),
        };
        let t = &mut self.transfers[key];
        match result {
            Ok(part) => {
                log::trace!("proxy: #{key} disk created {}.part", part.name());
                if let Some(part) = t.spool_opened(part, &self.closing_inbox) {
                    // The transfer has no spool any more.
                    if let Ok(path) = crate::sys::cpath(part.path()) {
                        cx.disk.unlink(path, None);
                    }
                    cx.disk.release(part.into_file());
                }
            }
            Err(e) => {
                // Out of descriptors: stop accepting for a moment (asked
                // before the error is reworded, which drops its errno).
                let out_of_fds = accept::is_out_of_descriptors(&e);
                let e = io::Error::new(e.kind(), format!("creating {}: {e}", t.spool_name()));
                self.stats.recordings_failed += 1;
                let addr = t.client_addr();
                if policy.hold.is_some() || policy.on_disk_error == OnDiskError::Refuse {
                    cx.aborts.warn(format_args!("proxy: refusing {addr}: {e}"));
                } else {
                    cx.aborts.warn(format_args!(
                        "proxy: relaying {addr} without recording: {e}"
                    ));
                }
                if out_of_fds {
                    let open = self.transfers.len();
                    cx.acceptor.out_of_descriptors(&e, open);
                }
                self.transfers[key].spool_open_failed(e, cause, cx, &policy);
            }
        }
        self.drive(cx, key);
        self.adopt_closing(cx);
    }

    /// A file created for a transfer that has ended meanwhile (a client
    /// that reset, a stop, a route deleted): nobody will write it, so it
    /// goes, through the ring. Names are unique to this process, so it is
    /// looked for in every route's store.
    fn remove_orphan(&self, cx: &mut Context<Timer>, done: Done) {
        let stores = std::iter::once(&self.store)
            .chain(self.routes.iter().filter_map(|(_, r)| r.store.as_ref()));
        remove_orphan_in(stores, done, &mut cx.disk);
    }
}

/// Removes the file an open made (if it made one) from whichever of
/// `stores` holds it, and closes it, both through `disk`'s ring.
fn remove_orphan_in<'a>(stores: impl Iterator<Item = &'a Store>, done: Done, disk: &mut Disk) {
    let (Some(file), Some(name)) = (done.opened, done.name) else {
        return;
    };
    log::debug!(
        "proxy: #{} gone before its spool file: removing it",
        done.owner.key
    );
    for store in stores {
        let path = store.dir().join(OsStr::from_bytes(name.to_bytes()));
        if let Ok(path) = crate::sys::cpath(&path) {
            disk.unlink(path, None);
        }
    }
    disk.release(std::sync::Arc::new(file));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_made_for_a_transfer_that_has_ended_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("a")).unwrap();
        let other = Store::open(&dir.path().join("b")).unwrap();
        let mut disk = Disk::blocking(1 << 24); // creates at once
        let name = store.next_name();
        disk.open(
            store.dir_file(),
            Store::part_name(&name),
            Owner { key: 1, id: 2 },
        );
        let done = disk.reap().pop().expect("the open completed");
        assert!(done.opened.is_some(), "{done:?}");
        let part = dir.path().join("a").join(format!("{name}.part"));
        assert!(part.exists());
        remove_orphan_in([&other, &store].into_iter(), done, &mut disk);
        assert!(!part.exists(), "no .part outlives its transfer");
    }
}
