//! One non-blocking socket and what the loop knows about it.
//!
//! Every read and write that the server and the proxy make on a socket goes
//! through a [`Peer`], and comes back as one small verdict, [`Io`]:
//!
//! ```text
//!   Data(n)    n bytes moved
//!   Eof        the other end sent FIN: nothing more will arrive (reads)
//!   Blocked    not now; an event will say when (the readiness flag is clear)
//!   Failed(e)  the connection is broken
//! ```
//!
//! This is the one place that knows the readiness ladder, after sozu's
//! `SocketResult`: retry on `EINTR`, and on `WouldBlock` **clear the
//! readiness flag**. Readiness is edge-triggered: the kernel says "readable"
//! once, when the socket becomes readable, not for as long as it is. So the
//! loop keeps a flag per direction, set by events ([`Peer::on_event`]) and
//! cleared only when a call says `WouldBlock`. Forgetting to clear it makes
//! a loop spin; clearing it when the socket is not drained makes a
//! connection stall forever. Written once, here, neither can happen by
//! accident in a role.
//!
//! A call on a flag that is already clear returns `Blocked` without a
//! system call, so callers can simply "try" and let the verdict decide.
//!
//! A peer also remembers the half-close facts of its connection: whether
//! we have read its EOF ([`Peer::eof`]), sent our FIN ([`Peer::shut`]), or
//! seen a write fail ([`Peer::broken`]). A role decides what those mean.
//!
//! Each call is traced at `-vv` as `proxy: #3 upstream read 65536`, so the
//! trace of every role reads the same.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use mio::event::Event;
use mio::net::TcpStream;

/// The verdict of one non-blocking call. See the module docs.
#[derive(Debug)]
pub enum Io {
    /// This many bytes moved (never zero for a read: that is `Eof`).
    Data(usize),
    /// The other end's FIN: it will send nothing more.
    Eof,
    /// Not now: the readiness flag is clear and an event will set it.
    Blocked,
    /// The call failed; the connection (or the file) is unusable.
    Failed(io::Error),
}

/// Which call a verdict is for: it decides which flag a `WouldBlock` clears.
#[derive(Debug, Clone, Copy)]
enum Call {
    Read,
    Write,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Read => "read",
            Call::Write => "write",
        }
    }
}

/// Who a peer is, for trace and log lines: `server: #4`, `proxy: #4 client`.
#[derive(Debug, Clone, Copy)]
pub struct Who {
    pub role: &'static str,
    pub key: usize,
    /// `""` when a connection has only one socket (the server).
    pub side: &'static str,
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.side.is_empty() {
            write!(f, "{}: #{}", self.role, self.key)
        } else {
            write!(f, "{}: #{} {}", self.role, self.key, self.side)
        }
    }
}

/// A non-blocking TCP socket with its readiness and half-close bookkeeping.
#[derive(Debug)]
pub struct Peer {
    sock: TcpStream,
    who: Who,
    /// A read may make progress: set by events, cleared by `WouldBlock`.
    readable: bool,
    /// A write may make progress: same bookkeeping.
    writable: bool,
    /// We have read this peer's EOF (or its read side failed).
    eof: bool,
    /// An event said the peer's FIN has arrived (`EPOLLRDHUP`, no error).
    fin_arrived: bool,
    /// A read after that came back short: the receive queue is empty, so
    /// the next read is the EOF, and needs no system call.
    drained_to_fin: bool,
    /// Whether a short read after the FIN may be taken for the EOF (see
    /// [`Peer::read`]): only where an early EOF cannot end a recording.
    infer_eof: bool,
    /// We have shut our write side (sent our FIN).
    shut: bool,
    /// A write failed: the peer will take nothing more.
    broken: bool,
    /// Read system calls made (for the tests that count them).
    #[cfg(test)]
    reads: u32,
}

impl Peer {
    /// An accepted socket: writable (its send buffer is empty), readable
    /// once an event says so (or [`Peer::mark_readable`] asks for a read).
    ///
    /// Every peer starts out closing abortively (`SO_LINGER` 0): dropped
    /// without [`Peer::close`], or with the process killed, it resets the
    /// connection instead of sending a FIN.
    pub fn accepted(sock: TcpStream, who: Who) -> Peer {
        Peer::new(sock, who, true, true)
    }

    /// An accepted socket that closes abortively already: it inherited
    /// `SO_LINGER` 0 from its listener (`event_loop::accept`, which checks
    /// that it did). Saves a system call per connection.
    pub fn inherited(sock: TcpStream, who: Who) -> Peer {
        Peer::new(sock, who, true, false)
    }

    /// A socket whose non-blocking connect is in flight: neither readable
    /// nor writable until an event (WRITABLE is how the handshake reports
    /// its end, either way; see [`Peer::connect_finished`]).
    pub fn connecting(sock: TcpStream, who: Who) -> Peer {
        Peer {
            // What comes back on it is an answer: see `read` on which EOFs
            // may be inferred.
            infer_eof: true,
            ..Peer::new(sock, who, false, true)
        }
    }

    fn new(sock: TcpStream, who: Who, writable: bool, set_linger: bool) -> Peer {
        // Abortive unless we say otherwise: with SO_LINGER {on, 0}, the
        // kernel closes this socket with a reset, not a FIN, and a FIN is
        // how the other end learns an upload is complete. So if this
        // process dies (SIGKILL, the OOM killer, a panic: the kernel closes
        // every descriptor), no peer mistakes a half-sent upload for a
        // whole one. A connection that ended well is closed with
        // [`Peer::close`], which turns lingering back to normal first.
        if set_linger {
            if let Err(e) = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO)) {
                log::debug!("{who} setting SO_LINGER 0: {e}");
            }
        }
        Peer {
            sock,
            who,
            readable: false,
            writable,
            eof: false,
            fin_arrived: false,
            drained_to_fin: false,
            infer_eof: false,
            shut: false,
            broken: false,
            #[cfg(test)]
            reads: 0,
        }
    }

    /// The socket itself (for registration, socket options, `SO_ERROR`).
    pub fn sock(&self) -> &TcpStream {
        &self.sock
    }

    /// Who this is, for log lines.
    pub fn who(&self) -> Who {
        self.who
    }

    /// Records what an event says: the flags it sets stay set until a call
    /// returns `WouldBlock`. Closed and error conditions count as ready,
    /// because the next call is how we learn what happened.
    pub fn on_event(&mut self, event: &Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.readable = true;
        }
        if event.is_read_closed() && !event.is_error() {
            self.fin_arrived = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.writable = true;
        }
    }

    /// Asks for a read on the next call even without an event (a check
    /// that must look at what is queued, or data expected after an error).
    pub fn mark_readable(&mut self) {
        self.readable = true;
    }

    /// A read may make progress now.
    pub fn is_readable(&self) -> bool {
        self.readable && !self.eof
    }

    /// A write may make progress now.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// We have read the peer's EOF: it will send nothing more.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// We have sent our FIN.
    pub fn shut(&self) -> bool {
        self.shut
    }

    /// A write to this peer failed.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// One `read` into `buf`. After `Eof`, every later call says `Eof`
    /// again without a system call. A `Failed` read leaves the decision to
    /// the caller (see [`Peer::end_reads`]).
    ///
    /// **The EOF that costs no read** (after nginx's `pending_eof`): once an
    /// event has said the peer's FIN arrived (`EPOLLRDHUP`), every byte it
    /// sent is already queued, because TCP delivers the FIN in order, after
    /// the data. A read that then comes back shorter than the buffer has
    /// emptied the queue, so the next read would only return 0: we say
    /// `Eof` without making it. Most small answers arrive with their FIN,
    /// so this saves one `recvfrom` per transfer.
    ///
    /// Only on the upstream side (`Peer::connecting`), where what is read
    /// is an answer that is relayed, never recorded: a read also comes back
    /// short at TCP's urgent mark (`MSG_OOB` data), and there an inferred
    /// EOF would cut an upload and give the cut part a final name.
    pub fn read(&mut self, buf: &mut [u8]) -> Io {
        if self.eof {
            return Io::Eof;
        }
        if self.drained_to_fin {
            log::trace!("{} read EOF (it came with the data)", self.who);
            self.eof = true;
            return Io::Eof;
        }
        if !self.readable {
            return Io::Blocked;
        }
        loop {
            #[cfg(test)]
            {
                self.reads += 1;
            }
            match self.sock.read(buf) {
                Ok(0) => {
                    log::trace!("{} read EOF", self.who);
                    self.eof = true;
                    return Io::Eof;
                }
                Ok(n) => {
                    log::trace!("{} read {n}", self.who);
                    self.drained_to_fin = self.infer_eof && self.fin_arrived && n < buf.len();
                    return Io::Data(n);
                }
                Err(e) => match self.failed(e, Call::Read) {
                    Some(io) => return io,
                    None => continue,
                },
            }
        }
    }

    /// Treats the read side as over without having seen EOF (after a read
    /// error the caller chose to survive).
    pub fn end_reads(&mut self) {
        self.eof = true;
    }

    /// After this peer's EOF, has it gone away? Once the FIN has arrived a
    /// read says EOF forever, so a reset that follows shows only as a
    /// pending socket error (`SO_ERROR`), or as a read that fails. Looks
    /// only when an event has said something changed.
    pub fn gone_after_eof(&mut self, scratch: &mut [u8]) -> Option<io::Error> {
        let looked = self.readable;
        if let Some(e) = self.failed_since_event() {
            return Some(e);
        }
        if !looked {
            return None;
        }
        match self.sock.read(scratch) {
            Err(e)
                if e.kind() != io::ErrorKind::WouldBlock
                    && e.kind() != io::ErrorKind::Interrupted =>
            {
                Some(e)
            }
            _ => None,
        }
    }

    /// For a socket we no longer read: has the connection failed (a reset
    /// arrived)? The pending socket error (`SO_ERROR`) says so; looks only
    /// when an event has said something changed, once per event (the read
    /// flag is the "an event came" mark, and is cleared here).
    pub fn failed_since_event(&mut self) -> Option<io::Error> {
        if !self.readable {
            return None;
        }
        self.readable = false;
        match self.sock.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => None,
        }
    }

    /// One `write` of (a prefix of) `data`.
    pub fn write(&mut self, data: &[u8]) -> Io {
        if !self.writable {
            return Io::Blocked;
        }
        loop {
            match self.sock.write(data) {
                Ok(n) => {
                    log::trace!("{} write {n}", self.who);
                    return Io::Data(n);
                }
                Err(e) => match self.failed(e, Call::Write) {
                    Some(io) => {
                        if let Io::Failed(_) = io {
                            self.broken = true;
                        }
                        return io;
                    }
                    None => continue,
                },
            }
        }
    }

    /// Writes as much of `data` as the socket takes now: all of it, or up
    /// to `WouldBlock`, or up to a failure. Returns the bytes taken, and
    /// the error if the peer broke.
    pub fn write_ready(&mut self, data: &[u8]) -> (usize, Option<io::Error>) {
        let mut off = 0;
        while off < data.len() {
            match self.write(&data[off..]) {
                Io::Data(n) => off += n,
                Io::Failed(e) => return (off, Some(e)),
                Io::Blocked | Io::Eof => break,
            }
        }
        (off, None)
    }

    /// The ladder for a failed call: `None` to retry (`EINTR`), `Blocked`
    /// (clearing the flag of the call's direction) for `WouldBlock`,
    /// `Failed` otherwise.
    fn failed(&mut self, e: io::Error, call: Call) -> Option<Io> {
        match e.kind() {
            io::ErrorKind::Interrupted => None,
            io::ErrorKind::WouldBlock => {
                log::trace!("{} {} WouldBlock", self.who, call.name());
                match call {
                    Call::Read => self.readable = false,
                    Call::Write => self.writable = false,
                }
                Some(Io::Blocked)
            }
            _ => {
                log::trace!("{} {} failed: {e}", self.who, call.name());
                Some(Io::Failed(e))
            }
        }
    }

    /// Sends our FIN (once): "that is all from this side".
    pub fn shutdown_write(&mut self) {
        if !self.shut {
            self.shut = true;
            log::trace!("{} shutdown(Write)", self.who);
            if let Err(e) = self.sock.shutdown(Shutdown::Write) {
                log::debug!("{} shutdown(Write): {e}", self.who);
            }
        }
    }

    /// Counts our FIN as sent, for a caller that closes gracefully
    /// ([`Peer::close`]) right after: `close` sends what is queued and then
    /// a FIN, the same bytes on the wire as `shutdown` then `close`, for one
    /// system call less. A caller that might reset instead must use
    /// [`Peer::shutdown_write`].
    pub fn fin_with_close(&mut self) {
        if !self.shut {
            self.shut = true;
            log::trace!("{} FIN with the close", self.who);
        }
    }

    /// Closes gracefully: whatever we wrote is delivered and followed by a
    /// FIN. For a connection that ended well.
    pub fn close(self) {
        if let Err(e) = socket2::SockRef::from(&self.sock).set_linger(None) {
            log::debug!("{} clearing SO_LINGER: {e}", self.who);
        }
        drop(self);
    }

    /// Closes abortively, with a reset (see [`Peer::accepted`]'s note on
    /// `SO_LINGER`): the other end sees an error rather than an EOF that
    /// would make a truncated upload look complete. Dropping a `Peer` does
    /// the same; this names the intent.
    pub fn reset(self) {
        drop(self);
    }

    /// Closes gracefully if our FIN is already out, abortively otherwise:
    /// the way to drop a peer that may hold part of an unfinished upload.
    pub fn close_or_reset(self) {
        if self.shut {
            self.close();
        } else {
            self.reset();
        }
    }

    /// The connect-in-progress check. A non-blocking `connect` returns at
    /// once; the socket becomes WRITABLE when the handshake is over, either
    /// way. A peer address (`getpeername`) means it succeeded: one system
    /// call on the common path. Without one, `SO_ERROR` (`take_error`) says
    /// why it failed; with no error either, the wake-up was spurious
    /// (`Ok(false)`, and the write flag is cleared to wait for the real one).
    pub fn connect_finished(&mut self) -> io::Result<bool> {
        if !self.writable {
            return Ok(false);
        }
        match self.sock.peer_addr() {
            Ok(_) => Ok(true),
            Err(e)
                if e.kind() == io::ErrorKind::NotConnected
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                if let Some(e) = self.sock.take_error()? {
                    return Err(e);
                }
                self.writable = false;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The remote address, if connected.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock.peer_addr()
    }
}

#[cfg(test)]
pub(crate) mod tests;
