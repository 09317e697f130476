//! End-to-end behaviour of client -> proxy -> server on loopback.

mod common;

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use stopover::answer::Answer;
use stopover::client::Verdict;

/// Sends `data` through the system and checks the answer, the server's file
/// and the proxy's spool copy.
fn round_trip(sys: &System, data: &[u8]) {
    let receipt = send(sys.proxy.addr, data).expect("transfer completes");
    assert_eq!(
        receipt.verdict(),
        Verdict::Verified,
        "answer {:?}",
        receipt.line
    );
    let Answer::Ok { file, bytes, .. } = &receipt.answer else {
        unreachable!()
    };
    assert_eq!(*bytes, data.len() as u64);
    let stored = std::fs::read(sys.server_dir.path().join(file))
        .expect("server file exists under its final name");
    assert!(
        stored == data,
        "server stored different bytes ({} vs {} bytes)",
        stored.len(),
        data.len()
    );
    // The proxy's copy: finalized before the answer could come back.
    let spooled = final_files(sys.proxy_dir.path())
        .into_iter()
        .map(|n| std::fs::read(sys.proxy_dir.path().join(n)).unwrap())
        .any(|bytes| bytes == data);
    assert!(spooled, "no spool file with the uploaded bytes");
}

#[test]
fn round_trips_of_0_1_64k_and_8m_bytes_are_byte_identical_in_both_dirs() {
    let sys = start_system();
    for (i, len) in [0usize, 1, 64 * 1024, 8 * 1024 * 1024]
        .into_iter()
        .enumerate()
    {
        round_trip(&sys, &random_bytes(len, i as u64));
    }
    assert_eq!(final_files(sys.server_dir.path()).len(), 4);
    assert_eq!(final_files(sys.proxy_dir.path()).len(), 4);
    assert!(file_names(sys.server_dir.path())
        .iter()
        .all(|n| !n.ends_with(".part")));
}

#[test]
fn two_hundred_concurrent_clients_are_all_verified() {
    let sys = start_system();
    let addr = sys.proxy.addr;
    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let data = random_bytes(1000 + (i as usize * 997) % 50_000, i);
                    let receipt = send(addr, &data).unwrap_or_else(|e| panic!("client {i}: {e}"));
                    assert_eq!(
                        receipt.verdict(),
                        Verdict::Verified,
                        "client {i}: {}",
                        receipt.line
                    );
                })
                .unwrap()
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    assert_eq!(final_files(sys.server_dir.path()).len(), 200);
    assert_eq!(final_files(sys.proxy_dir.path()).len(), 200);
}

#[test]
fn upstream_that_answers_and_half_closes_early_still_gets_the_whole_upload() {
    // The fake upstream knows the data, answers at once, shuts its write
    // side, and only then reads the upload. The proxy must relay the answer
    // (and its FIN) to a client that is still sending, and keep forwarding.
    let data = random_bytes(8 * 1024 * 1024, 7);
    let answer = ok_line(&data, "early");
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let line = answer.clone();
    std::thread::spawn(move || {
        let (mut sock, _) = upstream.accept().unwrap();
        answer_and_close(&mut sock, &line);
        tx.send(read_all(&mut sock).map(|d| d.len())).unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(up_addr, dir.path());
    let receipt = send(proxy.addr, &data).expect("transfer completes");
    assert_eq!(receipt.line, answer.trim_end());
    assert_eq!(receipt.verdict(), Verdict::Verified);
    let got = rx
        .recv_timeout(PATIENCE)
        .expect("upstream finished reading")
        .expect("upstream read ok");
    assert_eq!(
        got,
        data.len(),
        "the rest of the upload must still reach the upstream"
    );
}

#[test]
fn upstream_down_gets_err_and_the_spool_copy_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(dead_port(), dir.path());
    let data = random_bytes(300_000, 3);
    let receipt = send(proxy.addr, &data).expect("an answer comes back");
    let Answer::Err(reason) = &receipt.answer else {
        panic!("expected ERR, got {}", receipt.line)
    };
    assert!(reason.starts_with("upstream unavailable: "), "{reason}");
    let kept = reason
        .rsplit_once("(kept as ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("reason names the spool file: {reason}"));
    assert_eq!(
        std::fs::read(dir.path().join(kept)).unwrap(),
        data,
        "spool copy is whole"
    );
}

#[test]
fn upstream_closing_without_an_answer_is_reported_as_unavailable() {
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let up_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut sock, _) = upstream.accept().unwrap();
        let _ = read_all(&mut sock); // reads it all, then closes silently
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(up_addr, dir.path());
    let data = random_bytes(10_000, 4);
    let receipt = send(proxy.addr, &data).expect("an answer comes back");
    assert!(
        receipt.line.starts_with(
            "ERR upstream unavailable: closed the connection without answering (kept as "
        ),
        "{}",
        receipt.line
    );
}

#[test]
fn err_answers_from_the_server_are_relayed_untouched() {
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let up_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut sock, _) = upstream.accept().unwrap();
        let _ = read_all(&mut sock);
        answer_and_close(&mut sock, "ERR disk on fire\n");
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(up_addr, dir.path());
    let receipt = send(proxy.addr, b"hello").expect("an answer comes back");
    assert_eq!(receipt.line, "ERR disk on fire");
    assert_eq!(receipt.verdict(), Verdict::Refused("disk on fire".into()));
}

#[test]
fn client_reset_mid_upload_leaves_no_final_file_at_the_server() {
    let sys = start_system();
    let mut sock = TcpStream::connect(sys.proxy.addr).unwrap();
    sock.write_all(&random_bytes(1024 * 1024, 5)).unwrap();
    // Wait until the bytes are visibly on their way, then reset.
    wait_until("the server has a partial file", || {
        file_names(sys.server_dir.path())
            .iter()
            .any(|n| n.ends_with(".part"))
    });
    socket2::SockRef::from(&sock)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(sock);
    wait_until("the proxy keeps an .incomplete copy", || {
        file_names(sys.proxy_dir.path())
            .iter()
            .any(|n| n.ends_with(".incomplete"))
    });
    wait_until("the server removes its partial file", || {
        file_names(sys.server_dir.path()).is_empty()
    });
    assert!(final_files(sys.server_dir.path()).is_empty());
    assert!(final_files(sys.proxy_dir.path()).is_empty());
    // And both still serve.
    round_trip(&sys, b"after the reset");
}

#[test]
fn clean_half_close_mid_file_is_indistinguishable_from_a_complete_upload() {
    // Documented limit of the framing: a FIN is "end of upload". A client
    // that stops early but closes cleanly has its prefix stored as whole,
    // and the answer (bytes=) is how it could tell.
    let sys = start_system();
    let mut sock = TcpStream::connect(sys.proxy.addr).unwrap();
    sock.write_all(b"only half").unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    let answer = String::from_utf8(read_all(&mut sock).unwrap()).unwrap();
    assert!(answer.starts_with("OK bytes=9 "), "{answer}");
}
