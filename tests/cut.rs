//! A cut answer: the upstream fails after part of its answer has gone to
//! the client. The client must get every answer byte the proxy received,
//! *then* a reset (never a clean EOF: a cut answer must not look whole),
//! however slowly it reads; and a client that does not read at all must
//! not hold its slot past the idle timeout.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// Larger than what the client's receive buffer takes while it does not
/// read: most of the answer is in the proxy (its answer buffer, its send
/// queue) when the upstream resets.
const ANSWER: usize = 300_000;

/// An upstream that reads the upload to its end, answers `answer`, waits
/// until the proxy's kernel has acknowledged every byte of it (so the
/// proxy received them all: a bounded wait on a condition), and then
/// resets the connection (`SO_LINGER` 0). Says on `reset` when it has.
fn resetting_upstream(answer: Vec<u8>, reset: mpsc::Sender<()>) -> SocketAddr {
    let listener = TcpListener::bind(loopback0()).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        read_all(&mut sock).expect("the upload, then EOF");
        sock.write_all(&answer).expect("the proxy takes the answer");
        let deadline = Instant::now() + PATIENCE;
        while stopover::sys::unacked_bytes(&sock).unwrap() > 0 {
            assert!(
                Instant::now() < deadline,
                "the proxy never took the whole answer"
            );
            std::thread::sleep(Duration::from_millis(1)); // polling a condition
        }
        socket2::SockRef::from(&sock)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(sock); // a reset, not a FIN
        let _ = reset.send(());
    });
    addr
}

/// Connects, uploads a few bytes and half-closes, without reading.
fn upload(to: SocketAddr) -> TcpStream {
    let mut sock = TcpStream::connect(to).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    sock.write_all(b"a small upload").unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    sock
}

/// Reads until the connection ends: the bytes, and how it ended (`None`
/// for a clean EOF).
fn read_to_the_end(sock: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (got, Some(e)),
        }
    }
}

/// A transfer whose answer the upstream has cut, and its client, which has
/// read nothing yet.
struct Cut {
    answer: Vec<u8>,
    proxy: Spawned,
    /// The proxy's metrics address.
    stats: SocketAddr,
    client: TcpStream,
    dir: tempfile::TempDir,
}

/// Starts a proxy (with `extra` arguments) in front of a
/// [`resetting_upstream`] whose answer is [`ANSWER`] bytes, and uploads
/// through it; returns once the upstream has reset. The client has not
/// read: most of the answer is in the proxy.
fn cut_answer(extra: &[&str], seed: u64) -> Cut {
    let answer = random_bytes(ANSWER, seed);
    let (tx, reset) = mpsc::channel();
    let upstream = resetting_upstream(answer.clone(), tx);
    let dir = tempfile::tempdir().unwrap();
    let args = [extra, &["--stats-addr", "127.0.0.1:0"]].concat();
    let proxy = spawn_proxy(upstream, dir.path(), &args);
    let stats = stats_addr(&proxy);
    let client = upload(proxy.addr);
    reset.recv_timeout(PATIENCE).expect("the upstream resets");
    Cut {
        answer,
        proxy,
        stats,
        client,
        dir,
    }
}

/// The client reads only once the proxy has seen the upstream fail, and
/// must get the whole answer, then a reset.
fn a_slow_client_gets_the_whole_cut_answer(extra: &[&str], seed: u64) {
    let mut cut = cut_answer(extra, seed);
    cut.proxy.wait_for_log("failed after");
    let (got, end) = read_to_the_end(&mut cut.client);
    assert_eq!(
        got.len(),
        ANSWER,
        "the client got {} of the {ANSWER} answer bytes the proxy received",
        got.len()
    );
    assert!(got == cut.answer, "the answer bytes differ");
    match end {
        Some(e) => assert_eq!(
            e.kind(),
            ErrorKind::ConnectionReset,
            "after the cut answer: {e}"
        ),
        None => panic!("a clean EOF after a cut answer: it would look whole"),
    }
    // Counted as before the wait: aborted (the reset comes after the count).
    assert_aborted_once(cut.stats);
    // The upload was complete: its recording ends under its final name.
    wait_until("the upload's recording is final", || {
        final_files(cut.dir.path()).len() == 1
    });
}

#[test]
fn a_slow_client_gets_every_byte_of_a_cut_answer_then_a_reset() {
    a_slow_client_gets_the_whole_cut_answer(&[], 21);
}

/// Through a toxic, the answer bytes in its pipe are delivered at their
/// time, and then the reset (not a FIN).
#[test]
fn a_cut_answer_through_a_latency_toxic_arrives_whole_then_a_reset() {
    a_slow_client_gets_the_whole_cut_answer(&["--toxic", "latency:downstream:latency=20"], 23);
}

/// Hold mode forwards the held file and relays the answer the same way:
/// its cut answer too arrives whole, then the reset.
#[test]
fn a_held_upload_s_cut_answer_arrives_whole_then_a_reset() {
    a_slow_client_gets_the_whole_cut_answer(&["--hold", "10ms"], 24);
}

#[test]
fn a_client_that_never_reads_a_cut_answer_is_reset_after_the_idle_timeout() {
    let mut cut = cut_answer(&["--idle-timeout", "1s"], 22);
    // Not a byte read: the proxy gives up on the client after the idle
    // timeout, and says so.
    let line = cut.proxy.wait_for_log("of the cut answer");
    assert!(line.contains("idle"), "given up for being idle: {line}");
    let (got, end) = read_to_the_end(&mut cut.client);
    assert!(
        got.len() < ANSWER,
        "the client did not read, so part of the answer was never delivered"
    );
    let e = end.expect("a reset, not a clean EOF");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert_aborted_once(cut.stats);
}

/// The idle timeout counts from the client's last progress, not from the
/// cut: a client that takes a little at a time, each step well within the
/// timeout, gets it all however long that takes in total.
#[test]
fn a_client_that_reads_a_little_at_a_time_outlasts_the_idle_timeout() {
    let mut cut = cut_answer(&["--idle-timeout", "1s"], 26);
    cut.proxy.wait_for_log("failed after");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let started = Instant::now();
    let end = loop {
        // Pacing a slow reader (a fifth of the timeout), not synchronising.
        std::thread::sleep(Duration::from_millis(200));
        match cut.client.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e),
        }
    };
    eprintln!(
        "{} bytes in {:.1} s with a 1 s idle timeout",
        got.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(got == cut.answer, "{} of {ANSWER} bytes", got.len());
    let e = end.expect("a reset, not a clean EOF");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert_aborted_once(cut.stats);
}

#[test]
fn a_client_that_resets_during_a_cut_answer_ends_it_at_once() {
    // An idle timeout longer than the test's patience: only the client's
    // reset can end the transfer in time.
    let cut = cut_answer(&["--idle-timeout", "10m"], 25);
    cut.proxy.wait_for_log("failed after");
    socket2::SockRef::from(&cut.client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(cut.client);
    let line = cut.proxy.wait_for_log("of the cut answer");
    // (Its reset shows as EPIPE: it had half-closed.)
    assert!(
        !line.contains("idle"),
        "ended by the client's reset: {line}"
    );
    assert_aborted_once(cut.stats);
}

/// An answer the client does not take is the client's idleness, not the
/// upstream's: the upstream that sent it (and waits, its connection open)
/// is not blamed and its answer is not cut; the client is dropped after
/// one idle timeout.
#[test]
fn a_client_that_does_not_take_its_answer_is_the_one_idle() {
    let listener = TcpListener::bind(loopback0()).unwrap();
    let upstream = listener.local_addr().unwrap();
    let (_hold_open, held) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        read_all(&mut sock).expect("the upload, then EOF");
        // More than the proxy and the client's kernel take while the
        // client does not read: the proxy ends up holding answer bytes.
        let _ = sock.write_all(&random_bytes(8 << 20, 27));
        let _ = held.recv(); // no FIN: the connection stays open
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = spawn_proxy(upstream, dir.path(), &["--idle-timeout", "1s"]);
    let _client = upload(proxy.addr);
    wait_until("the proxy gives up on the transfer", || {
        proxy
            .log_lines()
            .iter()
            .any(|l| l.contains("before its answer") || l.contains("failed after"))
    });
    let log = proxy.log_lines().join("\n");
    assert!(
        !log.contains("failed after"),
        "the upstream was blamed for the client's idleness:\n{log}"
    );
    assert!(
        log.contains("went away before its answer (idle for 1s)"),
        "{log}"
    );
}

/// The proxy counted one transfer, aborted, and has none open.
fn assert_aborted_once(stats: SocketAddr) {
    let body = scrape(stats);
    let outcome = |o: &str| {
        sample(
            &body,
            &format!("stopover_transfers_total{{outcome=\"{o}\"}}"),
        )
    };
    assert_eq!(outcome("aborted"), 1.0, "{body}");
    assert_eq!(outcome("relayed"), 0.0, "{body}");
    assert_eq!(sample(&body, "stopover_connections_open"), 0.0, "{body}");
}
