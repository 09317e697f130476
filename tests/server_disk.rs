//! The server's file work goes through its disk (`io_uring`), never its
//! loop: creation, writes, reservation and trim, syncs, the rename, the
//! removal of an aborted upload (see `src/server/upload.rs`).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use stopover::client::Verdict;
use stopover::event_loop::disk::NO_RING_ENV;

/// Positions in `lines` of the first line containing each of `needles`,
/// searched in order, each after the one before.
fn in_order(lines: &[String], needles: &[&str]) -> Result<(), String> {
    let mut from = 0;
    for needle in needles {
        match lines[from..].iter().position(|l| l.contains(needle)) {
            Some(at) => from += at + 1,
            None => return Err(format!("no {needle:?} after line {from}")),
        }
    }
    Ok(())
}

#[test]
fn with_fsync_the_answer_waits_for_both_syncs_and_the_rename_through_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--fsync", "-vv"]);
    let data = random_bytes((3 << 20) + 100_000, 71);
    assert_eq!(
        send(server.addr, &data).unwrap().verdict(),
        Verdict::Verified
    );
    server.wait_for_log("server: stored ");
    // The first connection is #0: its file created, written, trimmed
    // (space is reserved ahead past 1 MiB), synced, named, its directory synced, and
    // only then the OK.
    let lines = server.log_lines();
    let steps = [
        "server: #0 disk open done",
        "server: #0 disk write ",
        "server: #0 disk ftruncate done",
        "server: #0 disk fsync done",
        "server: #0 disk rename done",
        "server: #0 disk fsync done",
        "server: stored ",
    ];
    if let Err(e) = in_order(&lines, &steps) {
        panic!("{e}; log:\n{}", lines.join("\n"));
    }
}

#[test]
fn uploads_are_counted_by_the_disk_and_nothing_is_left_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--stats-addr", "127.0.0.1:0"]);
    let sizes = [1usize, 70_000, (2 << 20) + 3];
    for (i, size) in sizes.iter().enumerate() {
        let data = random_bytes(*size, 72 + i as u64);
        assert_eq!(
            send(server.addr, &data).unwrap().verdict(),
            Verdict::Verified
        );
    }
    let body = scrape(stats_addr(&server));
    let total: usize = sizes.iter().sum();
    assert_eq!(
        sample(&body, "stopover_disk_write_bytes_total"),
        total as f64,
        "every byte stored went through the disk:\n{body}"
    );
    assert_eq!(
        sample(&body, "stopover_spool_memory_waiting"),
        0.0,
        "{body}"
    );
    // The last closes (through the ring) may still be in flight after OK.
    wait_until("no disk operation left in flight", || {
        sample(&scrape(stats_addr(&server)), "stopover_disk_in_flight") == 0.0
    });
}

#[test]
fn many_uploads_at_once_wait_for_write_memory_and_all_verify() {
    // 48 uploads of 3 MiB held open together want more chunks than the
    // server's write memory has (16): some connections stop reading until
    // chunks come back, and every upload still arrives whole.
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &[]);
    let (out, json) = run_load(&[
        "--to",
        &server.addr.to_string(),
        "-c",
        "48",
        "-n",
        "48",
        "-s",
        "3MiB",
        "--all-at-once",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json["transfers_ok"], 48, "{json}");
    assert_eq!(final_files(dir.path()).len(), 48);
    assert!(file_names(dir.path()).iter().all(|n| !n.ends_with(".part")));
}

/// Whether `strace` runs here (installed, and ptrace allowed).
fn strace_works() -> bool {
    Command::new("strace")
        .args(["-qq", "-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// The calls of thread `tid` in `trace` (`strace -f -y` output) on files
/// inside `dir` (the store's uploads: `.part` and final names), or on
/// `dir` itself with `fsync`.
fn file_calls_of(trace: &str, tid: u32, dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    let inside = format!("{dir}/");
    let synced = format!("<{dir}>");
    trace
        .lines()
        .filter(|l| l.starts_with(&format!("{tid} ")))
        .filter(|l| {
            let in_dir = l
                .match_indices(&inside)
                .any(|(at, _)| !l[at + inside.len()..].starts_with(".stopover-probe"));
            in_dir || (l.contains("fsync(") && l.contains(&synced))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_loop_thread_makes_no_file_call_on_uploads() {
    if std::env::var_os(NO_RING_ENV).is_some() {
        eprintln!("skipped: {NO_RING_ENV} is set (the disk works on the loop then)");
        return;
    }
    if !strace_works() {
        eprintln!("skipped: strace is not installed, or may not trace here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("r");
    let trace = dir.path().join("trace");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-y", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=write,pwrite64,writev,openat,rename,renameat,renameat2,fsync,fdatasync,unlink,unlinkat,fallocate,ftruncate,close",
        ])
        .arg(bin())
        .args(["server", "--listen", "127.0.0.1:0", "--fsync", "--grace", "1s"])
        .arg("--dir")
        .arg(&store);
    let server = spawn_with(&mut cmd);
    if server
        .log_lines()
        .iter()
        .any(|l| l.contains("io_uring not available") || l.contains("io_uring not usable"))
    {
        eprintln!("skipped: no io_uring here");
        return;
    }
    // Stored uploads (small, and large enough to reserve space ahead)...
    for (i, size) in [10usize, 200_000, 3 << 20].into_iter().enumerate() {
        let data = random_bytes(size, 80 + i as u64);
        assert_eq!(
            send(server.addr, &data).unwrap().verdict(),
            Verdict::Verified
        );
    }
    // ...and one aborted mid-way: its .part is removed.
    let mut sock = TcpStream::connect(server.addr).unwrap();
    sock.write_all(&random_bytes(100_000, 84)).unwrap();
    wait_until("a .part file appears", || {
        file_names(&store).iter().any(|n| n.ends_with(".part"))
    });
    socket2::SockRef::from(&sock)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(sock);
    wait_until("the partial file is removed", || {
        file_names(&store).iter().all(|n| !n.ends_with(".part"))
    });
    // Stop the server (the tracee, strace's child) so that the trace is
    // complete: strace exits with it.
    let children = format!("/proc/{0}/task/{0}/children", server.pid());
    let pid: u32 = std::fs::read_to_string(&children)
        .unwrap()
        .split_whitespace()
        .next()
        .expect("strace runs the server")
        .parse()
        .unwrap();
    // SAFETY: a plain kill(2) of the server we started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let trace = std::fs::read_to_string(&trace).unwrap();
    // The loop's thread is the process's main thread: its id is the pid.
    let calls = file_calls_of(&trace, pid, &store);
    assert!(
        calls.is_empty(),
        "file calls on the loop thread ({pid}):\n{}",
        calls.join("\n")
    );
    assert_eq!(final_files(&store).len(), 3, "{:?}", file_names(&store));
    // The check can fail: the filter sees such calls where they are made.
    let old = format!(
        "{pid} openat(AT_FDCWD, \"{0}/x.part\", O_RDWR|O_CREAT) = 9<{0}/x.part> <0.0001>\n\
         {pid} fsync(12<{0}>) = 0 <0.0002>\n\
         {pid} openat(AT_FDCWD, \"{0}/.stopover-probe-1\", O_WRONLY|O_CREAT) = 5 <0.0001>",
        store.display()
    );
    assert_eq!(file_calls_of(&old, pid, &store).len(), 2);
}
