//! The load generator, and how the daemons hold up under many connections.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn load(args: &[&str]) -> (Output, Value) {
    run_load(args)
}

#[test]
fn load_smoke_verifies_every_transfer_and_reports_json() {
    let sys = start_system();
    let (out, json) = load(&[
        "--to",
        &sys.proxy.addr.to_string(),
        "-c",
        "4",
        "-n",
        "40",
        "--size",
        "1KiB..64KiB",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for key in [
        "transfers_ok",
        "transfers_failed",
        "failures",
        "bytes",
        "wall_s",
        "mb_per_s",
        "transfers_per_s",
        "latency_ms",
    ] {
        assert!(json.get(key).is_some(), "JSON lacks {key}: {json}");
    }
    for key in ["p50", "p90", "p99", "max"] {
        assert!(
            json["latency_ms"][key].as_f64().is_some_and(|v| v > 0.0),
            "latency_ms.{key}: {json}"
        );
    }
    assert_eq!(json["transfers_ok"], 40);
    assert_eq!(json["transfers_failed"], 0);
    assert!(json["bytes"].as_u64().unwrap() >= 40 * 1024);
    assert_eq!(final_files(sys.server_dir.path()).len(), 40);
}

#[test]
fn load_counts_failures_by_kind_and_exits_nonzero() {
    // A fake server that misbehaves in turn: wrong checksum, silent close,
    // ERR, reset.
    let fake = TcpListener::bind(loopback0()).unwrap();
    let addr = fake.local_addr().unwrap();
    std::thread::spawn(move || {
        for (i, conn) in fake.incoming().enumerate() {
            let Ok(mut sock) = conn else { continue };
            let data = read_all(&mut sock).unwrap_or_default();
            match i % 4 {
                0 => answer_and_close(
                    &mut sock,
                    &format!("OK bytes={} crc32c=00000001 file=x\n", data.len()),
                ),
                1 => drop(sock),
                2 => answer_and_close(&mut sock, "ERR not today\n"),
                _ => {
                    socket2::SockRef::from(&sock)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                    drop(sock);
                }
            }
        }
    });
    let (out, json) = load(&[
        "--to",
        &addr.to_string(),
        "-c",
        "1",
        "-n",
        "8",
        "--size",
        "10KiB",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code says not every transfer was verified"
    );
    assert_eq!(json["transfers_ok"], 0);
    assert_eq!(json["transfers_failed"], 8);
    let failures = &json["failures"];
    assert_eq!(failures["mismatch"], 2, "{json}");
    assert_eq!(failures["lost"], 2, "{json}");
    assert_eq!(failures["err_answer"], 2, "{json}");
    assert_eq!(failures["reset"], 2, "{json}");

    let (out, json) = load(&["--to", &dead_port().to_string(), "-c", "2", "-n", "4"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json["failures"]["connect_refused"], 4, "{json}");
}

#[test]
fn load_says_which_limit_stops_it() {
    let out = Command::new(bin())
        .args(["load", "--to", "127.0.0.1:1", "--clients", "1000000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open-files limit"), "{err}");
}

/// Starts a server whose open-files limit is `limit` (soft and hard).
fn server_with_nofile(dir: &std::path::Path, limit: u64) -> Spawned {
    let mut cmd = server_command(dir, &[]);
    limit_child(&mut cmd, libc::RLIMIT_NOFILE, limit);
    spawn_with(&mut cmd)
}

#[test]
fn server_with_few_descriptors_backs_off_and_serves_everyone() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_nofile(dir.path(), 64);
    // 60 uploads held open half-way: far more than 64 descriptors allow
    // (two each). The server takes what fits; the rest wait in the backlog.
    let payloads: Vec<Vec<u8>> = (0..60).map(|i| random_bytes(20_000, 500 + i)).collect();
    let mut socks: Vec<TcpStream> = payloads
        .iter()
        .map(|p| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(&p[..10_000]).unwrap();
            s
        })
        .collect();
    let warnings = || -> Vec<String> {
        server
            .log_lines()
            .into_iter()
            .filter(|l| {
                l.contains("WARN") && (l.contains("at capacity") || l.contains("pausing accepts"))
            })
            .collect()
    };
    wait_until("the server logs that it backs off", || {
        !warnings().is_empty()
    });
    // Finish every upload; answers come as slots free up.
    for (sock, p) in socks.iter_mut().zip(&payloads) {
        sock.write_all(&p[10_000..]).unwrap();
        sock.shutdown(std::net::Shutdown::Write).unwrap();
    }
    for (i, (sock, p)) in socks.iter_mut().zip(&payloads).enumerate() {
        let mut answer = String::new();
        sock.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with(&ok_line(p, "")[..30]),
            "upload {i}: {answer}"
        );
    }
    assert_eq!(final_files(dir.path()).len(), 60);
    // Still serving, and one warning for the whole episode.
    let (out, json) = load(&["--to", &server.addr.to_string(), "-c", "4", "-n", "20"]);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(
        warnings().len(),
        1,
        "logs the back-off once: {:#?}",
        warnings()
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn idle_connections_cost_no_buffers() {
    const IDLE: usize = 2000;
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(server.addr, &dirs.path().join("s"), &[]);
    // Descriptors once ready and before any traffic (a finished transfer
    // may take a moment to release its own after its answer is out).
    let base_fds = open_fds(proxy.pid());
    // Warm the proxy up with real traffic first, so its baseline includes
    // the scratch buffer and allocator arenas.
    assert_eq!(
        send(proxy.addr, &random_bytes(4 << 20, 1))
            .unwrap()
            .line
            .get(..2),
        Some("OK")
    );
    let (proxy_before, server_before) = (proxy.rss_kib(), server.rss_kib());
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| TcpStream::connect(proxy.addr).unwrap())
        .collect();
    // Each idle transfer holds three descriptors in the proxy once set up.
    wait_until("the proxy has set up every idle transfer", || {
        open_fds(proxy.pid()) >= base_fds + 3 * IDLE
    });
    let (proxy_after, server_after) = (proxy.rss_kib(), server.rss_kib());
    let per_conn =
        |before: u64, after: u64| after.saturating_sub(before) as f64 * 1024.0 / IDLE as f64;
    eprintln!(
        "RSS with {IDLE} idle connections: proxy {proxy_before} -> {proxy_after} KiB ({:.0} B each), server {server_before} -> {server_after} KiB ({:.0} B each)",
        per_conn(proxy_before, proxy_after),
        per_conn(server_before, server_after)
    );
    // A buffer per connection would be 64 KiB or more each; we allow 4 KiB
    // for the slab entry, sockets' user-space state and file names.
    assert!(
        per_conn(proxy_before, proxy_after) < 4096.0,
        "proxy memory grows with idle connections"
    );
    assert!(
        per_conn(server_before, server_after) < 4096.0,
        "server memory grows with idle connections"
    );
    drop(idle);
}

#[test]
fn open_loop_latency_shows_a_stalled_server_and_loses_no_transfer() {
    // The server is paused (SIGSTOP) for a second in the middle of a
    // --rate run. Clients that wait for it cannot start the transfers
    // scheduled meanwhile; measured from their scheduled starts, those
    // transfers show the stall (coordinated omission corrected), while the
    // service times, measured from when a client began, mostly do not.
    const RATE: u64 = 200;
    const SECONDS: u64 = 3;
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(server.addr, &dirs.path().join("s"), &[]);
    let to = proxy.addr.to_string();
    let run = std::thread::spawn(move || {
        load(&[
            "--to",
            &to,
            "-c",
            "20",
            "--rate",
            &RATE.to_string(),
            "-d",
            &format!("{SECONDS}s"),
            "-s",
            "1KiB",
            "-i",
            "1s",
        ])
    });
    // The stimulus, timed by the test: a second in, pause the server for a
    // second.
    std::thread::sleep(Duration::from_secs(1));
    unsafe { libc::kill(server.pid() as i32, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(1));
    unsafe { libc::kill(server.pid() as i32, libc::SIGCONT) };
    let (out, json) = run.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{json}");
    // Nothing lost or miscounted: every scheduled transfer ran and was
    // verified, the queued ones included.
    assert_eq!(json["transfers_failed"], 0, "{json}");
    assert_eq!(json["transfers_ok"], RATE * SECONDS, "{json}");
    assert_eq!(json["rate"]["offered"], RATE as f64);
    assert!(json["rate"]["started_late"].as_u64().unwrap() > 0, "{json}");
    let corrected = |q: &str| json["latency_ms"][q].as_f64().unwrap();
    let service = |q: &str| json["service_time_ms"][q].as_f64().unwrap();
    assert!(
        corrected("p99") >= 300.0,
        "the stall must show in the corrected p99: {}",
        json["latency_ms"]
    );
    assert!(
        corrected("p90") > service("p90"),
        "the queued transfers' wait counts: corrected {} vs service {}",
        json["latency_ms"],
        json["service_time_ms"]
    );
    assert_eq!(json["config"]["mode"], "open");
    assert_eq!(
        json["intervals"].as_array().map(Vec::len),
        Some(SECONDS as usize),
        "{json}"
    );
    eprintln!(
        "corrected p99 {} ms, service p99 {} ms",
        corrected("p99"),
        service("p99")
    );
}

#[test]
fn thresholds_gate_the_exit_code_and_the_histogram_log_is_written() {
    let sys = start_system();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("latency.hlog");
    let to = sys.proxy.addr.to_string();
    let (out, json) = load(&[
        "--to",
        &to,
        "-n",
        "20",
        "-c",
        "2",
        "--warmup",
        "0s",
        "--hdr-log",
        log.to_str().unwrap(),
        "--fail-if",
        "p50<1h",
        "--fail-if",
        "errors>0",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "a crossed threshold exits 4: {json}"
    );
    assert_eq!(json["thresholds"][0]["passed"], false);
    assert_eq!(json["thresholds"][0]["unit"], "ms");
    assert_eq!(json["thresholds"][1]["passed"], true);
    assert_eq!(json["thresholds"][1]["unit"], "errors");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("#[StartTime: "), "{text}");
    assert!(
        text.lines().any(|l| l.contains(",HISTF")),
        "an encoded histogram line: {text}"
    );
    let (out, _) = load(&["--to", &to, "-n", "5", "--fail-if", "p99>1h"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_duration_run_has_rate_times_duration_transfers_and_whole_intervals() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let to = server.addr.to_string();
    // Open loop: 1/300 s is not a whole number of nanoseconds; the run
    // once started a 301st transfer at 0.9999990 s.
    let (out, json) = load(&[
        "--to", &to, "--rate", "300", "-d", "1s", "-i", "500ms", "-c", "8", "-s", "1KiB",
    ]);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["transfers_ok"], 300, "{json}");
    // Closed loop: clients send until the end, so some transfers end
    // after it; they belong to the last interval, not to a sliver of a
    // third one.
    let hlog = dir.path().join("intervals.hlog");
    let hlog = hlog.to_str().unwrap();
    for args in [
        &["--rate", "300", "-d", "1s"][..],
        &["-c", "2", "-d", "1s"][..],
    ] {
        let common = ["--to", &to, "-i", "500ms", "-s", "1KiB", "--hdr-log", hlog];
        let (out, json) = load(&[&common[..], args].concat());
        assert_eq!(out.status.code(), Some(0), "{json}");
        let intervals = json["intervals"].as_array().unwrap();
        assert_eq!(intervals.len(), 2, "{args:?}: {json}");
        let last = &intervals[1];
        assert_eq!(last["start_s"].as_f64(), Some(0.5), "{json}");
        assert!(last["end_s"].as_f64().unwrap() >= 1.0, "{json}");
        // The histogram log has the same two intervals, and no sliver.
        let log = std::fs::read_to_string(hlog).unwrap();
        let lengths: Vec<f64> = log
            .lines()
            .filter(|l| l.contains(",HISTF"))
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(lengths.len(), 2, "{log}");
        assert!(lengths.iter().all(|&s| s >= 0.499), "{lengths:?}");
    }
}
