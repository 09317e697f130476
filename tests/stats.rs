//! Daemons you can watch: `GET /metrics` on the same poll loop, the stats
//! log line, and stats clients that cannot disturb transfers.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::*;
use stopover::client::Verdict;

#[test]
fn server_metrics_count_a_known_sequence_of_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(
        dir.path(),
        &["--stats-addr", "127.0.0.1:0", "--max-bytes", "100KiB"],
    );
    let stats = stats_addr(&server);
    let sizes = [1_000usize, 20_000, 50_000];
    for (i, size) in sizes.iter().enumerate() {
        let receipt = send(server.addr, &random_bytes(*size, i as u64)).unwrap();
        assert_eq!(receipt.verdict(), Verdict::Verified);
    }
    // One refused (too large) ...
    let receipt = send(server.addr, &random_bytes(200_000, 9)).unwrap();
    assert!(receipt.line.starts_with("ERR too large"));
    // ... and one aborted (a reset mid-upload).
    let mut quitter = TcpStream::connect(server.addr).unwrap();
    quitter.write_all(&random_bytes(70_000, 10)).unwrap();
    socket2::SockRef::from(&quitter)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(quitter);
    server.wait_for_log("aborted after");
    let body = scrape(stats);
    assert_eq!(sample(&body, "stopover_connections_accepted_total"), 5.0);
    assert_eq!(
        sample(&body, "stopover_uploads_total{outcome=\"stored\"}"),
        3.0
    );
    assert_eq!(
        sample(&body, "stopover_uploads_total{outcome=\"refused\"}"),
        1.0
    );
    assert_eq!(
        sample(&body, "stopover_uploads_total{outcome=\"aborted\"}"),
        1.0
    );
    assert_eq!(
        sample(&body, "stopover_bytes_stored_total"),
        sizes.iter().sum::<usize>() as f64
    );
    assert_eq!(sample(&body, "stopover_connections_open"), 0.0);
    assert!(sample(&body, "stopover_connections_open_peak") >= 1.0);
    assert!(sample(&body, "stopover_uptime_seconds") > 0.0);
    assert!(
        body.contains("# TYPE stopover_uploads_total counter"),
        "{body}"
    );
}

#[test]
fn proxy_metrics_show_held_uploads_and_relayed_transfers() {
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(
        server.addr,
        &dirs.path().join("s"),
        &[
            "--stats-addr",
            "127.0.0.1:0",
            "--hold",
            "1h",
            "--grace",
            "0s",
        ],
    );
    let stats = stats_addr(&proxy);
    let mut held = TcpStream::connect(proxy.addr).unwrap();
    held.write_all(b"held for an hour").unwrap();
    held.shutdown(Shutdown::Write).unwrap();
    proxy.wait_for_log("holding ");
    let body = scrape(stats);
    assert_eq!(sample(&body, "stopover_uploads_held"), 1.0);
    assert_eq!(sample(&body, "stopover_connections_open"), 1.0);
    assert_eq!(
        sample(&body, "stopover_transfers_total{outcome=\"relayed\"}"),
        0.0
    );

    // A streaming proxy relays and counts the bytes both ways.
    let proxy = spawn_proxy(
        server.addr,
        &dirs.path().join("s2"),
        &["--stats-addr", "127.0.0.1:0"],
    );
    let stats = stats_addr(&proxy);
    for i in 0..4u64 {
        assert_eq!(
            send(proxy.addr, &random_bytes(10_000, i))
                .unwrap()
                .verdict(),
            Verdict::Verified
        );
    }
    let body = scrape(stats);
    assert_eq!(
        sample(&body, "stopover_transfers_total{outcome=\"relayed\"}"),
        4.0
    );
    assert_eq!(sample(&body, "stopover_bytes_received_total"), 40_000.0);
    assert_eq!(sample(&body, "stopover_bytes_forwarded_total"), 40_000.0);
}

#[test]
fn stalled_stats_clients_do_not_disturb_transfers() {
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(
        server.addr,
        &dirs.path().join("s"),
        &["--stats-addr", "127.0.0.1:0"],
    );
    let stats = stats_addr(&proxy);
    // More stalled stats clients than the proxy serves at once: half a
    // request line each, then silence.
    let stalled: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(stats).unwrap();
            s.write_all(b"GET /met").unwrap();
            s
        })
        .collect();
    for i in 0..20u64 {
        let data = random_bytes(100_000, i);
        assert_eq!(
            send(proxy.addr, &data).unwrap().verdict(),
            Verdict::Verified
        );
    }
    // The stalled ones are closed at their deadline, and a real scrape
    // gets through after them.
    let mut first = stalled.into_iter().next().unwrap();
    first.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 16];
    assert!(
        matches!(first.read(&mut buf), Ok(0) | Err(_)),
        "a stalled stats client is closed"
    );
    assert_eq!(
        sample(
            &scrape(stats),
            "stopover_transfers_total{outcome=\"relayed\"}"
        ),
        20.0
    );
}

#[test]
fn sigusr1_and_the_interval_log_the_counters() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--stats-interval", "1h"]);
    assert_eq!(
        send(server.addr, b"one").unwrap().verdict(),
        Verdict::Verified
    );
    unsafe { libc::kill(server.pid() as i32, libc::SIGUSR1) };
    let line = server.wait_for_log("server: stats: ");
    assert!(
        line.contains("stopover_uploads_total{outcome=\"stored\"}=1"),
        "{line}"
    );
    let ticking = spawn_server(dir.path(), &["--stats-interval", "200ms"]);
    ticking.wait_for_log("server: stats: stopover_connections_accepted_total=0");
}

#[test]
fn both_daemons_show_how_long_the_loop_takes_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(&dir.path().join("r"), &["--stats-addr", "127.0.0.1:0"]);
    let proxy = spawn_proxy(
        server.addr,
        &dir.path().join("s"),
        &["--stats-addr", "127.0.0.1:0"],
    );
    let data = random_bytes(3 << 20, 77);
    assert_eq!(
        send(proxy.addr, &data).unwrap().verdict(),
        Verdict::Verified
    );
    for daemon in [&server, &proxy] {
        let body = scrape(stats_addr(daemon));
        assert!(
            body.contains("# TYPE stopover_loop_event_seconds histogram"),
            "{body}"
        );
        let count = sample(&body, "stopover_loop_event_seconds_count");
        let le_inf = sample(&body, "stopover_loop_event_seconds_bucket{le=\"+Inf\"}");
        let le_1s = sample(&body, "stopover_loop_event_seconds_bucket{le=\"1\"}");
        assert!(count >= 3.0, "events were handled and timed: {count}");
        assert_eq!(le_inf, count, "+Inf holds every observation");
        assert!(le_1s <= le_inf, "buckets are cumulative");
        let max = sample(&body, "stopover_loop_event_seconds_max");
        assert!(max > 0.0, "the longest handling so far: {max}");
    }
}
