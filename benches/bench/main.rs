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
//! **Reference relays.** For each of HAProxy (one thread, `splice` both
//! ways), nginx's stream module (one worker, `proxy_half_close on`) and
//! socat (`-b 262144`, a process per connection) that is installed, every
//! scenario but concurrency also runs through it, in front of our server:
//! well-known relays that store nothing, measured on the same machine in
//! the same minute (see `daemons::Reference`). Their rows are labelled by
//! name; their memory and CPU fill the relay columns. Without them the
//! bench runs with fewer rows.
//!
//! Two traps of this machine are avoided on purpose. Files are never
//! deleted between runs (after deleting thousands of files, creating new
//! ones nearby is 10-35x slower for minutes: see
//! `measure::wait_for_fast_file_creation`, which also holds a run back until that
//! has passed); large ones are truncated instead to free the disk. And
//! every scenario is warmed up first, because memory the host took back is
//! several times slower on first touch.
//!
//! Sizes: the full run (default), `BENCH_QUICK=1` (under a minute) and
//! `BENCH_SMOKE=1` (seconds; `make test` runs it so the bench never rots).
//! `BENCH_ONLY=active,small` runs only the scenarios named.
//! `BENCH_PROXY_ARGS="--toxic latency::latency=50,toxicity=0"` gives the
//! proxies under test more flags (toxics configured but not drawn must
//! cost nothing: compare with a run without).
//! Outputs: the table on stdout, `target/bench/results.json` and
//! `target/bench/report.svg` (smoke runs write under `target/bench/smoke/`).

//!
//! Files: `scenarios` (what is measured), `daemons` (the processes under
//! test), `measure` (one run, and the arithmetic that compares runs),
//! `report` (the table, the targets, results.json and the chart).

mod chart;
mod daemons;
mod measure;
mod receiver;
mod report;
mod scenarios;
mod syscalls;
mod targets;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use daemons::{Daemon, Reference};
use measure::{file_floor_us, machine, wait_for_fast_file_creation, Bench, Run, Via};
use scenarios::{scenarios, warm_up, Preset, Scenario};

fn main() {
    // Started again as the threaded receiver (see `receiver`).
    if let Some((addr, dir)) = receiver::requested() {
        receiver::serve(&addr, &dir);
    }
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
        m.cores, m.cpu, m.kernel
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
            "--stats-addr",
            "127.0.0.1:0",
        ],
        &work.join("server.log"),
    );
    // BENCH_PROXY_ARGS: more flags for the proxies under test.
    let extra = std::env::var("BENCH_PROXY_ARGS").unwrap_or_default();
    let start_proxy = |upstream: &str, spool: &str, log: &str| {
        let spool = work.join(spool);
        let mut args = vec![
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
            "--dir",
            spool.to_str().unwrap(),
            "--stats-addr",
            "127.0.0.1:0",
        ];
        args.extend(extra.split_whitespace());
        Daemon::start(&bin, &args, &work.join(log))
    };
    let proxy = start_proxy(&server.addr, "spool", "proxy.log");
    let references: Vec<(Reference, Daemon)> = if preset == Preset::Smoke {
        Vec::new()
    } else {
        Reference::ALL
            .into_iter()
            .filter_map(|r| Daemon::start_reference(r, &server.addr, &work).map(|d| (r, d)))
            .collect()
    };
    // The plain blocking receiver (this binary, started again), and a
    // stopover proxy in front of it.
    let threaded = std::env::current_exe().ok().map(|me| {
        let receiver = Daemon::start(
            &me,
            &[
                "--receiver",
                "127.0.0.1:0",
                work.join("threaded").to_str().unwrap(),
            ],
            &work.join("receiver.log"),
        );
        let proxy = start_proxy(&receiver.addr, "spool-t", "proxy-t.log");
        (receiver, proxy)
    });
    let bench = Bench {
        bin,
        work: work.clone(),
        server,
        proxy,
        references,
        threaded,
    };
    // BENCH_ONLY=active,small runs just those scenarios.
    let only = std::env::var("BENCH_ONLY").ok();
    let scenarios: Vec<Scenario> = scenarios(preset)
        .into_iter()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n.trim() == s.name))
        })
        .collect();
    // The paths each scenario is run over. HAProxy, when installed, is the
    // reference for the two scenarios the targets compare with it.
    // Behind the threaded receiver too, except where it would need a
    // thread per held connection (concurrency).
    let paths = |s: &Scenario| {
        let mut v = vec![Via::Direct, Via::Proxy];
        if s.name != "concurrency" {
            v.extend(bench.references.iter().map(|(r, _)| Via::Reference(*r)));
        }
        if bench.threaded.is_some() && s.name != "concurrency" {
            v.extend([Via::DirectThreaded, Via::ProxyThreaded]);
        }
        v
    };

    // Warm up every scenario on every path before measuring anything.
    if preset != Preset::Smoke {
        for s in &scenarios {
            let w = warm_up(s);
            for via in paths(s) {
                bench.run(&w, via);
            }
        }
    }

    let strace = syscalls::available();
    if !strace {
        println!("strace is not installed, so no system-call counts (apt-get install strace)");
    }
    let mut results: BTreeMap<&str, BTreeMap<&str, Vec<Run>>> = BTreeMap::new();
    let mut syscall_counts: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    for s in &scenarios {
        let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
        for rep in 0..s.reps {
            // Interleave, alternating which of direct and proxied goes
            // first (for both receivers); the reference relay runs after
            // the pair it is compared with.
            let mut order = paths(s);
            if rep % 2 == 1 {
                order.swap(0, 1);
                if let Some(at) = order.iter().position(|v| *v == Via::DirectThreaded) {
                    order.swap(at, at + 1);
                }
            }
            for via in order {
                runs.entry(via.name()).or_default().push(bench.run(s, via));
            }
        }
        results.insert(s.name, runs);
        // System calls per transfer: a separate short run per relay, after
        // the timed ones (see `syscalls`).
        if strace {
            let short = syscalls::short(s);
            let counts = paths(s)
                .into_iter()
                .filter_map(|via| Some((via.name(), syscalls::per_transfer(&bench, &short, via)?)))
                .collect();
            syscall_counts.insert(s.name, counts);
        }
    }
    // The file floor, in the proxy's spool as the scenarios left it.
    let floor = file_floor_us(
        &bench.work.join("spool"),
        if preset == Preset::Smoke { 200 } else { 2_000 },
    );
    drop(bench);

    let report = report::report(
        preset,
        &scenarios,
        &results,
        &report::Extras {
            syscalls: &syscall_counts,
            file_floor: floor,
        },
        &m,
    );
    let wall = started.elapsed().as_secs_f64();
    report::footer(preset, wall, waited);
    report::write(&out_dir, preset, &m, wall, waited, &report);

    // Deleting is safe now: nothing in this run creates files after it. The
    // next run would pay for it (see wait_for_fast_file_creation), so say so.
    let _ = fs::remove_dir_all(&work);
    if preset != Preset::Smoke {
        println!("note: this run deleted its files; a bench started in the next few minutes waits until file creation is fast again");
    }
    if report.errors > 0 {
        eprintln!("bench: {} transfers failed", report.errors);
        std::process::exit(1);
    }
    // The smoke run keeps the counting from rotting: with strace installed,
    // every scenario must have a count for stopover's proxy.
    let uncounted: Vec<&str> = scenarios
        .iter()
        .map(|s| s.name)
        .filter(|name| strace && !syscall_counts[name].contains_key("proxied"))
        .collect();
    if !uncounted.is_empty() {
        eprintln!("bench: no system-call count for the proxy in {uncounted:?}");
        std::process::exit(1);
    }
}
