use super::*;

/// A `Peer` for one end of a loopback connection, and the other end
/// as a plain blocking socket.
pub(crate) fn pair() -> (Peer, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    // A broken half-close must fail a test, not hang it.
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (sock, _) = listener.accept().unwrap();
    sock.set_nonblocking(true).unwrap();
    let who = Who {
        role: "test",
        key: 0,
        side: "",
    };
    (Peer::accepted(TcpStream::from_std(sock), who), other)
}

/// Reads until something other than `Blocked` comes back. Loopback
/// delivers in the sender's `write`, so this takes one or two rounds;
/// the bound only keeps a broken peer from hanging the test.
pub(crate) fn read_ready(peer: &mut Peer, buf: &mut [u8]) -> Io {
    for _ in 0..10_000 {
        peer.mark_readable();
        match peer.read(buf) {
            Io::Blocked => std::thread::yield_now(),
            other => return other,
        }
    }
    panic!("nothing arrived on loopback");
}

#[test]
fn would_block_clears_the_flag_and_a_clear_flag_costs_no_call() {
    let (mut peer, mut other) = pair();
    let mut buf = [0u8; 64];
    assert!(!peer.is_readable(), "an accepted socket waits for an event");
    assert!(matches!(peer.read(&mut buf), Io::Blocked));
    peer.mark_readable();
    assert!(
        matches!(peer.read(&mut buf), Io::Blocked),
        "nothing sent yet"
    );
    assert!(!peer.is_readable(), "WouldBlock must clear the flag");
    other.write_all(b"hello").unwrap();
    assert!(
        matches!(peer.read(&mut buf), Io::Blocked),
        "with the flag clear, the peer must not look until told to"
    );
    assert!(matches!(read_ready(&mut peer, &mut buf), Io::Data(5)));
    assert_eq!(&buf[..5], b"hello");
    drop(other);
    assert!(matches!(read_ready(&mut peer, &mut buf), Io::Eof));
    assert!(peer.eof() && !peer.is_readable());
    assert!(matches!(peer.read(&mut buf), Io::Eof), "EOF stays EOF");
}

#[test]
fn a_write_to_a_reset_peer_fails_and_marks_it_broken() {
    let (mut peer, other) = pair();
    socket2::SockRef::from(&other)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(other); // a reset, not a FIN
    let chunk = [7u8; 64 * 1024];
    let failed = (0..1000).find_map(|_| match peer.write(&chunk) {
        Io::Failed(e) => Some(e),
        Io::Blocked => {
            peer.writable = true;
            None
        }
        _ => None,
    });
    assert!(failed.is_some(), "writing to a reset connection must fail");
    assert!(peer.broken());
}

#[test]
fn a_dropped_peer_resets_and_a_closed_one_ends_cleanly() {
    let (peer, mut other) = pair();
    drop(peer); // as when the process dies
    let mut buf = [0u8; 8];
    let err = other.read(&mut buf).expect_err("a reset, not an EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    let (mut peer, mut other) = pair();
    assert!(matches!(peer.write(b"bye"), Io::Data(3)));
    peer.close();
    let mut rest = Vec::new();
    other
        .read_to_end(&mut rest)
        .expect("a clean EOF after the data");
    assert_eq!(rest, b"bye");
}

/// Registers `peer` with a fresh poll and feeds it events until one
/// says its read side closed (a FIN or a reset).
fn events_for(peer: &mut Peer) -> (mio::Poll, Vec<String>) {
    let mut poll = mio::Poll::new().unwrap();
    poll.registry()
        .register(&mut peer.sock, mio::Token(0), mio::Interest::READABLE)
        .unwrap();
    let mut events = mio::Events::with_capacity(8);
    let mut seen = Vec::new();
    let mut closed = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !closed && std::time::Instant::now() < deadline {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
        for event in events.iter() {
            seen.push(crate::event_loop::flags(event));
            closed |= event.is_read_closed();
            peer.on_event(event);
        }
    }
    (poll, seen)
}

#[test]
fn a_fin_that_came_with_the_data_costs_no_second_read() {
    let (mut peer, mut other) = pair();
    peer.infer_eof = true; // as on an upstream (`Peer::connecting`)
    other.write_all(b"hello").unwrap();
    other.shutdown(std::net::Shutdown::Write).unwrap();
    let (_poll, seen) = events_for(&mut peer);
    assert!(peer.fin_arrived, "an event reports the FIN: {seen:?}");
    let mut buf = [0u8; 64];
    assert!(matches!(peer.read(&mut buf), Io::Data(5)));
    assert!(matches!(peer.read(&mut buf), Io::Eof));
    assert_eq!(peer.reads, 1, "the EOF was known without a read");
    assert!(peer.eof());
}

#[test]
fn a_full_read_before_the_fin_reads_on() {
    let (mut peer, mut other) = pair();
    peer.infer_eof = true;
    other.write_all(b"0123456789").unwrap();
    other.shutdown(std::net::Shutdown::Write).unwrap();
    let (_poll, _) = events_for(&mut peer);
    let mut buf = [0u8; 5];
    let mut got = Vec::new();
    loop {
        match peer.read(&mut buf) {
            Io::Data(n) => got.extend_from_slice(&buf[..n]),
            Io::Eof => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        got, b"0123456789",
        "a buffer filled to the brim proves nothing"
    );
    assert_eq!(peer.reads, 3, "two full reads, then the EOF read");
}

#[test]
fn a_reset_after_the_data_is_not_taken_for_an_eof() {
    let (mut peer, mut other) = pair();
    peer.infer_eof = true;
    other.write_all(b"part of an upload").unwrap();
    socket2::SockRef::from(&other)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(other); // a reset, not a FIN: the upload is not complete
    let (_poll, seen) = events_for(&mut peer);
    assert!(!peer.fin_arrived, "a reset is not a FIN: {seen:?}");
    let mut buf = [0u8; 64];
    let mut verdicts = Vec::new();
    for _ in 0..3 {
        match peer.read(&mut buf) {
            Io::Failed(_) => {
                verdicts.push("failed");
                break;
            }
            Io::Eof => verdicts.push("eof"),
            Io::Data(_) => verdicts.push("data"),
            Io::Blocked => verdicts.push("blocked"),
        }
    }
    assert!(
        !verdicts.contains(&"eof"),
        "a reset must never read as a clean end: {verdicts:?}"
    );
}

#[test]
fn an_accepted_peer_reads_its_eof() {
    // Uploads come in on accepted peers: their EOF is never inferred
    // (an urgent mark also makes a read come back short).
    let (mut peer, mut other) = pair();
    other.write_all(b"hello").unwrap();
    other.shutdown(std::net::Shutdown::Write).unwrap();
    let (_poll, _) = events_for(&mut peer);
    let mut buf = [0u8; 64];
    assert!(matches!(peer.read(&mut buf), Io::Data(5)));
    assert!(matches!(peer.read(&mut buf), Io::Eof));
    assert_eq!(peer.reads, 2, "the EOF came from a read");
}

#[test]
fn shutdown_write_sends_one_fin() {
    let (mut peer, mut other) = pair();
    peer.shutdown_write();
    peer.shutdown_write(); // idempotent
    assert!(peer.shut());
    let mut rest = Vec::new();
    other.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the other end sees a clean EOF");
}
