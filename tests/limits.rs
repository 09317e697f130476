//! Limits against slow, idle and greedy peers: each protection, proven on
//! real sockets.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use stopover::client::Verdict;

#[test]
fn slowloris_peers_at_capacity_are_cut_and_a_good_client_is_served() {
    // Every slot taken by a peer trickling one byte every 50 ms: just
    // enough to never be idle. Only --min-rate frees the slots.
    const SLOTS: usize = 50;
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(
        server.addr,
        &dirs.path().join("s"),
        &["--max-conns", &SLOTS.to_string(), "--min-rate", "1KiB/1s"],
    );
    let mut slow: Vec<TcpStream> = (0..SLOTS)
        .map(|_| TcpStream::connect(proxy.addr).unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // A byte to each, every 50 ms, until told to stop: pacing the
            // hostile peers, not synchronising the test.
            while !stop.load(Ordering::SeqCst) {
                for s in slow.iter_mut() {
                    let _ = s.write_all(b"x");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            slow
        })
    };
    proxy.wait_for_log("at capacity");
    let data = random_bytes(8 << 20, 63);
    let receipt = send(proxy.addr, &data).expect("the good client completes");
    assert_eq!(receipt.verdict(), Verdict::Verified);
    stop.store(true, Ordering::SeqCst);
    for s in trickler.join().unwrap() {
        reset(s);
    }
    proxy.wait_for_log("below --min-rate");
}

#[test]
fn the_server_cuts_a_trickling_upload_below_its_minimum_rate() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--max-conns", "1", "--min-rate", "1KiB/1s"]);
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 8];
    let mut cut = false;
    for _ in 0..100 {
        // 10 bytes a second: alive, never idle, far too slow.
        if slow.write_all(b"x").is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100)); // pacing the slow peer
    }
    if !cut {
        cut = matches!(slow.read(&mut buf), Ok(0) | Err(_));
    }
    assert!(cut, "the trickling upload was never cut");
    server.wait_for_log("below --min-rate");
    assert_eq!(
        send(server.addr, b"a real upload").unwrap().verdict(),
        Verdict::Verified,
        "its slot is free again"
    );
    wait_until("the partial is removed", || {
        file_names(dir.path()).iter().all(|n| !n.ends_with(".part"))
    });
}

#[test]
fn idle_peers_are_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--idle-timeout", "1s"]);
    let mut quiet = TcpStream::connect(server.addr).unwrap();
    quiet.write_all(b"a few bytes, then silence").unwrap();
    quiet.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 16];
    // The server closes on us (with a reset: the upload was aborted). A
    // broken idle timeout shows as the read timing out.
    match quiet.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close without an answer, got {other:?}"),
    }
    server.wait_for_log("idle for 1s: upload aborted");
    wait_until("the partial file is removed", || {
        file_names(dir.path()).is_empty()
    });
}

#[test]
fn max_conns_holds_further_clients_in_the_backlog_until_a_slot_frees() {
    for role in ["server", "proxy"] {
        let dirs = tempfile::tempdir().unwrap();
        let server = spawn_server(
            &dirs.path().join("r"),
            &["--max-conns", if role == "server" { "2" } else { "100" }],
        );
        let proxy = spawn_proxy(
            server.addr,
            &dirs.path().join("s"),
            &["--max-conns", if role == "proxy" { "2" } else { "100" }],
        );
        let front = if role == "server" {
            server.addr
        } else {
            proxy.addr
        };
        let mut first = TcpStream::connect(front).unwrap();
        let mut second = TcpStream::connect(front).unwrap();
        first.write_all(b"1").unwrap();
        second.write_all(b"2").unwrap();
        let limited = if role == "server" { &server } else { &proxy };
        limited.wait_for_log("at capacity");
        // A third client is connected (the kernel's backlog) but not served.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(send(front, b"third").map(|r| r.line)));
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "{role}: the third must wait for a slot"
        );
        // Finishing one frees a slot; the third is served.
        assert!(
            finish_and_read(&mut first, b"").starts_with("OK bytes=1 "),
            "{role}"
        );
        let third = rx.recv_timeout(PATIENCE).unwrap().unwrap();
        assert!(third.starts_with("OK bytes=5 "), "{role}: {third}");
        assert!(
            finish_and_read(&mut second, b"").starts_with("OK bytes=1 "),
            "{role}"
        );
    }
}

#[test]
fn max_bytes_refuses_large_uploads_and_removes_the_partial() {
    let dirs = tempfile::tempdir().unwrap();
    let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
    let server = spawn_server(&recv, &["--max-bytes", "100KiB"]);
    let proxy = spawn_proxy(server.addr, &spool, &["--max-bytes", "50KiB"]);
    for (to, limit) in [(server.addr, 102_400), (proxy.addr, 51_200)] {
        let receipt = send(to, &random_bytes(1 << 20, 64)).expect("an answer comes back");
        assert_eq!(receipt.line, format!("ERR too large: limit {limit} bytes"));
        assert_eq!(
            send(to, &random_bytes(limit as usize, 65))
                .unwrap()
                .verdict(),
            Verdict::Verified,
            "at the limit is fine"
        );
    }
    // A refused upload is nobody's copy: no .part at the server and no
    // .part or .incomplete at the proxy.
    wait_until("no partial files remain", || {
        file_names(&recv)
            .iter()
            .chain(file_names(&spool).iter())
            .all(|n| !n.ends_with(".part") && !n.ends_with(".incomplete"))
    });
    assert_eq!(final_files(&recv).len(), 2);
    assert_eq!(
        final_files(&spool).len(),
        1,
        "the proxy keeps only what it accepted"
    );
}

#[test]
fn idle_and_half_closed_silent_peers_cost_no_cpu() {
    // A fake upstream that reads everything and then never answers.
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (keep_tx, keep_rx) = mpsc::channel::<TcpStream>();
    std::thread::spawn(move || {
        for mut sock in upstream.incoming().flatten() {
            let _ = read_all(&mut sock);
            let _ = keep_tx.send(sock);
        }
    });
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(up_addr, &dirs.path().join("s"), &[]);
    // 1000 idle connections to the server, and to the proxy one client
    // that half-closed and then went silent (never reads its answer).
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    let mut silent = TcpStream::connect(proxy.addr).unwrap();
    silent.write_all(b"done, and now silence").unwrap();
    silent.shutdown(Shutdown::Write).unwrap();
    wait_until("the server has accepted them all", || {
        open_fds(server.pid()) >= 2000
    });
    let _upstream_side = keep_rx.recv_timeout(PATIENCE).unwrap();
    let (s0, p0) = (cpu_seconds(server.pid()), cpu_seconds(proxy.pid()));
    // Observe for a while: a loop that spins on an unhandled event would
    // burn this whole interval in CPU time.
    std::thread::sleep(Duration::from_secs(3));
    let (s1, p1) = (cpu_seconds(server.pid()), cpu_seconds(proxy.pid()));
    eprintln!(
        "CPU over 3 s: server {:.2} s, proxy {:.2} s",
        s1 - s0,
        p1 - p0
    );
    assert!(
        s1 - s0 < 0.3,
        "server used {:.2} s of CPU while idle",
        s1 - s0
    );
    assert!(
        p1 - p0 < 0.3,
        "proxy used {:.2} s of CPU while waiting",
        p1 - p0
    );
    drop(idle);
}

#[test]
fn a_slow_client_below_the_low_water_mark_is_not_mistaken_for_idle() {
    // The server only wakes for 64 KiB at a time (SO_RCVLOWAT). A client
    // sending 100 bytes every 300 ms moves far less than that within the
    // 1 s idle timeout, yet it is alive and must not be cut off.
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--idle-timeout", "1s"]);
    let data = random_bytes(1500, 68);
    let mut sock = TcpStream::connect(server.addr).unwrap();
    for chunk in data.chunks(100) {
        sock.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(300)); // pacing the slow peer
    }
    let answer = finish_and_read(&mut sock, b"");
    assert!(answer.starts_with("OK bytes=1500 "), "{answer}");
    assert!(
        server.log_lines().iter().all(|l| !l.contains("idle")),
        "{:#?}",
        server.log_lines()
    );
}

// ---- Answers stay one line ----

#[test]
fn a_client_silent_mid_upload_is_closed_by_the_proxy_and_its_spool_kept() {
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let spool = dirs.path().join("s");
    let proxy = spawn_proxy(server.addr, &spool, &["--idle-timeout", "1s"]);
    let base = conn_fds(proxy.pid());
    let mut quiet = TcpStream::connect(proxy.addr).unwrap();
    quiet.write_all(b"a few bytes, then silence").unwrap();
    quiet.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 16];
    match quiet.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the proxy to close on us, got {other:?}"),
    }
    proxy.wait_for_log("aborted its upload");
    wait_until("the proxy releases the transfer", || {
        proxy.log_lines().iter().any(|l| l.contains("idle for 1s")) && conn_fds(proxy.pid()) == base
    });
    let kept = file_names(&spool);
    assert!(
        kept.len() == 1 && kept[0].ends_with(".incomplete"),
        "{kept:?}"
    );
}
