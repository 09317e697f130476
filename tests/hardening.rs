//! Faults and hostile peers: each protection, proven on real sockets.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;

use common::*;
use stopover::client::Verdict;

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
