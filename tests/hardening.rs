//! Faults and hostile peers: each protection, proven on real sockets.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use stopover::client::Verdict;

fn reset(sock: TcpStream) {
    socket2::SockRef::from(&sock)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(sock);
}

fn finish_and_read(sock: &mut TcpStream, rest: &[u8]) -> String {
    if let Err(e) = sock.write_all(rest) {
        return format!("write failed: {e}");
    }
    sock.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    sock.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn server_killed_mid_transfer_gets_err_keeps_the_spool_and_the_next_client_is_served() {
    let dirs = tempfile::tempdir().unwrap();
    let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
    let server = spawn_server(&recv, &[]);
    let server_addr = server.addr;
    let proxy = spawn_proxy(server_addr, &spool, &[]);
    let data = random_bytes(2 << 20, 60);
    let mut sock = TcpStream::connect(proxy.addr).unwrap();
    sock.write_all(&data[..1 << 20]).unwrap();
    wait_until("the server is receiving", || !file_names(&recv).is_empty());
    drop(server); // SIGKILL, by PID
    let answer = finish_and_read(&mut sock, &data[1 << 20..]);
    assert!(answer.starts_with("ERR upstream unavailable: "), "{answer}");
    let kept = answer
        .trim_end()
        .rsplit_once("(kept as ")
        .unwrap()
        .1
        .trim_end_matches(')')
        .to_string();
    assert_eq!(
        std::fs::read(spool.join(kept)).unwrap(),
        data,
        "the spool holds the whole upload"
    );
    // A server comes back on the same address; the proxy serves the next client.
    let _server2 = spawn_server(&recv, &["--listen", &server_addr.to_string()]);
    assert_eq!(
        send(proxy.addr, b"next").unwrap().verdict(),
        Verdict::Verified
    );
}

#[test]
fn upstream_that_never_reads_is_timed_out_and_proxy_memory_stays_bounded() {
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (hold_tx, hold_rx) = mpsc::channel::<TcpStream>();
    std::thread::spawn(move || {
        for sock in upstream.incoming().flatten() {
            let _ = hold_tx.send(sock); // keep it open, never read
        }
    });
    let dir = tempfile::tempdir().unwrap();
    // The chunk budget is what bounds the memory of uploads in passage
    // (disk writes in flight included): half of what the assertion allows.
    let proxy = spawn_proxy(
        up_addr,
        dir.path(),
        &["--idle-timeout", "1s", "--spool-memory", "4MiB"],
    );
    let baseline = peak_rss_kib(proxy.pid());
    let data = random_bytes(48 << 20, 61);
    let receipt = send(proxy.addr, &data).expect("an answer comes back");
    assert!(
        receipt
            .line
            .starts_with("ERR upstream unavailable: no progress for 1s (kept as "),
        "{}",
        receipt.line
    );
    // The peak (VmHWM), not the RSS after the fact: memory held during the
    // transfer and released since must count.
    let peak = peak_rss_kib(proxy.pid());
    assert!(
        peak < baseline + 8 * 1024,
        "proxy peak RSS {baseline} -> {peak} KiB"
    );
    drop(hold_rx);
}

#[test]
fn upstream_that_answers_early_and_closes_has_its_answer_relayed() {
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let up_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut sock in upstream.incoming().flatten() {
            let _ = sock.write_all(b"ERR go away\n");
            drop(sock); // closes with the upload unread: a reset follows
        }
    });
    let dirs = tempfile::tempdir().unwrap();
    let proxy = start_proxy(up_addr, dirs.path());
    let receipt = send(proxy.addr, &random_bytes(4 << 20, 62)).expect("an answer comes back");
    assert_eq!(receipt.line, "ERR go away");
    let receipt = send(proxy.addr, b"again").expect("still serving");
    assert_eq!(receipt.line, "ERR go away");
}

#[test]
fn two_thousand_connect_then_close_peers_leave_both_daemons_serving() {
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(server.addr, &dirs.path().join("s"), &[]);
    let base = (conn_fds(proxy.pid()), conn_fds(server.pid()));
    for i in 0..2000 {
        let sock = TcpStream::connect(proxy.addr).unwrap();
        if i % 2 == 0 {
            reset(sock);
        } else {
            drop(sock); // a FIN: an empty upload, whose answer nobody reads
        }
    }
    assert_eq!(
        send(proxy.addr, b"still here").unwrap().verdict(),
        Verdict::Verified
    );
    wait_until("every connection is released", || {
        (conn_fds(proxy.pid()), conn_fds(server.pid())) == base
    });
    let logs: Vec<String> = proxy
        .log_lines()
        .into_iter()
        .chain(server.log_lines())
        .collect();
    assert!(logs.iter().all(|l| !l.contains("panicked")));
    // What they leave: a reset before any byte leaves nothing (and no
    // warning); a clean close is an empty upload, stored as an empty file
    // on both daemons (see README, "Faults, limits and hostile peers").
    for dir in [dirs.path().join("r"), dirs.path().join("s")] {
        let names = file_names(&dir);
        assert!(
            names
                .iter()
                .all(|n| !n.ends_with(".part") && !n.ends_with(".incomplete")),
            "{}: partials left: {:?}",
            dir.display(),
            names
                .iter()
                .filter(|n| n.contains("."))
                .take(5)
                .collect::<Vec<_>>()
        );
        let empty = names
            .iter()
            .filter(|n| std::fs::metadata(dir.join(n)).is_ok_and(|m| m.len() == 0))
            .count();
        assert_eq!(
            empty,
            1000,
            "{}: one empty file per clean close",
            dir.display()
        );
    }
    let warnings = logs.iter().filter(|l| l.contains("WARN")).count();
    assert!(
        warnings <= 2,
        "the resets flooded the log: {warnings} warnings"
    );
}

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
fn chaos_two_thousand_transfers_with_random_aborts() {
    const THREADS: usize = 16;
    const PER_THREAD: usize = 125;
    let dirs = tempfile::tempdir().unwrap();
    let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
    let server = spawn_server(&recv, &[]);
    let proxy = spawn_proxy(server.addr, &spool, &[]);
    let to = proxy.addr;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut done = Vec::new();
                let mut aborted = 0;
                for i in 0..PER_THREAD {
                    let seed = (t * PER_THREAD + i) as u64;
                    let size = (seed.wrapping_mul(2654435761) % (256 * 1024)) as usize;
                    let data = random_bytes(size, seed);
                    if seed % 10 == 3 {
                        // Abort mid-upload with a reset.
                        let mut s = TcpStream::connect(to).unwrap();
                        let _ = s.write_all(&data[..size / 2]);
                        reset(s);
                        aborted += 1;
                        continue;
                    }
                    let receipt =
                        send(to, &data).unwrap_or_else(|e| panic!("transfer {seed}: {e}"));
                    assert_eq!(
                        receipt.verdict(),
                        Verdict::Verified,
                        "transfer {seed}: {}",
                        receipt.line
                    );
                    done.push((receipt, data));
                }
                (done, aborted)
            })
        })
        .collect();
    let mut completed = Vec::new();
    let mut aborted = 0;
    for w in workers {
        let (done, a) = w.join().unwrap();
        completed.extend(done);
        aborted += a;
    }
    assert_eq!(completed.len() + aborted, THREADS * PER_THREAD);
    // Every completed transfer: byte-identical at the server under its name.
    for (receipt, data) in &completed {
        let stopover::answer::Answer::Ok { file, .. } = &receipt.answer else {
            unreachable!()
        };
        assert!(
            std::fs::read(recv.join(file)).unwrap() == *data,
            "server copy of {file} differs"
        );
    }
    // ... and in the spool: the same multiset of (size, crc).
    let mut want: Vec<(usize, u32)> = completed
        .iter()
        .map(|(_, d)| (d.len(), crc32c::crc32c(d)))
        .collect();
    let mut got: Vec<(usize, u32)> = final_files(&spool)
        .iter()
        .map(|n| std::fs::read(spool.join(n)).unwrap())
        .map(|d| (d.len(), crc32c::crc32c(&d)))
        .collect();
    want.sort_unstable();
    got.sort_unstable();
    assert!(
        want == got,
        "spool copies differ from the completed uploads"
    );
    // Aborted ones: no final name at the server, and no partial left over.
    wait_until("the server has cleaned up every aborted upload", || {
        file_names(&recv).iter().all(|n| !n.ends_with(".part"))
    });
    assert_eq!(final_files(&recv).len(), completed.len());
    // Both still serve.
    assert_eq!(
        send(proxy.addr, b"after the chaos").unwrap().verdict(),
        Verdict::Verified
    );
    assert_eq!(
        send(server.addr, b"after the chaos").unwrap().verdict(),
        Verdict::Verified
    );
    eprintln!("chaos: {} completed, {aborted} aborted", completed.len());
}

#[test]
fn binding_a_non_loopback_address_warns() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--listen", "0.0.0.0:0"]);
    server.wait_for_log("anyone who can reach it can write files to this disk");
}

#[test]
fn proxy_spool_write_failure_with_refuse_gets_err_and_the_server_keeps_nothing() {
    let dirs = tempfile::tempdir().unwrap();
    let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
    let server = spawn_server(&recv, &[]);
    let mut cmd = proxy_command(server.addr, &spool, &["--on-disk-error", "refuse"]);
    limit_child(&mut cmd, libc::RLIMIT_FSIZE, 1 << 20);
    let proxy = spawn_with(&mut cmd);
    let receipt = send(proxy.addr, &random_bytes(4 << 20, 67)).expect("an answer comes back");
    assert!(
        receipt
            .line
            .starts_with("ERR proxy cannot store upload: File too large"),
        "{}",
        receipt.line
    );
    // The server saw a reset, not an EOF: no final file there.
    wait_until("the server discards its partial", || {
        file_names(&recv).iter().all(|n| !n.ends_with(".part"))
    });
    assert!(final_files(&recv).is_empty());
    wait_until("the partial spool is kept as .incomplete", || {
        let kept = file_names(&spool);
        kept.len() == 1 && kept[0].ends_with(".incomplete")
    });
    // Still serving.
    assert_eq!(
        send(proxy.addr, b"small").unwrap().verdict(),
        Verdict::Verified
    );
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

/// A fake upstream that reads each upload whole, then answers with
/// whatever `answer` returns for it; `stall` keeps the connection open
/// afterwards without closing.
fn fake_upstream(answer: fn(&[u8]) -> Vec<u8>, stall: bool) -> std::net::SocketAddr {
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for mut sock in upstream.incoming().flatten() {
            let data = read_all(&mut sock).unwrap_or_default();
            let _ = sock.write_all(&answer(&data));
            if stall {
                kept.push(sock); // open, silent
            } else {
                let _ = sock.shutdown(Shutdown::Write);
            }
        }
    });
    addr
}

#[test]
fn an_upstream_that_stalls_mid_answer_is_reset_without_a_second_line() {
    let up = fake_upstream(|_| b"OK bytes=".to_vec(), true);
    let dir = tempfile::tempdir().unwrap();
    let proxy = spawn_proxy(up, dir.path(), &["--idle-timeout", "1s"]);
    let mut sock = TcpStream::connect(proxy.addr).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    sock.write_all(b"some upload").unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let read = sock.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    // The cut answer must not look whole: the connection is reset, as the
    // upstream's failure would have reached the client directly.
    assert_eq!(
        read.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "{read:?}: {got:?}; proxy log:\n{}",
        proxy.log_lines().join("\n")
    );
    assert_eq!(
        got, "OK bytes=",
        "only the server's bytes reach the client, never an ERR line after them"
    );
    proxy.wait_for_log("failed after 9 answer bytes");
}

#[test]
fn an_overlong_or_multi_line_answer_ends_the_same_way_through_the_proxy() {
    let long = fake_upstream(|_| vec![b'x'; 10_000], false);
    let two = fake_upstream(
        |d| format!("{}ERR and more\n", ok_line(d, "f")).into_bytes(),
        false,
    );
    for (upstream, want) in [
        (long, "longer than 4096 bytes"),
        (two, "more than one line"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let proxy = spawn_proxy(upstream, dir.path(), &[]);
        for (path, to) in [("direct", upstream), ("proxied", proxy.addr)] {
            let err = send(to, b"payload").expect_err("a bad answer is an error");
            let text = err.to_string();
            assert!(text.contains(want), "{path}: {text}");
        }
    }
}

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

/// TCP urgent data (`MSG_OOB`) makes a read come back short at its mark.
/// An upload's EOF is never inferred from a short read (only an answer's
/// is, see `Peer::read`), so the bytes after the mark are stored too: the
/// upload is not cut at the mark and given a final name.
#[test]
fn urgent_data_does_not_cut_an_upload_short() {
    use std::os::fd::AsRawFd;
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(server.addr, &dirs.path().join("s"), &[]);
    let mut sock = TcpStream::connect(proxy.addr).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    sock.write_all(b"before the mark, ").unwrap();
    // SAFETY: one byte from a live buffer on an open socket.
    let sent = unsafe { libc::send(sock.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(sent, 1);
    sock.write_all(b"after the mark").unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    let answer = read_all(&mut sock).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    // The urgent byte is out of band: not part of the stream.
    let stream = b"before the mark, after the mark";
    assert!(
        answer.starts_with(&format!("OK bytes={} ", stream.len())),
        "{answer}"
    );
    wait_until("the proxy's recording is final", || {
        final_files(&dirs.path().join("s")).len() == 1
    });
    let name = &final_files(&dirs.path().join("s"))[0];
    assert_eq!(
        std::fs::read(dirs.path().join("s").join(name)).unwrap(),
        stream
    );
}
