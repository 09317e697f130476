//! The server on its own: storage discipline and failure handling.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use stopover::answer::Answer;
use stopover::client::Verdict;

#[test]
fn direct_upload_is_stored_under_a_final_name_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("nested/received");
    let server = start_server(&store);
    let data = random_bytes(200_000, 21);
    let receipt = send(server.addr, &data).unwrap();
    assert_eq!(receipt.verdict(), Verdict::Verified);
    let Answer::Ok { file, .. } = receipt.answer else {
        unreachable!()
    };
    let path = store.join(&file);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&store).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn reset_before_eof_removes_the_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let mut sock = TcpStream::connect(server.addr).unwrap();
    sock.write_all(&random_bytes(100_000, 22)).unwrap();
    wait_until("a .part file appears", || {
        !file_names(dir.path()).is_empty()
    });
    socket2::SockRef::from(&sock)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(sock);
    wait_until("the partial file is removed", || {
        file_names(dir.path()).is_empty()
    });
    // Still serving.
    assert_eq!(
        send(server.addr, b"next").unwrap().verdict(),
        Verdict::Verified
    );
}

#[test]
fn slow_client_does_not_delay_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    // One client connects, sends a little, and goes quiet (never closes).
    let mut idle = TcpStream::connect(server.addr).unwrap();
    idle.write_all(b"partial").unwrap();
    // Others are served meanwhile.
    for i in 0..20 {
        let data = random_bytes(5000, 100 + i);
        assert_eq!(
            send(server.addr, &data).unwrap().verdict(),
            Verdict::Verified
        );
    }
    drop(idle);
}

#[test]
fn write_error_on_the_file_gets_err_removes_the_partial_and_keeps_serving() {
    // A real write failure: the server process may not write files larger
    // than 1 MiB (RLIMIT_FSIZE), and ignores SIGXFSZ so the write returns
    // EFBIG instead of killing it.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = server_command(dir.path(), &[]);
    limit_child(&mut cmd, libc::RLIMIT_FSIZE, 1024 * 1024);
    let server = spawn_with(&mut cmd);
    let receipt =
        send(server.addr, &random_bytes(4 * 1024 * 1024, 23)).expect("an answer comes back");
    assert!(
        receipt
            .line
            .starts_with("ERR storing upload failed: File too large"),
        "{}",
        receipt.line
    );
    assert!(
        file_names(dir.path()).is_empty(),
        "partial removed: {:?}",
        file_names(dir.path())
    );
    let small = send(server.addr, b"small enough").unwrap();
    assert_eq!(small.verdict(), Verdict::Verified, "server keeps serving");
    server.wait_for_log("upload refused");
}

#[test]
fn discard_answers_count_and_crc_stores_nothing_and_needs_no_dir() {
    // Started in an empty directory, without --dir: nothing may appear in
    // it (not even the default `received`).
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["server", "--discard", "--listen", "127.0.0.1:0"])
        .current_dir(cwd.path());
    let server = spawn_with(&mut cmd);
    server.wait_for_log("server: --discard: uploads are counted and checksummed, never stored");
    // Directly, and relayed by a proxy: verified by our client, `file=-`.
    let proxy_dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(server.addr, proxy_dir.path());
    for (to, seed) in [(server.addr, 31), (proxy.addr, 32)] {
        let data = random_bytes(3 * 1024 * 1024 + 7, seed);
        let receipt = send(to, &data).unwrap();
        assert_eq!(receipt.line, ok_line(&data, "-").trim_end());
        assert_eq!(receipt.verdict(), Verdict::Verified);
    }
    // An empty upload too.
    assert_eq!(
        send(server.addr, b"").unwrap().line,
        ok_line(b"", "-").trim_end()
    );
    // The load generator accepts the answers as verified.
    let out = std::process::Command::new(bin())
        .args([
            "load",
            "--to",
            &server.addr.to_string(),
            "-n",
            "20",
            "-c",
            "4",
        ])
        .args(["--size", "1KiB..64KiB", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["transfers_ok"], 20, "{summary}");
    server.wait_for_log("discarded upload from");
    assert_eq!(file_names(cwd.path()), Vec::<String>::new());
}

#[test]
fn discard_with_a_dir_is_a_usage_error() {
    let out = std::process::Command::new(bin())
        .args(["server", "--discard", "--dir", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
