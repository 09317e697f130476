//! The binary's command line: the whole system through real processes,
//! exit codes, and clear one-line errors for bad input.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output};

use common::*;

/// Runs `stopover args...` to completion, bounded: a command that should
/// fail at once but starts serving instead fails the test, not hangs it.
fn run(args: &[&str]) -> Output {
    let child = Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run stopover");
    let pid = child.id() as i32;
    let (exited, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let overdue = watch.recv_timeout(PATIENCE).is_err();
        if overdue {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        overdue
    });
    let out = child.wait_with_output().expect("wait for stopover");
    let _ = exited.send(());
    assert!(
        !watchdog.join().unwrap(),
        "stopover {args:?} was still running after {PATIENCE:?}"
    );
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn whole_system_through_processes_prints_the_answer_and_exits_0() {
    let dirs = tempfile::tempdir().unwrap();
    let recv = dirs.path().join("received");
    let spool = dirs.path().join("spool");
    let server = spawn_server(&recv, &[]);
    let proxy = spawn_proxy(server.addr, &spool, &[]);
    let file = dirs.path().join("payload");
    std::fs::write(&file, random_bytes(1_000_000, 31)).unwrap();
    let out = run(&[
        "client",
        "--to",
        &proxy.addr.to_string(),
        file.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {stdout} stderr {}",
        stderr(&out)
    );
    assert!(stdout.starts_with("OK bytes=1000000 crc32c="), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "stdout is just the answer");
    assert!(
        stderr(&out).is_empty(),
        "client is quiet on success: {}",
        stderr(&out)
    );
    proxy.wait_for_log("relayed");
    server.wait_for_log("stored");
}

#[test]
fn client_exits_3_when_the_server_stored_different_bytes() {
    let fake = TcpListener::bind(loopback0()).unwrap();
    let addr = fake.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut sock, _) = fake.accept().unwrap();
        let data = read_all(&mut sock).unwrap();
        // Right length, wrong checksum.
        let line = format!("OK bytes={} crc32c=deadbeef file=lies\n", data.len());
        answer_and_close(&mut sock, &line);
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"the real bytes").unwrap();
    let out = run(&["client", "--to", &addr.to_string(), file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("server stored different bytes than were sent"),
        "{err}"
    );
    assert!(
        err.contains("deadbeef") && err.contains("sent 14 bytes"),
        "{err}"
    );
}

#[test]
fn client_exits_1_on_an_err_answer_and_on_a_garbled_one() {
    for line in ["ERR nope\n", "HTTP/1.1 400 Bad Request\r\n"] {
        let fake = TcpListener::bind(loopback0()).unwrap();
        let addr = fake.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut sock, _) = fake.accept().unwrap();
            let _ = read_all(&mut sock);
            answer_and_close(&mut sock, line);
        });
        let out = Command::new(bin())
            .args(["client", "--to", &addr.to_string(), "-"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "answer {line:?}: stderr {}",
            stderr(&out)
        );
    }
}

#[test]
fn the_client_escapes_control_characters_in_the_answer_it_prints() {
    let fake = TcpListener::bind(loopback0()).unwrap();
    let addr = fake.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut sock, _) = fake.accept().unwrap();
        let _ = read_all(&mut sock);
        answer_and_close(&mut sock, "ERR \x1b]0;owned\x07\x1b[2Jcleared\n");
    });
    let out = Command::new(bin())
        .args(["client", "--to", &addr.to_string(), "-"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !stdout.contains('\x1b') && !stdout.contains('\x07'),
        "raw control characters reached the terminal: {stdout:?}"
    );
    assert_eq!(stdout, "ERR \\u{1b}]0;owned\\u{7}\\u{1b}[2Jcleared\n");
}

#[test]
fn bad_input_gets_one_clear_line_exit_2_for_usage_and_1_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let plain_file = dir.path().join("plain");
    std::fs::write(&plain_file, b"").unwrap();
    let taken = TcpListener::bind(loopback0()).unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["server".into(), "--listen".into(), "not-an-address".into()],
            "is not host:port",
        ),
        (
            vec!["server".into(), "--listen".into(), "127.0.0.1".into()],
            "is not host:port",
        ),
        (
            vec!["load".into(), "-n".into(), "0".into()],
            "invalid value '0'",
        ),
        (
            vec!["load".into(), "-c".into(), "0".into()],
            "invalid value '0'",
        ),
        (
            vec!["client".into(), "--timeout".into(), "0s".into(), "f".into()],
            "is zero",
        ),
        (
            vec![
                "load".into(),
                "--all-at-once".into(),
                "--duration".into(),
                "1s".into(),
            ],
            "cannot be used with",
        ),
        (
            vec![
                "server".into(),
                "--listen".into(),
                taken_addr.clone(),
                "--dir".into(),
                dir.path().join("a").to_string_lossy().into(),
            ],
            "Address already in use",
        ),
        (
            vec![
                "server".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--dir".into(),
                plain_file.join("sub").to_string_lossy().into(),
            ],
            "creating directory",
        ),
        (
            vec![
                "proxy".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--dir".into(),
                plain_file.to_string_lossy().into(),
            ],
            "not a directory",
        ),
        (
            vec![
                "proxy".into(),
                "--upstream".into(),
                "no-such-host.invalid:9".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
            "resolving upstream",
        ),
        (
            vec![
                "client".into(),
                dir.path().join("missing").to_string_lossy().into(),
            ],
            "No such file",
        ),
        (
            vec![
                "client".into(),
                "--to".into(),
                dead_port().to_string(),
                plain_file.to_string_lossy().into(),
            ],
            "Connection refused",
        ),
        (
            vec![
                "client".into(),
                "--timeout".into(),
                "soon".into(),
                "f".into(),
            ],
            "invalid value",
        ),
        (
            vec![
                "server".into(),
                "--grace".into(),
                "10000000000000000000s".into(),
            ],
            "longer than the longest allowed",
        ),
        (vec!["teleport".into()], "unrecognized subcommand"),
        (
            vec!["proxy".into(), "--spool-memory".into(), "1MiB".into()],
            "invalid value '1MiB'",
        ),
    ];
    // What the command line itself gets wrong is a usage error (2); what
    // only running can find out (a taken port, a bad directory, a name
    // that does not resolve, a refused connection) is a failure (1).
    let usage = [
        "is not host:port",
        "invalid value",
        "is zero",
        "cannot be used with",
        "longer than the longest allowed",
        "unrecognized subcommand",
    ];
    for (args, needle) in cases {
        let out = Command::new(bin())
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = stderr(&out);
        let code = if usage.iter().any(|u| needle.starts_with(u)) {
            2
        } else {
            1
        };
        assert_eq!(out.status.code(), Some(code), "{args:?}: stderr {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        assert!(
            first.contains(needle) || first.starts_with("error:"),
            "{args:?}: first line should say it: {err}"
        );
    }
    drop(taken);
}

#[test]
fn unwritable_directory_is_refused_at_startup() {
    use std::os::unix::fs::PermissionsExt;
    if unsafe { libc::geteuid() } == 0 {
        // root ignores permission bits; use a read-only bind instead: a
        // directory in /proc cannot be created in by anyone.
        let out = run(&[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            "/proc/stopover-test",
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("creating directory"),
            "{}",
            stderr(&out)
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
    let out = run(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not writable"), "{}", stderr(&out));
}

#[test]
fn help_is_available_for_every_subcommand() {
    for sub in ["server", "proxy", "client"] {
        let out = run(&[sub, "--help"]);
        assert_eq!(out.status.code(), Some(0));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: stopover"),
            "{sub} --help"
        );
    }
}

#[test]
fn a_directory_other_users_can_write_or_own_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let open = parent.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    for role in ["server", "proxy"] {
        let out = run(&[
            role,
            "--listen",
            "127.0.0.1:0",
            "--dir",
            open.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{role}");
        assert!(
            stderr(&out).contains("other users can write to it"),
            "{role}: {}",
            stderr(&out)
        );
    }
    if unsafe { libc::geteuid() } != 0 {
        return; // only root can give a directory away
    }
    let theirs = parent.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(12345), Some(12345)).unwrap();
    let out = run(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        theirs.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("owned by uid 12345"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn completions_and_a_man_page_come_from_the_same_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("stopover") && text.contains("min-rate"),
            "{shell} completions name the flags"
        );
    }
    let out = run(&["manpage"]);
    assert_eq!(out.status.code(), Some(0));
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(man.contains(".TH stopover 1"), "a roff man page");
    assert!(man.contains("proxy"), "it lists the subcommands");
}

#[test]
fn help_groups_global_options_and_ends_with_examples() {
    for sub in ["server", "proxy", "client", "load"] {
        let out = run(&[sub, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Global options:"), "{sub}");
        assert!(help.contains("Examples:\n  stopover "), "{sub}");
        assert!(help.contains("Exit codes:"), "{sub}");
    }
}

#[test]
fn listen_accepts_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--listen", "localhost:0"]);
    assert_eq!(
        send(server.addr, b"by name").unwrap().verdict(),
        stopover::client::Verdict::Verified
    );
}

#[test]
fn counts_are_worded_alike_and_spool_memory_has_the_floor_help_states() {
    let reason = |args: &[&str]| {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        let line = err.lines().next().unwrap_or("").to_string();
        // `error: invalid value '0' for '--clients <C>': REASON`
        line.rsplit_once("': ")
            .map(|(_, r)| r.to_string())
            .unwrap_or(line)
    };
    let n = reason(&["load", "-n", "0"]);
    assert_eq!(n, reason(&["load", "-c", "0"]));
    assert_eq!(n, reason(&["server", "--max-conns", "0"]));
    assert!(n.contains("at least 1"), "{n}");
    let help = String::from_utf8_lossy(&run(&["proxy", "--help"]).stdout).into_owned();
    assert!(help.contains("at least 4 MiB"), "{help}");
    let low = reason(&["proxy", "--spool-memory", "1MiB"]);
    assert!(low.contains("least allowed, 4MiB"), "{low}");
}

#[test]
fn a_daemon_that_cannot_bind_creates_no_directory() {
    let taken = TcpListener::bind(loopback0()).unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let parent = tempfile::tempdir().unwrap();
    for role in ["server", "proxy"] {
        let dir = parent.path().join(role);
        let out = run(&[role, "--listen", &taken, "--dir", dir.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{role}: {}", stderr(&out));
        assert!(stderr(&out).contains("Address already in use"), "{role}");
        assert!(
            !dir.exists(),
            "{role} created {} before failing",
            dir.display()
        );
    }
}

/// `stopover client FILE | head -0`: the answer cannot be printed, and
/// that costs the line, not a panic; the exit code still says the upload
/// was verified. The same for `load`'s summary.
#[test]
fn a_closed_stdout_loses_the_line_not_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&dir.path().join("r"));
    let file = dir.path().join("f");
    std::fs::write(&file, b"some bytes").unwrap();
    let to = server.addr.to_string();
    for args in [
        vec![
            "client",
            "--no-progress",
            "--to",
            &to,
            file.to_str().unwrap(),
        ],
        vec![
            "load",
            "--no-progress",
            "--to",
            &to,
            "-n",
            "3",
            "-c",
            "1",
            "-s",
            "1KiB",
        ],
    ] {
        let mut child = Command::new(bin())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
