//! The processes under test: our server and proxy (the release binary),
//! and HAProxy as a reference relay when it is installed. Each is killed by
//! PID when dropped; what they cost is read from `/proc` (procfs).

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The well-known relays measured beside stopover when installed
/// (`apt-get install haproxy nginx-light libnginx-mod-stream socat`).
/// None of them stores anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    Haproxy,
    Nginx,
    Socat,
}

impl Reference {
    pub const ALL: [Reference; 3] = [Reference::Haproxy, Reference::Nginx, Reference::Socat];

    pub fn name(self) -> &'static str {
        match self {
            Reference::Haproxy => "haproxy",
            Reference::Nginx => "nginx",
            Reference::Socat => "socat",
        }
    }
}

/// A daemon under test, killed by PID when dropped.
pub struct Daemon {
    child: Child,
    pub addr: String,
    /// Where our daemons serve `GET /metrics` (`--stats-addr`).
    stats: Option<String>,
}

impl Daemon {
    pub fn start(bin: &Path, args: &[&str], log: &Path) -> Daemon {
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
                let stats = text.find("metrics at http://").map(|at| {
                    let rest = &text[at + "metrics at http://".len()..];
                    rest.split('/').next().unwrap_or("").to_string()
                });
                return Daemon { child, addr, stats };
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

    /// Starts a reference relay (if it is installed) to `server`, each
    /// with the settings that make it fastest here and comparable with
    /// stopover: one thread or worker (socat has a process per
    /// connection, as it must), half-close passed on. `None`, with the
    /// reason printed, if it is not installed or will not start.
    pub fn start_reference(reference: Reference, server: &str, work: &Path) -> Option<Daemon> {
        let name = reference.name();
        let (program, version_arg) = match reference {
            Reference::Haproxy => ("haproxy", "-v"),
            Reference::Nginx => ("nginx", "-v"),
            Reference::Socat => ("socat", "-V"),
        };
        let installed = Command::new(program)
            .arg(version_arg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .ok()
            .filter(|o| o.status.success());
        let Some(version) = installed else {
            println!(
                "reference: {name} is not installed, so no {name} rows (see README: Benchmarks)"
            );
            return None;
        };
        let text = [version.stdout, version.stderr].concat();
        let text = String::from_utf8_lossy(&text);
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or(name);
        println!("reference: {}", first.trim());
        // A port the kernel just handed out is free, and nothing else here
        // takes ports: good enough for a bench.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = work.join(format!("{name}.log"));
        let mut cmd = match reference {
            Reference::Haproxy => {
                let config = work.join("haproxy.cfg");
                let text = format!(
                    "global
    maxconn 6000
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
                let mut cmd = Command::new("haproxy");
                cmd.arg("-f").arg(&config).arg("-db");
                cmd
            }
            Reference::Nginx => {
                let config = work.join("nginx.conf");
                let text = format!(
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
master_process off;
daemon off;
pid {pid};
error_log stderr;
events {{ worker_connections 16384; }}
stream {{
    server {{
        listen {addr} backlog=4096;
        proxy_pass {server};
        proxy_half_close on;
        proxy_timeout 120s;
    }}
}}
",
                    pid = work.join("nginx.pid").display()
                );
                fs::write(&config, text).ok()?;
                let mut cmd = Command::new("nginx");
                cmd.arg("-p")
                    .arg(work)
                    .arg("-c")
                    .arg(&config)
                    .arg("-e")
                    .arg("stderr");
                cmd
            }
            Reference::Socat => {
                let mut cmd = Command::new("socat");
                cmd.args([
                    "-b",
                    "262144",
                    "-t",
                    "120",
                    &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096"),
                    &format!("TCP:{server}"),
                ]);
                cmd
            }
        };
        let mut child = cmd
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
                    "reference: {name} did not start, so no {name} rows: {}",
                    fs::read_to_string(&log).unwrap_or_default().trim()
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(20)); // waiting for its listener
        }
        Some(Daemon {
            child,
            addr,
            stats: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resets the peak-RSS counter (VmHWM) to the current RSS.
    pub fn reset_peak(&self) {
        let _ = fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    pub fn peak_rss_kib(&self) -> u64 {
        self.process()
            .and_then(|p| p.status().ok())
            .and_then(|s| s.vmhwm)
            .unwrap_or(0)
    }

    /// CPU seconds (user + system) the daemon has used so far, its ended
    /// children included (socat forks one per connection and reaps it).
    pub fn cpu_s(&self) -> f64 {
        self.process().and_then(|p| p.stat().ok()).map_or(0.0, |s| {
            let ticks = s.utime + s.stime + (s.cutime + s.cstime).max(0) as u64;
            ticks as f64 / procfs::ticks_per_second() as f64
        })
    }

    /// Connections (transfers, for the proxy) the daemon has open now, from
    /// its own `stopover_connections_open` gauge; 0 if it cannot be read.
    pub fn open_conns(&self) -> usize {
        self.stats
            .as_deref()
            .and_then(|addr| scrape(addr).ok())
            .and_then(|body| {
                body.lines().find_map(|l| {
                    l.strip_prefix("stopover_connections_open ")
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
            })
            .map_or(0, |v| v as usize)
    }

    fn process(&self) -> Option<procfs::process::Process> {
        procfs::process::Process::new(self.pid() as i32).ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `GET /metrics`: the response body.
fn scrape(addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut response = String::new();
    sock.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string()))
}
