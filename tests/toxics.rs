//! Toxics through a real proxy on loopback, measured as toxiproxy measures
//! its own: an echo server behind the proxy, a client timing round trips.
//! Tolerances are generous for a loaded 2-core machine, but real: each
//! check fails if the toxic does not do what it says.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use stopover::proxy::{Proxy, ProxyConfig};
use stopover::toxics::Toxic;

/// An in-process proxy in front of `upstream` with `toxics` (compact form).
fn proxy(upstream: SocketAddr, dir: &std::path::Path, toxics: &[&str]) -> InProcess {
    let toxics: Vec<Toxic> = toxics.iter().map(|t| t.parse().unwrap()).collect();
    let proxy = Proxy::bind(&ProxyConfig {
        listen: loopback0(),
        upstream,
        dir: dir.to_path_buf(),
        toxics,
        ..ProxyConfig::default()
    })
    .expect("proxy binds");
    InProcess::run(proxy)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

/// Sends `data` (from a thread, so a slow answer cannot block the upload)
/// and reads `data.len()` bytes back; returns them, the time taken, and
/// how many reads it took.
fn round_trip(sock: &TcpStream, data: &[u8]) -> (Vec<u8>, Duration, usize) {
    let mut w = sock.try_clone().unwrap();
    let mut r = sock.try_clone().unwrap();
    let data = data.to_vec();
    let want = data.len();
    let start = Instant::now();
    let writer = std::thread::spawn(move || w.write_all(&data).unwrap());
    let mut got = Vec::with_capacity(want);
    let mut buf = vec![0u8; 64 * 1024];
    let mut reads = 0;
    while got.len() < want {
        let n = r.read(&mut buf).expect("reading the echo");
        assert!(n > 0, "EOF after {} of {want} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
        reads += 1;
    }
    let took = start.elapsed();
    writer.join().unwrap();
    (got, took, reads)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn within(took: Duration, lo: u64, hi: u64, what: &str) {
    assert!(
        took >= ms(lo) && took <= ms(hi),
        "{what}: took {took:?}, expected {lo}..{hi} ms"
    );
}

#[test]
fn latency_on_a_32k_round_trip_is_the_toxics() {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        echo_server(),
        dir.path(),
        &["latency:downstream:latency=100"],
    );
    let sock = connect(p.addr);
    let data = random_bytes(32 * 1024, 1);
    let (got, took, _) = round_trip(&sock, &data);
    assert!(got == data, "the echo came back changed");
    within(
        took,
        100 - 15,
        100 + 15,
        "32 KiB round trip, 100 ms latency",
    );
}

#[test]
fn two_chained_latencies_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        echo_server(),
        dir.path(),
        &[
            "latency:downstream:latency=500,name=first",
            "latency:downstream:latency=500,name=second",
        ],
    );
    let (got, took, _) = round_trip(&connect(p.addr), b"ping");
    assert_eq!(got, b"ping");
    within(took, 1000, 1000 + 100, "two chained 500 ms latencies");
}

#[test]
fn bandwidth_paces_480_kb_at_1000_kb_per_s() {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        echo_server(),
        dir.path(),
        &["bandwidth:downstream:rate=1000"],
    );
    let data = random_bytes(480_000, 2);
    let (got, took, _) = round_trip(&connect(p.addr), &data);
    assert!(got == data, "bytes lost or changed");
    within(took, 432, 528, "480,000 bytes at 1,000 KB/s");
}

#[test]
fn reset_peer_resets_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        echo_server(),
        dir.path(),
        &["reset_peer:downstream:timeout=50"],
    );
    let mut sock = connect(p.addr);
    sock.write_all(b"hello").unwrap();
    let mut buf = [0u8; 64];
    let start = Instant::now();
    let err = match sock.read(&mut buf) {
        Ok(0) => panic!("a clean EOF, not a reset"),
        Ok(n) => panic!("{n} bytes passed a reset_peer toxic"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(start.elapsed() >= ms(40), "reset before its timeout");
}

#[test]
fn slicer_delivers_every_byte_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        echo_server(),
        dir.path(),
        &["slicer:downstream:average_size=1024,size_variation=512,delay=10"],
    );
    let data = b"hello world ".repeat(40_000); // 480 KB, as toxiproxy's test
    let (got, _, reads) = round_trip(&connect(p.addr), &data);
    assert!(got == data, "bytes lost or reordered by the slicer");
    // How many slices the toxic cuts is checked on the pipeline itself
    // (toxics::pipe's slicer test, as toxiproxy's); the socket coalesces.
    println!("slicer: 480,000 bytes in {reads} client reads");
}

#[test]
fn limit_data_passes_exactly_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        echo_server(),
        dir.path(),
        &["limit_data:downstream:bytes=1000"],
    );
    let mut sock = connect(p.addr);
    let data = random_bytes(4000, 3);
    sock.write_all(&data).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("after {} bytes: {e}", got.len()),
        }
    }
    assert_eq!(got.len(), 1000);
    assert!(got == data[..1000], "not the first 1000 bytes");
}

#[test]
fn toxicity_zero_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        echo_server(),
        dir.path(),
        &[
            "latency:downstream:latency=2000,toxicity=0",
            "reset_peer:upstream:toxicity=0",
        ],
    );
    let data = random_bytes(32 * 1024, 4);
    let (got, took, _) = round_trip(&connect(p.addr), &data);
    assert!(got == data);
    assert!(took < ms(1000), "a toxic with toxicity 0 acted: {took:?}");
}

#[test]
fn the_recording_is_what_the_client_sent_before_upstream_toxics() {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        echo_server(),
        dir.path(),
        &[
            "latency:upstream:latency=20",
            "slicer:upstream:average_size=100,size_variation=50",
        ],
    );
    let sock = connect(p.addr);
    let data = random_bytes(100_000, 5);
    let (got, _, _) = round_trip(&sock, &data);
    assert!(got == data);
    sock.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&sock).read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    wait_until("the recording is final", || {
        final_files(dir.path()).len() == 1
    });
    let name = &final_files(dir.path())[0];
    assert!(std::fs::read(dir.path().join(name)).unwrap() == data);
}

#[test]
fn slow_close_delays_the_fin() {
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        echo_server(),
        dir.path(),
        &["slow_close:downstream:delay=300"],
    );
    let mut sock = connect(p.addr);
    sock.write_all(b"bye").unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    sock.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    within(start.elapsed(), 290, 600, "300 ms slow_close");
}

#[test]
fn timeout_and_limit_time_close_the_connection() {
    for (toxic, lo) in [
        ("timeout:upstream:timeout=200", 190),
        ("limit_time:downstream:duration=200", 190),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = proxy(echo_server(), dir.path(), &[toxic]);
        let mut sock = connect(p.addr);
        let start = Instant::now();
        sock.write_all(b"x").unwrap();
        let mut got = Vec::new();
        let _ = sock.read_to_end(&mut got); // an EOF (or a reset: unread bytes)
        within(start.elapsed(), lo, 1000, toxic);
        if toxic.starts_with("timeout") {
            assert!(got.is_empty(), "a timeout toxic passed {got:?}");
        }
    }
}

/// Not a timed assertion: the added latency of a proxy without toxics, as
/// a figure in the test's output (`cargo test --test toxics -- --nocapture`).
#[test]
fn no_toxic_latency_figure() {
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_server();
    let p = proxy(echo, dir.path(), &[]);
    let median = |addr: SocketAddr| {
        let mut sock = connect(addr);
        let mut buf = [0u8; 64];
        let mut times: Vec<Duration> = (0..200)
            .map(|_| {
                let start = Instant::now();
                sock.write_all(b"ping").unwrap();
                sock.read_exact(&mut buf[..4]).unwrap();
                start.elapsed()
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    };
    let direct = median(echo);
    let through = median(p.addr);
    println!(
        "no-toxic proxy: median round trip {through:?} vs {direct:?} direct: {:?} added",
        through.saturating_sub(direct)
    );
}

#[test]
fn metrics_count_toxics_and_their_ends() {
    let dir = tempfile::tempdir().unwrap();
    let toxics: Vec<Toxic> = [
        "latency:downstream:latency=20",
        "reset_peer:upstream:timeout=10",
    ]
    .iter()
    .map(|t| t.parse().unwrap())
    .collect();
    let proxy = Proxy::bind(&ProxyConfig {
        listen: loopback0(),
        upstream: echo_server(),
        dir: dir.path().to_path_buf(),
        toxics,
        stats_addr: Some(loopback0()),
        ..ProxyConfig::default()
    })
    .unwrap();
    let stats = proxy.stats_addr().unwrap();
    let p = InProcess::run(proxy);
    let mut sock = connect(p.addr);
    sock.write_all(b"hello").unwrap();
    let mut buf = [0u8; 16];
    let err = sock.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    wait_until("the reset is counted", || {
        sample(&scrape(stats), "stopover_toxic_ends_total{how=\"reset\"}") == 1.0
    });
    let body = scrape(stats);
    assert_eq!(sample(&body, "stopover_toxics_applied_total"), 2.0);
    assert_eq!(
        sample(&body, "stopover_toxic_ends_total{how=\"closed\"}"),
        0.0
    );
}

#[test]
fn the_command_line_checks_toxics_and_honours_a_config_files_toxics() {
    for bad in [
        &["--toxic", "lag"][..],
        &["--toxic", "latency:sideways"],
        &["--toxic", "latency::latency=-5"],
        &["--toxic", "latency::toxicity=1.5"],
        &["--config", "/nonexistent/toxiproxy.json"],
    ] {
        let out = std::process::Command::new(bin())
            .arg("proxy")
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("toxiproxy.json");
    let echo = echo_server();
    std::fs::write(
        &config,
        format!(
            r#"[{{"name": "db", "listen": "127.0.0.1:0", "upstream": "{echo}", "enabled": true,
                 "toxics": [{{"type": "latency", "attributes": {{"latency": 150}}}}]}}]"#
        ),
    )
    .unwrap();
    let spool = dir.path().join("spool");
    let proxy = spawn_with(std::process::Command::new(bin()).args([
        "-v",
        "proxy",
        "--config",
        config.to_str().unwrap(),
        "--name",
        "db",
        "--dir",
        spool.to_str().unwrap(),
    ]));
    let (got, took, _) = round_trip(&connect(proxy.addr), b"config");
    assert_eq!(got, b"config");
    assert!(took >= ms(150), "the config's toxic did not act: {took:?}");
    proxy.wait_for_log("drew toxics: latency_downstream");
}

#[test]
fn hold_mode_and_toxics_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let toxics: Vec<Toxic> = [
        "slicer:upstream:average_size=1000,size_variation=500",
        "latency:downstream:latency=100",
    ]
    .iter()
    .map(|t| t.parse().unwrap())
    .collect();
    let proxy = Proxy::bind(&ProxyConfig {
        listen: loopback0(),
        upstream: echo_server(),
        dir: dir.path().to_path_buf(),
        hold: Some(Duration::ZERO),
        toxics,
        ..ProxyConfig::default()
    })
    .unwrap();
    let p = InProcess::run(proxy);
    let mut sock = connect(p.addr);
    let data = random_bytes(200_000, 9);
    let start = Instant::now();
    sock.write_all(&data).unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    sock.read_to_end(&mut got).unwrap();
    assert!(got == data, "the held upload came back changed");
    assert!(start.elapsed() >= ms(100), "the answer was not delayed");
    wait_until("the held recording is final", || {
        final_files(dir.path()).len() == 1
    });
    let name = &final_files(dir.path())[0];
    assert!(std::fs::read(dir.path().join(name)).unwrap() == data);
}
