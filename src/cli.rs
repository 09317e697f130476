//! Command-line definitions (clap derive) and their defaults.
//!
//! Only parsing lives here; `main.rs` turns the parsed arguments into the
//! roles' config structs and runs them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::help;

/// A client -> proxy -> server file relay on hand-driven mio poll loops.
///
/// The client sends a file to the proxy; the proxy stores it in a spool file
/// while streaming it to the server; the server stores it and answers
/// `OK bytes=<n> crc32c=<hex> file=<name>`, and the answer travels back to
/// the client, which checks it against what it sent.
mod parse;

pub use parse::*;

#[derive(Debug, Parser)]
#[command(name = "stopover", version, propagate_version = true, after_help = help::STOPOVER.help())]
pub struct Cli {
    /// More logging: -v for debug (connection life cycle), -vv for trace
    /// (every readiness event and every read and write).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = "Global options")]
    pub verbose: u8,

    /// Less logging: warnings and errors only.
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Global options"
    )]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The roles.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store each upload in its own file and answer with its size and CRC-32C.
    #[command(after_help = help::SERVER.help())]
    Server(ServerArgs),
    /// Relay uploads to a server, keeping a copy of each in a spool directory.
    #[command(after_help = help::PROXY.help())]
    Proxy(ProxyArgs),
    /// Send one file and verify the answer (exit 0 verified, 1 failed, 3 mismatch).
    #[command(after_help = help::CLIENT.help())]
    Client(ClientArgs),
    /// Run many concurrent verifying clients and summarize throughput and latency.
    #[command(after_help = help::LOAD.help())]
    Load(LoadArgs),
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(after_help = help::COMPLETIONS.help())]
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff): stopover(1), or stopover-SUBCOMMAND(1).
    #[command(after_help = help::MANPAGE.help())]
    Manpage {
        /// Print this subcommand's page instead of stopover(1).
        #[arg(value_name = "SUBCOMMAND", value_parser = crate::man::PAGES)]
        page: Option<String>,
        /// Write every page into DIR (stopover.1, and stopover-SUBCOMMAND.1
        /// for each subcommand) instead of printing one.
        #[arg(long, value_name = "DIR", conflicts_with = "page")]
        dir: Option<PathBuf>,
    },
    /// Draw a -vv trace as an SVG timeline: a lane per socket, the disk, the timers.
    #[command(after_help = help::TRACE_VIEW.help())]
    TraceView {
        /// Trace files (`-` or none: standard input). Lines it does not
        /// know are skipped, so a whole log will do.
        #[arg(value_name = "LOG")]
        logs: Vec<PathBuf>,
        /// Write the SVG here instead of to standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// `stopover server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on, host:port (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9000", value_name = "ADDR", value_parser = parse_host_port)]
    pub listen: String,

    /// Directory to store uploads in (created if missing, mode 0700).
    #[arg(long, default_value = "received", value_name = "DIR")]
    pub dir: PathBuf,

    /// Sync each file and its directory entry to disk before answering OK,
    /// so OK means durable (costs a disk flush per upload).
    #[arg(long)]
    pub fsync: bool,

    /// Store nothing: answer with the byte count and CRC-32C of what
    /// arrived and `file=-`, for load tests that measure the relay alone.
    /// No directory is created or used (so no --retain-* or --min-free).
    #[arg(long, conflicts_with_all = ["dir", "fsync", "retain_bytes", "retain_files", "retain_for", "min_free"])]
    pub discard: bool,

    #[command(flatten)]
    pub limits: Limits,
}

/// Protections shared by the server and the proxy.
#[derive(Debug, Args)]
pub struct Limits {
    /// Most connections at once; more wait in the kernel's listen backlog
    /// (default: as many as the open-files limit allows).
    #[arg(long, value_name = "N", value_parser = parse_count::<u64>)]
    pub max_conns: Option<u64>,

    /// Refuse uploads larger than this with `ERR too large` (e.g. 100MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub max_bytes: Option<u64>,

    /// Close a connection that moves no byte for this long (0s: never).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Abort an upload that brings in fewer than RATE bytes a second,
    /// averaged over WINDOW (default 10s): the slowloris defence. `0` turns
    /// it off. E.g. 128B, 1KiB/30s.
    #[arg(long, default_value = "128B/10s", value_name = "RATE[/WINDOW]", value_parser = parse_min_rate)]
    pub min_rate: MinRateArg,

    /// Serve Prometheus metrics at http://ADDR/metrics, from the same
    /// poll loop (off by default; e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR", value_parser = parse_host_port)]
    pub stats_addr: Option<String>,

    /// Log one line with the same counters this often (off by default);
    /// SIGUSR1 logs it at once.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub stats_interval: Option<Duration>,

    /// On SIGINT/SIGTERM, how long transfers in flight may take to finish
    /// (a second signal stops at once).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub grace: Duration,

    /// Keep at most this many bytes of recordings (finished and
    /// .incomplete files) in --dir; the oldest are deleted first (e.g. 10GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_positive_bytes)]
    pub retain_bytes: Option<u64>,

    /// Keep at most this many recordings in --dir (a ring of N files);
    /// the oldest are deleted first.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub retain_files: Option<u64>,

    /// Delete recordings older than this (their arrival time is in their
    /// name), e.g. 1h, 7days.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub retain_for: Option<Duration>,

    /// While the filesystem of --dir has less free than this, delete the
    /// oldest recordings (checked every second), e.g. 10GiB, 5%.
    #[arg(long, value_name = "SIZE|PERCENT", value_parser = crate::retention::parse_min_free)]
    pub min_free: Option<crate::retention::MinFree>,
}

impl Limits {
    /// The retention flags, for the roles' configs.
    pub fn retention(&self) -> crate::retention::Limits {
        crate::retention::Limits {
            bytes: self.retain_bytes,
            files: self.retain_files,
            age: self.retain_for,
            min_free: self.min_free,
        }
    }
}

/// `stopover proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address to listen on, host:port (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8000", value_name = "ADDR", value_parser = parse_host_port)]
    pub listen: String,

    /// The server to forward uploads to (host:port).
    #[arg(long, default_value = "127.0.0.1:9000", value_name = "ADDR", value_parser = parse_host_port)]
    pub upstream: String,

    /// Directory for spool files (created if missing, mode 0700).
    #[arg(long, default_value = "spool", value_name = "DIR")]
    pub dir: PathBuf,

    /// Store-and-forward: receive each whole upload, hold it this long
    /// (e.g. 30s; 0s = no wait) so the spool file can be edited, then send
    /// the file as it is on disk. Without --hold the proxy streams.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub hold: Option<Duration>,

    /// Give up connecting to the upstream after this long (the client gets
    /// `ERR upstream unavailable`, and the upload is kept).
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Memory for uploads in passage, all transfers together: bytes between
    /// the client and the upstream and on their way to the spool file (in
    /// 1 MiB chunks; at least 4 MiB). When it is spent, clients wait in
    /// the kernel until some is free: more memory, fewer and larger disk
    /// writes; less, more of them.
    #[arg(long, default_value = "8MiB", value_name = "SIZE", value_parser = parse_spool_memory)]
    pub spool_memory: u64,

    /// What a full or failing spool disk does to an upload: `relay` keeps
    /// relaying it without recording (what landed is kept as
    /// NAME.incomplete; counted and warned about), `refuse` answers `ERR`
    /// (every relayed byte is recorded). Hold mode always refuses.
    #[arg(long, default_value = "relay", value_name = "WHAT")]
    pub on_disk_error: OnDiskErrorArg,

    /// Misbehave on purpose (repeatable; toxiproxy's toxics, chained in
    /// the order given): TYPE:STREAM:ATTR=N,... with the stream and the
    /// attributes optional, e.g. latency:downstream:latency=50,jitter=10.
    /// STREAM is upstream (client to server) or downstream (the default);
    /// besides the type's attributes, toxicity=P (default 1) and
    /// name=NAME. Types: latency,
    /// bandwidth, slow_close, timeout, reset_peer, slicer, limit_data,
    /// limit_time.
    #[arg(long = "toxic", value_name = "TOXIC", value_parser = parse_toxic)]
    pub toxics: Vec<crate::toxics::Toxic>,

    /// toxiproxy's config file (a JSON list of proxies: name, listen,
    /// upstream, enabled, toxics): the proxy named --name (or the file's
    /// only one) sets the listen address, the upstream and the toxics
    /// (--toxic adds to them).
    #[arg(long, value_name = "FILE", value_parser = parse_config)]
    pub config: Option<ConfigFile>,

    /// This proxy's name (in --config, and in the toxiproxy API).
    #[arg(long, default_value = "stopover", value_name = "NAME")]
    pub name: String,

    /// Serve a toxiproxy-compatible HTTP API here (host:port), from the
    /// same loop: toxiproxy's clients add and remove toxics, disable and
    /// re-enable the proxy. Off by default; keep it on loopback.
    #[arg(long, value_name = "ADDR", value_parser = parse_host_port)]
    pub api_addr: Option<String>,

    #[command(flatten)]
    pub limits: Limits,
}

/// A `--config` file, read and checked when the command line is parsed.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub proxies: Vec<crate::toxics::json::ProxySpec>,
}

impl ConfigFile {
    /// The proxy named `name`, or the file's only one.
    pub fn proxy(&self, name: &str) -> Result<&crate::toxics::json::ProxySpec, String> {
        match self.proxies.iter().find(|p| p.name == name) {
            Some(p) => Ok(p),
            None if self.proxies.len() == 1 => Ok(&self.proxies[0]),
            None => Err(format!(
                "{}: no proxy named {name:?} (use --name)",
                self.path.display()
            )),
        }
    }
}

/// `--toxic`: the compact form (see `crate::toxics`).
pub fn parse_toxic(text: &str) -> Result<crate::toxics::Toxic, String> {
    text.parse()
}

/// `--config`: toxiproxy's JSON list of proxies, toxics honoured.
pub fn parse_config(text: &str) -> Result<ConfigFile, String> {
    let path = PathBuf::from(text);
    let body = std::fs::read_to_string(&path).map_err(|e| format!("reading {text}: {e}"))?;
    let proxies =
        crate::toxics::json::proxies_from_json(&body).map_err(|e| format!("{text}: {e}"))?;
    for p in &proxies {
        parse_host_port(&p.listen).map_err(|e| format!("{text}: proxy {}: listen: {e}", p.name))?;
        parse_host_port(&p.upstream)
            .map_err(|e| format!("{text}: proxy {}: upstream: {e}", p.name))?;
    }
    if proxies.is_empty() {
        return Err(format!("{text}: no proxy in it"));
    }
    Ok(ConfigFile { path, proxies })
}

/// `--on-disk-error` (see `ProxyArgs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnDiskErrorArg {
    Relay,
    Refuse,
}

/// `stopover client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Where to send the file: the proxy, or a server directly (host:port).
    #[arg(long, default_value = "127.0.0.1:8000", value_name = "ADDR", value_parser = parse_host_port)]
    pub to: String,

    /// Bound on connecting, on any single blocked send, and on waiting for
    /// the answer (e.g. 30s, 2m, 500ms).
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub timeout: Duration,

    /// Never show a progress bar.
    #[arg(long)]
    pub no_progress: bool,

    /// The file to send; `-` reads standard input.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// `stopover load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Where to send: the proxy, or a server directly (host:port).
    #[arg(long, default_value = "127.0.0.1:8000", value_name = "ADDR", value_parser = parse_host_port)]
    pub to: String,

    /// Concurrent clients (threads, each one blocking client).
    #[arg(long, short = 'c', default_value_t = 16, value_name = "C", value_parser = parse_count::<u32>)]
    pub clients: u32,

    /// Total transfers to run (default 1000 unless --duration is given).
    #[arg(long, short = 'n', value_name = "N", conflicts_with = "duration", value_parser = parse_count::<u64>)]
    pub transfers: Option<u64>,

    /// Run for this long instead of a fixed number of transfers (e.g. 30s).
    #[arg(long, short = 'd', value_name = "DURATION", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,

    /// Payload size, or a range to draw sizes from (64KiB, 1MB, 1KiB..1MiB).
    #[arg(
        long,
        short = 's',
        default_value = "64KiB",
        value_name = "SIZE|MIN..MAX"
    )]
    pub size: crate::load::SizeRange,

    /// Per-transfer bound on connecting, any blocked send, and the answer.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub timeout: Duration,

    /// One transfer per client, all held open half-way until every client
    /// has got that far: C transfers in flight at the same moment.
    #[arg(long, conflicts_with = "duration")]
    pub all_at_once: bool,

    /// With --all-at-once: once every client is half-way, keep all the
    /// connections open this much longer (gives the receiver time to
    /// accept them all).
    #[arg(long, default_value = "0s", value_name = "DURATION", value_parser = parse_duration, requires = "all_at_once")]
    pub hold_open: Duration,

    /// Open loop: start R transfers a second on a fixed schedule (as wrk2
    /// and vegeta do), and measure each latency from its scheduled start,
    /// so a stall shows up instead of being hidden (coordinated omission).
    /// Without it, each client sends again as soon as it is answered.
    #[arg(long, value_name = "R", value_parser = parse_rate, conflicts_with = "all_at_once")]
    pub rate: Option<f64>,

    /// Run transfers for this long first without counting them.
    #[arg(long, default_value = "0s", value_name = "DURATION", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Print a line every interval (elapsed, transfers ok/failed, MB/s,
    /// transfers/s, p50/p99); with --json, an `intervals` array instead.
    #[arg(long, short = 'i', value_name = "DURATION", value_parser = parse_positive_duration)]
    pub interval: Option<Duration>,

    /// Write the latency histogram (one per interval with -i) to FILE in
    /// the HdrHistogram interval log format.
    #[arg(long, value_name = "FILE")]
    pub hdr_log: Option<PathBuf>,

    /// Fail the run (exit 4) if this is true at the end, e.g. 'p99>50ms',
    /// 'errors>0', 'error_rate>1', 'transfers_per_s<1000'. Repeatable.
    /// Quote it: unquoted, a shell takes > and < as redirections.
    #[arg(long, value_name = "CONDITION")]
    pub fail_if: Vec<crate::load::Threshold>,

    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,

    /// Never show a progress bar.
    #[arg(long)]
    pub no_progress: bool,

    /// Replay a recording: send each finished file in DIR (a proxy's spool,
    /// a server's directory) as one upload, at its recorded arrival time
    /// relative to the first, on the open loop. With --rate, in name order
    /// on a fixed schedule instead (for names that carry no time).
    #[arg(long, value_name = "DIR", help_heading = "Replay", conflicts_with_all = ["transfers", "duration", "size", "all_at_once", "warmup"])]
    pub replay: Option<PathBuf>,

    /// Replay X times as fast as recorded: 2 twice, 0.5 half (default 1).
    #[arg(long, value_name = "X", help_heading = "Replay", value_parser = crate::load::parse_speed, requires = "replay", conflicts_with = "rate")]
    pub speed: Option<f64>,

    /// Cap every gap between two uploads of the replay (after --speed) at
    /// this, so a pause in the recording does not become one in the replay.
    #[arg(long, value_name = "DURATION", help_heading = "Replay", value_parser = parse_duration, requires = "replay", conflicts_with = "rate")]
    pub max_wait: Option<Duration>,

    /// Play the recording N times, each pass one average gap after the last.
    #[arg(long = "loop", value_name = "N", help_heading = "Replay", value_parser = clap::value_parser!(u64).range(1..), requires = "replay")]
    pub loops: Option<u64>,

    /// Replay only files that arrived at or after this: an offset into the
    /// recording (90s), a UTC time (2026-11-25T12:44:45Z), or a file's name.
    #[arg(
        long,
        value_name = "WHEN",
        help_heading = "Replay",
        requires = "replay"
    )]
    pub since: Option<crate::load::Bound>,

    /// Replay only files that arrived at or before this (as --since).
    #[arg(
        long,
        value_name = "WHEN",
        help_heading = "Replay",
        requires = "replay"
    )]
    pub until: Option<crate::load::Bound>,

    /// Print what the replay would send and how long it would take
    /// (files, bytes, the recording's and the replay's duration, the
    /// longest gap), and send nothing.
    #[arg(long, help_heading = "Replay", requires = "replay")]
    pub dry_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::MinRate;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let cli = Cli::try_parse_from(["stopover", "proxy"]).unwrap();
        let Command::Proxy(p) = cli.command else {
            panic!("expected proxy")
        };
        assert_eq!(p.listen, "127.0.0.1:8000");
        assert_eq!(p.upstream, "127.0.0.1:9000");
        assert_eq!(p.dir, PathBuf::from("spool"));
        let cli = Cli::try_parse_from(["stopover", "server"]).unwrap();
        let Command::Server(s) = cli.command else {
            panic!("expected server")
        };
        assert_eq!(s.listen, "127.0.0.1:9000");
        assert_eq!(s.dir, PathBuf::from("received"));
    }

    #[test]
    fn addresses_need_a_port_and_may_be_names() {
        for good in [
            "127.0.0.1:0",
            "localhost:9000",
            "[::1]:8000",
            "example.invalid:1",
        ] {
            assert_eq!(parse_host_port(good), Ok(good.to_string()));
        }
        for bad in ["127.0.0.1", "localhost", ":80", "host:http", "host:70000"] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_and_spool_memory_have_one_wording_and_a_floor() {
        assert_eq!(parse_count::<u32>("16"), Ok(16));
        let n = parse_count::<u64>("0").unwrap_err();
        let c = parse_count::<u32>("0").unwrap_err();
        assert_eq!(n, c, "-n 0 and -c 0 say the same");
        assert!(n.contains("at least 1"), "{n}");
        assert!(parse_count::<u32>("5000000000").is_err());
        assert_eq!(MIN_SPOOL_MEMORY, 4 * 1024 * 1024);
        assert_eq!(parse_spool_memory("4MiB"), Ok(MIN_SPOOL_MEMORY));
        let e = parse_spool_memory("1MiB").unwrap_err();
        assert!(e.contains("at least") || e.contains("least allowed"), "{e}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_positive_duration("0s").is_err());
        assert_eq!(parse_min_rate("0"), Ok(MinRateArg(None)));
        assert_eq!(
            parse_min_rate("1KiB/30s"),
            Ok(MinRateArg(Some(MinRate {
                per_second: 1024,
                window: Duration::from_secs(30)
            })))
        );
        assert_eq!(
            parse_min_rate("128B/10s"),
            Ok(MinRateArg(Some(MinRate::DEFAULT)))
        );
        assert!(parse_min_rate("fast").is_err());
        assert!(parse_duration("10000000000000000000s").is_err());
        assert_eq!(parse_duration("3650days"), Ok(MAX_DURATION));
    }
}
