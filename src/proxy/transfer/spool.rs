//! The spool: one upload's bytes, in memory while they pass and on disk for
//! good, written without the page cache.
//!
//! ```text
//!   client --read--> [ chunk | chunk | staging ]  --send--> upstream
//!                      |        |                (from the oldest unsent byte)
//!                      +--------+--> disk: one O_DIRECT write per full chunk,
//!                                   asynchronous (event_loop::disk)
//! ```
//!
//! The client's bytes are read **straight into the staging chunk** (an
//! aligned buffer from the loop's pool), sent to the upstream **from that
//! memory**, and written to disk **from that memory** by DMA. A chunk is
//! handed to the disk when it is full; it is let go once the upstream has
//! all of it (the disk keeps its own reference until the write completes).
//! When the client has nothing more for now, the partial staging chunk goes
//! to the disk at once ([`Spool::settle`]) and only its last partial block
//! is kept aside. So a transfer holds what the upstream has not taken yet
//! (back-pressure bounds it at [`LAG_LIMIT`](super::LAG_LIMIT)) and the
//! chunks its disk writes are using; all transfers' chunks together come out
//! of one budget (`event_loop::disk`); and nothing it records lands in the
//! page cache, unless the disk falls behind ([`MAX_IN_FLIGHT`]).
//!
//! **The end of an upload** (the client's FIN): the staging chunk's
//! block-aligned part goes to the disk like any chunk; the last partial
//! block (under 4 KiB) cannot be written with `O_DIRECT`, so it is written
//! at once through an ordinary descriptor: one page of page cache per file.
//! Once every write has completed, the file gets its final name (`store`'s
//! rule: a final name means a complete upload), and only then does the
//! upstream get our FIN and the client the upstream's answer.
//!
//! **Small uploads** never use `O_DIRECT`: while an upload is under
//! [`DIRECT_AFTER`] bytes its bytes are written with plain `pwrite`s (at a
//! pause, and at its end): no `fcntl`, no completion round trip. Below
//! that size the page cache costs less than the ceremony.
//!
//! **Where `O_DIRECT` is refused** (tmpfs on older kernels, some network
//! filesystems), the same writes go through the page cache: everything
//! still works, only the page-cache savings are lost.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Context as _;
use crate::event_loop::disk::{Chunk, Disk, Owner, ALIGN, CHUNK};
use crate::store::PartFile;
use crate::sys;

/// Uploads that end with fewer bytes than this in hand are written through
/// the page cache, in one `pwrite` (see the module docs).
pub const DIRECT_AFTER: usize = 64 * 1024;

/// Most direct writes one spool may have in flight. A chunk that fills up
/// beyond that (the disk is slower than the client) *overflows*: it is
/// written the ordinary way, into the page cache, so the transfer goes on
/// at memory speed, as the server's own writes do; its writeback starts at
/// once and its pages are dropped from the cache when the file is finished.
/// Only where even that is impossible does the client wait for the disk.
pub const MAX_IN_FLIGHT: u32 = 4;

/// Whether the spool file is open with `O_DIRECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direct {
    /// Not asked yet (nothing has gone to the disk through the ring).
    NotYet,
    On,
    /// The filesystem said no: ordinary writes.
    Refused,
}

/// One upload's spool (see the module docs).
#[derive(Debug)]
pub struct Spool {
    part: PartFile,
    owner: Owner,
    /// Chunks handed to the disk that the upstream has not all taken,
    /// oldest first, each with the upload offset of its first byte.
    sent_to_disk: VecDeque<(u64, Arc<Chunk>)>,
    /// The chunk being filled, and the upload offset of its first byte.
    staging: Option<(u64, Chunk)>,
    /// Disk writes not yet completed.
    in_flight: u32,
    /// The first disk write that failed.
    failed: Option<io::Error>,
    direct: Direct,
    /// The client's FIN has been read and every byte handed to the disk.
    ended: bool,
    /// The last partial block of a chunk given back early (see
    /// [`Spool::settle`]): the next chunk starts with it, because direct
    /// writes start on a block boundary.
    tail: Vec<u8>,
    /// `tail` is on disk already (an ordinary write of a small upload's
    /// first chunk wrote it), so the end need not write it again.
    tail_written: bool,
    /// Queued for a chunk (see `Disk::wait`).
    waiting: bool,
    /// A second, ordinary descriptor for overflow writes (see
    /// [`MAX_IN_FLIGHT`]), opened the first time one is needed; `Err` once
    /// opening it failed (then the client waits for the disk instead).
    overflow: Option<Result<File, ()>>,
    /// Bytes written through `overflow`.
    overflowed: u64,
}

impl Spool {
    pub fn new(part: PartFile, owner: Owner) -> Spool {
        Spool {
            part,
            owner,
            sent_to_disk: VecDeque::new(),
            staging: None,
            in_flight: 0,
            failed: None,
            direct: Direct::NotYet,
            ended: false,
            tail: Vec::new(),
            tail_written: false,
            waiting: false,
            overflow: None,
            overflowed: 0,
        }
    }

    /// Room to read up to `max` more upload bytes into; then
    /// [`Spool::commit`]. Empty when the memory budget is spent: the spool
    /// has queued for a chunk, and the loop wakes its transfer when one is
    /// free ([`Spool::woken`]).
    pub fn spare(&mut self, disk: &mut Disk, max: usize) -> &mut [u8] {
        if self.staging.is_none() {
            let Some(mut chunk) = disk.chunk() else {
                if !self.waiting {
                    self.waiting = true;
                    disk.wait(self.owner);
                }
                return &mut [];
            };
            // A chunk starts on a block boundary: with the partial block a
            // previous chunk could not write, if any.
            let at = self.part.bytes() - self.tail.len() as u64;
            chunk.spare()[..self.tail.len()].copy_from_slice(&self.tail);
            chunk.commit(self.tail.len());
            self.tail.clear();
            self.tail_written = false;
            self.staging = Some((at, chunk));
        }
        let (_, chunk) = self.staging.as_mut().expect("staging was just set");
        let spare = chunk.spare();
        let n = spare.len().min(max);
        &mut spare[..n]
    }

    /// The loop has woken us: a chunk may be free.
    pub fn woken(&mut self) {
        self.waiting = false;
    }

    /// True while the client is not read because of us: queued for memory,
    /// or a full chunk waiting for the disk.
    pub fn held_back(&self) -> bool {
        self.waiting || self.disk_bound()
    }

    /// Gives the partial staging chunk to the disk now (its whole blocks;
    /// the last partial block is set aside for the next chunk), so that the
    /// transfer holds no chunk of its own while it waits. Called when the
    /// client has nothing more for now (`idle`), or, under memory pressure,
    /// when reading pauses for back-pressure. Without this, a few hundred
    /// clients that send a little and go quiet could hold the whole budget.
    pub fn settle(&mut self, disk: &mut Disk, idle: bool) {
        let Some((_, chunk)) = self.staging.as_ref() else {
            return;
        };
        if self.ended || !(idle || disk.under_pressure()) {
            return;
        }
        let aligned = chunk.len() / ALIGN * ALIGN;
        self.tail.extend_from_slice(&chunk.filled()[aligned..]);
        if self.direct == Direct::NotYet && self.part.bytes() < DIRECT_AFTER as u64 {
            // Still small: an ordinary write, as at the end of a small
            // upload. The partial block is set aside all the same (a later
            // direct write must start on a block boundary; it rewrites those
            // few bytes with the same values).
            let (at, chunk) = self.staging.take().expect("staging exists");
            if let Err(e) = self.write_plain(chunk.filled(), at) {
                self.failed.get_or_insert(e);
            }
            self.tail_written = true;
            self.sent_to_disk.push_back((at, Arc::new(chunk)));
            return;
        }
        self.submit_staging(disk, aligned);
    }

    /// Counts `n` bytes just read into [`Spool::spare`] as part of the upload;
    /// a chunk that is now full goes to the disk.
    pub fn commit(&mut self, n: usize, disk: &mut Disk) {
        let Some((_, chunk)) = self.staging.as_mut() else {
            return;
        };
        chunk.commit(n);
        let filled = chunk.filled();
        self.part.record(&filled[filled.len() - n..]);
        if chunk.is_full() {
            if self.in_flight >= MAX_IN_FLIGHT && self.direct == Direct::On {
                self.overflow_staging(disk);
            } else {
                self.submit_staging(disk, CHUNK);
            }
        }
    }

    /// The disk is behind: write the full staging chunk the ordinary way
    /// (see [`MAX_IN_FLIGHT`]), keeping it for the upstream as usual.
    fn overflow_staging(&mut self, disk: &mut Disk) {
        if self.overflow.is_none() {
            let path = self.part.path();
            let opened = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| log::debug!("{}: no overflow: {e}", path.display()));
            self.overflow = Some(opened);
        }
        let Some(Ok(file)) = self.overflow.as_ref() else {
            return; // stays staged; the client waits for the disk
        };
        let Some((at, chunk)) = self.staging.take() else {
            return;
        };
        let data = chunk.filled();
        log::trace!(
            "proxy: #{} disk write {} at {at} through the page cache",
            self.owner.key,
            data.len()
        );
        if let Err(e) = file.write_all_at(data, at) {
            let e = io::Error::new(
                e.kind(),
                format!("writing {}: {e}", self.part.path().display()),
            );
            self.failed.get_or_insert(e);
        }
        // Start writeback now, so that the pages are clean (and can be
        // dropped) by the time the file is finished.
        let _ = sys::start_writeback(file, at, data.len() as u64);
        self.overflowed += data.len() as u64;
        disk.counters.overflow_bytes += data.len() as u64;
        self.sent_to_disk.push_back((at, Arc::new(chunk)));
    }

    /// A full chunk that could neither go to the disk nor overflow goes to
    /// the disk as soon as a write completes.
    pub fn retry_full(&mut self, disk: &mut Disk) {
        if self.disk_bound() && self.in_flight < MAX_IN_FLIGHT {
            self.submit_staging(disk, CHUNK);
        }
    }

    /// Hands the first `len` bytes (a multiple of [`ALIGN`]) of the staging
    /// chunk to the disk. The chunk stays readable for forwarding.
    fn submit_staging(&mut self, disk: &mut Disk, len: usize) {
        let Some((at, chunk)) = self.staging.take() else {
            return;
        };
        if self.direct == Direct::NotYet && len > 0 {
            self.direct = match sys::set_direct_io(self.part.shared_file(), true) {
                Ok(()) => {
                    self.part.extend_reserve();
                    Direct::On
                }
                Err(e) => {
                    log::debug!(
                        "{}: O_DIRECT refused ({e}): writing through the page cache",
                        self.part.path().display()
                    );
                    Direct::Refused
                }
            };
        }
        let chunk = Arc::new(chunk);
        if len > 0 {
            disk.write(self.part.shared_file(), at, &chunk, len, self.owner);
            self.in_flight += 1;
            log::trace!("proxy: #{} disk write {len} at {at} queued", self.owner.key);
        }
        self.sent_to_disk.push_back((at, chunk));
    }

    /// The contiguous upload bytes held in memory from `offset` on (up to
    /// the end of the chunk that holds `offset`); empty if none.
    pub fn bytes_at(&self, offset: u64) -> &[u8] {
        let chunks = self
            .sent_to_disk
            .iter()
            .map(|(at, c)| (*at, &**c))
            .chain(self.staging.as_ref().map(|(at, c)| (*at, c)));
        for (at, chunk) in chunks {
            let end = at + chunk.len() as u64;
            if offset >= at && offset < end {
                return &chunk.filled()[(offset - at) as usize..];
            }
        }
        &[]
    }

    /// Lets go of the chunks wholly before `upto` (what the upstream has
    /// taken; everything, when there is no upstream to feed).
    pub fn release(&mut self, upto: u64, disk: &mut Disk) {
        while let Some((at, chunk)) = self.sent_to_disk.front() {
            if at + chunk.len() as u64 > upto {
                break;
            }
            let (_, chunk) = self.sent_to_disk.pop_front().expect("front exists");
            if let Ok(chunk) = Arc::try_unwrap(chunk) {
                disk.recycle(chunk); // the disk is done with it too
            }
        }
    }

    /// The client's FIN: hand the rest of the upload to the disk (see the
    /// module docs). [`Spool::try_finish`] then renames it once it is all
    /// written.
    pub fn end(&mut self, disk: &mut Disk) -> io::Result<()> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        let Some((at, chunk)) = self.staging.as_ref() else {
            // Nothing in hand but, perhaps, a partial block set aside (and
            // perhaps written already).
            let tail = std::mem::take(&mut self.tail);
            if self.tail_written {
                return Ok(());
            }
            return self.write_plain(&tail, self.part.bytes() - tail.len() as u64);
        };
        let (at, len) = (*at, chunk.len());
        if self.direct == Direct::NotYet && len < DIRECT_AFTER {
            // A small upload: one ordinary write, done. The chunk stays
            // until the upstream has all of it (`release`).
            let (_, chunk) = self.staging.take().expect("staging exists");
            self.write_plain(chunk.filled(), at)?;
            self.sent_to_disk.push_back((at, Arc::new(chunk)));
            return Ok(());
        }
        let aligned = len / ALIGN * ALIGN;
        self.write_plain(&chunk.filled()[aligned..], at + aligned as u64)?;
        self.submit_staging(disk, aligned);
        Ok(())
    }

    /// An ordinary (page-cache) write of `data` at `offset`: through our own
    /// descriptor while it is not `O_DIRECT`, else through a fresh one.
    fn write_plain(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        log::trace!(
            "proxy: #{} disk write {} at {offset}",
            self.owner.key,
            data.len()
        );
        if self.direct == Direct::On {
            // The overflow descriptor, if there is one, saves an open.
            if let Some(Ok(file)) = self.overflow.as_ref() {
                return file
                    .write_all_at(data, offset)
                    .with_context(|| format!("writing {}", self.part.path().display()));
            }
            return write_by_path(self.part.path(), data, offset);
        }
        self.part
            .shared_file()
            .write_all_at(data, offset)
            .with_context(|| format!("writing {}", self.part.path().display()))
    }

    /// Once the upload has ended and every write has completed: gives the
    /// file its final name. `Ok(false)` while there is still something to
    /// wait for.
    pub fn try_finish(&mut self) -> io::Result<bool> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.part.is_finished() {
            return Ok(true);
        }
        if !self.ended || self.in_flight > 0 {
            return Ok(false);
        }
        self.part.finish()?;
        log::trace!(
            "proxy: #{} disk renamed {}",
            self.owner.key,
            self.part.name()
        );
        if self.overflowed > 0 {
            // What overflowed through the page cache leaves it (the pages
            // still being written back stay until they are clean).
            log::debug!(
                "{}: {} of {} bytes overflowed through the page cache",
                self.part.name(),
                self.overflowed,
                self.part.bytes()
            );
            let _ = sys::drop_cached(self.part.shared_file());
        }
        Ok(true)
    }

    /// A disk write of ours has completed.
    pub fn on_written(&mut self, result: io::Result<()>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        log::trace!("proxy: #{} disk write done", self.owner.key);
        if let Err(e) = result {
            log::debug!("{}: disk write failed: {e}", self.part.path().display());
            self.failed.get_or_insert(e);
        }
    }

    /// True while the disk is behind: reading more would only pile up
    /// chunks (see [`MAX_IN_FLIGHT`]).
    pub fn disk_bound(&self) -> bool {
        // A full chunk still staged: it could neither go to the disk nor
        // overflow.
        self.staging.as_ref().is_some_and(|(_, c)| c.is_full())
    }

    /// The first failed disk write, if any (for the caller to act on at
    /// once rather than at the end).
    pub fn take_failure(&mut self) -> Option<io::Error> {
        self.failed.take()
    }

    /// Upload bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.part.bytes()
    }

    pub fn crc32c(&self) -> u32 {
        self.part.crc32c()
    }

    pub fn name(&self) -> &str {
        self.part.name()
    }

    pub fn path(&self) -> &Path {
        self.part.path()
    }

    pub fn is_finished(&self) -> bool {
        self.part.is_finished()
    }

    /// Removes the unfinished file (writes in flight land in an unlinked
    /// file, which goes away with them).
    pub fn discard(self) {
        self.part.discard();
    }

    /// Keeps what was received as `<name>.incomplete`: bytes not yet handed
    /// to the disk are written now (ordinary writes), then the file is
    /// renamed. Writes still in flight land in it under its new name.
    pub fn keep_incomplete(self) -> io::Result<PathBuf> {
        let written = match self.staging.as_ref() {
            Some((at, chunk)) => self.write_plain(chunk.filled(), *at),
            None if !self.tail_written => {
                self.write_plain(&self.tail, self.part.bytes() - self.tail.len() as u64)
            }
            None => Ok(()),
        };
        if let Err(e) = written {
            log::warn!("{e}"); // keep what is already there, at least
        }
        self.part.keep_incomplete()
    }
}

/// Writes `data` at `offset` of the file at `path` through a fresh,
/// ordinary descriptor (the spool's own is `O_DIRECT`, which takes only
/// whole aligned blocks). The file is ours, in our own directory; still,
/// `O_NOFOLLOW` as everywhere.
fn write_by_path(path: &Path, data: &[u8], offset: u64) -> io::Result<()> {
    let file: File = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("reopening {}", path.display()))?;
    file.write_all_at(data, offset)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// Feeds `data` to the spool in reads of `piece` bytes (at most), and,
    /// if `settle`, gives the staging chunk back after each, as a transfer
    /// whose client pauses between reads does.
    fn fill(spool: &mut Spool, disk: &mut Disk, data: &[u8], piece: usize, settle: bool) {
        let mut rest = data;
        while !rest.is_empty() {
            let spare = spool.spare(disk, rest.len().min(piece));
            let n = spare.len();
            spare.copy_from_slice(&rest[..n]);
            spool.commit(n, disk);
            rest = &rest[n..];
            if settle {
                spool.settle(disk, true);
            }
        }
    }

    /// A store in a temp dir, and a disk writer with a budget no test
    /// reaches. (The temp dir must outlive the test's files.)
    fn setup() -> (tempfile::TempDir, Store, mio::Poll, Disk) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let poll = mio::Poll::new().unwrap();
        let disk = Disk::new(poll.registry(), mio::Token(3), "test", 1 << 30);
        (dir, store, poll, disk)
    }

    /// Reaps until every write of `spool` has completed (or 10 s).
    fn wait_for_writes(spool: &mut Spool, disk: &mut Disk, poll: &mut mio::Poll) {
        let mut events = mio::Events::with_capacity(8);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        disk.submit();
        while spool.in_flight > 0 && std::time::Instant::now() < deadline {
            if !disk.has_completions() {
                // EINTR is normal: io_uring interrupts the wait to post
                // a completion.
                let _ = poll.poll(&mut events, Some(std::time::Duration::from_millis(100)));
            }
            for w in disk.reap() {
                spool.on_written(w.result);
            }
        }
    }

    #[test]
    fn every_size_lands_whole_under_its_final_name() {
        let (_dir, mut store, mut poll, mut disk) = setup();
        for len in [
            0,
            1,
            ALIGN - 1,
            DIRECT_AFTER,
            CHUNK - 1,
            CHUNK,
            CHUNK + ALIGN,
            3 * CHUNK + 12_345,
        ] {
            for (piece, settle) in [(usize::MAX, false), (10_000, true), (ALIGN, true)] {
                let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
                let mut spool = Spool::new(store.create().unwrap(), Owner { key: 0, id: 1 });
                fill(&mut spool, &mut disk, &data, piece, settle);
                // Forwarding reads the same bytes back from memory.
                let mut from_memory = Vec::new();
                while from_memory.len() < len {
                    let piece = spool.bytes_at(from_memory.len() as u64);
                    assert!(!piece.is_empty(), "bytes at {} are held", from_memory.len());
                    from_memory.extend_from_slice(piece);
                }
                assert_eq!(from_memory, data);
                spool.release(len as u64, &mut disk);
                spool.end(&mut disk).unwrap();
                wait_for_writes(&mut spool, &mut disk, &mut poll);
                assert!(spool.try_finish().unwrap(), "finished at {len} bytes");
                assert_eq!(spool.crc32c(), crc32c::crc32c(&data));
                let stored = std::fs::read(spool.path()).unwrap();
                assert!(
                    stored == data,
                    "{len} bytes in reads of {piece} (settle: {settle}) stored as {}",
                    stored.len()
                );
            }
        }
    }

    #[test]
    fn bytes_the_upstream_has_not_taken_stay_held_past_the_end() {
        let (_dir, mut store, mut poll, mut disk) = setup();
        for len in [1000, DIRECT_AFTER + 5, CHUNK + 5] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut spool = Spool::new(store.create().unwrap(), Owner { key: 0, id: 1 });
            fill(&mut spool, &mut disk, &data, usize::MAX, false);
            spool.end(&mut disk).unwrap(); // the upstream has taken nothing yet
            let mut from_memory = Vec::new();
            while from_memory.len() < len {
                let piece = spool.bytes_at(from_memory.len() as u64);
                assert!(
                    !piece.is_empty(),
                    "{len}: bytes at {} held",
                    from_memory.len()
                );
                from_memory.extend_from_slice(piece);
            }
            assert_eq!(from_memory, data);
            spool.release(len as u64, &mut disk);
            wait_for_writes(&mut spool, &mut disk, &mut poll);
            assert!(spool.try_finish().unwrap());
            assert_eq!(std::fs::read(spool.path()).unwrap(), data);
        }
    }

    #[test]
    fn a_disk_that_is_behind_overflows_through_the_page_cache_and_loses_nothing() {
        let (dir, mut store, mut poll, mut disk) = setup();
        // Eight chunks and nothing reaped meanwhile: the disk is "behind"
        // after MAX_IN_FLIGHT of them.
        let data: Vec<u8> = (0..8 * CHUNK + 777).map(|i| (i % 239) as u8).collect();
        let mut spool = Spool::new(store.create().unwrap(), Owner { key: 0, id: 1 });
        fill(&mut spool, &mut disk, &data, usize::MAX, false);
        if spool.direct != Direct::On {
            eprintln!("no O_DIRECT on {}; nothing overflows", dir.path().display());
            return;
        }
        assert_eq!(spool.in_flight, MAX_IN_FLIGHT);
        assert_eq!(
            disk.counters.overflow_bytes,
            (8 - MAX_IN_FLIGHT as usize) as u64 * CHUNK as u64,
            "the chunks past MAX_IN_FLIGHT overflowed"
        );
        spool.end(&mut disk).unwrap();
        wait_for_writes(&mut spool, &mut disk, &mut poll);
        assert!(spool.try_finish().unwrap());
        assert_eq!(std::fs::read(spool.path()).unwrap(), data);
    }

    #[test]
    fn an_abandoned_spool_keeps_every_byte_received() {
        let (_dir, mut store, mut poll, mut disk) = setup();
        let data: Vec<u8> = (0..CHUNK + 5000).map(|i| (i % 241) as u8).collect();
        let mut spool = Spool::new(store.create().unwrap(), Owner { key: 0, id: 1 });
        fill(&mut spool, &mut disk, &data, 100_000, true);
        wait_for_writes(&mut spool, &mut disk, &mut poll);
        assert!(!spool.try_finish().unwrap(), "not ended: no final name");
        let kept = spool.keep_incomplete().unwrap();
        assert_eq!(std::fs::read(kept).unwrap(), data);
    }
}
