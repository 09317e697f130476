//! Taking a client in: its spool file, its transfer, its first drive.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::event_loop::{accept, Context};

use super::transfer::spool::Spool;
use super::transfer::Transfer;
use super::{register_client, Core, OnDiskError, Owner, Timer};

impl Core {
    /// Seed steps 1 and 4: a client of route `r` connected. Create its
    /// spool file, start the non-blocking connect upstream (unless
    /// holding), and drive it.
    pub(super) fn admit(
        &mut self,
        cx: &mut Context<Timer>,
        r: usize,
        mut client: TcpStream,
        addr: SocketAddr,
    ) {
        let policy = self.routes[r].policy;
        let store = match &mut self.routes[r].store {
            Some(store) => store,
            None => &mut self.store,
        };
        let spool = match store.create() {
            Ok(spool) => Ok(spool),
            Err(e) if accept::is_out_of_descriptors(&e) => {
                // No descriptor for the file means none for the upstream
                // either: refuse by closing before reading a byte, and back off.
                cx.aborts.warn(format_args!("proxy: refusing {addr}: {e}"));
                self.stats.refused += 1;
                cx.acceptor.out_of_descriptors(&e, self.transfers.len());
                return;
            }
            Err(e) if policy.hold.is_some() || policy.on_disk_error == OnDiskError::Refuse => {
                // Without a spool we could lose the upload: the transfer
                // answers `ERR proxy cannot store upload` (`Transfer::new`).
                self.stats.recordings_failed += 1;
                cx.aborts.warn(format_args!("proxy: refusing {addr}: {e}"));
                Err(cause(&e))
            }
            Err(e) => {
                // --on-disk-error relay: the load test goes on, unrecorded.
                self.stats.recordings_failed += 1;
                cx.aborts.warn(format_args!(
                    "proxy: relaying {addr} without recording: {e}"
                ));
                Err(cause(&e))
            }
        };
        // TCP_NODELAY and SO_LINGER 0 came from the listener (see
        // `event_loop::accept`'s set_options).
        let entry = self.transfers.vacant_entry();
        let key = entry.key();
        self.next_id += 1;
        let id = self.next_id;
        if let Err(e) = register_client(&cx.registry, key, &mut client) {
            log::warn!("proxy: registering {addr}: {e}");
            if let Ok(part) = spool {
                part.discard();
            }
            return;
        }
        log::trace!("proxy: accept {addr} -> #{key}, register client READABLE|WRITABLE");
        let spool = Spool::new(spool, Owner { key, id }, &self.closing_inbox);
        let mut transfer = Transfer::new(
            key,
            id,
            client,
            addr,
            spool,
            cx,
            &policy,
            &self.routes[r].toxics,
        );
        transfer.route = r;
        if let Some(idle) = self.idle_timeout {
            transfer.set_idle_timer(
                cx.timers
                    .schedule(Instant::now() + idle, Timer::Idle { key, id }),
            );
        }
        log::debug!("proxy: accepted {addr} as #{key}");
        entry.insert(transfer);
        // Bytes may already be waiting; the registration will report
        // them, but driving now saves a trip through poll.
        self.drive(cx, key);
        self.adopt_closing(cx);
    }
}

/// What went wrong, without where (the spool's path is none of the
/// client's business): `No space left on device`.
fn cause(e: &io::Error) -> String {
    let text = crate::error::brief(e);
    match text.rsplit_once(": ") {
        Some((_, cause)) => cause.to_string(),
        None => text,
    }
}
