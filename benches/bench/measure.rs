//! Measuring one run, and the arithmetic that makes runs comparable: paired
//! ratios, the CPU bound, and the wait for file creation to be fast.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use stopover::load::Summary;

use crate::daemons::{Daemon, Reference};
use crate::scenarios::Scenario;

/// One measured run.
#[derive(Clone, Debug)]
pub struct Run {
    /// What `stopover load --json` reported.
    pub load: Summary,
    pub proxy_rss_kib: Option<u64>,
    pub proxy_cpu_s: Option<f64>,
    pub server_rss_kib: u64,
    pub server_cpu_s: f64,
    pub server_peak_conns: usize,
    pub proxy_peak_conns: Option<usize>,
    /// CPU seconds of the load generator itself.
    pub load_cpu_s: f64,
    /// How much the page cache (`Cached` in /proc/meminfo) grew during the
    /// run, in KiB: the receiver's files, and the relay's if it records.
    pub cache_growth_kib: i64,
    /// For stopover's proxy: how much its spool files' bytes in the page
    /// cache grew during the run, measured right after it (`mincore`, as
    /// `fincore` shows).
    pub spool_cached_bytes: Option<u64>,
}

impl Run {
    pub fn mb_per_s(&self) -> f64 {
        self.load.mb_per_s
    }
    pub fn transfers_per_s(&self) -> f64 {
        self.load.transfers_per_s
    }
    pub fn failed(&self) -> u64 {
        self.load.transfers_failed
    }
}

/// The way a run's transfers take to a receiver.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Via {
    /// Client -> our server.
    Direct,
    /// Client -> stopover proxy -> our server.
    Proxy,
    /// Client -> a reference relay (HAProxy, nginx, socat) -> our server.
    Reference(Reference),
    /// Client -> the threaded receiver (see `receiver`).
    DirectThreaded,
    /// Client -> stopover proxy -> the threaded receiver.
    ProxyThreaded,
}

impl Via {
    /// The path's name in the table and in results.json.
    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Proxy => "proxied",
            Via::Reference(r) => r.name(),
            Via::DirectThreaded => "direct-t",
            Via::ProxyThreaded => "proxied-t",
        }
    }
}

pub struct Bench {
    pub bin: PathBuf,
    pub work: PathBuf,
    pub server: Daemon,
    pub proxy: Daemon,
    /// The reference relays that are installed and started.
    pub references: Vec<(Reference, Daemon)>,
    /// The plain blocking receiver, and a proxy in front of it.
    pub threaded: Option<(Daemon, Daemon)>,
}

impl Bench {
    fn relay(&self, via: Via) -> Option<&Daemon> {
        match via {
            Via::Direct | Via::DirectThreaded => None,
            Via::Proxy => Some(&self.proxy),
            Via::Reference(r) => self
                .references
                .iter()
                .find(|(x, _)| *x == r)
                .map(|(_, d)| d),
            Via::ProxyThreaded => self.threaded.as_ref().map(|(_, p)| p),
        }
    }

    /// The relay's process id on `via`, if it has a relay.
    pub fn relay_pid(&self, via: Via) -> Option<u32> {
        self.relay(via).map(Daemon::pid)
    }

    fn receiver(&self, via: Via) -> &Daemon {
        match via {
            Via::DirectThreaded | Via::ProxyThreaded => {
                self.threaded.as_ref().map_or(&self.server, |(r, _)| r)
            }
            _ => &self.server,
        }
    }

    pub fn run(&self, s: &Scenario, via: Via) -> Run {
        self.run_sampled(s, via, true)
    }

    /// [`Bench::run`], with or without sampling the daemons' `/metrics`
    /// while it runs (a scrape is a connection to the daemon: a run whose
    /// system calls are counted must not make any).
    pub fn run_sampled(&self, s: &Scenario, via: Via, sample: bool) -> Run {
        let relay = self.relay(via);
        let receiver = self.receiver(via);
        let to = relay.map_or(&receiver.addr, |r| &r.addr);
        receiver.reset_peak();
        if let Some(r) = relay {
            r.reset_peak();
        }
        let (s_cpu, p_cpu) = (receiver.cpu_s(), relay.map_or(0.0, Daemon::cpu_s));
        let cached0 = page_cache_kib();
        let spool_dir = match via {
            Via::Proxy => Some(self.work.join("spool")),
            Via::ProxyThreaded => Some(self.work.join("spool-t")),
            _ => None,
        };
        let spool_cached0 = spool_dir.as_deref().map_or(0, cached_in);
        let proxied = matches!(via, Via::Proxy | Via::ProxyThreaded);
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
        // Sample the daemons' own open-connections gauge (GET /metrics)
        // while the load runs, to report the concurrency they really reached.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = std::thread::scope(|scope| {
            let sampler = scope.spawn(|| {
                let mut peak = (0usize, 0usize);
                while sample && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak.0 = peak.0.max(receiver.open_conns());
                    peak.1 = peak.1.max(relay.map_or(0, Daemon::open_conns));
                    std::thread::sleep(Duration::from_millis(10)); // sampling interval
                }
                peak
            });
            let load_cpu0 = children_cpu_s();
            let out = cmd
                .stderr(Stdio::inherit())
                .output()
                .expect("run stopover load");
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (sampler.join().unwrap_or((0, 0)), load_cpu0, out)
        });
        let ((server_peak, proxy_peak), load_cpu0, out) = sampler;
        let load: Summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "load output is not a summary ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let run = Run {
            load,
            proxy_rss_kib: relay.map(Daemon::peak_rss_kib),
            proxy_cpu_s: relay.map(|r| r.cpu_s() - p_cpu),
            server_rss_kib: receiver.peak_rss_kib(),
            server_cpu_s: receiver.cpu_s() - s_cpu,
            server_peak_conns: server_peak,
            proxy_peak_conns: proxied.then_some(proxy_peak),
            load_cpu_s: children_cpu_s() - load_cpu0,
            cache_growth_kib: page_cache_kib() - cached0,
            // What this run's files added (earlier small files stay cached).
            spool_cached_bytes: spool_dir
                .as_deref()
                .map(|d| cached_in(d).saturating_sub(spool_cached0)),
        };
        self.free_disk();
        run
    }

    /// Truncates large stored files (never deletes: see the module docs).
    fn free_disk(&self) {
        for dir in ["received", "spool", "threaded", "spool-t"] {
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

/// The file floor: what storing one 1 KiB upload costs in `dir` with the
/// discipline stopover keeps (create `NAME.part` with `O_EXCL`, write,
/// `renameat2(RENAME_NOREPLACE)` to `NAME`, close), in microseconds per
/// file over `n` files, and how many entries `dir` held. Measured by the
/// bench in the proxy's own spool directory, so a reader can see how much
/// of a relay's cost per transfer is the recording itself.
pub fn file_floor_us(dir: &Path, n: usize) -> Option<(f64, usize)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let entries = fs::read_dir(dir).ok()?.count();
    let data = [0x5au8; 1024];
    let tag = std::process::id();
    let started = Instant::now();
    for i in 0..n {
        let part = dir.join(format!("floor-{tag}-{i}.part"));
        let done = dir.join(format!("floor-{tag}-{i}"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part)
            .ok()?;
        f.write_all(&data).ok()?;
        stopover::sys::rename_noreplace(&part, &done).ok()?;
        drop(f);
    }
    Some((started.elapsed().as_secs_f64() * 1e6 / n as f64, entries))
}

/// `Cached` from /proc/meminfo, in KiB.
fn page_cache_kib() -> i64 {
    use procfs::Current;
    procfs::Meminfo::current().map_or(0, |m| (m.cached / 1024) as i64)
}

/// Bytes of the files in `dir` that are in the page cache now.
fn cached_in(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| fs::File::open(e.path()).ok())
        .filter_map(|f| stopover::sys::page_cache_bytes(&f).ok())
        .sum()
}

/// Creating files is normally ~25 us each here; this is "slow".
pub const SLOW_CREATE_US: f64 = 80.0;
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
pub fn wait_for_fast_file_creation(work: &Path) -> Duration {
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
    use procfs::process::Process;
    Process::myself().and_then(|p| p.stat()).map_or(0.0, |s| {
        (s.cutime + s.cstime) as f64 / procfs::ticks_per_second() as f64
    })
}

/// The shortest a run can take on `cores` cores, from the CPU each of its
/// processes needs: no process can go faster than one core, and all of
/// them together no faster than all cores.
pub fn cpu_bound_s(per_process: &[f64], cores: f64) -> f64 {
    let busiest = per_process.iter().copied().fold(0.0, f64::max);
    busiest.max(per_process.iter().sum::<f64>() / cores)
}

/// The median over repetitions of `other[i] / direct[i]` for the figure
/// `f` picks: repetition i ran both back to back (see the module docs).
pub fn paired_ratio(direct: &[Run], other: &[Run], f: fn(&Run) -> f64) -> f64 {
    median(
        direct
            .iter()
            .zip(other)
            .filter(|(d, _)| f(d) > 0.0)
            .map(|(d, o)| f(o) / f(d))
            .collect(),
    )
}

pub fn median(mut v: Vec<f64>) -> f64 {
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

/// The machine the bench ran on, for the table's title and results.json.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub mem_gib: f64,
}

pub fn machine() -> Machine {
    use procfs::Current;
    let cpu = procfs::CpuInfo::current()
        .ok()
        .and_then(|c| c.model_name(0).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = procfs::Meminfo::current().map_or(0, |m| m.mem_total);
    Machine {
        cpu,
        cores,
        kernel,
        mem_gib: (mem as f64 / (1u64 << 30) as f64 * 10.0).round() / 10.0,
    }
}
