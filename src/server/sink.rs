//! Where a server connection's upload goes: a `.part` file in the store
//! (written through the ring, see `upload`), or, with `--discard`, nowhere.
//!
//! `--discard` is for load tests that measure the relay alone, as iperf3's
//! server does: the bytes are counted and checksummed as they arrive, so
//! the answer still proves that what arrived is what was sent
//! (`OK bytes=.. crc32c=.. file=-`, see [`NOT_STORED`]), but no file is
//! created, written or renamed, and no directory is needed.

use std::fmt;

use crate::answer::NOT_STORED;
use crate::event_loop::disk::Disk;

use super::upload::Upload;

/// The upload's destination while it streams in.
pub(super) enum Sink {
    /// Stored: `<name>.part`, renamed to `<name>` when complete.
    File(Box<Upload>),
    /// Counted and checksummed, then forgotten.
    Discard { bytes: u64, crc32c: u32 },
}

impl Sink {
    /// A sink that keeps nothing.
    pub fn discard() -> Sink {
        Sink::Discard {
            bytes: 0,
            crc32c: 0,
        }
    }

    /// Counts and checksums the next bytes of a discarded upload (a file's
    /// are read straight into its chunks: see `Upload::room`).
    pub fn discard_more(&mut self, data: &[u8]) {
        if let Sink::Discard { bytes, crc32c } = self {
            *crc32c = crc32c::crc32c_append(*crc32c, data);
            *bytes += data.len() as u64;
        }
    }

    /// Bytes taken so far.
    pub fn bytes(&self) -> u64 {
        match self {
            Sink::File(part) => part.bytes(),
            Sink::Discard { bytes, .. } => *bytes,
        }
    }

    /// CRC-32C of the bytes taken so far.
    pub fn crc32c(&self) -> u32 {
        match self {
            Sink::File(part) => part.crc32c(),
            Sink::Discard { crc32c, .. } => *crc32c,
        }
    }

    /// The name the answer carries: the stored file's, or [`NOT_STORED`].
    pub fn name(&self) -> &str {
        match self {
            Sink::File(part) => part.name(),
            Sink::Discard { .. } => NOT_STORED,
        }
    }

    /// Gives up the upload: its partial file is removed (through the ring).
    pub fn abandon(self, disk: &mut Disk) {
        if let Sink::File(upload) = self {
            upload.abandon(disk);
        }
    }

    /// What abandoning does, for log lines: `removed <path>`.
    pub fn fate(&self) -> Fate<'_> {
        Fate(self)
    }
}

impl Sink {
    /// What abandoning `upload` does, for log lines.
    pub fn fate_of(upload: &Upload) -> String {
        match upload.path() {
            Some(path) => format!("removed {}", path.display()),
            None => "its file, being created, is removed".to_string(),
        }
    }
}

/// See [`Sink::fate`].
pub(super) struct Fate<'a>(&'a Sink);

impl fmt::Display for Fate<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Sink::File(upload) => f.write_str(&Sink::fate_of(upload)),
            Sink::Discard { .. } => f.write_str("nothing was stored (--discard)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discarding_sink_counts_and_checksums_what_it_keeps_nothing_of() {
        let mut sink = Sink::discard();
        sink.discard_more(b"hello, ");
        sink.discard_more(b"world");
        assert_eq!(sink.bytes(), 12);
        assert_eq!(sink.crc32c(), crc32c::crc32c(b"hello, world"));
        assert_eq!(sink.name(), "-");
    }
}
