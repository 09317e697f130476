//! The readiness trace (`-vv`): a learner should be able to watch the loop
//! think. This checks that one small transfer shows the expected sequence.

mod common;

use common::*;
use stopover::client::Verdict;

/// Checks that `wanted` appear, in this order, among `lines` (other lines
/// may come between them); `a|b` accepts either. Returns the first missing.
fn missing_in_order<'a>(lines: &[String], wanted: &[&'a str]) -> Option<&'a str> {
    let mut at = 0;
    for w in wanted {
        match lines[at..]
            .iter()
            .position(|l| w.split('|').any(|alt| l.contains(alt)))
        {
            Some(i) => at += i + 1,
            None => return Some(w),
        }
    }
    None
}

/// A proxy process at `-vv` in front of `upstream`, spooling into `dir`.
fn spawn_traced_proxy(upstream: std::net::SocketAddr, dir: &std::path::Path) -> Spawned {
    spawn(&[
        "-vv",
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream.to_string(),
        "--dir",
        dir.to_str().unwrap(),
    ])
}

#[test]
fn trace_shows_one_transfer_step_by_step() {
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn(&[
        "-vv",
        "server",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        dirs.path().join("r").to_str().unwrap(),
    ]);
    let proxy = spawn_traced_proxy(server.addr, &dirs.path().join("s"));
    assert_eq!(
        send(proxy.addr, b"hello, trace\n").unwrap().verdict(),
        Verdict::Verified
    );
    proxy.wait_for_log("closed (Relayed)");
    let lines = proxy.log_lines();
    // Two causal chains. Whether the upload arrives before or after the
    // connect completes is a race, and both orders are right (early bytes
    // wait in the spool and go out by sendfile), so each chain is checked
    // on its own.
    let upload_and_answer = [
        "proxy: listener READABLE",
        "proxy: accept 127.0.0.1:", // accept; both sockets registered
        "#0 client event READABLE", // the upload arrives
        "#0 client read 13",
        "#0 client read EOF",          // the client's half-close...
        "#0 upstream shutdown(Write)", // ...passed on once all is forwarded
        "#0 upstream event READABLE",  // the answer arrives
        "#0 upstream read ",
        "#0 client write ", // relayed
        "#0 upstream read EOF",
        "#0 client shutdown(Write)|#0 client FIN with the close",
        "#0 closed (Relayed)",
    ];
    let connect = [
        "proxy: accept 127.0.0.1:",
        "#0 upstream event WRITABLE", // the connect has finished...
        "#0 upstream connected",      // ...successfully (it has a peer address)
        "#0 state Connecting -> Streaming",
        "#0 upstream write 13|#0 upstream sendfile 13",
        "#0 upstream shutdown(Write)",
    ];
    for chain in [&upload_and_answer[..], &connect[..]] {
        if let Some(missing) = missing_in_order(&lines, chain) {
            panic!(
                "trace lacks {missing:?} (in order); trace:\n{}",
                lines.join("\n")
            );
        }
    }
    // And the server's side of the same story.
    server.wait_for_log("closed");
    let lines = server.log_lines();
    let expected = [
        "server: accept 127.0.0.1:",
        "#0 read 13",
        "#0 read EOF",
        "#0 state Receiving -> Finishing", // the file's last write, then its name
        "#0 disk rename done",
        "#0 state Finishing -> Answering",
        "#0 write ",
        "#0 closed",
    ];
    if let Some(missing) = missing_in_order(&lines, &expected) {
        panic!(
            "server trace lacks {missing:?}; trace:\n{}",
            lines.join("\n")
        );
    }
}

#[test]
fn trace_is_off_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &[]);
    assert_eq!(
        send(server.addr, b"quiet").unwrap().verdict(),
        Verdict::Verified
    );
    server.wait_for_log("stored");
    assert!(server
        .log_lines()
        .iter()
        .all(|l| !l.contains("TRACE") && !l.contains("DEBUG")));
}

#[test]
fn trace_view_draws_a_real_trace_with_a_lane_per_socket() {
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_traced_proxy(server.addr, &dirs.path().join("s"));
    // Large enough for several reads and a disk write through the ring.
    let data = random_bytes(300_000, 23);
    assert_eq!(
        send(proxy.addr, &data).unwrap().verdict(),
        Verdict::Verified
    );
    proxy.wait_for_log("closed (Relayed)");
    let log = dirs.path().join("proxy.log");
    std::fs::write(&log, proxy.log_lines().join("\n")).unwrap();
    let svg_path = dirs.path().join("trace.svg");
    let out = std::process::Command::new(bin())
        .args([
            "trace-view",
            log.to_str().unwrap(),
            "-o",
            svg_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "trace-view failed: {out:?}");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for lane in [
        "proxy loop",
        "proxy #0 client",
        "proxy #0 upstream",
        "proxy disk",
        "proxy timers",
    ] {
        assert!(svg.contains(&format!(">{lane}</text>")), "no lane {lane:?}");
    }
    for label in [
        ">read ",
        ">write ",
        "#0 write ",
        "Connecting \u{2192} Streaming",
        "closed (Relayed)",
    ] {
        assert!(
            svg.contains(label),
            "no {label:?} in the picture of:\n{}",
            proxy.log_lines().join("\n")
        );
    }
}

#[test]
fn trace_view_says_so_when_a_log_has_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("info.log");
    std::fs::write(&log, "2026-12-02T00:52:30.505Z INFO  server: stopped\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["trace-view", log.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no trace lines found"), "{err}");
}
