//! The `stopover` binary: parse the command line, start logging, run a
//! role, and turn its result into an exit code. All the work is in the
//! library; see `src/lib.rs` for the map.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use clap::Parser;
use log::LevelFilter;

use stopover::cli::{Cli, Command};
use stopover::client::{self, ClientConfig, Verdict};
use stopover::load::{self, LoadConfig, Stop};
use stopover::logging;
use stopover::proxy::{OnDiskError, Proxy, ProxyConfig};
use stopover::server::{Server, ServerConfig};

/// Exit code for any failure at run time (a transfer that failed, a
/// directory or address that cannot be used).
const EXIT_FAILURE: u8 = 1;
/// Exit code for a usage error: the command line itself is wrong.
const EXIT_USAGE: u8 = 2;
/// Exit code when the server answered OK but stored different bytes.
const EXIT_MISMATCH: u8 = 3;
/// Exit code when a load run crossed a `--fail-if` threshold.
const EXIT_THRESHOLD: u8 = 4;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not failures; a usage error is 2,
            // as with every clap-based (and most Unix) tools.
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(&cli);
    let code = match run(cli.command) {
        Ok(code) => code,
        Err(message) => {
            logging::message(&format!("stopover: {message}"));
            ExitCode::from(EXIT_FAILURE)
        }
    };
    // The last lines (a daemon's summary, the error above) reach a working
    // stderr; a blocked one cannot hold the exit.
    logging::flush(logging::EXIT_FLUSH);
    code
}

fn init_logging(cli: &Cli) {
    // The client's stdout carries the answer and its stderr is for the
    // user, so it logs only warnings unless asked; the daemons log info.
    let base = match cli.command {
        Command::Client(_)
        | Command::Load(_)
        | Command::Completions { .. }
        | Command::Manpage { .. }
        | Command::TraceView { .. } => LevelFilter::Warn,
        _ => LevelFilter::Info,
    };
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => LevelFilter::Warn,
        (false, 0) => base,
        (false, 1) => LevelFilter::Debug,
        (false, _) => LevelFilter::Trace,
    };
    // Each line names the process's role (see `logging`).
    let role = match cli.command {
        Command::Server(_) => "server",
        Command::Proxy(_) => "proxy",
        Command::Client(_) => "client",
        Command::Load(_) => "load",
        Command::Completions { .. } | Command::Manpage { .. } | Command::TraceView { .. } => "",
    };
    logging::init(level, role);
}

fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Server(args) => {
            let mut server = Server::bind(&ServerConfig {
                listen: resolve("listen address", &args.listen)?,
                dir: args.dir,
                max_conns: args.limits.max_conns.map(|n| n as usize),
                max_bytes: args.limits.max_bytes,
                idle_timeout: nonzero(args.limits.idle_timeout),
                min_rate: args.limits.min_rate.0,
                grace: args.limits.grace,
                stats_addr: stats_addr(&args.limits)?,
                stats_interval: args.limits.stats_interval,
                retention: args.limits.retention(),
                fsync: args.fsync,
                discard: args.discard,
            })
            .map_err(|e| e.to_string())?;
            server.handle_signals().map_err(|e| e.to_string())?;
            server.run().map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Proxy(args) => {
            let (mut listen, mut upstream) = (args.listen.clone(), args.upstream.clone());
            let mut toxics = Vec::new();
            if let Some(config) = &args.config {
                let p = config.proxy(&args.name)?;
                if !p.enabled {
                    return Err(format!(
                        "{}: proxy {} is disabled (enabled: false)",
                        config.path.display(),
                        p.name
                    ));
                }
                (listen, upstream) = (p.listen.clone(), p.upstream.clone());
                toxics = p.toxics.clone();
            }
            for t in &args.toxics {
                if toxics
                    .iter()
                    .any(|o: &stopover::toxics::Toxic| o.name == t.name)
                {
                    return Err(format!(
                        "toxic {} given twice (name=NAME tells them apart)",
                        t.name
                    ));
                }
                toxics.push(t.clone());
            }
            let upstream = resolve("upstream", &upstream)?;
            let mut proxy = Proxy::bind(&ProxyConfig {
                listen: resolve("listen address", &listen)?,
                upstream,
                toxics,
                name: args.name.clone(),
                api_addr: args
                    .api_addr
                    .as_deref()
                    .map(|a| resolve("API address", a))
                    .transpose()?,
                dir: args.dir,
                hold: args.hold,
                max_conns: args.limits.max_conns.map(|n| n as usize),
                max_bytes: args.limits.max_bytes,
                idle_timeout: nonzero(args.limits.idle_timeout),
                min_rate: args.limits.min_rate.0,
                connect_timeout: args.connect_timeout,
                grace: args.limits.grace,
                stats_addr: stats_addr(&args.limits)?,
                stats_interval: args.limits.stats_interval,
                retention: args.limits.retention(),
                spool_memory: usize::try_from(args.spool_memory).unwrap_or(usize::MAX),
                on_disk_error: match args.on_disk_error {
                    stopover::cli::OnDiskErrorArg::Relay => OnDiskError::Relay,
                    stopover::cli::OnDiskErrorArg::Refuse => OnDiskError::Refuse,
                },
            })
            .map_err(|e| e.to_string())?;
            proxy.handle_signals().map_err(|e| e.to_string())?;
            proxy.run().map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Client(args) => {
            let receipt = client::send_file(&ClientConfig {
                to: args.to,
                file: args.file,
                timeout: args.timeout,
                progress: !args.no_progress,
            })
            .map_err(|e| e.to_string())?;
            // The line comes from the network: escaped, it cannot drive
            // the user's terminal.
            stopover::human::out(stopover::human::printable(&receipt.line));
            match receipt.verdict() {
                Verdict::Verified => Ok(ExitCode::SUCCESS),
                Verdict::Refused(_) => Ok(ExitCode::from(EXIT_FAILURE)),
                mismatch @ Verdict::Mismatch { .. } => {
                    logging::message(&format!("stopover: {mismatch}"));
                    Ok(ExitCode::from(EXIT_MISMATCH))
                }
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into memory first: `generate` panics on a failed write, and a
            // closed stdout (`| head -0`) must cost the output, not a panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "stopover", &mut script);
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpage { page, dir } => {
            stopover::man::run(page.as_deref(), dir.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::TraceView { logs, output } => {
            stopover::trace_view::run(&logs, output.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Load(args) => {
            let stop = match (args.transfers, args.duration) {
                (_, Some(d)) => Stop::Duration(d),
                (Some(n), None) => Stop::Transfers(n),
                (None, None) => Stop::Transfers(1000),
            };
            let replay = match &args.replay {
                Some(dir) => Some(load::Replay::plan(&load::ReplayOptions {
                    dir: dir.clone(),
                    speed: args.speed.unwrap_or(1.0),
                    max_wait: args.max_wait,
                    loops: args.loops.unwrap_or(1),
                    since: args.since,
                    until: args.until,
                    rate: args.rate,
                })?),
                None => None,
            };
            // A replay runs its own number of transfers.
            let stop = replay.as_ref().map_or(stop, |r| Stop::Transfers(r.slots()));
            if let Some(replay) = replay.as_ref().filter(|_| args.dry_run) {
                if args.json {
                    let json = serde_json::to_string(&replay.plan).map_err(|e| e.to_string())?;
                    stopover::human::out(json);
                } else {
                    stopover::human::out(&replay.plan);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let summary = load::run(&LoadConfig {
                to: args.to,
                clients: args.clients as usize,
                stop,
                size: replay.as_ref().map_or(args.size, |r| r.sizes()),
                timeout: args.timeout,
                all_at_once: args.all_at_once,
                hold_open: args.hold_open,
                rate: args.rate,
                warmup: args.warmup,
                interval: args.interval,
                print_intervals: !args.json,
                hdr_log: args.hdr_log,
                thresholds: args.fail_if,
                progress: !args.no_progress,
                replay: replay.map(std::sync::Arc::new),
            })?;
            if args.json {
                let json = serde_json::to_string(&summary).map_err(|e| e.to_string())?;
                stopover::human::out(json);
            } else {
                stopover::human::out(&summary);
            }
            // Failed transfers first (1), then crossed thresholds (4).
            Ok(if !summary.all_verified() {
                ExitCode::from(EXIT_FAILURE)
            } else if !summary.thresholds_passed() {
                ExitCode::from(EXIT_THRESHOLD)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// `0s` means "off" for timeouts.
fn nonzero(d: std::time::Duration) -> Option<std::time::Duration> {
    (!d.is_zero()).then_some(d)
}

/// The `--stats-addr`, resolved.
fn stats_addr(limits: &stopover::cli::Limits) -> Result<Option<SocketAddr>, String> {
    limits
        .stats_addr
        .as_deref()
        .map(|a| resolve("stats address", a))
        .transpose()
}

/// Resolves `host:port` once, at startup, so a typo fails now and clearly.
fn resolve(what: &str, addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("resolving {what} {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{what} {addr:?} resolves to no address"))
}
