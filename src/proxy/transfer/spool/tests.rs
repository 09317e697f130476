use super::*;
use crate::store::Store;

/// Feeds `data` to the spool in reads of `piece` bytes (at most), and,
/// if `settle`, gives the staging chunk back after each, as a transfer
/// whose client pauses between reads does. When the spool takes nothing
/// (a full chunk waits for the `O_DIRECT` descriptor), completions are
/// delivered, as the loop would.
fn fill(
    spool: &mut Spool,
    disk: &mut Disk,
    poll: &mut mio::Poll,
    data: &[u8],
    piece: usize,
    settle: bool,
) {
    let mut rest = data;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !rest.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the spool stopped taking bytes"
        );
        let spare = spool.spare(disk, rest.len().min(piece));
        let n = spare.len();
        if n == 0 {
            assert!(
                spool.waiting_for_direct(),
                "only the direct descriptor is awaited"
            );
            pump(disk, poll, |d, disk| spool.on_done(d, disk));
            continue;
        }
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

fn new_spool(store: &mut Store, closing: &Closing) -> Spool {
    Spool::new(
        Ok(store.create().unwrap()),
        Owner { key: 0, id: 1 },
        closing,
    )
}

/// Waits (at most 10 s) for the next completions and hands them to `to`.
fn pump(disk: &mut Disk, poll: &mut mio::Poll, mut to: impl FnMut(Done, &mut Disk)) {
    let mut events = mio::Events::with_capacity(8);
    disk.submit();
    if !disk.has_completions() {
        // EINTR is normal: io_uring interrupts the wait to post a completion.
        let _ = poll.poll(&mut events, Some(std::time::Duration::from_millis(100)));
    }
    for done in disk.reap() {
        to(done, disk);
    }
}

/// Reaps until the spool is final (or 10 s); true if it is.
fn finish(spool: &mut Spool, disk: &mut Disk, poll: &mut mio::Poll) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if spool.try_finish(disk).unwrap() {
            return true;
        }
        pump(disk, poll, |d, disk| spool.on_done(d, disk));
    }
    false
}

/// Reaps until every operation in flight has completed (or 10 s).
fn settle_all(spool: &mut Spool, disk: &mut Disk, poll: &mut mio::Poll) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while disk.in_flight() > 0 && std::time::Instant::now() < deadline {
        pump(disk, poll, |d, disk| spool.on_done(d, disk));
    }
}

/// Does what the proxy's closing table does: takes the recordings let go
/// of and moves them to their end.
fn close(closing: &Closing, disk: &mut Disk, poll: &mut mio::Poll) -> Vec<Ended> {
    let mut recs = closing.take_new();
    let mut ended = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !recs.is_empty() && std::time::Instant::now() < deadline {
        let mut i = 0;
        while i < recs.len() {
            match recs[i].advance_to_end(disk) {
                Some(e) => ended.push(e.unwrap()),
                None => {
                    i += 1;
                    continue;
                }
            }
            recs.remove(i);
        }
        if recs.is_empty() {
            break;
        }
        pump(disk, poll, |d, disk| {
            if let Some(r) = recs.iter_mut().find(|r| r.owner() == d.owner) {
                r.on_done(d, disk);
            }
        });
    }
    ended
}

#[test]
fn every_size_lands_whole_under_its_final_name() {
    let (_dir, mut store, mut poll, mut disk) = setup();
    let closing = Closing::default();
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
            let mut spool = new_spool(&mut store, &closing);
            fill(&mut spool, &mut disk, &mut poll, &data, piece, settle);
            // Forwarding reads the same bytes back from memory.
            let mut from_memory = Vec::new();
            while from_memory.len() < len {
                let piece = spool.bytes_at(from_memory.len() as u64);
                assert!(!piece.is_empty(), "bytes at {} are held", from_memory.len());
                from_memory.extend_from_slice(piece);
            }
            assert_eq!(from_memory, data);
            spool.release(len as u64, &mut disk);
            spool.end(&mut disk);
            assert!(
                finish(&mut spool, &mut disk, &mut poll),
                "finished at {len} bytes"
            );
            assert_eq!(spool.crc32c(), crc32c::crc32c(&data));
            let stored = std::fs::read(spool.path().unwrap()).unwrap();
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
    let closing = Closing::default();
    for len in [1000, DIRECT_AFTER + 5, CHUNK + 5] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut spool = new_spool(&mut store, &closing);
        fill(&mut spool, &mut disk, &mut poll, &data, usize::MAX, false);
        spool.end(&mut disk); // the upstream has taken nothing yet
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
        assert!(finish(&mut spool, &mut disk, &mut poll));
        assert_eq!(std::fs::read(spool.path().unwrap()).unwrap(), data);
    }
}

#[test]
fn a_disk_that_is_behind_overflows_through_the_page_cache_and_loses_nothing() {
    let (dir, mut store, mut poll, mut disk) = setup();
    let closing = Closing::default();
    // Past DIRECT_AFTER the spool asks the ring for the O_DIRECT
    // descriptor; a chunk full before it is open waits for it rather than
    // go through the page cache.
    let data: Vec<u8> = (0..9 * CHUNK + 777).map(|i| (i % 239) as u8).collect();
    let mut spool = new_spool(&mut store, &closing);
    fill(
        &mut spool,
        &mut disk,
        &mut poll,
        &data[..CHUNK],
        usize::MAX,
        false,
    );
    assert_eq!(
        disk.counters.overflow_bytes, 0,
        "nothing went through the page cache"
    );
    settle_all(&mut spool, &mut disk, &mut poll);
    assert!(
        !spool.waiting_for_direct(),
        "the completion sent the chunk on"
    );
    if !spool.rec.as_ref().unwrap().is_direct() {
        eprintln!("no O_DIRECT on {}; nothing overflows", dir.path().display());
        return;
    }
    // Then eight chunks and nothing reaped meanwhile: the disk is "behind"
    // after MAX_IN_FLIGHT of them.
    fill(
        &mut spool,
        &mut disk,
        &mut poll,
        &data[CHUNK..],
        usize::MAX,
        false,
    );
    assert_eq!(
        disk.counters.overflow_bytes,
        (8 - MAX_IN_FLIGHT as usize) as u64 * CHUNK as u64,
        "the chunks past MAX_IN_FLIGHT overflowed"
    );
    spool.end(&mut disk);
    assert!(finish(&mut spool, &mut disk, &mut poll));
    assert_eq!(std::fs::read(spool.path().unwrap()).unwrap(), data);
}

#[test]
fn an_upload_that_ends_while_its_direct_descriptor_opens_is_whole_or_incomplete() {
    // 200 KiB and its FIN in one burst: past DIRECT_AFTER the O_DIRECT
    // descriptor is asked for, and the end comes before it is open. The
    // spool is then let go of (a stop, a client lost after its FIN) before
    // any completion is delivered: the closing table must still produce
    // the whole upload, never a shorter file under its final name.
    let (_dir, mut store, mut poll, mut disk) = setup();
    let closing = Closing::default();
    let data: Vec<u8> = (0..200 * 1024).map(|i| (i % 233) as u8).collect();
    let mut spool = new_spool(&mut store, &closing);
    fill(&mut spool, &mut disk, &mut poll, &data, usize::MAX, false);
    spool.end(&mut disk);
    spool.keep_incomplete(&mut disk);
    let ended = close(&closing, &mut disk, &mut poll);
    match &ended[..] {
        [Ended::Finished(path)] | [Ended::Kept(path, _)] => {
            assert_eq!(std::fs::read(path).unwrap(), data, "{ended:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_abandoned_spool_keeps_every_byte_received_and_no_padding() {
    let (dir, mut store, mut poll, mut disk) = setup();
    let closing = Closing::default();
    // Large enough to be preallocated past its end (the zeros that must
    // not stay), cut short while its writes are in flight.
    let data: Vec<u8> = (0..3 * CHUNK + 5000).map(|i| (i % 241) as u8).collect();
    let mut spool = new_spool(&mut store, &closing);
    fill(&mut spool, &mut disk, &mut poll, &data, 100_000, true);
    assert!(
        !spool.try_finish(&mut disk).unwrap(),
        "not ended: no final name"
    );
    spool.keep_incomplete(&mut disk);
    let ended = close(&closing, &mut disk, &mut poll);
    let [Ended::Kept(path, n)] = &ended[..] else {
        panic!("kept as .incomplete: {ended:?}");
    };
    assert_eq!(*n, data.len() as u64);
    assert!(path.to_string_lossy().ends_with(".incomplete"));
    assert_eq!(
        std::fs::read(path).unwrap(),
        data,
        "every byte, no zeros after"
    );
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        [path.file_name().unwrap().to_string_lossy().into_owned()],
        "no .part left"
    );
}

#[test]
fn a_failed_write_keeps_only_the_valid_prefix() {
    let (_dir, mut store, mut poll, mut disk) = setup();
    let closing = Closing::default();
    let data: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 233) as u8).collect();
    let mut spool = new_spool(&mut store, &closing);
    fill(&mut spool, &mut disk, &mut poll, &data, usize::MAX, false);
    settle_all(&mut spool, &mut disk, &mut poll);
    // The write of the second chunk "failed" (as on a full disk): later
    // chunks landed, but the file must not have a hole.
    let failed = Done {
        owner: Owner { key: 0, id: 1 },
        op: crate::event_loop::disk::Op::Write {
            offset: CHUNK as u64,
            len: CHUNK,
            direct: true,
        },
        result: Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        refused_direct: false,
        opened: None,
        name: None,
    };
    spool.on_done(failed, &mut disk);
    let e = spool.take_failure().expect("the failure is reported");
    assert!(e.to_string().contains("No space left"), "{e}");
    spool.give_up(&e, &mut disk);
    assert!(!spool.is_recording());
    let ended = close(&closing, &mut disk, &mut poll);
    let [Ended::Kept(path, n)] = &ended[..] else {
        panic!("kept as .incomplete: {ended:?}");
    };
    assert_eq!(*n, CHUNK as u64, "up to the first failed write");
    assert_eq!(std::fs::read(path).unwrap(), &data[..CHUNK]);
}

#[test]
fn a_spool_that_records_nothing_still_passes_every_byte() {
    let (_dir, _store, mut poll, mut disk) = setup();
    let closing = Closing::default();
    let owner = Owner { key: 0, id: 1 };
    let mut spool = Spool::new(Err("disk full".into()), owner, &closing);
    let data: Vec<u8> = (0..2 * CHUNK + 77).map(|i| (i % 229) as u8).collect();
    fill(&mut spool, &mut disk, &mut poll, &data, 300_000, true);
    let mut from_memory = Vec::new();
    while from_memory.len() < data.len() {
        let piece = spool.bytes_at(from_memory.len() as u64);
        assert!(!piece.is_empty());
        from_memory.extend_from_slice(piece);
    }
    assert_eq!(from_memory, data);
    spool.end(&mut disk);
    assert!(spool.try_finish(&mut disk).unwrap() && spool.is_finished());
    assert_eq!(spool.kept_as(), "not recorded: disk full");
    assert_eq!(disk.in_flight(), 0, "nothing went to the disk");
    assert!(closing.take_new().is_empty());
}

#[test]
fn a_file_that_cannot_be_trimmed_is_neither_named_nor_kept() {
    let (dir, mut store, mut poll, mut disk) = setup();
    let closing = Closing::default();
    // Large enough to reserve space past its data (so a trim is due).
    let data: Vec<u8> = (0..3 * CHUNK + 100).map(|i| (i % 241) as u8).collect();
    let mut spool = new_spool(&mut store, &closing);
    fill(&mut spool, &mut disk, &mut poll, &data, usize::MAX, false);
    spool.end(&mut disk);
    settle_all(&mut spool, &mut disk, &mut poll);
    // Every write has landed: the recording asks for its trim first.
    assert!(
        !spool.try_finish(&mut disk).unwrap(),
        "not named before its trim"
    );
    assert_eq!(disk.in_flight(), 1, "the trim is in flight");
    // The trim "fails" (as on an I/O error).
    let failed = Done {
        owner: Owner { key: 0, id: 1 },
        op: crate::event_loop::disk::Op::Truncate,
        result: Err(io::Error::from_raw_os_error(libc::EIO)),
        refused_direct: false,
        opened: None,
        name: None,
    };
    spool.on_done(failed, &mut disk);
    let e = spool.take_failure().expect("the failure is reported");
    assert!(e.to_string().contains("Input/output"), "{e}");
    spool.give_up(&e, &mut disk);
    let ended = close(&closing, &mut disk, &mut poll);
    assert!(matches!(ended[..], [Ended::Removed]), "{ended:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while disk.in_flight() > 0 && std::time::Instant::now() < deadline {
        pump(&mut disk, &mut poll, |_, _| {});
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "no final name, no .part: {left:?}");
}
