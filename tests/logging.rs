//! Logging that can never kill or stall a daemon, and log lines a person
//! can read: real processes whose stderr is closed, full, or read.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use stopover::client::Verdict;

/// A daemon started with its stderr on a pipe the test holds: read up to
/// the `listening on` line, then closed or left unread as the test wants.
struct Daemon {
    spawned: Spawned,
    stats: SocketAddr,
    stderr: Option<BufReader<ChildStderr>>,
}

impl Daemon {
    /// Starts `cmd` with `--stats-addr` and reads its log to `listening on`.
    fn start(cmd: &mut Command) -> Daemon {
        let mut child = cmd
            .args(["--stats-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stopover");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let (mut addr, mut stats) = (None, None);
        let mut lines = Vec::new();
        while addr.is_none() {
            let mut line = String::new();
            // Blocking, but bounded: a daemon that starts prints the line,
            // and one that fails closes the pipe (EOF).
            let n = stderr.read_line(&mut line).unwrap();
            assert!(n > 0, "daemon exited before listening: {lines:?}");
            let after = |marker: &str| {
                line.find(marker)
                    .map(|at| line[at + marker.len()..].split([' ', '/']).next().unwrap())
                    .map(|a| a.trim().parse::<SocketAddr>().unwrap())
            };
            stats = stats.or(after("metrics at http://"));
            addr = after("listening on ");
            lines.push(line);
        }
        let spawned = Spawned {
            child,
            addr: addr.unwrap(),
            log: Default::default(),
        };
        Daemon {
            spawned,
            stats: stats.expect("a metrics line before listening"),
            stderr: Some(stderr),
        }
    }

    /// The reader of the daemon's stderr goes away, as `| head -1` does.
    fn close_stderr(&mut self) {
        self.stderr = None;
    }

    fn dropped(&self) -> f64 {
        sample(&scrape(self.stats), "stopover_log_lines_dropped_total")
    }

    /// SIGINT, then the exit code (bounded wait).
    fn interrupt(mut self) -> Option<i32> {
        let pid = self.spawned.pid() as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.spawned.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), None, "killed by a signal: {status}");
                return status.code();
            }
            assert!(Instant::now() < deadline, "no exit after SIGINT");
            std::thread::sleep(Duration::from_millis(10)); // polling a condition
        }
    }
}

/// True if the process ignores SIGPIPE (bit 13 of SigIgn in /proc).
fn ignores_sigpipe(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .unwrap()
        .trim();
    let mask = u64::from_str_radix(mask, 16).unwrap();
    mask & (1 << (libc::SIGPIPE - 1)) != 0
}

/// Sends `count` uploads to `to`, each verified.
fn uploads_verified(to: SocketAddr, count: usize, seed: u64) {
    for i in 0..count {
        let data = random_bytes(10_000 + i, seed + i as u64);
        let receipt = send(to, &data).unwrap();
        assert_eq!(receipt.verdict(), Verdict::Verified, "upload {i}");
    }
}

#[test]
fn a_server_whose_log_reader_is_gone_keeps_answering_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Daemon::start(&mut server_command(dir.path(), &[]));
    assert!(ignores_sigpipe(server.spawned.pid()));
    server.close_stderr();
    uploads_verified(server.spawned.addr, 20, 100);
    // Each upload stored once (no answer lost after the rename, no retry),
    // and each one's log line counted as lost.
    assert_eq!(final_files(dir.path()).len(), 20);
    // (the last lines may still be on their way to the failing write)
    wait_until("every upload's lost line is counted", || {
        server.dropped() >= 20.0
    });
    assert_eq!(server.interrupt(), Some(0));
}

#[test]
fn a_proxy_whose_log_reader_is_gone_keeps_relaying_and_exits_0() {
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    let mut proxy = Daemon::start(&mut proxy_command(server.addr, &dirs.path().join("s"), &[]));
    assert!(ignores_sigpipe(proxy.spawned.pid()));
    proxy.close_stderr();
    uploads_verified(proxy.spawned.addr, 20, 200);
    assert_eq!(final_files(&dirs.path().join("s")).len(), 20);
    // (the last lines may still be on their way to the failing write)
    wait_until("every upload's lost line is counted", || {
        proxy.dropped() >= 20.0
    });
    assert_eq!(proxy.interrupt(), Some(0));
}

#[test]
fn a_log_pipe_nobody_reads_does_not_stall_a_daemon() {
    let dirs = tempfile::tempdir().unwrap();
    let server = start_server(&dirs.path().join("r"));
    // -vv writes lines for every event, read and write: the pipe (64 KiB)
    // and then the logger's queue fill while nobody reads them.
    let proxy = Daemon::start(&mut proxy_command(
        server.addr,
        &dirs.path().join("s"),
        &["-vv"],
    ));
    assert!(proxy.stderr.is_some(), "held open, never read");
    // Bounded: a few hundred uploads overflow both; a daemon that waited
    // for its stderr would stop answering at the first of them.
    let mut sent = 0;
    while proxy.dropped() == 0.0 {
        assert!(sent < 5_000, "no log line dropped after {sent} uploads");
        uploads_verified(proxy.spawned.addr, 10, sent as u64);
        sent += 10;
    }
    uploads_verified(proxy.spawned.addr, 10, 9_000);
    // Exit does not wait for the stuck pipe longer than its bounded flush.
    assert_eq!(proxy.interrupt(), Some(0));
}

// ---- Lines a person can read ----

/// A log line's level and message (after the time and the level).
fn level_and_message(line: &str) -> (&str, &str) {
    let (_time, rest) = line.split_once(' ').unwrap_or(("", line));
    let rest = rest.trim_start();
    let (level, message) = rest.split_once(' ').unwrap_or((rest, ""));
    (level, message.trim_start())
}

/// Checks every line: it names `role` first, and shows no module path.
fn assert_readable(lines: &[String], role: &str) {
    assert!(!lines.is_empty());
    for line in lines {
        let (level, message) = level_and_message(line);
        assert!(
            ["INFO", "WARN", "ERROR"].contains(&level),
            "unexpected level in {line:?}"
        );
        assert!(
            message.starts_with(&format!("{role}: ")),
            "line does not start with {role:?}: {line:?}"
        );
        assert!(!line.contains("[stopover"), "module path at info: {line:?}");
    }
}

#[test]
fn daemon_lines_name_their_role_and_no_module_at_info() {
    let dirs = tempfile::tempdir().unwrap();
    let server_dir = dirs.path().join("r");
    let server = spawn_server(&server_dir, &[]);
    let proxy = spawn_proxy(server.addr, &dirs.path().join("s"), &["--hold", "10ms"]);
    uploads_verified(proxy.addr, 1, 300);
    proxy.wait_for_log("relayed held");
    server.wait_for_log("stored");
    // The proxy's hold line, and where the server stores, among them.
    proxy.wait_for_log("proxy: holding ");
    let canonical = server_dir.canonicalize().unwrap();
    let storing = server.wait_for_log("storing uploads in ");
    assert!(
        storing.contains(&format!(
            "server: storing uploads in {}",
            server_dir.display()
        )) || storing.contains(&canonical.display().to_string()),
        "{storing}"
    );
    assert_readable(&server.log_lines(), "server");
    assert_readable(&proxy.log_lines(), "proxy");
}

#[test]
fn debug_lines_show_where_they_come_from() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["-v"]);
    uploads_verified(server.addr, 1, 400);
    let line = server.wait_for_log("accepted");
    assert!(
        line.contains(" DEBUG [stopover::server] server: accepted "),
        "{line}"
    );
}

/// Runs `stopover <args>` to the end; returns its stderr lines.
fn run_stderr(args: &[&str], dir: &Path) -> Vec<String> {
    let out = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stderr)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn client_v_shows_its_connection_life_cycle_and_is_quiet_without() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&dir.path().join("r"));
    std::fs::write(dir.path().join("note"), b"hello, verbose\n").unwrap();
    let to = server.addr.to_string();
    let quiet = run_stderr(&["client", "--to", &to, "note"], dir.path());
    assert!(quiet.is_empty(), "{quiet:?}");
    let lines = run_stderr(&["-v", "client", "--to", &to, "note"], dir.path());
    for wanted in [
        format!("client: connected to {to}"),
        "client: sent 15 bytes crc32c=".to_string(),
        "half-closed".to_string(),
        "client: answer after ".to_string(),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(" DEBUG ") && l.contains(&wanted)),
            "no debug line with {wanted:?}: {lines:?}"
        );
    }
}

#[test]
fn load_v_shows_debug_lines() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&dir.path().join("r"));
    let to = server.addr.to_string();
    let args = ["load", "--to", &to, "-n", "3", "-c", "1", "--size", "1000"];
    let quiet = run_stderr(&args, dir.path());
    assert!(quiet.is_empty(), "{quiet:?}");
    let lines = run_stderr(&[&["-v"], &args[..]].concat(), dir.path());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("load: 1 client thread(s)")),
        "{lines:?}"
    );
    let answers = lines
        .iter()
        .filter(|l| l.contains("client: answer after"))
        .count();
    assert_eq!(answers, 3, "{lines:?}");
    assert!(
        lines.iter().all(|l| !l.contains("load: client:")),
        "one role per line: {lines:?}"
    );
}
