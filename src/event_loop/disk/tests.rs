use super::*;
use std::os::unix::fs::OpenOptionsExt;

fn disk() -> (mio::Poll, Disk) {
    let poll = mio::Poll::new().unwrap();
    let disk = Disk::new(poll.registry(), mio::Token(7), "test", DEFAULT_BUDGET);
    (poll, disk)
}

/// Reaps until `n` completions have come (or 10 s).
fn wait_for(disk: &mut Disk, poll: &mut mio::Poll, n: usize) -> Vec<Done> {
    let mut done = Vec::new();
    let mut events = mio::Events::with_capacity(8);
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.len() < n && Instant::now() < deadline {
        // As the loop does: what is queued (a retry, too) goes to the
        // kernel before waiting.
        disk.submit();
        if !disk.has_completions() {
            // EINTR is normal: io_uring interrupts the wait to post a
            // completion.
            let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
        }
        done.extend(disk.reap());
    }
    done
}

#[test]
fn chunks_are_aligned_and_fill_from_the_front() {
    let (_poll, mut disk) = disk();
    let mut c = disk.chunk().unwrap();
    assert_eq!(c.spare().as_ptr() as usize % ALIGN, 0);
    c.spare()[..3].copy_from_slice(b"abc");
    c.commit(3);
    assert_eq!(c.filled(), b"abc");
    assert_eq!(c.spare().len(), CHUNK - 3);
    c.mark_submitted();
    assert!(
        c.spare().is_empty(),
        "a submitted chunk takes no more bytes"
    );
}

#[test]
fn the_budget_bounds_chunks_and_wakes_waiters_in_order() {
    let (_poll, mut disk) = disk();
    disk.budget = MIN_CHUNKS;
    let held: Vec<Chunk> = (0..MIN_CHUNKS).map(|_| disk.chunk().unwrap()).collect();
    assert!(disk.chunk().is_none(), "the budget is spent");
    assert!(disk.under_pressure());
    for key in 0..3 {
        disk.wait(Owner { key, id: 1 });
    }
    assert!(disk.wakeups().is_empty(), "nothing is free yet");
    let mut held = held.into_iter();
    disk.recycle(held.next().unwrap()); // back to the pool
    drop(held.next().unwrap()); // or freed: both give room back
    assert!(disk.has_wakeups(), "the loop must not sleep now");
    let woken: Vec<usize> = disk.wakeups().iter().map(|o| o.key).collect();
    assert_eq!(woken, [0, 1], "one per free chunk, oldest first");
    assert_eq!(disk.waiting(), 1);
    assert!(
        disk.has_wakeups(),
        "the woken have not taken their chunks yet"
    );
    let taken = (disk.chunk().unwrap(), disk.chunk().unwrap());
    assert!(
        !disk.has_wakeups(),
        "the budget is spent again: nothing to wake"
    );
    drop(taken);
}

#[test]
fn writes_reservations_and_truncation_complete_through_the_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let plain = Arc::new(std::fs::File::create(&path).unwrap());
    // O_DIRECT where the filesystem allows it, as the proxy does.
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .ok()
        .map(Arc::new);
    let (mut poll, mut disk) = disk();
    let owner = Owner { key: 1, id: 9 };
    let mut want = Vec::new();
    disk.reserve(&plain, 0, 0, 8 * CHUNK as u64, owner);
    for i in 0..4u8 {
        let mut c = disk.chunk().unwrap();
        let n = c.spare().len();
        c.spare().fill(i + 1);
        c.commit(n);
        want.extend_from_slice(c.filled());
        let (file, fallback) = match &direct {
            Some(d) => (d, Some(&plain)),
            None => (&plain, None),
        };
        let at = i as u64 * CHUNK as u64;
        disk.write(file, fallback, at, Buf::Chunk(Arc::new(c)), CHUNK, owner);
    }
    let done = wait_for(&mut disk, &mut poll, 5);
    assert_eq!(done.len(), 5, "every operation completes");
    for d in &done {
        assert_eq!(d.owner, owner);
        assert!(d.result.is_ok(), "{:?}", d.result);
    }
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        8 * CHUNK as u64,
        "fallocate mode 0 extends the file"
    );
    disk.truncate(&plain, 4 * CHUNK as u64, owner);
    let done = wait_for(&mut disk, &mut poll, 1);
    assert_eq!(done.len(), 1);
    assert!(matches!(done[0].op, Op::Truncate) && done[0].result.is_ok());
    assert_eq!(disk.in_flight(), 0);
    assert_eq!(std::fs::read(&path).unwrap(), want);
}

#[test]
fn without_a_ring_everything_completes_at_the_next_reap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let file = Arc::new(std::fs::File::create(&path).unwrap());
    let mut disk = Disk::blocking(DEFAULT_BUDGET);
    assert!(!disk.is_async());
    let owner = Owner { key: 0, id: 1 };
    disk.write(&file, None, 3, Buf::Bytes(b"abc".to_vec().into()), 3, owner);
    disk.truncate(&file, 5, owner);
    assert!(disk.has_completions());
    let done = disk.reap();
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|d| d.result.is_ok()));
    assert_eq!(std::fs::read(&path).unwrap(), b"\0\0\0ab");
}

#[test]
fn dropping_the_disk_waits_for_what_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let file = Arc::new(std::fs::File::create(&path).unwrap());
    let (_poll, mut disk) = disk();
    let owner = Owner { key: 0, id: 1 };
    for i in 0..4u64 {
        let mut c = disk.chunk().unwrap();
        let n = c.spare().len();
        c.spare().fill(7);
        c.commit(n);
        disk.write(
            &file,
            None,
            i * CHUNK as u64,
            Buf::Chunk(Arc::new(c)),
            CHUNK,
            owner,
        );
    }
    disk.submit();
    drop(disk);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * CHUNK as u64);
}

#[test]
fn a_direct_write_the_device_refuses_is_written_through_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let plain = Arc::new(std::fs::File::create(&path).unwrap());
    let Ok(direct) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    else {
        eprintln!("no O_DIRECT on {}: nothing to refuse", dir.path().display());
        return;
    };
    let direct = Arc::new(direct);
    let (mut poll, mut disk) = disk();
    let owner = Owner { key: 2, id: 3 };
    // A length that is not a multiple of the block: the kernel answers
    // EINVAL, as a device that refuses a direct write does.
    let data = b"not a whole block".to_vec();
    let len = data.len();
    disk.write(
        &direct,
        Some(&plain),
        0,
        Buf::Bytes(data.into()),
        len,
        owner,
    );
    let done = wait_for(&mut disk, &mut poll, 1);
    assert_eq!(done.len(), 1);
    assert!(done[0].result.is_ok(), "{:?}", done[0].result);
    assert!(done[0].refused_direct, "the completion says so");
    assert_eq!(disk.counters.refused_direct, 1);
    assert_eq!(std::fs::read(&path).unwrap(), b"not a whole block");
}

#[test]
fn files_are_created_through_the_ring_and_a_taken_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir_file = Arc::new(File::open(dir.path()).unwrap());
    std::fs::write(dir.path().join("taken"), b"someone else's").unwrap();
    for ring in [true, false] {
        let (mut poll, mut disk) = disk();
        if !ring {
            disk.ring = None; // the fallback: created at once, reported at the reap
        }
        let owner = Owner { key: 3, id: 9 };
        let fresh = format!("new-{ring}");
        disk.open(&dir_file, CString::new(fresh.clone()).unwrap(), owner);
        disk.open(&dir_file, CString::new("taken").unwrap(), owner);
        let done = wait_for(&mut disk, &mut poll, 2);
        assert_eq!(done.len(), 2, "ring {ring}: both opens complete");
        let made = done
            .iter()
            .find(|d| d.name.as_deref() == Some(CString::new(fresh.clone()).unwrap().as_c_str()))
            .unwrap();
        assert!(made.result.is_ok() && made.op == Op::Open, "{made:?}");
        let mut file = made.opened.as_ref().unwrap();
        std::io::Write::write_all(&mut file, b"ours").unwrap();
        assert_eq!(std::fs::read(dir.path().join(&fresh)).unwrap(), b"ours");
        let mode = std::fs::metadata(dir.path().join(&fresh)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        let taken = done.iter().find(|d| d.opened.is_none()).unwrap();
        assert_eq!(
            taken.result.as_ref().unwrap_err().kind(),
            io::ErrorKind::AlreadyExists,
            "O_EXCL: a name that exists is never opened"
        );
        assert_eq!(
            std::fs::read(dir.path().join("taken")).unwrap(),
            b"someone else's"
        );
    }
}

#[test]
fn renames_never_replace_and_removals_and_fsyncs_complete_through_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    let c = |name: &str| crate::sys::cpath(&at(name)).unwrap();
    for ring in [true, false] {
        let (mut poll, mut disk) = disk();
        if !ring {
            disk.ring = None; // the fallback: done at once, reported at the reap
        }
        std::fs::write(at("a.part"), b"upload").unwrap();
        std::fs::write(at("taken"), b"someone else's").unwrap();
        std::fs::write(at("b.part"), b"mine").unwrap();
        std::fs::write(at("gone"), b"x").unwrap();
        let owner = Owner { key: 1, id: 2 };
        let file = Arc::new(File::open(at("a.part")).unwrap());
        disk.fsync(&file, owner);
        disk.rename(c("a.part"), c("a"), owner);
        disk.rename(c("b.part"), c("taken"), owner);
        disk.unlink(c("gone"), Some(owner));
        let done = wait_for(&mut disk, &mut poll, 4);
        assert_eq!(done.len(), 4, "ring {ring}: {done:?}");
        let of = |op: Op| done.iter().filter(move |d| d.op == op);
        assert!(of(Op::Fsync).all(|d| d.result.is_ok()));
        assert!(of(Op::Unlink).all(|d| d.result.is_ok()));
        assert!(!at("gone").exists());
        let renames: Vec<_> = of(Op::Rename).collect();
        assert_eq!(renames.len(), 2);
        assert_eq!(renames.iter().filter(|d| d.result.is_ok()).count(), 1);
        let refused = renames.iter().find(|d| d.result.is_err()).unwrap();
        assert_eq!(
            refused.result.as_ref().unwrap_err().kind(),
            io::ErrorKind::AlreadyExists,
            "RENAME_NOREPLACE: an existing name is never replaced"
        );
        assert_eq!(std::fs::read(at("a")).unwrap(), b"upload");
        assert_eq!(std::fs::read(at("taken")).unwrap(), b"someone else's");
        assert_eq!(std::fs::read(at("b.part")).unwrap(), b"mine");
        for name in ["a", "taken", "b.part"] {
            std::fs::remove_file(at(name)).unwrap();
        }
    }
}

/// The path a descriptor of this process refers to, if it is open.
fn fd_path(fd: i32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()
}

#[test]
fn the_last_release_closes_the_file_through_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("closed-through-the-ring");
    let file = Arc::new(File::create(&path).unwrap());
    let fd = file.as_raw_fd();
    let (mut poll, mut disk) = disk();
    let owner = Owner { key: 0, id: 1 };
    // A write in flight holds the file too: releasing ours does not close it.
    disk.write(&file, None, 0, Buf::Bytes(b"abc".to_vec().into()), 3, owner);
    disk.release(file);
    assert_eq!(fd_path(fd).as_deref(), Some(path.as_path()), "still open");
    let done = wait_for(&mut disk, &mut poll, 1);
    assert!(done[0].result.is_ok(), "{done:?}");
    // The write's completion let go of the last reference: the close is
    // queued on the ring (not done on this thread), and done by the kernel.
    assert_eq!(disk.in_flight(), 1, "a close is queued");
    assert_eq!(fd_path(fd).as_deref(), Some(path.as_path()), "still open");
    let _ = disk.drain(Instant::now() + Duration::from_secs(10));
    assert_eq!(disk.in_flight(), 0);
    assert_ne!(
        fd_path(fd).as_deref(),
        Some(path.as_path()),
        "the descriptor is closed"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"abc");
}
