//! Stopping: signals, the grace period, and what a stop leaves on disk.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::*;
use stopover::client::Verdict;

#[test]
fn sigterm_lets_transfers_in_flight_finish_then_exits_0() {
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let mut proxy = spawn_proxy(server.addr, &dirs.path().join("s"), &["--grace", "30s"]);
    let data = random_bytes(1 << 20, 66);
    let mut in_flight = TcpStream::connect(proxy.addr).unwrap();
    in_flight.write_all(&data[..1000]).unwrap();
    wait_until("the proxy has the transfer", || {
        !file_names(&dirs.path().join("s")).is_empty()
    });
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    proxy.wait_for_log("shutting down");
    // No new clients.
    assert!(send(proxy.addr, b"late").is_err(), "the listener is closed");
    // The transfer in flight still completes.
    let answer = finish_and_read(&mut in_flight, &data[1000..]);
    assert!(
        answer.starts_with(&format!("OK bytes={} ", data.len())),
        "{answer} {:#?}",
        proxy.log_lines()
    );
    let status = proxy.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    proxy.wait_for_log("stopped: 1 relayed");
}

#[test]
fn shutdown_grace_runs_out_and_unfinished_uploads_are_kept_incomplete() {
    let dirs = tempfile::tempdir().unwrap();
    let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
    let server = spawn_server(&recv, &["--grace", "300ms"]);
    let mut proxy = spawn_proxy(server.addr, &spool, &["--grace", "300ms"]);
    let mut stuck = TcpStream::connect(proxy.addr).unwrap();
    stuck.write_all(b"never finished").unwrap();
    wait_until("the server is receiving", || !file_names(&recv).is_empty());
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    assert_eq!(proxy.child.wait().unwrap().code(), Some(0));
    proxy.wait_for_log("1 aborted");
    wait_until("the server discards its partial", || {
        file_names(&recv).is_empty()
    });
    let kept = file_names(&spool);
    assert!(
        kept.len() == 1 && kept[0].ends_with(".incomplete"),
        "{kept:?}"
    );
    drop(server);
    // And a second signal stops at once: with an hour of grace, only the
    // second signal can end it before the watchdog does.
    let mut server = spawn_server(&recv, &["--grace", "1h"]);
    let mut hanging = TcpStream::connect(server.addr).unwrap();
    hanging.write_all(b"x").unwrap();
    wait_until("the server has it", || !file_names(&recv).is_empty());
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    server.wait_for_log("shutting down");
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    let pid = server.pid();
    wait_until("the second signal stops the server", || {
        matches!(server.child.try_wait(), Ok(Some(_)))
    });
    assert_eq!(server.child.wait().unwrap().code(), Some(0), "pid {pid}");
    assert!(
        final_files(&recv).is_empty(),
        "no final name for an unfinished upload"
    );
}

#[test]
fn without_io_uring_an_upload_cut_by_shutdown_is_kept_incomplete_too() {
    // Without a ring, each disk operation completes at once and waits only
    // to be reaped; keeping an upload takes several (its tail, the trim,
    // the rename), and the stop must go round until all are done. A size
    // past the O_DIRECT threshold and not block-aligned takes them all.
    let dirs = tempfile::tempdir().unwrap();
    let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
    let server = spawn_server(&recv, &["--grace", "200ms"]);
    let mut cmd = proxy_command(server.addr, &spool, &["--grace", "200ms"]);
    cmd.env(stopover::event_loop::disk::NO_RING_ENV, "1");
    let mut proxy = spawn_with(&mut cmd);
    proxy.wait_for_log("io_uring not available");
    let data = random_bytes(100_000, 77);
    let mut stuck = TcpStream::connect(proxy.addr).unwrap();
    stuck.write_all(&data).unwrap();
    wait_until("the server has it all", || {
        file_names(&recv)
            .iter()
            .any(|f| std::fs::metadata(recv.join(f)).is_ok_and(|m| m.len() == data.len() as u64))
    });
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    assert_eq!(proxy.child.wait().unwrap().code(), Some(0));
    let kept = file_names(&spool);
    assert!(
        kept.len() == 1 && kept[0].ends_with(".incomplete"),
        "no .part outlives its transfer: {kept:?}"
    );
    assert_eq!(std::fs::read(spool.join(&kept[0])).unwrap(), data);
    drop(stuck);
}

#[test]
fn leftover_part_files_are_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let leftover = dir.path().join("20200101T000000.000000Z-1-000001.part");
    std::fs::write(&leftover, b"from a crash").unwrap();
    let server = spawn_server(dir.path(), &[]);
    let line = server.wait_for_log("leftover");
    assert!(line.contains("1 leftover .part"), "{line}");
    assert_eq!(
        send(server.addr, b"new").unwrap().verdict(),
        Verdict::Verified
    );
    assert_eq!(std::fs::read(&leftover).unwrap(), b"from a crash");
}
