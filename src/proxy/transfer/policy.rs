//! The per-transfer rules, from the command line (and, per route, the
//! upstream: see `proxy::routes`).

use std::net::SocketAddr;
use std::time::Duration;

use crate::event_loop::MinRate;

/// The per-transfer rules, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The server every upload goes to.
    pub upstream: SocketAddr,
    /// Hold mode (`--hold`): how long to hold a complete upload.
    pub hold: Option<Duration>,
    /// Largest upload accepted (`--max-bytes`).
    pub max_bytes: Option<u64>,
    /// Slowest upload accepted (`--min-rate`).
    pub min_rate: Option<MinRate>,
    /// Longest an upstream connect may take (`--connect-timeout`).
    pub connect_timeout: Duration,
    /// What a full or failing spool disk does to a transfer
    /// (`--on-disk-error`; hold mode always refuses).
    pub on_disk_error: OnDiskError,
}

/// `--on-disk-error`: what happens to a transfer whose recording cannot be
/// written (a full disk, a failing one, no file to write to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDiskError {
    /// Keep relaying; give up that transfer's recording (what landed is
    /// kept as `.incomplete`), count it and warn. A load test goes on.
    #[default]
    Relay,
    /// Refuse the upload (`ERR proxy cannot store upload`): for users who
    /// need every relayed byte recorded.
    Refuse,
}
