//! A full or failing spool disk, on real filesystems: a size-limited tmpfs
//! and an ext4 image on a loop device, created here when the tests run as
//! root (each test says so and passes without checking anything where it
//! cannot mount).
//!
//! What must hold (issue 18): by default every transfer is relayed and
//! verified however full the spool's disk, no `.part` is left once a
//! transfer has ended, a kept `.incomplete` is a valid prefix of its upload
//! (no hole, no zero padding), and the warnings are throttled; with
//! `--on-disk-error refuse` the uploads that cannot be recorded get `ERR`
//! with the same cleanliness. And without `io_uring` the spool writes
//! through the page cache instead of making the loop wait for the device.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use stopover::client::Verdict;

/// A filesystem mounted for one test; unmounted (and its image removed)
/// when dropped.
struct Mount {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Mount {
    /// An ext4 image of `mib` MiB on a loop device, or why not.
    fn ext4(mib: u64) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().join("image");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let file = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        file.set_len(mib << 20).map_err(|e| e.to_string())?;
        // -m 0: no blocks reserved for root (we are root: they would hide
        // the full disk); no lazy init, so nothing writes behind our back.
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
            ],
            &[&image],
        )?;
        run("mount", &["-o", "loop"], &[&image, &mnt])?;
        Ok(Mount { dir, mounted: true })
    }

    /// A tmpfs of `mib` MiB, or why not.
    fn tmpfs(mib: u64) -> Result<Mount, String> {
        Mount::tmpfs_with(&format!("size={mib}m"))
    }

    /// A tmpfs mounted with `options`, or why not.
    fn tmpfs_with(options: &str) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let size = options.to_string();
        run("mount", &["-t", "tmpfs", "-o", &size, "tmpfs"], &[&mnt])?;
        Ok(Mount { dir, mounted: true })
    }

    /// Where the filesystem is mounted.
    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// A directory inside it (a store must be created by us, mode 0700).
    fn sub(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.path()).status();
        }
    }
}

fn run(cmd: &str, args: &[&str], paths: &[&Path]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .args(paths)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Bytes free in the filesystem holding `path` (`statvfs`).
fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string and a zeroed struct that outlive the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

/// The mount, or `None` after saying why this test checks nothing.
fn mounted(test: &str, m: Result<Mount, String>) -> Option<Mount> {
    match m {
        Ok(m) => Some(m),
        Err(why) => {
            eprintln!("{test}: SKIPPED, cannot mount a test filesystem here: {why}");
            None
        }
    }
}

/// Names in `dir` ending with `suffix`.
fn with_suffix(dir: &Path, suffix: &str) -> Vec<String> {
    file_names(dir)
        .into_iter()
        .filter(|n| n.ends_with(suffix))
        .collect()
}

/// Sends `uploads` (from `threads` clients at once) and returns each answer
/// line with the index of its upload.
fn send_all(to: std::net::SocketAddr, uploads: &[Vec<u8>], threads: usize) -> Vec<(usize, String)> {
    let uploads = std::sync::Arc::new(uploads.to_vec());
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let uploads = uploads.clone();
            std::thread::spawn(move || {
                (t..uploads.len())
                    .step_by(threads)
                    .map(|i| {
                        let line = match send(to, &uploads[i]) {
                            Ok(r) if r.verdict() == Verdict::Verified => "verified".to_string(),
                            Ok(r) => r.line,
                            Err(e) => format!("client error: {e}"),
                        };
                        (i, line)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// Every file the proxy left in `spool`: final files are whole uploads,
/// `.incomplete` files are prefixes of one (no hole, no padding), and
/// there is no `.part`.
fn check_spool(spool: &Path, uploads: &[Vec<u8>]) -> (usize, usize) {
    assert_eq!(
        with_suffix(spool, ".part"),
        Vec::<String>::new(),
        "no .part is left"
    );
    let (mut whole, mut partial) = (0, 0);
    for name in file_names(spool) {
        let data = std::fs::read(spool.join(&name)).unwrap();
        if name.ends_with(".incomplete") {
            assert!(!data.is_empty(), "{name}: an empty recording is removed");
            assert!(
                uploads.iter().any(|u| u.starts_with(&data)),
                "{name}: {} bytes that are not a prefix of any upload",
                data.len()
            );
            partial += 1;
        } else {
            assert!(uploads.contains(&data), "{name}: not a whole upload");
            whole += 1;
        }
    }
    (whole, partial)
}

fn warnings(daemon: &Spawned) -> Vec<String> {
    daemon
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("WARN"))
        .collect()
}

/// The default: a spool filesystem that fills up ends no transfer.
fn full_spool_disk_relays_everything(test: &str, mount: Mount) {
    let server_dir = tempfile::tempdir().unwrap();
    let server = spawn_server(server_dir.path(), &[]);
    let spool = mount.sub("spool");
    let proxy = spawn_proxy(server.addr, &spool, &["--stats-addr", "127.0.0.1:0"]);
    // 40 MiB into a 16 MiB filesystem.
    let uploads: Vec<Vec<u8>> = (0..40).map(|i| random_bytes(1 << 20, 1800 + i)).collect();
    let answers = send_all(proxy.addr, &uploads, 4);
    for (i, line) in &answers {
        assert_eq!(line, "verified", "{test}: upload {i} relayed and verified");
    }
    // Every transfer has ended; their files are finished by the loop as
    // their last writes land.
    let metrics = stats_addr(&proxy);
    wait_until("every recording is finished", || {
        sample(&scrape(metrics), "stopover_recordings_closing") == 0.0
    });
    let failed = sample(&scrape(metrics), "stopover_recordings_failed_total");
    let (whole, partial) = check_spool(&spool, &uploads);
    eprintln!("{test}: {whole} recorded whole, {partial} kept partial, {failed} recordings failed");
    assert!(
        failed >= 20.0,
        "{test}: most recordings could not fit: {failed}"
    );
    assert!(whole >= 1, "{test}: the first uploads were recorded");
    let warned = warnings(&proxy);
    assert!(
        warned.len() <= 12,
        "{test}: the per-transfer warnings are throttled: {warned:#?}"
    );
    // Space returns: recording resumes by itself.
    for name in file_names(&spool) {
        std::fs::remove_file(spool.join(name)).unwrap();
    }
    let data = random_bytes(3 << 20, 1900);
    assert_eq!(
        send(proxy.addr, &data).unwrap().verdict(),
        Verdict::Verified
    );
    wait_until("the new upload is recorded whole", || {
        final_files(&spool)
            .iter()
            .any(|n| std::fs::read(spool.join(n)).is_ok_and(|d| d == data))
    });
}

#[test]
fn a_full_ext4_spool_relays_every_transfer_and_leaves_no_part() {
    let test = "a_full_ext4_spool_relays_every_transfer_and_leaves_no_part";
    if let Some(m) = mounted(test, Mount::ext4(16)) {
        full_spool_disk_relays_everything(test, m);
    }
}

#[test]
fn a_full_tmpfs_spool_relays_every_transfer_and_leaves_no_part() {
    let test = "a_full_tmpfs_spool_relays_every_transfer_and_leaves_no_part";
    if let Some(m) = mounted(test, Mount::tmpfs(16)) {
        full_spool_disk_relays_everything(test, m);
    }
}

#[test]
fn a_full_spool_with_refuse_answers_err_and_leaves_no_part() {
    let test = "a_full_spool_with_refuse_answers_err_and_leaves_no_part";
    let Some(mount) = mounted(test, Mount::ext4(16)) else {
        return;
    };
    let server_dir = tempfile::tempdir().unwrap();
    let server = spawn_server(server_dir.path(), &[]);
    let spool = mount.sub("spool");
    let proxy = spawn_proxy(server.addr, &spool, &["--on-disk-error", "refuse"]);
    let uploads: Vec<Vec<u8>> = (0..30).map(|i| random_bytes(1 << 20, 2000 + i)).collect();
    let answers = send_all(proxy.addr, &uploads, 3);
    let refused: Vec<_> = answers.iter().filter(|(_, l)| l != "verified").collect();
    for (i, line) in &refused {
        assert!(
            line.starts_with("ERR proxy cannot store upload: "),
            "upload {i}: {line}"
        );
    }
    assert!(
        refused.len() >= 10,
        "most uploads cannot be recorded: {answers:?}"
    );
    // A refused upload reached the server only in part: nothing final there.
    assert_eq!(
        final_files(server_dir.path()).len(),
        answers.len() - refused.len()
    );
    wait_until("no .part is left", || {
        with_suffix(&spool, ".part").is_empty()
    });
    check_spool(&spool, &uploads);
    assert!(warnings(&proxy).len() <= 12, "{:#?}", warnings(&proxy));
}

#[test]
fn the_server_answers_err_on_a_full_disk_and_leaves_no_part() {
    let test = "the_server_answers_err_on_a_full_disk_and_leaves_no_part";
    let Some(mount) = mounted(test, Mount::ext4(16)) else {
        return;
    };
    // Leave about 1 MiB free, so that the rest of a 3 MiB upload is within
    // what the server reads into the void after refusing it (then the
    // client reads the answer rather than a reset).
    let filler = mount.path().join("filler");
    let free = free_bytes(&mount.path());
    std::fs::write(&filler, vec![1u8; (free - (1 << 20)) as usize]).unwrap();
    let dir = mount.sub("recv");
    let server = spawn_server(&dir, &[]);
    let receipt = send(server.addr, &random_bytes(3 << 20, 2100)).expect("an answer");
    assert!(receipt.line.starts_with("ERR "), "{}", receipt.line);
    wait_until("no .part is left", || file_names(&dir).is_empty());
    std::fs::remove_file(&filler).unwrap();
    let small = random_bytes(1 << 20, 2101);
    assert_eq!(
        send(server.addr, &small).unwrap().verdict(),
        Verdict::Verified
    );
}

#[test]
fn an_early_answer_mid_upload_leaves_no_part_and_no_zero_padding() {
    let test = "an_early_answer_mid_upload_leaves_no_part_and_no_zero_padding";
    let Some(mount) = mounted(test, Mount::ext4(64)) else {
        return;
    };
    // An upstream that reads 4 MiB of a 20 MiB upload, answers ERR and
    // closes (as a server that refuses mid-way does).
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let up_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut sock, _) = upstream.accept().unwrap();
        let mut buf = vec![0u8; 4 << 20];
        let _ = sock.read_exact(&mut buf);
        let _ = sock.write_all(b"ERR no thanks\n");
        let _ = sock.shutdown(Shutdown::Both);
    });
    let spool = mount.sub("spool");
    let proxy = spawn_proxy(up_addr, &spool, &[]);
    let data = random_bytes(20 << 20, 2200);
    let mut sock = TcpStream::connect(proxy.addr).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let writer = {
        let mut sock = sock.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            let _ = sock.write_all(&data);
            let _ = sock.shutdown(Shutdown::Write);
        })
    };
    let mut answer = Vec::new();
    let _ = sock.read_to_end(&mut answer);
    assert!(
        String::from_utf8_lossy(&answer).starts_with("ERR no thanks"),
        "the upstream's answer is relayed: {:?}",
        String::from_utf8_lossy(&answer)
    );
    drop(sock);
    let _ = writer.join();
    wait_until(
        "the proxy's transfer has ended and its file is kept",
        || with_suffix(&spool, ".part").is_empty() && !file_names(&spool).is_empty(),
    );
    for name in file_names(&spool) {
        let kept = std::fs::read(spool.join(&name)).unwrap();
        assert!(
            data.starts_with(&kept),
            "{name}: {} bytes, a prefix of the upload (no zero padding)",
            kept.len()
        );
    }
}

#[test]
fn a_failed_write_in_default_mode_relays_and_keeps_the_valid_prefix() {
    // RLIMIT_FSIZE: every write past 1 MiB fails with EFBIG, as on a full
    // disk, on any filesystem.
    let dirs = tempfile::tempdir().unwrap();
    let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
    let server = spawn_server(&recv, &[]);
    let mut cmd = proxy_command(server.addr, &spool, &[]);
    limit_child(&mut cmd, libc::RLIMIT_FSIZE, 1 << 20);
    let proxy = spawn_with(&mut cmd);
    let data = random_bytes(4 << 20, 2300);
    assert_eq!(
        send(proxy.addr, &data).unwrap().verdict(),
        Verdict::Verified
    );
    wait_until("the partial recording is kept", || {
        with_suffix(&spool, ".incomplete").len() == 1 && with_suffix(&spool, ".part").is_empty()
    });
    let name = &with_suffix(&spool, ".incomplete")[0];
    let kept = std::fs::read(spool.join(name)).unwrap();
    assert_eq!(kept.len(), 1 << 20, "up to the first failed write");
    assert!(data.starts_with(&kept));
    proxy.wait_for_log("its transfer went on without it");
}

/// Bytes of the final files in `dir` that are in the page cache, and their size.
fn cached_finals(dir: &Path) -> (u64, u64) {
    final_files(dir).iter().fold((0, 0), |(c, n), f| {
        let path = dir.join(f);
        (
            c + cached_bytes(&path),
            n + std::fs::metadata(&path).unwrap().len(),
        )
    })
}

#[test]
fn without_io_uring_the_spool_writes_through_the_page_cache() {
    let test = "without_io_uring_the_spool_writes_through_the_page_cache";
    let Some(mount) = mounted(test, Mount::ext4(64)) else {
        return;
    };
    let server_dir = tempfile::tempdir().unwrap();
    let server = spawn_server(server_dir.path(), &[]);
    let data = random_bytes(8 << 20, 2400);
    let mut results = Vec::new();
    for no_ring in [true, false] {
        let spool = mount.sub(if no_ring { "no-ring" } else { "ring" });
        let mut cmd = proxy_command(server.addr, &spool, &["--stats-addr", "127.0.0.1:0"]);
        if no_ring {
            cmd.env(stopover::event_loop::disk::NO_RING_ENV, "1");
        }
        let proxy = spawn_with(&mut cmd);
        if no_ring {
            proxy.wait_for_log("io_uring not available (STOPOVER_NO_IO_URING is set)");
        }
        assert_eq!(
            send(proxy.addr, &data).unwrap().verdict(),
            Verdict::Verified
        );
        // Bytes written through the page cache because the disk was behind.
        let overflow = sample(
            &scrape(stats_addr(&proxy)),
            "stopover_disk_overflow_bytes_total",
        );
        let (cached, len) = cached_finals(&spool);
        assert_eq!(len, 8 << 20);
        eprintln!("{test}: no ring: {no_ring}: {cached} bytes cached, {overflow} overflowed");
        results.push((cached, overflow as u64));
    }
    let [(no_ring_cached, no_ring_overflow), (ring_cached, ring_overflow)] = results[..] else {
        unreachable!()
    };
    assert!(
        no_ring_cached > (8 << 20) / 2 && no_ring_overflow == 0,
        "without a ring: ordinary writes, into the page cache ({no_ring_cached} cached)"
    );
    // With a ring, O_DIRECT: what is cached is what overflowed (a disk
    // behind the client), and the last partial pages.
    assert!(
        ring_cached <= ring_overflow + (256 << 10),
        "with a ring: {ring_cached} bytes cached, only {ring_overflow} overflowed"
    );
}

#[test]
fn a_spool_file_that_cannot_be_created_relays_unrecorded_or_refuses() {
    let test = "a_spool_file_that_cannot_be_created_relays_unrecorded_or_refuses";
    // Few inodes: once the proxies have started, the rest are taken, and
    // creating a spool file fails with ENOSPC.
    let Some(mount) = mounted(test, Mount::tmpfs_with("size=16m,nr_inodes=8")) else {
        return;
    };
    let server_dir = tempfile::tempdir().unwrap();
    let server = spawn_server(server_dir.path(), &[]);
    let relay = spawn_proxy(server.addr, &mount.sub("a"), &[]);
    let refuse = spawn_proxy(server.addr, &mount.sub("b"), &["--on-disk-error", "refuse"]);
    let fillers: Vec<PathBuf> = (0..8)
        .map(|i| mount.path().join(format!("filler-{i}")))
        .take_while(|p| std::fs::write(p, b"x").is_ok())
        .collect();
    assert!(std::fs::write(mount.path().join("one-more"), b"x").is_err());
    let data = random_bytes(300_000, 2500);
    for _ in 0..3 {
        assert_eq!(
            send(relay.addr, &data).unwrap().verdict(),
            Verdict::Verified
        );
        let line = send(refuse.addr, &data).unwrap().line;
        assert!(
            line.starts_with("ERR proxy cannot store upload: No space left on device"),
            "{line}"
        );
    }
    relay.wait_for_log("without recording");
    assert!(file_names(&mount.sub("a")).is_empty() && file_names(&mount.sub("b")).is_empty());
    // Space returns: the next upload is recorded again.
    std::fs::remove_file(&fillers[0]).unwrap();
    assert_eq!(
        send(relay.addr, &data).unwrap().verdict(),
        Verdict::Verified
    );
    wait_until("the upload is recorded", || {
        final_files(&mount.sub("a")).len() == 1
    });
}

/// The spool file is created through the ring while the transfer starts
/// connecting (see `proxy::files`). A flood of clients that reset before
/// sending a byte leaves nothing behind (each file made for one is
/// removed), and a client that does send is recorded whole. (A file whose
/// transfer is gone before it exists is removed too: `proxy::files`'s unit
/// test, since on loopback the race is too narrow to provoke.)
#[test]
fn a_flood_of_resets_leaves_nothing_and_an_upload_is_recorded_whole() {
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let spool = dirs.path().join("s");
    let proxy = spawn_proxy(server.addr, &spool, &[]);
    let base = conn_fds(proxy.pid());
    for _ in 0..300 {
        let sock = TcpStream::connect(proxy.addr).unwrap();
        socket2::SockRef::from(&sock)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(sock); // a reset before any byte
    }
    let upload = random_bytes(100_000, 7);
    assert_eq!(
        send(proxy.addr, &upload).unwrap().verdict(),
        Verdict::Verified
    );
    wait_until("every reset transfer is closed and its file gone", || {
        conn_fds(proxy.pid()) == base && with_suffix(&spool, ".part").is_empty()
    });
    let files = file_names(&spool);
    assert_eq!(
        files.len(),
        1,
        "only the real upload is recorded: {files:?}"
    );
    assert_eq!(std::fs::read(spool.join(&files[0])).unwrap(), upload);
}
