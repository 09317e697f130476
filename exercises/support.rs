//! What the checks drive the system with: the `stopover` binary as real
//! processes on loopback ports, raw sockets, and tiny fake peers on threads.
//!
//! Deliberately black-box: nothing here links the `stopover` library, so
//! the checks compile whatever shape a learner's change takes (a new field
//! in `Answer::Ok`, a new argument to `drive`), and judge only what can be
//! seen from outside: bytes on sockets, log lines, metrics, exit codes.
//! Every wait is bounded; a wait that runs out is a "not done", never a hang.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest any wait may take before a check gives up: generous, so a
/// busy machine never turns a pass into a fail.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A check's verdict: `Err` says what was seen, in one line.
pub type Check = Result<(), String>;

/// The binary under test (the learner's code, built by cargo).
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stopover"))
}

/// A `stopover` daemon running as a process; killed (by PID) when dropped.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    /// The `--stats-addr` endpoint, when one was asked for.
    pub stats: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `stopover ARGS` and waits for its `listening on` line (and,
    /// with `--stats-addr`, its `metrics at` line).
    pub fn start(args: &[&str]) -> Result<Daemon, String> {
        let mut child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin().display()))?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                for marker in ["listening on ", "metrics at http://"] {
                    if let Some(at) = line.find(marker) {
                        let rest = &line[at + marker.len()..];
                        let addr = rest.split(['/', ' ']).next().unwrap_or("").to_string();
                        let _ = tx.send((marker, addr));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let wants_stats = args.contains(&"--stats-addr");
        let (mut addr, mut stats) = (None, None);
        let deadline = Instant::now() + PATIENCE;
        while addr.is_none() || (wants_stats && stats.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((marker, a)) => {
                    let a: SocketAddr = a.parse().map_err(|e| format!("address {a:?}: {e}"))?;
                    if marker.starts_with("listening") {
                        addr = Some(a);
                    } else {
                        stats = Some(a);
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let said = log.lock().unwrap().join(" / ");
                    return Err(format!(
                        "`stopover {}` did not start: {said}",
                        args.join(" ")
                    ));
                }
            }
        }
        Ok(Daemon {
            child,
            addr: addr.unwrap(),
            stats,
            log,
        })
    }

    /// Every log line so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line satisfies `wanted`, for at most `patience`.
    pub fn wait_for_line(
        &self,
        patience: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| wanted(l)) {
                return Some(line);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10)); // polling a condition
        }
    }

    /// SIGTERM, then waits (bounded) for the process to exit and for its
    /// last log lines.
    pub fn terminate(&mut self) -> Check {
        // SAFETY: kill(2) on the PID of our own child, which has not been
        // reaped (we hold its Child), so the PID cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // The reader thread may still be taking the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10)); // polling a condition
        }
        Err("the daemon did not stop after SIGTERM".into())
    }

    /// The value of metric `name` (without labels) at `GET /metrics`.
    pub fn metric(&self, name: &str) -> Result<Option<f64>, String> {
        let addr = self.stats.ok_or("started without --stats-addr")?;
        let mut sock = connect(addr)?;
        sock.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .map_err(|e| format!("asking for metrics: {e}"))?;
        let mut text = String::new();
        sock.read_to_string(&mut text)
            .map_err(|e| format!("reading metrics: {e}"))?;
        Ok(text.lines().find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        }))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory that is removed when dropped.
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

/// `dir/name` as a `&str`-friendly String.
pub fn path_in(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// A TCP connection with timeouts, so no read or write waits forever.
pub fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let sock = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    sock.set_read_timeout(Some(PATIENCE)).ok();
    sock.set_write_timeout(Some(PATIENCE)).ok();
    Ok(sock)
}

/// Sends `data`, half-closes, and returns everything the other end sent
/// back (as text) until it closed. A reset after an answer still returns
/// the answer.
pub fn upload(addr: SocketAddr, data: &[u8]) -> Result<String, String> {
    let mut sock = connect(addr)?;
    sock.write_all(data)
        .map_err(|e| format!("sending {} bytes: {e}", data.len()))?;
    sock.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-closing: {e}"))?;
    read_answer(&mut sock)
}

/// Reads until the other end closes (or resets); returns what came.
pub fn read_answer(sock: &mut TcpStream) -> Result<String, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if got.is_empty() && e.kind() != std::io::ErrorKind::ConnectionReset => {
                return Err(format!("waiting for the answer: {e}"))
            }
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// Runs `stopover client` on `len` bytes through `to`; returns its exit
/// code and what it printed (stdout and stderr).
pub fn stopover_client(to: SocketAddr, dir: &Path, len: usize) -> Result<(i32, String), String> {
    let file = dir.join(format!("client-{len}.bin"));
    std::fs::write(&file, pattern(len)).map_err(|e| format!("writing {}: {e}", file.display()))?;
    let out = Command::new(bin())
        .args(["client", "--no-progress", "--to", &to.to_string()])
        .arg(&file)
        .output()
        .map_err(|e| format!("running stopover client: {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), said.trim().to_string()))
}

/// `len` bytes of a recognisable pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A relay between the proxy and the real server that counts what passes
/// upstream: how the checks see what a proxy sent on.
pub struct CountingRelay {
    pub addr: SocketAddr,
    upstream_bytes: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
}

impl CountingRelay {
    pub fn start(target: SocketAddr) -> Result<CountingRelay, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("relay: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (count, opened) = (upstream_bytes.clone(), open.clone());
        std::thread::spawn(move || {
            for from in listener.incoming().map_while(Result::ok) {
                let Ok(to) = TcpStream::connect(target) else {
                    continue;
                };
                opened.fetch_add(1, Ordering::SeqCst);
                let (from2, to2) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                let (count, opened) = (count.clone(), opened.clone());
                // Upload direction, counted; when it ends, the pair is done.
                std::thread::spawn(move || {
                    copy(&from, &to, Some(&count));
                    let _ = to.shutdown(Shutdown::Write);
                });
                std::thread::spawn(move || {
                    copy(&to2, &from2, None);
                    let _ = from2.shutdown(Shutdown::Both);
                    opened.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(CountingRelay {
            addr,
            upstream_bytes,
            open,
        })
    }

    /// Upload bytes that went through to the server.
    pub fn upstream_bytes(&self) -> u64 {
        self.upstream_bytes.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until no connection through the relay is open.
    pub fn wait_until_idle(&self) {
        let deadline = Instant::now() + PATIENCE;
        while self.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10)); // polling a condition
        }
    }
}

fn copy(mut from: &TcpStream, mut to: &TcpStream, count: Option<&AtomicU64>) {
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(c) = count {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}

/// A fake upstream server on a thread: for each connection, reads the
/// upload to its end and hands it to `answer`, which writes what it likes.
pub fn fake_upstream(
    answer: impl Fn(&mut TcpStream, &[u8]) + Send + Sync + 'static,
) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("fake upstream: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for mut sock in listener.incoming().map_while(Result::ok) {
            let answer = answer.clone();
            std::thread::spawn(move || {
                sock.set_read_timeout(Some(PATIENCE)).ok();
                sock.set_write_timeout(Some(PATIENCE)).ok();
                let mut upload = Vec::new();
                if sock.read_to_end(&mut upload).is_ok() {
                    answer(&mut sock, &upload);
                }
            });
        }
    });
    Ok(addr)
}

/// The number next to one of `words` in `line` (`wouldblock=12`,
/// `would_block: 12`, `12 WouldBlocks`): right after it, else right before.
pub fn number_near(line: &str, words: &[&str]) -> Option<u64> {
    let lower = line.to_lowercase();
    let (at, len) = words
        .iter()
        .find_map(|w| lower.find(w).map(|at| (at, w.len())))?;
    let leading = |s: &str| -> Option<u64> {
        let run: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
        run.parse().ok()
    };
    let after = lower[at + len..]
        .trim_start_matches(|c: char| c.is_alphabetic())
        .trim_start_matches(['=', ':', ' ', '_']);
    if let Some(n) = leading(after) {
        return Some(n);
    }
    let before = lower[..at].trim_end();
    let digits = before.len() - before.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    before[before.len() - digits..].parse().ok()
}
