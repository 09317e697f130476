//! The completions of the server's disk operations (see `upload` and
//! `event_loop::disk`), each to its owner: the connection that asked (by
//! slab key and identity: keys are reused, identities are not), or a
//! complete upload whose connection was closed while it was being named
//! (the `closing` table: at a stop, it is still named, unanswered). A
//! completion for a connection that is gone is dropped (its file was
//! removed when it went, and writes in flight landed in the unlinked
//! file), except a creation: a file made for nobody is removed.

use std::sync::Arc;

use crate::event_loop::disk::{Disk, Done, Op, Owner};
use crate::event_loop::Context;
use crate::store::Store;
use crate::sys;

use super::conn::State;
use super::sink::Sink;
use super::{Core, Timer};

impl Core {
    /// A disk operation completed: it goes to its connection, which is
    /// driven again if it waits for it (to read on, finish, or refuse:
    /// otherwise its socket's next event drives it), or to a complete
    /// upload whose connection was closed at a stop. A file created for a
    /// connection that is gone is removed; anything else of one is dropped
    /// (its file was removed when it went).
    pub(super) fn on_written(&mut self, cx: &mut Context<Timer>, done: Done) {
        let Owner { key, id } = done.owner;
        let Some(store) = self.store.as_mut() else {
            return;
        };
        if let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == id) {
            if let Some(done) = conn.on_done(done, store, &mut cx.disk) {
                if done.op == Op::Open {
                    remove_orphan(store, done, &mut cx.disk);
                }
            }
            if conn.wants_drive() {
                self.drive(cx, key);
            }
        } else if let Some(upload) = self.closing.get_mut(&id) {
            upload.on_done(done, store, &mut cx.disk);
            self.advance_closing(cx, id);
        } else if done.op == Op::Open {
            remove_orphan(store, done, &mut cx.disk);
        }
    }

    /// A chunk may be free for connection `owner`, which waited for one.
    pub(super) fn on_wake(&mut self, cx: &mut Context<Timer>, owner: Owner) {
        let Owner { key, id } = owner;
        if let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == id) {
            if let State::Receiving(Sink::File(upload)) = &mut conn.state {
                upload.woken();
            }
            self.drive(cx, key);
        }
    }

    /// Moves the complete upload `id`, whose connection is gone, on to its
    /// final name; once there (or failed, and removed), forgets it.
    pub(super) fn advance_closing(&mut self, cx: &mut Context<Timer>, id: u64) {
        let Some(upload) = self.closing.get_mut(&id) else {
            return;
        };
        let Some(result) = upload.advance_to_end(&mut cx.disk) else {
            return; // operations still in flight
        };
        let Some(upload) = self.closing.remove(&id) else {
            return;
        };
        match result {
            Ok(()) => {
                log::info!(
                    "server: stored {} ({} bytes), its client gone before the answer",
                    upload.name(),
                    upload.bytes()
                );
                self.stats.stored += 1;
                self.stats.bytes += upload.bytes();
                upload.close(&mut cx.disk);
            }
            Err(trouble) => {
                cx.aborts.warn(format_args!(
                    "server: {trouble}; its client gone, nothing kept"
                ));
                upload.abandon(&mut cx.disk);
            }
        }
    }
}

/// Removes the file an open made for a connection that is gone (if it
/// made one), and closes it, both through the ring.
fn remove_orphan(store: &Store, done: Done, disk: &mut Disk) {
    let (Some(file), Some(name)) = (done.opened, done.name) else {
        return;
    };
    log::debug!(
        "server: #{} gone before its file: removing it",
        done.owner.key
    );
    let path = store.dir().join(name.to_string_lossy().as_ref());
    match sys::cpath(&path) {
        Ok(path) => disk.unlink(path, None),
        Err(e) => log::warn!("removing {}: {e}", path.display()),
    }
    disk.release(Arc::new(file));
}
