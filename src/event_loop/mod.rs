//! Plumbing shared by the two poll loops (server and proxy).
//!
//! Each role is one thread running one `mio::Poll`. Everything here is the
//! part of that loop that does not depend on the role:
//!
//! - [`bind_listener`]: a non-blocking listening socket with a deep backlog;
//! - [`Shutdown`]: a handle another thread can use to stop a loop (a
//!   `mio::Waker` plus a flag), used by tests, benches and signals;
//! - [`Timers`](timer::Timers): deadlines the loop waits on instead of sleeping;
//! - [`AcceptPause`]: what to do when `accept` fails for lack of file
//!   descriptors;
//! - [`raise_nofile_limit`]: lift the soft open-files limit to the hard one.
//!
//! Reserved tokens live here too. Connection tokens are derived from slab
//! keys by each role (small numbers counting up from zero), so the reserved
//! ones sit at the very top of the token space where no key can reach.

pub mod timer;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Registry, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::error::Context;

pub use timer::{TimerId, Timers};

/// Token of the listening socket.
pub const LISTENER: Token = Token(usize::MAX);
/// Token of the waker that [`Shutdown::shutdown`] pokes.
pub const WAKER: Token = Token(usize::MAX - 1);

/// How many not-yet-accepted connections the kernel may queue for us. The
/// kernel caps it at `net.core.somaxconn` (4096 on current kernels). A load
/// test opening thousands of connections at once needs a deep queue: with
/// the common default of 128, the excess SYNs are dropped and retried a full
/// second later, which shows up as a 1 s latency cliff.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Size of the read buffer each loop owns and lends to whichever connection
/// is being served. Large reads mean few syscalls per megabyte.
pub const SCRATCH_SIZE: usize = 256 * 1024;

/// Binds a non-blocking TCP listener on `addr` (port 0 picks a free port)
/// and logs `listening on <addr>` with the address actually bound.
pub fn bind_listener(addr: SocketAddr, role: &str) -> io::Result<TcpListener> {
    let what = || format!("{role}: binding {addr}");
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .with_context(what)?;
    // SO_REUSEADDR: a restarted server can bind while old connections of
    // the previous run sit in TIME_WAIT.
    socket.set_reuse_address(true).with_context(what)?;
    socket.bind(&addr.into()).with_context(what)?;
    socket.listen(LISTEN_BACKLOG).with_context(what)?;
    socket.set_nonblocking(true).with_context(what)?;
    let listener = TcpListener::from_std(socket.into());
    let local = listener.local_addr().with_context(what)?;
    if !local.ip().is_loopback() {
        log::warn!(
            "{role} listening on non-loopback address {local}: anyone who can reach it can write files to this disk"
        );
    }
    log::info!("{role} listening on {local}");
    Ok(listener)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new
/// soft limit. Each connection costs the server one descriptor and the proxy
/// three (two sockets and a spool file), and the usual soft default of 1024
/// would cap us far below what the machine allows.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// A handle that stops a running loop from another thread.
#[derive(Clone, Debug)]
pub struct Shutdown {
    waker: Arc<Waker>,
    requested: Arc<AtomicBool>,
}

impl Shutdown {
    /// Creates the handle, registering a waker on the loop's registry.
    pub fn new(registry: &Registry) -> io::Result<Shutdown> {
        Ok(Shutdown {
            waker: Arc::new(Waker::new(registry, WAKER).context("creating waker")?),
            requested: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Asks the loop to stop; it returns from `run` at its next wake-up.
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::warn!("waking loop for shutdown: {e}");
        }
    }

    /// True once [`Shutdown::shutdown`] has been called.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// True for the `accept` errors that mean "out of file descriptors".
///
/// The pending connection stays in the kernel's queue, so the listener stays
/// readable: a loop that simply retries would spin at 100% CPU. The remedy
/// is to stop accepting for a moment ([`AcceptPause`]).
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Back-off state for a listener that ran out of file descriptors.
///
/// When `accept` fails with `EMFILE`/`ENFILE`, the loop stops accepting for
/// [`AcceptPause::DELAY`] (a timer), logs one warning for the whole episode,
/// and tries again when the timer fires or when a connection closes (which
/// frees a descriptor). Because readiness is edge-triggered, resuming means
/// *calling accept again*: the connections that queued up while we paused
/// will not produce a fresh event.
#[derive(Debug, Default)]
pub struct AcceptPause {
    paused_since: Option<Instant>,
    last_warning: Option<Instant>,
    refused: u64,
}

impl AcceptPause {
    /// How long to stop accepting after running out of descriptors.
    pub const DELAY: Duration = Duration::from_millis(50);

    /// Records an out-of-descriptors failure. Returns true if this starts a
    /// new pause (the caller then arms a timer for [`AcceptPause::DELAY`]).
    pub fn pause(&mut self, role: &str, err: &io::Error, open: usize) -> bool {
        self.refused += 1;
        if self.paused_since.is_some() {
            return false;
        }
        let now = Instant::now();
        self.paused_since = Some(now);
        // One warning per minute at most: under sustained overload a pause
        // starts every few milliseconds, and the log must stay readable.
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.last_warning = Some(now);
            log::warn!(
                "{role}: accept failed ({err}) with {open} connections open: pausing accepts until descriptors free up"
            );
        } else {
            log::debug!(
                "{role}: accept failed ({err}) with {open} connections open: pausing accepts"
            );
        }
        true
    }

    /// True while accepting is paused.
    pub fn is_paused(&self) -> bool {
        self.paused_since.is_some()
    }

    /// Ends a pause (the caller then tries to accept again). Logs once when
    /// the episode is over.
    pub fn resume(&mut self, role: &str) {
        if let Some(since) = self.paused_since.take() {
            log::debug!("{role}: resuming accepts after {:?}", since.elapsed());
        }
    }

    /// Total out-of-descriptor failures seen.
    pub fn refusals(&self) -> u64 {
        self.refused
    }
}
