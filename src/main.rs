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
    match run(cli.command) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("stopover: {message}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn init_logging(cli: &Cli) {
    // The client's stdout carries the answer and its stderr is for the
    // user, so it logs only warnings unless asked; the daemons log info.
    let base = match cli.command {
        Command::Client(_) | Command::Load(_) | Command::Completions { .. } | Command::Manpage => {
            LevelFilter::Warn
        }
        _ => LevelFilter::Info,
    };
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => LevelFilter::Warn,
        (false, 0) => base,
        (false, 1) => LevelFilter::Debug,
        (false, _) => LevelFilter::Trace,
    };
    // Logging is a convenience; failing to set it up is not a reason to stop.
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        // mio traces its own registrations; ours say the same in our terms.
        .with_module_level("mio", LevelFilter::Info)
        .with_utc_timestamps()
        .init();
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
                fsync: args.fsync,
            })
            .map_err(|e| e.to_string())?;
            server.handle_signals().map_err(|e| e.to_string())?;
            server.run().map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Proxy(args) => {
            let upstream = resolve("upstream", &args.upstream)?;
            let mut proxy = Proxy::bind(&ProxyConfig {
                listen: resolve("listen address", &args.listen)?,
                upstream,
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
            println!("{}", stopover::human::printable(&receipt.line));
            match receipt.verdict() {
                Verdict::Verified => Ok(ExitCode::SUCCESS),
                Verdict::Refused(_) => Ok(ExitCode::from(EXIT_FAILURE)),
                mismatch @ Verdict::Mismatch { .. } => {
                    eprintln!("stopover: {mismatch}");
                    Ok(ExitCode::from(EXIT_MISMATCH))
                }
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "stopover", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpage => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .map_err(|e| format!("writing the man page: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Load(args) => {
            let stop = match (args.transfers, args.duration) {
                (_, Some(d)) => Stop::Duration(d),
                (Some(n), None) => Stop::Transfers(n),
                (None, None) => Stop::Transfers(1000),
            };
            let summary = load::run(&LoadConfig {
                to: args.to,
                clients: args.clients as usize,
                stop,
                size: args.size,
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
            })?;
            if args.json {
                let json = serde_json::to_string(&summary).map_err(|e| e.to_string())?;
                println!("{json}");
            } else {
                println!("{summary}");
            }
            // Failed transfers first (1), then crossed thresholds (4).
            Ok(if !summary.all_verified() {
                ExitCode::from(EXIT_FAILURE)
            } else if !summary.thresholds_met() {
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
