//! Taking a client in: its spool file, its transfer, its first drive.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::event_loop::Context;

use super::transfer::Transfer;
use super::{register_client, Core, Owner, Timer};

impl Core {
    /// Seed steps 1 and 4: a client of route `r` connected. Ask the ring
    /// for its spool file, start the non-blocking connect upstream (unless
    /// holding), and drive it.
    pub(super) fn admit(
        &mut self,
        cx: &mut Context<Timer>,
        r: usize,
        mut client: TcpStream,
        addr: SocketAddr,
    ) {
        let policy = self.routes[r].policy;
        // TCP_NODELAY and SO_LINGER 0 came from the listener (see
        // `event_loop::accept`'s set_options), or were set on the socket
        // where they did not (`Acceptor::count_accepted`, for the routes'
        // listeners too).
        let key = self.transfers.vacant_key();
        self.next_id += 1;
        let id = self.next_id;
        if let Err(e) = register_client(&cx.registry, key, &mut client) {
            log::warn!("proxy: registering {addr}: {e}");
            return;
        }
        log::trace!("proxy: accept {addr} -> #{key}, register client READABLE|WRITABLE");
        // The spool file is created through the ring (see `files`); the
        // transfer starts connecting meanwhile, and reads its client once
        // the file exists.
        let spool = self.create_spool(cx, r, Owner { key, id });
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
        let inserted = self.transfers.insert(transfer);
        debug_assert_eq!(inserted, key, "the slab fills the key it said was vacant");
        // Bytes may already be waiting; the registration will report
        // them, but driving now saves a trip through poll.
        self.drive(cx, key);
        self.adopt_closing(cx);
    }
}
