//! A transfer while its spool file is being created through the ring (see
//! `proxy::files`): what the loop tells it when the file exists, or cannot.
//!
//! Nothing else changes for the transfer meanwhile: it connects upstream
//! (or, in hold mode, waits to receive) as usual, and only reading its
//! client waits for the file (`Spool::is_opening`), so the first byte read
//! is recorded like every other.

use std::io;
use std::net::SocketAddr;

use super::{Happened, OnDiskError, Policy, Timer, Transfer};
use crate::event_loop::Context;
use crate::store::PartFile;

use super::spool::Closing;

impl Transfer {
    /// True while this transfer's spool waits for its file.
    pub fn spool_opening(&self) -> bool {
        self.state.spool().is_some_and(|s| s.is_opening())
    }

    /// The name of this transfer's recording (`-` without one).
    pub fn spool_name(&self) -> &str {
        self.state.spool().map_or("-", |s| s.name())
    }

    /// The client's address, for log lines.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The name asked for was taken; `name` is being created instead.
    pub fn spool_renamed(&mut self, name: String) {
        if let Some(spool) = self.state.spool_mut() {
            spool.set_name(name);
        }
    }

    /// Names tried for the spool file so far.
    pub fn spool_open_tries(&self) -> u32 {
        self.state.spool().map_or(0, |s| s.open_tries())
    }

    /// The file exists: the spool records into it from now on, and the
    /// client may be read. Gives `part` back if the transfer has no spool
    /// any more (the caller removes it).
    pub fn spool_opened(&mut self, part: PartFile, closing: &Closing) -> Option<PartFile> {
        match self.state.spool_mut().filter(|s| s.is_opening()) {
            Some(spool) => {
                spool.opened(part, closing);
                None
            }
            None => Some(part),
        }
    }

    /// The file could not be created. Where every byte must be recorded
    /// (`--on-disk-error refuse`, hold mode), the upload is refused with
    /// `ERR`; otherwise it goes on, relayed without a recording. `cause`
    /// words the error for the client (without the spool's path).
    pub fn spool_open_failed(
        &mut self,
        e: io::Error,
        cause: fn(&io::Error) -> String,
        cx: &mut Context<Timer>,
        policy: &Policy,
    ) {
        let must_record = policy.hold.is_some() || policy.on_disk_error == OnDiskError::Refuse;
        if must_record {
            let e = io::Error::new(e.kind(), cause(&e));
            self.on(Happened::SpoolFailed(e), cx, policy);
        } else if let Some(spool) = self.state.spool_mut() {
            spool.open_failed(cause(&e));
        }
    }
}
