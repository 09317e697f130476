//! `make bench`: direct (client -> server) against proxied (client -> proxy
//! -> server) throughput, latency, memory and CPU, on loopback.
//!
//! The server and the proxy run as separate processes (the release build of
//! `stopover`), writing every byte to temp dirs on disk under
//! `target/bench/`. The load comes from `stopover load --json`, the same
//! tool users run. For each scenario, direct and proxied runs are
//! *interleaved* (never all of one first) after a warm-up pass, and the
//! table reports medians. Peak RSS per run is `VmHWM`, reset before each
//! run by writing `5` to `/proc/<pid>/clear_refs`; CPU is `utime + stime`
//! from `/proc/<pid>/stat` for the daemons and `getrusage(RUSAGE_CHILDREN)`
//! for the load generator.
//!
//! **Ratios are paired.** This machine's speed drifts by tens of percent
//! from one minute to the next (a VM sharing its host), so a ratio of two
//! medians can compare a fast minute with a slow one. Each repetition runs
//! direct and proxied back to back, and the ratio reported is the median of
//! the per-repetition ratios: both halves of a pair saw the same machine.
//!
//! **CPU bound.** For bulk, the bench also prints the CPU each process
//! spent per GiB and what that alone allows: with `n` cores, a run can take
//! no less than `max(busiest process, total CPU / n)`. Comparing that for
//! direct and proxied gives the best ratio the CPU budget permits, which
//! tells whether a gap is the relay's cost per byte or something else.
//!
//! **A reference relay.** If `haproxy` is installed, bulk and small also run
//! through it (one thread, `splice` both ways, plain TCP mode): a
//! well-known relay that stores nothing, measured on the same machine in
//! the same minute. Its rows are labelled `haproxy`; its memory and CPU
//! fill the relay columns. Without it the bench runs as before.
//!
//! Two traps of this machine are avoided on purpose. Files are never
//! deleted between runs (after deleting thousands of files, creating new
//! ones nearby is 10-35x slower for minutes: see
//! [`wait_for_fast_file_creation`], which also holds a run back until that
//! has passed); large ones are truncated instead to free the disk. And
//! every scenario is warmed up first, because memory the host took back is
//! several times slower on first touch.
//!
//! Sizes: the full run (default), `BENCH_QUICK=1` (under a minute) and
//! `BENCH_SMOKE=1` (seconds; `make test` runs it so the bench never rots).
//! Outputs: the table on stdout, `target/bench/results.json` and
//! `target/bench/report.svg` (smoke runs write under `target/bench/smoke/`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Preset {
    Full,
    Quick,
    Smoke,
}

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    what: String,
    clients: usize,
    transfers: u64,
    size: u64,
    all_at_once: bool,
    reps: usize,
}

fn scenarios(preset: Preset) -> Vec<Scenario> {
    let s = |name, clients: usize, transfers: u64, size: u64, all_at_once, reps| Scenario {
        name,
        what: if all_at_once {
            format!("{clients} clients x {} at once", human(size))
        } else {
            format!("{clients} clients, {transfers} x {}", human(size))
        },
        clients,
        transfers,
        size,
        all_at_once,
        reps,
    };
    const K: u64 = 1024;
    match preset {
        Preset::Full => vec![
            s("bulk", 1, 1, K * K * K, false, 7),
            s("small", 64, 20_000, K, false, 3),
            s("medium", 32, 2_000, K * K, false, 3),
            s("concurrency", 5_000, 5_000, 64 * K, true, 3),
        ],
        Preset::Quick => vec![
            s("bulk", 1, 1, 256 * K * K, false, 3),
            s("small", 64, 4_000, K, false, 3),
            s("medium", 32, 300, K * K, false, 3),
            s("concurrency", 2_000, 2_000, 64 * K, true, 1),
        ],
        Preset::Smoke => vec![
            s("bulk", 1, 1, 16 * K * K, false, 1),
            s("small", 8, 200, K, false, 1),
            s("medium", 4, 20, K * K, false, 1),
            s("concurrency", 100, 100, 64 * K, true, 1),
        ],
    }
}

/// Warm-up version of a scenario: same shape, a fraction of the work.
fn warm_up(s: &Scenario) -> Scenario {
    let mut w = s.clone();
    if s.all_at_once {
        w.clients = (s.clients / 4).max(1);
        w.transfers = w.clients as u64;
    } else if s.transfers == 1 {
        w.size = (s.size / 4).max(1);
    } else {
        w.transfers = (s.transfers / 5).max(1);
    }
    w
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// A daemon under test, killed by PID when dropped.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(bin: &Path, args: &[&str], log: &Path) -> Daemon {
        let log_file = fs::File::create(log).expect("create daemon log");
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start daemon");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if let Some(at) = text.find("listening on ") {
                let rest = &text[at + "listening on ".len()..];
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                return Daemon { child, addr };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("daemon {args:?} exited with {status}: {text}");
            }
            assert!(
                Instant::now() < deadline,
                "daemon {args:?} did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(20)); // polling its log
        }
    }

    /// Starts HAProxy (if it is installed) as a plain TCP relay to
    /// `server`, with the settings that make it fastest at bulk here: one
    /// thread like stopover, and `splice` both ways. `None`, with the
    /// reason printed, if it is not installed or will not start.
    fn start_haproxy(server: &str, work: &Path) -> Option<Daemon> {
        let installed = Command::new("haproxy")
            .arg("-v")
            .stdout(Stdio::piped())
            .output()
            .ok()
            .filter(|o| o.status.success());
        let Some(version) = installed else {
            println!("reference: haproxy is not installed, so no reference rows (`apt install haproxy` adds them)");
            return None;
        };
        let version = String::from_utf8_lossy(&version.stdout);
        println!("reference: {}", version.lines().next().unwrap_or("haproxy"));
        // A port the kernel just handed out is free, and nothing else here
        // takes ports: good enough for a bench.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = work.join("haproxy.cfg");
        let text = format!(
            "global
    maxconn 4096
    nbthread 1
defaults
    mode tcp
    option splice-request
    option splice-response
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend bench
    bind {addr}
    default_backend stopover
backend stopover
    server s1 {server}
"
        );
        fs::write(&config, text).ok()?;
        let log = work.join("haproxy.log");
        let mut child = Command::new("haproxy")
            .arg("-f")
            .arg(&config)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).ok()?)
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                println!(
                    "reference: haproxy did not start, so no reference rows: {}",
                    fs::read_to_string(&log).unwrap_or_default().trim()
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(20)); // waiting for its listener
        }
        Some(Daemon { child, addr })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resets the peak-RSS counter (VmHWM) to the current RSS.
    fn reset_peak(&self) {
        let _ = fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    fn cpu_s(&self) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the ")" that ends the command name; utime and stime
        // are fields 14 and 15 of the whole line.
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (ticks(11) + ticks(12)) / hz
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One measured run.
#[derive(Clone, Debug)]
struct Run {
    load: Value,
    proxy_rss_kib: Option<u64>,
    proxy_cpu_s: Option<f64>,
    server_rss_kib: u64,
    server_cpu_s: f64,
    server_peak_conns: usize,
    proxy_peak_conns: Option<usize>,
    /// CPU seconds of the load generator itself.
    load_cpu_s: f64,
}

impl Run {
    fn f(&self, key: &str) -> f64 {
        self.load[key].as_f64().unwrap_or(0.0)
    }
    fn latency(&self, key: &str) -> f64 {
        self.load["latency_ms"][key].as_f64().unwrap_or(0.0)
    }
    fn failed(&self) -> u64 {
        self.load["transfers_failed"].as_u64().unwrap_or(u64::MAX)
    }
}

/// The way a run's transfers take to the server.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    /// Client -> server.
    Direct,
    /// Client -> stopover proxy -> server.
    Proxy,
    /// Client -> HAProxy -> server: a reference relay that stores nothing.
    Haproxy,
}

struct Bench {
    bin: PathBuf,
    work: PathBuf,
    server: Daemon,
    proxy: Daemon,
    /// HAProxy, if it is installed (the reference row).
    haproxy: Option<Daemon>,
}

impl Bench {
    fn relay(&self, via: Via) -> Option<&Daemon> {
        match via {
            Via::Direct => None,
            Via::Proxy => Some(&self.proxy),
            Via::Haproxy => self.haproxy.as_ref(),
        }
    }

    fn run(&self, s: &Scenario, via: Via) -> Run {
        let relay = self.relay(via);
        let to = relay.map_or(&self.server.addr, |r| &r.addr);
        self.server.reset_peak();
        if let Some(r) = relay {
            r.reset_peak();
        }
        let (s_cpu, p_cpu) = (self.server.cpu_s(), relay.map_or(0.0, Daemon::cpu_s));
        let proxied = via == Via::Proxy;
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "-q",
            "load",
            "--json",
            "--no-progress",
            "--timeout",
            "120s",
            "--to",
            to,
        ])
        .args([
            "--clients",
            &s.clients.to_string(),
            "--size",
            &s.size.to_string(),
        ]);
        if s.all_at_once {
            cmd.args(["--all-at-once", "--hold-open", "1s"]);
        } else {
            cmd.args(["--transfers", &s.transfers.to_string()]);
        }
        // Sample the receiving daemons' open descriptors while the load runs,
        // to report the concurrency they really reached.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            let pids = (self.server.pid(), self.proxy.pid());
            std::thread::spawn(move || {
                let mut peak = (0usize, 0usize);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak.0 = peak.0.max(open_fds(pids.0));
                    peak.1 = peak.1.max(open_fds(pids.1));
                    std::thread::sleep(Duration::from_millis(10)); // sampling interval
                }
                peak
            })
        };
        let (s_fds0, p_fds0) = (open_fds(self.server.pid()), open_fds(self.proxy.pid()));
        let load_cpu0 = children_cpu_s();
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .expect("run stopover load");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (s_fds, p_fds) = sampler.join().unwrap_or((0, 0));
        let load: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "load output is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let run = Run {
            load,
            proxy_rss_kib: relay.map(Daemon::peak_rss_kib),
            proxy_cpu_s: relay.map(|r| r.cpu_s() - p_cpu),
            server_rss_kib: self.server.peak_rss_kib(),
            server_cpu_s: self.server.cpu_s() - s_cpu,
            // Two descriptors per server connection, three per proxy transfer.
            server_peak_conns: s_fds.saturating_sub(s_fds0) / 2,
            proxy_peak_conns: proxied.then_some(p_fds.saturating_sub(p_fds0) / 3),
            load_cpu_s: children_cpu_s() - load_cpu0,
        };
        self.free_disk();
        run
    }

    /// Truncates large stored files (never deletes: see the module docs).
    fn free_disk(&self) {
        for dir in ["received", "spool"] {
            let Ok(entries) = fs::read_dir(self.work.join(dir)) else {
                continue;
            };
            for e in entries.flatten() {
                if e.metadata()
                    .is_ok_and(|m| m.is_file() && m.len() > 256 * 1024)
                {
                    if let Ok(f) = fs::OpenOptions::new().write(true).open(e.path()) {
                        let _ = f.set_len(0);
                    }
                }
            }
        }
    }
}

/// Creating files is normally ~25 us each here; this is "slow".
const SLOW_CREATE_US: f64 = 80.0;
/// How long to wait for file creation to recover before measuring anyway.
const CREATE_WAIT_LIMIT: Duration = Duration::from_secs(8 * 60);

/// Microseconds to create one file (and write 1 KiB to it) in a new
/// directory under `dir`, from a sample of 300. The files stay: deleting
/// them would cause the very slowness this measures.
fn create_cost_us(dir: &Path) -> f64 {
    let sample = (0..10_000)
        .map(|i| dir.join(format!("sample-{i}")))
        .find(|p| fs::create_dir(p).is_ok())
        .expect("create a probe directory");
    let t = Instant::now();
    for i in 0..300 {
        let _ = fs::write(sample.join(format!("f{i}")), [0u8; 1024]);
    }
    t.elapsed().as_secs_f64() * 1e6 / 300.0
}

/// Waits (bounded) until creating files in `work` runs at its usual speed,
/// and returns how long it waited.
///
/// Without a journal, ext4 will not reuse an inode freed in the last 60 s
/// (up to 6 minutes while its inode table block is still dirty), and checks
/// that for every candidate it passes over. After a run that deleted
/// thousands of files nearby (the last bench's, for one), every `create`
/// walks past thousands of them: 10-20x slower, which once made the small
/// scenario measure 2,000 transfers/s instead of 11,000. The bench's own
/// directory sits next to the last run's, so it probes there.
fn wait_for_fast_file_creation(work: &Path) -> Duration {
    let probes = work.join("create-probe");
    let _ = fs::create_dir_all(&probes);
    let since = Instant::now();
    loop {
        let cost = create_cost_us(&probes);
        if cost < SLOW_CREATE_US {
            println!("file creation: {cost:.0} us per file");
            return since.elapsed();
        }
        if since.elapsed() > CREATE_WAIT_LIMIT {
            println!("WARNING: file creation is still slow ({cost:.0} us per file); small and medium will read low");
            return since.elapsed();
        }
        println!(
            "file creation is slow right now ({cost:.0} us per file, usually ~25): files were deleted nearby recently, waiting for ext4 to let go of them ({:.0} s so far)",
            since.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(20)); // the condition ages out in minutes
    }
}

/// CPU seconds (user + system) of this process's children that have ended
/// and been waited for. The daemons run until the end, so between two calls
/// around a run this is the load generator's CPU.
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct we pass; all-zero is a valid rusage.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// The shortest a run can take on `cores` cores, from the CPU each of its
/// processes needs: no process can go faster than one core, and all of
/// them together no faster than all cores.
fn cpu_bound_s(per_process: &[f64], cores: f64) -> f64 {
    let busiest = per_process.iter().copied().fold(0.0, f64::max);
    busiest.max(per_process.iter().sum::<f64>() / cores)
}

/// The median over repetitions of `other[i] / direct[i]` for `key`:
/// repetition i ran both back to back (see the module docs).
fn paired_ratio(direct: &[Run], other: &[Run], key: &str) -> f64 {
    median(
        direct
            .iter()
            .zip(other)
            .filter(|(d, _)| d.f(key) > 0.0)
            .map(|(d, o)| o.f(key) / d.f(key))
            .collect(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn machine() -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = proc_meminfo_kib("MemTotal:");
    json!({ "cpu": cpu, "cores": cores, "kernel": kernel, "mem_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0 })
}

fn proc_meminfo_kib(key: &str) -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes --bench. Anything else (`cargo test --benches`,
    // `cargo test --all-targets`) runs this binary as a test: do nothing,
    // rather than a full benchmark against a debug build.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "bench: run me with `make bench` (or `cargo bench`); nothing to do under cargo test"
        );
        return;
    }
    let preset = if std::env::var_os("BENCH_SMOKE").is_some() {
        Preset::Smoke
    } else if std::env::var_os("BENCH_QUICK").is_some() {
        Preset::Quick
    } else {
        Preset::Full
    };
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_stopover"));
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let out_dir = if preset == Preset::Smoke {
        target.join("smoke")
    } else {
        target.clone()
    };
    let work = target.join(format!("work-{}", std::process::id()));
    fs::create_dir_all(&out_dir).expect("create target/bench");
    fs::create_dir_all(&work).expect("create bench work dir");
    let started = Instant::now();
    let m = machine();
    println!(
        "stopover bench ({preset:?}) on {} cores, {}, kernel {}",
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?")
    );
    println!("binary {}", bin.display());
    let waited = if preset == Preset::Smoke {
        Duration::ZERO
    } else {
        wait_for_fast_file_creation(&work)
    };

    let server = Daemon::start(
        &bin,
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            work.join("received").to_str().unwrap(),
        ],
        &work.join("server.log"),
    );
    let proxy = Daemon::start(
        &bin,
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &server.addr,
            "--dir",
            work.join("spool").to_str().unwrap(),
        ],
        &work.join("proxy.log"),
    );
    let haproxy = if preset == Preset::Smoke {
        None
    } else {
        Daemon::start_haproxy(&server.addr, &work)
    };
    let bench = Bench {
        bin,
        work: work.clone(),
        server,
        proxy,
        haproxy,
    };
    let scenarios = scenarios(preset);
    // The paths each scenario is run over. HAProxy, when installed, is the
    // reference for the two scenarios the targets compare with it.
    let paths = |s: &Scenario| {
        let mut v = vec![("direct", Via::Direct), ("proxied", Via::Proxy)];
        if bench.haproxy.is_some() && matches!(s.name, "bulk" | "small") {
            v.push(("haproxy", Via::Haproxy));
        }
        v
    };

    // Warm up every scenario on every path before measuring anything.
    if preset != Preset::Smoke {
        for s in &scenarios {
            let w = warm_up(s);
            for (_, via) in paths(s) {
                bench.run(&w, via);
            }
        }
    }

    let mut results: BTreeMap<&str, BTreeMap<&str, Vec<Run>>> = BTreeMap::new();
    for s in &scenarios {
        let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
        for rep in 0..s.reps {
            // Interleave, alternating which of direct and proxied goes
            // first; the reference relay, if any, runs last.
            let mut order = paths(s);
            if rep % 2 == 1 {
                order.swap(0, 1);
            }
            for (name, via) in order {
                runs.entry(name).or_default().push(bench.run(s, via));
            }
        }
        results.insert(s.name, runs);
    }
    drop(bench);

    // ---- The table ----
    let mut rows = Vec::new();
    let mut errors = 0u64;
    println!();
    println!(
        "{:<12} {:<9} {:>9} {:>11} {:>9} {:>9} {:>10} {:>9} {:>10} {:>9} {:>7} {:>6}",
        "scenario",
        "path",
        "MB/s",
        "transfers/s",
        "p50 ms",
        "p99 ms",
        "relay MiB",
        "relay s",
        "server MiB",
        "server s",
        "load s",
        "errors"
    );
    for s in &scenarios {
        let runs = &results[s.name];
        let mut summary = serde_json::Map::new();
        for path in ["direct", "proxied", "haproxy"] {
            let Some(runs) = runs.get(path) else {
                continue;
            };
            let med = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
            let errs: u64 = runs.iter().map(Run::failed).sum();
            errors += errs;
            let row = json!({
                "mb_per_s": med(&|r| r.f("mb_per_s")),
                "transfers_per_s": med(&|r| r.f("transfers_per_s")),
                "p50_ms": med(&|r| r.latency("p50")),
                "p99_ms": med(&|r| r.latency("p99")),
                "proxy_peak_rss_mib": runs.iter().filter_map(|r| r.proxy_rss_kib).max().map(|k| k as f64 / 1024.0),
                "proxy_cpu_s": runs.iter().any(|r| r.proxy_cpu_s.is_some()).then(|| med(&|r| r.proxy_cpu_s.unwrap_or(0.0))),
                "server_peak_rss_mib": runs.iter().map(|r| r.server_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
                "server_cpu_s": med(&|r| r.server_cpu_s),
                "load_cpu_s": med(&|r| r.load_cpu_s),
                "server_peak_conns": runs.iter().map(|r| r.server_peak_conns).max(),
                "proxy_peak_conns": runs.iter().filter_map(|r| r.proxy_peak_conns).max(),
                "errors": errs,
                "runs": runs.len(),
            });
            let opt = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
            println!(
                "{:<12} {:<9} {:>9.1} {:>11.0} {:>9.2} {:>9.2} {:>10} {:>9} {:>10.1} {:>9.2} {:>7.2} {:>6}",
                s.name,
                path,
                row["mb_per_s"].as_f64().unwrap_or(0.0),
                row["transfers_per_s"].as_f64().unwrap_or(0.0),
                row["p50_ms"].as_f64().unwrap_or(0.0),
                row["p99_ms"].as_f64().unwrap_or(0.0),
                opt(&row["proxy_peak_rss_mib"]),
                row["proxy_cpu_s"]
                    .as_f64()
                    .map_or("-".to_string(), |x| format!("{x:.2}")),
                row["server_peak_rss_mib"].as_f64().unwrap_or(0.0),
                row["server_cpu_s"].as_f64().unwrap_or(0.0),
                row["load_cpu_s"].as_f64().unwrap_or(0.0),
                errs
            );
            summary.insert(path.to_string(), row);
        }
        let direct = &runs["direct"];
        let (r_mb, r_tps) = (
            paired_ratio(direct, &runs["proxied"], "mb_per_s"),
            paired_ratio(direct, &runs["proxied"], "transfers_per_s"),
        );
        println!("{:<12} {:<9} {:>8.2}x {:>10.2}x", "", "ratio", r_mb, r_tps);
        let mut row = json!({
            "scenario": s.name,
            "what": s.what,
            "direct": summary["direct"],
            "proxied": summary["proxied"],
            "ratio_mb_per_s": r_mb,
            "ratio_transfers_per_s": r_tps,
            "ratios_per_repetition": direct
                .iter()
                .zip(&runs["proxied"])
                .map(|(d, p)| p.f("mb_per_s") / d.f("mb_per_s").max(f64::MIN_POSITIVE))
                .collect::<Vec<_>>(),
            "raw": runs
                .iter()
                .map(|(path, runs)| (path.to_string(), json!(runs.iter().map(|r| r.load.clone()).collect::<Vec<_>>())))
                .collect::<serde_json::Map<_, _>>(),
        });
        if let Some(reference) = runs.get("haproxy") {
            let (h_mb, h_tps) = (
                paired_ratio(direct, reference, "mb_per_s"),
                paired_ratio(direct, reference, "transfers_per_s"),
            );
            println!(
                "{:<12} {:<9} {:>8.2}x {:>10.2}x",
                "", "haproxy/d", h_mb, h_tps
            );
            row["haproxy"] = summary["haproxy"].clone();
            row["haproxy_ratio_mb_per_s"] = json!(h_mb);
            row["haproxy_ratio_transfers_per_s"] = json!(h_tps);
        }
        rows.push(row);
    }

    // ---- Targets (reported, not enforced: speed is not a test) ----
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["scenario"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let conc = row("concurrency");
    let conc_clients = scenarios
        .iter()
        .find(|s| s.name == "concurrency")
        .map_or(1, |s| s.clients) as f64;
    let proxy_mib = conc["proxied"]["proxy_peak_rss_mib"]
        .as_f64()
        .unwrap_or(f64::MAX);
    let targets = vec![
        (
            "bulk: proxied MB/s >= 0.5x direct",
            row("bulk")["ratio_mb_per_s"].as_f64().unwrap_or(0.0) >= 0.5,
        ),
        (
            "small: proxied transfers/s >= 0.5x direct",
            row("small")["ratio_transfers_per_s"]
                .as_f64()
                .unwrap_or(0.0)
                >= 0.5,
        ),
        (
            "concurrency: proxy peak RSS <= 16 KiB per transfer",
            proxy_mib * 1024.0 / conc_clients <= 16.0,
        ),
        ("no scenario shows errors", errors == 0),
    ];
    println!();
    if let Some(bulk) = scenarios.iter().find(|s| s.name == "bulk") {
        let b = row("bulk");
        let gib = bulk.size as f64 / (1u64 << 30) as f64;
        let per_gib = |path: &str, key: &str| b[path][key].as_f64().unwrap_or(0.0) / gib;
        let (dl, ds) = (
            per_gib("direct", "load_cpu_s"),
            per_gib("direct", "server_cpu_s"),
        );
        let (pl, pp, ps) = (
            per_gib("proxied", "load_cpu_s"),
            per_gib("proxied", "proxy_cpu_s"),
            per_gib("proxied", "server_cpu_s"),
        );
        let cores = m["cores"].as_f64().unwrap_or(1.0).max(1.0);
        let ceiling = cpu_bound_s(&[dl, ds], cores) / cpu_bound_s(&[pl, pp, ps], cores);
        println!(
            "bulk CPU per GiB: direct load {dl:.2} + server {ds:.2} = {:.2} s; proxied load {pl:.2} + proxy {pp:.2} + server {ps:.2} = {:.2} s",
            dl + ds,
            pl + pp + ps
        );
        println!(
            "on {cores} cores that CPU alone allows a bulk ratio of at most {ceiling:.2}x (measured {:.2}x)",
            b["ratio_mb_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "proxy peak RSS in the concurrency scenario: {proxy_mib:.1} MiB = {:.1} KiB per concurrent transfer",
        proxy_mib * 1024.0 / conc_clients
    );
    println!(
        "concurrency reached (from open descriptors): proxy {} transfers, server {} connections (proxied run), server {} (direct run)",
        conc["proxied"]["proxy_peak_conns"],
        conc["proxied"]["server_peak_conns"],
        conc["direct"]["server_peak_conns"]
    );
    if preset != Preset::Full {
        println!("({preset:?} run: the targets are set for the full run; at these sizes they are only indicative)");
    }
    for (what, met) in &targets {
        println!("target {}: {what}", if *met { "met   " } else { "MISSED" });
    }
    let wall = started.elapsed().as_secs_f64();
    let waited_note = if waited.as_secs() > 0 {
        format!(
            " (of which {:.0} s waiting for file creation)",
            waited.as_secs_f64()
        )
    } else {
        String::new()
    };
    println!(
        "bench wall time {wall:.0} s{waited_note}; reproduce with: {}",
        match preset {
            Preset::Full => "make bench",
            Preset::Quick => "BENCH_QUICK=1 make bench",
            Preset::Smoke => "BENCH_SMOKE=1 make bench",
        }
    );

    let results = json!({
        "preset": format!("{preset:?}"),
        "machine": m,
        "wall_s": wall,
        "waited_for_file_creation_s": waited.as_secs_f64(),
        "scenarios": rows,
        "targets": targets.iter().map(|(w, met)| json!({"target": w, "met": met})).collect::<Vec<_>>(),
    });
    let json_path = out_dir.join("results.json");
    fs::write(&json_path, serde_json::to_string_pretty(&results).unwrap())
        .expect("write results.json");
    let svg_path = out_dir.join("report.svg");
    fs::write(&svg_path, svg_report(&rows, &m, preset)).expect("write report.svg");
    println!("wrote {} and {}", json_path.display(), svg_path.display());

    // Deleting is safe now: nothing in this run creates files after it. The
    // next run would pay for it (see wait_for_fast_file_creation), so say so.
    let _ = fs::remove_dir_all(&work);
    if preset != Preset::Smoke {
        println!("note: this run deleted its files; a bench started in the next few minutes waits until file creation is fast again");
    }
    if errors > 0 {
        eprintln!("bench: {errors} transfers failed");
        std::process::exit(1);
    }
}

/// A self-contained SVG: for each scenario, throughput and latency bars,
/// direct against proxied, each panel on its own scale.
fn svg_report(rows: &[Value], machine: &Value, preset: Preset) -> String {
    const W: f64 = 220.0;
    const H: f64 = 205.0;
    let (cols, panel_rows) = (rows.len().max(1) as f64, 2.0);
    let width = 40.0 + cols * W;
    let height = 80.0 + panel_rows * H;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"20\" y=\"24\" font-size=\"16\">stopover bench ({preset:?}): direct vs proxied</text>\n\
         <text x=\"20\" y=\"42\" fill=\"#555\">{} cores, {}, kernel {}</text>\n\
         <rect x=\"{}\" y=\"14\" width=\"10\" height=\"10\" fill=\"#4c78a8\"/><text x=\"{}\" y=\"23\">direct</text>\n\
         <rect x=\"{}\" y=\"14\" width=\"10\" height=\"10\" fill=\"#f58518\"/><text x=\"{}\" y=\"23\">proxied</text>\n",
        machine["cores"],
        xml_escape(machine["cpu"].as_str().unwrap_or("?")),
        xml_escape(machine["kernel"].as_str().unwrap_or("?")),
        width - 150.0,
        width - 136.0,
        width - 80.0,
        width - 66.0,
    );
    for (i, row) in rows.iter().enumerate() {
        let x0 = 30.0 + i as f64 * W;
        let name = row["scenario"].as_str().unwrap_or("?");
        let what = row["what"].as_str().unwrap_or("");
        // Throughput: MB/s for bulk and medium, transfers/s where small
        // payloads make MB/s meaningless.
        let (key, unit) = if name == "small" || name == "concurrency" {
            ("transfers_per_s", "transfers/s")
        } else {
            ("mb_per_s", "MB/s")
        };
        let d = row["direct"][key].as_f64().unwrap_or(0.0);
        let p = row["proxied"][key].as_f64().unwrap_or(0.0);
        svg += &bar_panel(
            x0,
            60.0,
            &format!("{name}: {unit}"),
            what,
            &[("", d, p)],
            |v| format!("{v:.0}"),
        );
        let lat = [
            (
                "p50",
                row["direct"]["p50_ms"].as_f64().unwrap_or(0.0),
                row["proxied"]["p50_ms"].as_f64().unwrap_or(0.0),
            ),
            (
                "p99",
                row["direct"]["p99_ms"].as_f64().unwrap_or(0.0),
                row["proxied"]["p99_ms"].as_f64().unwrap_or(0.0),
            ),
        ];
        svg += &bar_panel(
            x0,
            60.0 + H,
            &format!("{name}: latency ms"),
            "",
            &lat,
            |v| format!("{v:.1}"),
        );
    }
    svg += "</svg>\n";
    svg
}

/// One panel: groups of (label, direct, proxied) bars on a shared scale.
fn bar_panel(
    x0: f64,
    y0: f64,
    title: &str,
    subtitle: &str,
    groups: &[(&str, f64, f64)],
    fmt: impl Fn(f64) -> String,
) -> String {
    let plot_h = 120.0;
    let base = y0 + 44.0 + plot_h;
    let max = groups
        .iter()
        .flat_map(|g| [g.1, g.2])
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let mut s = format!(
        "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">{}</text>\n<text x=\"{x0}\" y=\"{}\" fill=\"#555\">{}</text>\n\
         <line x1=\"{x0}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#999\"/>\n",
        y0 + 4.0,
        xml_escape(title),
        y0 + 18.0,
        xml_escape(subtitle),
        x0 + 190.0
    );
    let group_w = 180.0 / groups.len() as f64;
    for (gi, (label, d, p)) in groups.iter().enumerate() {
        let gx = x0 + 10.0 + gi as f64 * group_w;
        let bw = (group_w - 20.0) / 2.0;
        for (j, (v, color)) in [(*d, "#4c78a8"), (*p, "#f58518")].into_iter().enumerate() {
            let h = v / max * plot_h;
            let x = gx + j as f64 * bw;
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                base - h,
                bw - 4.0,
                x + (bw - 4.0) / 2.0,
                base - h - 3.0,
                fmt(v)
            );
        }
        if !label.is_empty() {
            s += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n",
                gx + bw,
                base + 14.0
            );
        }
    }
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
