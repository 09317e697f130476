//! Hold mode: store the whole upload, hold it (a timer in the loop) while a
//! person may edit it, then forward the file as it is on disk.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use stopover::answer::Answer;
use stopover::client::Verdict;

fn held_proxy(upstream: std::net::SocketAddr, dir: &std::path::Path, hold: &str) -> Spawned {
    spawn_proxy(upstream, dir, &["--hold", hold])
}

/// The spool path from a `holding <path> for ...` log line.
fn held_path(line: &str) -> String {
    let rest = &line[line.find("holding ").expect("a holding line") + "holding ".len()..];
    rest.split_whitespace().next().unwrap().to_string()
}

#[test]
fn an_edit_during_the_hold_reaches_the_server_and_the_client_exits_3() {
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("received"));
    // Long enough that reacting to the log line can never miss the window.
    let proxy = held_proxy(server.addr, &dirs.path().join("spool"), "5s");
    let original = dirs.path().join("note.txt");
    std::fs::write(&original, b"hello, world\n").unwrap();
    let client = Command::new(bin())
        .args([
            "client",
            "--to",
            &proxy.addr.to_string(),
            original.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let path = held_path(&proxy.wait_for_log("holding "));
    std::fs::write(&path, b"HELLO, EDITED WORLD\n").unwrap();
    let out = client.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "client sees the edit: {stderr}");
    assert!(
        stderr.contains("server stored different bytes than were sent"),
        "{stderr}"
    );
    assert!(
        stderr.contains("sent 13 bytes") && stderr.contains("server stored 20 bytes"),
        "{stderr}"
    );
    let answer = Answer::parse(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let Answer::Ok { file, .. } = answer else {
        panic!("expected OK")
    };
    assert_eq!(
        std::fs::read(dirs.path().join("received").join(file)).unwrap(),
        b"HELLO, EDITED WORLD\n"
    );
    let relayed = proxy.wait_for_log("relayed held");
    assert!(relayed.contains("edited during hold"), "{relayed}");
}

#[test]
fn hold_zero_is_plain_store_and_forward() {
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    let proxy = start_proxy_with(server.addr, &dirs.path().join("s"), Some(Duration::ZERO));
    for (i, len) in [0usize, 1, 300_000, 3 << 20].into_iter().enumerate() {
        let data = random_bytes(len, 40 + i as u64);
        let receipt = send(proxy.addr, &data).unwrap();
        assert_eq!(
            receipt.verdict(),
            Verdict::Verified,
            "{len} bytes: {}",
            receipt.line
        );
        let Answer::Ok { file, .. } = receipt.answer else {
            unreachable!()
        };
        assert_eq!(
            std::fs::read(dirs.path().join("r").join(file)).unwrap(),
            data
        );
    }
}

#[test]
fn many_held_transfers_overlap_instead_of_queueing() {
    const CLIENTS: usize = 100;
    let hold = Duration::from_secs(3);
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    let proxy = start_proxy_with(server.addr, &dirs.path().join("s"), Some(hold));
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    for i in 0..CLIENTS {
        let (tx, addr) = (tx.clone(), proxy.addr);
        std::thread::spawn(move || {
            let data = random_bytes(10_000 + i, i as u64);
            let mut sock = TcpStream::connect(addr).unwrap();
            sock.write_all(&data).unwrap();
            sock.shutdown(Shutdown::Write).unwrap();
            let sent_at = Instant::now();
            let mut answer = String::new();
            sock.read_to_string(&mut answer).unwrap();
            let expected = ok_line(&data, "");
            let matches = answer.starts_with(&expected[..expected.find(" file=").unwrap()]);
            tx.send((sent_at, Instant::now(), matches, answer)).unwrap();
        });
    }
    drop(tx);
    let results: Vec<_> = rx.iter().collect();
    assert_eq!(results.len(), CLIENTS, "every client got an answer");
    for (_, _, matches, answer) in &results {
        assert!(matches, "answer does not match the upload: {answer}");
    }
    // Order, not timing: every upload was complete before the first answer
    // came back, so all 100 were being held at the same time.
    let last_sent = results.iter().map(|r| r.0).max().unwrap();
    let first_answer = results.iter().map(|r| r.1).min().unwrap();
    assert!(
        last_sent < first_answer,
        "a hold finished before the last upload did: holds did not overlap"
    );
    // Held one after another they would take 100 holds; overlapping, about one.
    assert!(
        started.elapsed() < hold * 10,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(final_files(&dirs.path().join("r")).len(), CLIENTS);
}

#[test]
fn a_held_file_deleted_during_the_hold_gets_err_and_the_proxy_keeps_serving() {
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    let proxy = held_proxy(server.addr, &dirs.path().join("s"), "3s");
    let addr = proxy.addr;
    let client = std::thread::spawn(move || send(addr, b"soon to vanish"));
    let path = held_path(&proxy.wait_for_log("holding "));
    std::fs::remove_file(&path).unwrap();
    let receipt = client.join().unwrap().expect("an answer comes back");
    let name = std::path::Path::new(&path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        receipt.line,
        format!("ERR held file {name} is gone: No such file or directory")
    );
    // The log says the reason once (it once read "is gone: No such file
    // or directory (No such file or directory (os error 2))").
    let warning = proxy.wait_for_log("is gone");
    assert_eq!(
        warning.matches("No such file or directory").count(),
        1,
        "{warning}"
    );
    assert!(
        final_files(&dirs.path().join("r")).is_empty(),
        "nothing reached the server"
    );
    // Still serving.
    assert_eq!(
        send(proxy.addr, b"next one").unwrap().verdict(),
        Verdict::Verified
    );
}

#[test]
fn a_client_that_leaves_during_its_hold_sends_nothing_upstream() {
    // A fake upstream that records each connection it gets, in order.
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut sock) = conn else { continue };
            let data = read_all(&mut sock).unwrap_or_default();
            answer_and_close(&mut sock, &ok_line(&data, "fake"));
            let _ = tx.send(data);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = held_proxy(up_addr, dir.path(), "2s");

    let mut leaver = TcpStream::connect(proxy.addr).unwrap();
    leaver.write_all(b"I will not wait").unwrap();
    leaver.shutdown(Shutdown::Write).unwrap();
    let path = held_path(&proxy.wait_for_log("holding "));
    socket2::SockRef::from(&leaver)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(leaver); // a reset, during the hold
    let warning = proxy.wait_for_log("went away during its hold");
    assert!(
        warning.contains(&path),
        "the log names the kept file: {warning}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"I will not wait",
        "spool copy kept"
    );

    // A second transfer is held and forwarded after the first one's hold
    // would have ended: if the first had been forwarded, the upstream would
    // have seen it first.
    assert_eq!(
        send(proxy.addr, b"I will wait").unwrap().verdict(),
        Verdict::Verified
    );
    let first_seen = rx.recv_timeout(PATIENCE).unwrap();
    assert_eq!(
        first_seen, b"I will wait",
        "the upstream's first connection is the second client"
    );
    assert!(rx.try_recv().is_err(), "nothing else reached the upstream");
}

/// Starts one held upload through `proxy` on a thread; returns the spool
/// path from the proxy's log and the thread that waits for the answer.
fn hold_one(
    proxy: &Spawned,
    data: &'static [u8],
) -> (
    String,
    std::thread::JoinHandle<Result<stopover::client::Receipt, stopover::client::ClientError>>,
) {
    let addr = proxy.addr;
    let client = std::thread::spawn(move || send(addr, data));
    (held_path(&proxy.wait_for_log("holding ")), client)
}

#[test]
fn a_held_file_replaced_by_a_symlink_is_refused_not_followed() {
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    let proxy = held_proxy(server.addr, &dirs.path().join("s"), "2s");
    let secret = dirs.path().join("secret");
    std::fs::write(&secret, b"not for the upstream").unwrap();
    let (path, client) = hold_one(&proxy, b"the real upload");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&secret, &path).unwrap();
    let receipt = client.join().unwrap().expect("an answer comes back");
    let name = std::path::Path::new(&path)
        .file_name()
        .unwrap()
        .to_string_lossy();
    assert_eq!(
        receipt.line,
        format!("ERR held file {name} is not a regular file")
    );
    assert!(
        final_files(&dirs.path().join("r")).is_empty(),
        "the server received nothing (least of all the secret)"
    );
}

#[test]
fn a_held_file_replaced_by_a_fifo_is_refused_and_the_loop_keeps_running() {
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    let proxy = held_proxy(server.addr, &dirs.path().join("s"), "1s");
    let (path, client) = hold_one(&proxy, b"about to become a fifo");
    std::fs::remove_file(&path).unwrap();
    let c_path = std::ffi::CString::new(path.as_str()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // Opening a FIFO for reading blocks until a writer comes: a proxy that
    // did so would answer nobody, ever.
    let receipt = client.join().unwrap().expect("an answer comes back");
    assert!(
        receipt.line.ends_with("is not a regular file"),
        "{}",
        receipt.line
    );
    assert_eq!(
        send(proxy.addr, b"the next one").unwrap().verdict(),
        Verdict::Verified,
        "the loop still serves"
    );
}

/// Holds one upload, stops the proxy with SIGTERM, and checks what the
/// client is told (`ERR proxy shutting down: kept as NAME, not
/// forwarded`), that the upload stays whole under its final name, that
/// nothing reached the server and that the proxy exits 0. Returns the
/// stopped proxy (for its log) and the held file's path.
fn stop_during_a_hold(hold: &str, grace: &str) -> (Spawned, String) {
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    let mut proxy = spawn_proxy(
        server.addr,
        &dirs.path().join("s"),
        &["--hold", hold, "--grace", grace],
    );
    let data: &'static [u8] = b"held when the proxy stops";
    let (path, client) = hold_one(&proxy, data);
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    let receipt = client.join().unwrap().expect("an answer comes back");
    let name = std::path::Path::new(&path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        receipt.line,
        format!("ERR proxy shutting down: kept as {name}, not forwarded")
    );
    let mut status = None;
    wait_until("the proxy exits once nothing else is in flight", || {
        status = proxy.child.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.unwrap().code(), Some(0));
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(final_files(&dirs.path().join("r")).is_empty());
    (proxy, path)
}

#[test]
fn a_shutdown_during_a_hold_answers_err_and_keeps_the_upload() {
    let (proxy, path) = stop_during_a_hold("1h", "200ms");
    let warning = proxy.wait_for_log("not forwarded");
    assert!(warning.contains(&path), "the log names the file: {warning}");
}

#[test]
fn a_shutdown_answers_at_once_the_holds_that_outlast_the_grace_and_lets_the_others_finish() {
    // A hold of an hour cannot end within a grace of an hour less a
    // minute: its client is told at once, not when the grace runs out
    // (the client gives up after PATIENCE, a minute, so waiting would fail).
    let (proxy, _) = stop_during_a_hold("1h", "59m");
    // Counted as kept, not as aborted: the upload is whole.
    let summary = proxy.wait_for_log("stopped:");
    assert!(
        summary.contains("0 aborted") && summary.contains("1 kept"),
        "{summary}"
    );

    // A hold that ends within the grace is forwarded as usual.
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    let proxy = spawn_proxy(
        server.addr,
        &dirs.path().join("s"),
        &["--hold", "1s", "--grace", "59m"],
    );
    let (_, client) = hold_one(&proxy, b"held within the grace");
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    let receipt = client.join().unwrap().expect("an answer comes back");
    assert_eq!(receipt.verdict(), Verdict::Verified, "{}", receipt.line);
    let summary = proxy.wait_for_log("stopped:");
    assert!(
        summary.contains("1 relayed") && summary.contains("0 kept"),
        "{summary}"
    );
}

#[test]
fn held_transfers_near_the_open_files_limit_are_all_forwarded() {
    // Each held transfer needs four descriptors once its hold ends (client,
    // spool, the reopened file, upstream). Budgeting three made the last
    // ones fail with "Too many open files" instead of waiting their turn.
    const CLIENTS: usize = 70;
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    let mut cmd = proxy_command(server.addr, &dirs.path().join("s"), &["--hold", "1s"]);
    limit_child(&mut cmd, libc::RLIMIT_NOFILE, 200);
    let proxy = spawn_with(&mut cmd);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let addr = proxy.addr;
            std::thread::spawn(move || send(addr, &random_bytes(1000 + i, i as u64)))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let receipt = c.join().unwrap().expect("an answer comes back");
        assert_eq!(
            receipt.verdict(),
            Verdict::Verified,
            "client {i}: {}",
            receipt.line
        );
    }
}

#[test]
fn after_a_hold_the_idle_clock_restarts_so_a_slow_connect_gets_its_own_timeout() {
    // An upstream whose accept queue is full: the kernel drops the proxy's
    // SYN, so its connect hangs (retried after a second). Only the connect
    // timeout should end it, not an idle check counting from before the hold.
    let upstream =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    upstream.bind(&loopback0().into()).unwrap();
    upstream.listen(0).unwrap();
    let up_addr = upstream.local_addr().unwrap().as_socket().unwrap();
    // With a backlog of 0 the queue holds one connection: this one.
    let _queued = TcpStream::connect_timeout(&up_addr, Duration::from_secs(5)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = spawn_proxy(
        up_addr,
        dir.path(),
        &[
            "--hold",
            "1500ms",
            "--idle-timeout",
            "1s",
            "--connect-timeout",
            "700ms",
        ],
    );
    let receipt = send(proxy.addr, b"held, then a slow connect").expect("an answer comes back");
    assert!(
        receipt
            .line
            .starts_with("ERR upstream unavailable: connect timed out after 700ms"),
        "{}",
        receipt.line
    );
}
