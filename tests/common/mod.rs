//! Helpers shared by the integration tests: start roles in-process or as
//! real processes on ephemeral loopback ports, make random payloads, wait
//! on conditions with a deadline (never a bare sleep).

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stopover::client::{self, Receipt};
use stopover::event_loop::StopHandle;
use stopover::proxy::{Proxy, ProxyConfig};
use stopover::server::{Server, ServerConfig};

/// How long any wait in a test may take before the test fails. Generous:
/// a busy 2-core CI machine must never turn a pass into a fail.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A role running on a thread of the test process; stops when dropped.
pub struct InProcess {
    pub addr: SocketAddr,
    shutdown: StopHandle,
    thread: Option<JoinHandle<()>>,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.shutdown_now();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn start_server(dir: &Path) -> InProcess {
    let server = Server::bind(&ServerConfig {
        listen: loopback0(),
        dir: dir.to_path_buf(),
        ..ServerConfig::default()
    })
    .expect("server binds");
    let addr = server.local_addr();
    let shutdown = server.shutdown_handle();
    let thread = std::thread::spawn(move || {
        server.run().expect("server runs");
    });
    InProcess {
        addr,
        shutdown,
        thread: Some(thread),
    }
}

impl InProcess {
    /// Runs a bound proxy on a thread of the test process.
    pub fn run(proxy: Proxy) -> InProcess {
        let addr = proxy.local_addr();
        let shutdown = proxy.shutdown_handle();
        let thread = std::thread::spawn(move || {
            proxy.run().expect("proxy runs");
        });
        InProcess {
            addr,
            shutdown,
            thread: Some(thread),
        }
    }
}

pub fn start_proxy(upstream: SocketAddr, dir: &Path) -> InProcess {
    start_proxy_with(upstream, dir, None)
}

pub fn start_proxy_with(upstream: SocketAddr, dir: &Path, hold: Option<Duration>) -> InProcess {
    let proxy = Proxy::bind(&ProxyConfig {
        listen: loopback0(),
        upstream,
        dir: dir.to_path_buf(),
        hold,
        ..ProxyConfig::default()
    })
    .expect("proxy binds");
    let addr = proxy.local_addr();
    let shutdown = proxy.shutdown_handle();
    let thread = std::thread::spawn(move || {
        proxy.run().expect("proxy runs");
    });
    InProcess {
        addr,
        shutdown,
        thread: Some(thread),
    }
}

/// Server and proxy in-process, each with its own temp dir.
pub struct System {
    pub server_dir: tempfile::TempDir,
    pub proxy_dir: tempfile::TempDir,
    pub server: InProcess,
    pub proxy: InProcess,
}

pub fn start_system() -> System {
    let server_dir = tempfile::tempdir().unwrap();
    let proxy_dir = tempfile::tempdir().unwrap();
    let server = start_server(server_dir.path());
    let proxy = start_proxy(server.addr, proxy_dir.path());
    System {
        server_dir,
        proxy_dir,
        server,
        proxy,
    }
}

/// The `stopover` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stopover"))
}

/// A role running as a real process; killed (by PID) when dropped.
pub struct Spawned {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self.log_lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}; log:\n{}",
                self.log_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10)); // polling a condition, not synchronising
        }
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- What /proc says about a process (through procfs, as the bench does) ----

fn process(pid: u32) -> procfs::process::Process {
    procfs::process::Process::new(pid as i32).expect("process in /proc")
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = process(pid).status().expect("read /proc status");
    status.vmrss.expect("VmRSS in /proc status")
}

/// Peak resident set size in KiB (VmHWM): the most a process has held.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = process(pid).status().expect("read /proc status");
    status.vmhwm.expect("VmHWM in /proc status")
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = process(pid).stat().expect("read /proc stat");
    (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64
}

/// Descriptors a process has open (0 once it is gone).
pub fn open_fds(pid: u32) -> usize {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.fd_count())
        .unwrap_or(0)
}

/// Sockets and regular files a process holds: what its connections cost.
/// (Not every descriptor: a process may inherit pipes or /dev/null from
/// whatever started it, and those are not ours to count.)
pub fn conn_fds(pid: u32) -> usize {
    use procfs::process::FDTarget;
    let Ok(fds) = procfs::process::Process::new(pid as i32).and_then(|p| p.fd()) else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| match &fd.target {
            FDTarget::Socket(_) => true,
            FDTarget::Path(path) => !path.starts_with("/dev/"),
            _ => false,
        })
        .count()
}

/// The command for a server process on a free port, storing into `dir`;
/// `extra` flags are appended (a `--listen` among them replaces the
/// default). Start it with [`spawn_with`], after [`limit_child`] if needed.
pub fn server_command(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["server", "--dir", dir.to_str().unwrap()]);
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(extra);
    cmd
}

/// The command for a proxy process on a free port in front of `upstream`,
/// spooling into `dir`.
pub fn proxy_command(upstream: SocketAddr, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["proxy", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream.to_string()])
        .args(["--dir", dir.to_str().unwrap()])
        .args(extra);
    cmd
}

/// A server process on a free port, storing into `dir` (see [`server_command`]).
pub fn spawn_server(dir: &Path, extra: &[&str]) -> Spawned {
    spawn_with(&mut server_command(dir, extra))
}

/// A proxy process on a free port in front of `upstream`, spooling into `dir`.
pub fn spawn_proxy(upstream: SocketAddr, dir: &Path, extra: &[&str]) -> Spawned {
    spawn_with(&mut proxy_command(upstream, dir, extra))
}

/// Makes the child started by `cmd` run with resource `resource` limited
/// to `value` (soft and hard), and with SIGXFSZ ignored, so that passing
/// RLIMIT_FSIZE makes a write fail with EFBIG instead of killing the
/// process: how the tests produce real disk-write and descriptor failures.
pub fn limit_child(cmd: &mut Command, resource: libc::__rlimit_resource_t, value: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
}

/// Starts `stopover <args>` and waits for its `listening on <addr>` line.
pub fn spawn(args: &[&str]) -> Spawned {
    spawn_with(Command::new(bin()).args(args))
}

pub fn spawn_with(cmd: &mut Command) -> Spawned {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stopover");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.find("listening on ") {
                let addr = line[at + "listening on ".len()..].trim().to_string();
                let _ = tx.send(addr);
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = match rx.recv_timeout(PATIENCE) {
        Ok(a) => a.parse().expect("listening address parses"),
        Err(_) => {
            let _ = child.kill();
            panic!("no 'listening on' line; stderr: {:?}", log.lock().unwrap());
        }
    };
    Spawned { child, addr, log }
}

/// Runs `stopover load --json --no-progress ARGS` and returns its output
/// and the JSON it printed.
pub fn run_load(args: &[&str]) -> (Output, serde_json::Value) {
    let out = Command::new(bin())
        .args(["load", "--json", "--no-progress"])
        .args(args)
        .output()
        .expect("run stopover load");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "load prints JSON ({e}): {}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, json)
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failing test can
/// be rerun with the same data.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Uploads `data` to `to` with the library client.
pub fn send(to: SocketAddr, data: &[u8]) -> Result<Receipt, client::ClientError> {
    client::upload(
        &to.to_string(),
        &mut &data[..],
        "test data",
        PATIENCE,
        &mut |_| {},
    )
}

/// Waits until `cond` holds, polling; panics with `what` after [`PATIENCE`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10)); // polling a condition, not synchronising
    }
}

/// Names of the files in `dir`, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Final-named files (no `.part` / `.incomplete` suffix) in `dir`.
pub fn final_files(dir: &Path) -> Vec<String> {
    file_names(dir)
        .into_iter()
        .filter(|n| !n.ends_with(".part") && !n.ends_with(".incomplete"))
        .collect()
}

/// A port on which nothing listens (bound, then released).
pub fn dead_port() -> SocketAddr {
    let l = TcpListener::bind(loopback0()).unwrap();
    l.local_addr().unwrap()
}

/// Reads a stream to EOF and returns the bytes (for fake peers).
pub fn read_all(sock: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    sock.read_to_end(&mut data)?;
    Ok(data)
}

/// The answer a correct server would give for `data`.
pub fn ok_line(data: &[u8], file: &str) -> String {
    format!(
        "OK bytes={} crc32c={:08x} file={file}\n",
        data.len(),
        crc32c::crc32c(data)
    )
}

/// Writes all of `line` and half-closes (for fake peers).
pub fn answer_and_close(sock: &mut TcpStream, line: &str) {
    let _ = sock.write_all(line.as_bytes());
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// Bytes of `path` that are in the page cache now (see
/// `stopover::sys::page_cache_bytes`).
pub fn cached_bytes(path: &Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    stopover::sys::page_cache_bytes(&file).unwrap()
}

// ---- Metrics: what a daemon's `GET /metrics` says ----

/// The stats address a daemon logged (`metrics at http://ADDR/metrics`).
pub fn stats_addr(daemon: &Spawned) -> SocketAddr {
    let line = daemon.wait_for_log("metrics at http://");
    let rest = &line[line.find("http://").unwrap() + "http://".len()..];
    rest.trim_end_matches("/metrics")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// One scrape: the body of `GET /metrics`.
pub fn scrape(addr: SocketAddr) -> String {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: stopover\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    sock.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    response.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the sample named exactly `name` (labels included).
pub fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{body}"))
        .parse()
        .unwrap()
}

/// A thread-per-connection echo server: every byte back, then its FIN
/// after the client's (the upstream of the toxics tests).
pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(loopback0()).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = sock.set_nodelay(true);
                let mut out = sock.try_clone().unwrap();
                let mut sock = sock;
                let _ = std::io::copy(&mut sock, &mut out);
                let _ = out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Closes `sock` with a reset (`SO_LINGER` 0), as a crashed client would.
pub fn reset(sock: TcpStream) {
    socket2::SockRef::from(&sock)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(sock);
}

/// Sends `rest`, half-closes, and reads the answer to the end (or says
/// why the write failed).
pub fn finish_and_read(sock: &mut TcpStream, rest: &[u8]) -> String {
    if let Err(e) = std::io::Write::write_all(sock, rest) {
        return format!("write failed: {e}");
    }
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(sock, &mut answer).unwrap();
    answer
}
