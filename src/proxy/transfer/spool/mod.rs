//! The spool: one upload's bytes, in memory while they pass and on disk for
//! good, written without the page cache and without the loop ever waiting.
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
//! through the page cache: one page of page cache per file. Once every
//! write has completed, the file is trimmed and gets its final name
//! (`store`'s rule: a final name means a complete upload), and only then
//! does the upstream get our FIN and the client the upstream's answer.
//!
//! **Small uploads** never use `O_DIRECT`: while an upload is under
//! [`DIRECT_AFTER`] bytes its bytes are written through the page cache (at
//! a pause, and at its end). Below that size the page cache costs less than
//! the ceremony. **Where `O_DIRECT` is refused** (tmpfs, some network
//! filesystems, a device that refuses a direct write, or no ring to make it
//! asynchronous), the same writes go through the page cache: everything
//! still works, only the page-cache savings are lost.
//!
//! **A spool may stop recording** and go on relaying: when the file cannot
//! be created, or a write fails (a full disk), and the proxy runs with
//! `--on-disk-error relay` (the default), the transfer keeps streaming from
//! the same chunks while the recording is handed to the loop to be finished
//! ([`Spool::give_up`], see `recording`). The file side lives in
//! `recording`: descriptors, operations in flight, and how a file ends.

mod recording;

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::event_loop::disk::{Buf, Chunk, Disk, Done, Owner, ALIGN, CHUNK};
use crate::store::PartFile;

pub use recording::{Closing, Ended, Goal, Recording, MAX_IN_FLIGHT};

/// Uploads that end with fewer bytes than this in hand are written through
/// the page cache, in one write (see the module docs).
pub const DIRECT_AFTER: usize = 64 * 1024;

/// One upload's spool (see the module docs).
#[derive(Debug)]
pub struct Spool {
    owner: Owner,
    /// Upload bytes received, and their CRC-32C.
    received: u64,
    crc: u32,
    /// Chunks handed on (to the disk, or just done with) that the upstream
    /// has not all taken, oldest first, each with the upload offset of its
    /// first byte.
    held: VecDeque<(u64, Arc<Chunk>)>,
    /// The chunk being filled, and the upload offset of its first byte.
    staging: Option<(u64, Chunk)>,
    /// The file, while the upload is being recorded.
    rec: Option<Recording>,
    /// Its name (kept when recording stops, for messages).
    name: Option<String>,
    /// Why the upload is not (or no longer) recorded.
    not_recorded: Option<String>,
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
    /// The file is being created through the ring (see [`Spool::opening`]):
    /// the client is not read until it exists.
    opening: bool,
    /// Names tried that were taken (`EEXIST`).
    open_tries: u32,
}

impl Spool {
    /// A spool recording into `part`, or, if there is none (it could not be
    /// created: `why`), only passing bytes on.
    pub fn new(part: Result<PartFile, String>, owner: Owner, closing: &Closing) -> Spool {
        let (rec, name, not_recorded) = match part {
            Ok(part) => {
                let name = part.name().to_string();
                (
                    Some(Recording::new(part, owner, closing.clone())),
                    Some(name),
                    None,
                )
            }
            Err(why) => (None, None, Some(why)),
        };
        Spool {
            owner,
            received: 0,
            crc: 0,
            held: VecDeque::new(),
            staging: None,
            rec,
            name,
            not_recorded,
            ended: false,
            tail: Vec::new(),
            tail_written: false,
            waiting: false,
            opening: false,
            open_tries: 0,
        }
    }

    /// A spool whose file `name` is being created through the ring (the
    /// proxy asked `Disk::open` for it). Until [`Spool::opened`] or
    /// [`Spool::open_failed`], the client is not read: its bytes wait in
    /// the kernel, as with any back-pressure, and the loop never waits for
    /// `openat`, which on a busy disk can take a quarter of a second.
    pub fn opening(name: String, owner: Owner) -> Spool {
        Spool {
            name: Some(name),
            not_recorded: None,
            opening: true,
            ..Spool::new(Err(String::new()), owner, &Closing::default())
        }
    }

    /// True while the file is being created.
    pub fn is_opening(&self) -> bool {
        self.opening
    }

    /// The name being created (a collision moved it to the next one).
    pub fn set_name(&mut self, name: String) {
        self.name = Some(name);
        self.open_tries += 1;
    }

    /// Names taken by someone else so far (bounded by
    /// `store::MAX_NAME_TRIES`).
    pub fn open_tries(&self) -> u32 {
        self.open_tries
    }

    /// The file exists: record into it from the first byte.
    pub fn opened(&mut self, part: PartFile, closing: &Closing) {
        self.opening = false;
        self.not_recorded = None;
        self.name = Some(part.name().to_string());
        self.rec = Some(Recording::new(part, self.owner, closing.clone()));
    }

    /// The file could not be created (`why`): pass the bytes on without
    /// recording them (the caller decides whether that is allowed).
    pub fn open_failed(&mut self, why: String) {
        self.opening = false;
        self.name = None;
        self.not_recorded = Some(why);
    }

    /// Room to read up to `max` more upload bytes into; then
    /// [`Spool::commit`]. Empty when the memory budget is spent: the spool
    /// has queued for a chunk, and the loop wakes its transfer when one is
    /// free ([`Spool::woken`]).
    pub fn spare(&mut self, disk: &mut Disk, max: usize) -> &mut [u8] {
        if self.staging.as_ref().is_some_and(|(_, c)| c.is_full()) {
            if self.waiting_for_direct() {
                return &mut [];
            }
            self.hand_full(disk);
        }
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
            let at = self.received - self.tail.len() as u64;
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
    /// waiting for the file to be created, or for its `O_DIRECT`
    /// descriptor.
    pub fn held_back(&self) -> bool {
        self.waiting || self.opening || self.waiting_for_direct()
    }

    /// True while a full chunk waits for the `O_DIRECT` descriptor, which
    /// the ring is opening (asked for when the upload passed
    /// [`DIRECT_AFTER`]): written now, it would go through the page cache.
    /// The client is not read meanwhile; the completion resumes it.
    pub fn waiting_for_direct(&self) -> bool {
        self.staging.as_ref().is_some_and(|(_, c)| c.is_full())
            && self.rec.as_ref().is_some_and(Recording::direct_opening)
    }

    /// Gives the partial staging chunk to the disk now (its whole blocks;
    /// the last partial block is set aside for the next chunk), so that the
    /// transfer holds no chunk of its own while it waits. Called when the
    /// client has nothing more for now (`idle`), or, under memory pressure,
    /// when reading pauses for back-pressure. Without this, a few hundred
    /// clients that send a little and go quiet could hold the whole budget.
    pub fn settle(&mut self, disk: &mut Disk, idle: bool) {
        if self.staging.is_none()
            || self.ended
            || self.waiting_for_direct()
            || !(idle || disk.under_pressure())
        {
            return;
        }
        let (at, chunk) = self.staging.take().expect("checked above");
        let Some(rec) = self.rec.as_mut() else {
            // Not recording: the chunk only waits for the upstream.
            self.held.push_back((at, Arc::new(chunk)));
            return;
        };
        let aligned = chunk.len() / ALIGN * ALIGN;
        self.tail.extend_from_slice(&chunk.filled()[aligned..]);
        let chunk = Arc::new(chunk);
        if rec.direct_not_yet() && self.received < DIRECT_AFTER as u64 {
            // Still small: through the page cache, as at the end of a small
            // upload. The partial block is set aside all the same (a later
            // direct write must start on a block boundary; it rewrites those
            // few bytes with the same values).
            rec.write_plain(disk, at, Buf::Chunk(Arc::clone(&chunk)), chunk.len());
            self.tail_written = true;
        } else if aligned > 0 {
            rec.write_blocks(disk, at, Buf::Chunk(Arc::clone(&chunk)), aligned);
        }
        self.held.push_back((at, chunk));
    }

    /// Counts `n` bytes just read into [`Spool::spare`] as part of the upload;
    /// a chunk that is now full goes to the disk.
    pub fn commit(&mut self, n: usize, disk: &mut Disk) {
        let Some((_, chunk)) = self.staging.as_mut() else {
            return;
        };
        chunk.commit(n);
        let filled = chunk.filled();
        self.crc = crc32c::crc32c_append(self.crc, &filled[filled.len() - n..]);
        self.received += n as u64;
        let full = chunk.is_full();
        if let Some(rec) = self.rec.as_mut() {
            rec.advance(n as u64, disk);
            if self.received >= DIRECT_AFTER as u64 {
                // Large now: the O_DIRECT descriptor is opened through the
                // ring while the rest of the first chunk arrives.
                rec.prepare_direct(disk);
            }
        }
        if !full || self.waiting_for_direct() {
            return; // a full chunk waiting for O_DIRECT goes from `on_done`
        }
        self.hand_full(disk);
    }

    /// Hands the full staging chunk to the disk, keeping it for the
    /// upstream.
    fn hand_full(&mut self, disk: &mut Disk) {
        let Some((at, chunk)) = self.staging.take() else {
            return;
        };
        let chunk = Arc::new(chunk);
        match self.rec.as_mut() {
            None => {}
            // The disk is behind: through the page cache (see MAX_IN_FLIGHT).
            Some(rec) if rec.disk_behind() => {
                rec.overflow(disk, at, Buf::Chunk(Arc::clone(&chunk)), CHUNK)
            }
            Some(rec) => rec.write_blocks(disk, at, Buf::Chunk(Arc::clone(&chunk)), CHUNK),
        }
        self.held.push_back((at, chunk));
    }

    /// The contiguous upload bytes held in memory from `offset` on (up to
    /// the end of the chunk that holds `offset`); empty if none.
    pub fn bytes_at(&self, offset: u64) -> &[u8] {
        let chunks = self
            .held
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
        while let Some((at, chunk)) = self.held.front() {
            if at + chunk.len() as u64 > upto {
                break;
            }
            let (_, chunk) = self.held.pop_front().expect("front exists");
            if let Ok(chunk) = Arc::try_unwrap(chunk) {
                disk.recycle(chunk); // the disk is done with it too
            }
        }
    }

    /// The client's FIN: hand the rest of the upload to the disk (see the
    /// module docs). [`Spool::try_finish`] then names it once it is all
    /// written.
    pub fn end(&mut self, disk: &mut Disk) {
        if self.ended {
            return;
        }
        self.ended = true;
        // Written now, whatever the O_DIRECT descriptor is doing (a chunk
        // that is not full goes through the page cache until it is open):
        // a spool let go of after its end must not hold the last bytes.
        self.write_end(disk);
    }

    /// Hands what is left at the end (the staging chunk, or a partial
    /// block set aside) to the disk.
    fn write_end(&mut self, disk: &mut Disk) {
        let staging = self.staging.take();
        let Some(rec) = self.rec.as_mut() else {
            if let Some((at, chunk)) = staging {
                self.held.push_back((at, Arc::new(chunk)));
            }
            return;
        };
        rec.goal = Goal::Finish;
        let Some((at, chunk)) = staging else {
            // Nothing in hand but, perhaps, a partial block set aside (and
            // perhaps written already).
            let tail = std::mem::take(&mut self.tail);
            if !self.tail_written {
                let at = self.received - tail.len() as u64;
                let len = tail.len();
                rec.write_plain(disk, at, Buf::Bytes(tail.into()), len);
            }
            return;
        };
        let len = chunk.len();
        let chunk = Arc::new(chunk);
        if rec.direct_not_yet() && len < DIRECT_AFTER {
            // A small upload: one write through the page cache. The chunk
            // stays until the upstream has all of it (`release`).
            rec.write_plain(disk, at, Buf::Chunk(Arc::clone(&chunk)), len);
        } else {
            let aligned = len / ALIGN * ALIGN;
            let last: Box<[u8]> = chunk.filled()[aligned..].into();
            rec.write_plain(disk, at + aligned as u64, Buf::Bytes(last), len - aligned);
            if aligned > 0 {
                rec.write_blocks(disk, at, Buf::Chunk(Arc::clone(&chunk)), aligned);
            }
        }
        self.held.push_back((at, chunk));
    }

    /// Once the upload has ended and every write has completed: trims the
    /// file and gives it its final name. `Ok(false)` while there is still
    /// something to wait for. Without a recording, the upload is final as
    /// soon as it has ended.
    pub fn try_finish(&mut self, disk: &mut Disk) -> io::Result<bool> {
        let Some(rec) = self.rec.as_mut() else {
            return Ok(self.ended);
        };
        if rec.is_finished() {
            return Ok(true);
        }
        if !self.ended {
            return Ok(false);
        }
        match rec.advance_to_end(disk) {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(e),
        }
    }

    /// An operation of ours has completed. If it opened the `O_DIRECT`
    /// descriptor, what waited for it goes to the disk now.
    pub fn on_done(&mut self, mut done: Done, disk: &mut Disk) {
        let Some(rec) = self.rec.as_mut() else {
            // Recording given up meanwhile: a descriptor opened for it is
            // closed through the ring too.
            if let Some(file) = done.opened.take() {
                disk.release(Arc::new(file));
            }
            return;
        };
        let was_opening = rec.direct_opening();
        rec.on_done(done, disk);
        if !was_opening || rec.direct_opening() {
            return;
        }
        if !self.ended && self.staging.as_ref().is_some_and(|(_, c)| c.is_full()) {
            self.hand_full(disk);
        }
    }

    /// The first failed disk write, if any (for the caller to act on at
    /// once rather than at the end).
    pub fn take_failure(&mut self) -> Option<io::Error> {
        self.rec.as_mut().and_then(Recording::take_failure)
    }

    /// Stops recording and goes on passing bytes (the default way with a
    /// failing disk): the bytes not yet handed to the disk are written,
    /// and the recording is handed to the loop, which keeps its valid prefix
    /// as `.incomplete` (or removes it) once its writes have landed.
    pub fn give_up(&mut self, why: &io::Error, disk: &mut Disk) {
        let Some(mut rec) = self.rec.take() else {
            return;
        };
        self.flush_for_keeping(&mut rec, disk);
        rec.given_up = Some(crate::error::brief(why));
        self.not_recorded = Some(format!("recording failed: {}", crate::error::brief(why)));
        drop(rec); // to the loop's closing table
    }

    /// Hands the bytes received but not on the disk yet (the staging chunk,
    /// or a partial block set aside) to it, through the page cache.
    fn flush_for_keeping(&mut self, rec: &mut Recording, disk: &mut Disk) {
        if let Some((at, chunk)) = self.staging.take() {
            let len = chunk.len();
            let chunk = Arc::new(chunk);
            rec.write_plain(disk, at, Buf::Chunk(Arc::clone(&chunk)), len);
            self.held.push_back((at, chunk));
        } else if !self.tail_written && !self.tail.is_empty() {
            let at = self.received - self.tail.len() as u64;
            let len = self.tail.len();
            rec.write_plain(disk, at, Buf::Bytes(self.tail.as_slice().into()), len);
        }
        self.tail.clear();
        self.tail_written = false;
    }

    /// Ends the recording of an upload that will not be finished: its bytes
    /// so far are kept as `.incomplete` (valid prefix) once they have
    /// landed, by the loop (see `recording`).
    pub fn keep_incomplete(mut self, disk: &mut Disk) {
        if let Some(mut rec) = self.rec.take() {
            if !self.ended {
                self.flush_for_keeping(&mut rec, disk);
            }
        }
    }

    /// Removes the unfinished file (writes in flight land in an unlinked
    /// file, which goes away with them).
    pub fn discard(mut self) {
        if let Some(rec) = self.rec.as_mut() {
            rec.goal = Goal::Discard;
        }
    }

    /// Upload bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.received
    }

    pub fn crc32c(&self) -> u32 {
        self.crc
    }

    /// The recording's name (`-` if there never was one).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("-")
    }

    /// Where the recording is now, while there is one.
    pub fn path(&self) -> Option<&Path> {
        self.rec.as_ref().map(Recording::path)
    }

    /// What became of the recording, for messages: `kept as NAME`, or why
    /// there is none.
    pub fn kept_as(&self) -> String {
        match (&self.rec, &self.not_recorded) {
            (Some(rec), _) => format!("kept as {}", rec.name()),
            (None, Some(why)) => format!("not recorded: {why}"),
            (None, None) => "not recorded".to_string(),
        }
    }

    /// Why the upload is not (or no longer) recorded, if it is not.
    pub fn not_recorded(&self) -> Option<&str> {
        self.not_recorded.as_deref()
    }

    /// True while the upload is being recorded.
    pub fn is_recording(&self) -> bool {
        self.rec.is_some()
    }

    /// True once the upload is final: under its final name, or, when it is
    /// not recorded, received whole.
    pub fn is_finished(&self) -> bool {
        match &self.rec {
            Some(rec) => rec.is_finished(),
            None => self.ended,
        }
    }
}

#[cfg(test)]
mod tests;
