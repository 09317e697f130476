//! System calls per transfer, for every relay: counted by `strace -f -c`
//! in a separate, shorter run of each scenario, after its timed runs
//! (strace slows a process down many times over, so it never touches a
//! timed run). Where strace is not installed there are no figures.
//!
//! Why count them: on small transfers a relay's cost is mostly system
//! calls (accept, connect, the reads and writes, the close of each socket;
//! for stopover also the file: open, write, rename, close), and a count
//! does not drift with the machine the way CPU time does.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::measure::{Bench, Via};
use crate::scenarios::Scenario;

/// Whether `strace` can be run here.
pub fn available() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The short version of `s` that is counted: the same clients and size,
/// at most 256 MiB and 1,000 transfers in all.
pub fn short(s: &Scenario) -> Scenario {
    let mut c = s.clone();
    let by_bytes = ((256u64 << 20) / s.size.max(1)).max(1);
    if s.all_at_once {
        c.clients = s.clients.min(500);
        c.transfers = c.clients as u64;
    } else {
        c.transfers = s.transfers.min(by_bytes).min(1_000);
        c.clients = s.clients.min(c.transfers as usize);
    }
    c
}

/// Runs `s` through `via` with the relay's process (and its children)
/// under `strace -f -c`; returns its system calls per completed transfer.
pub fn per_transfer(bench: &Bench, s: &Scenario, via: Via) -> Option<f64> {
    let pid = bench.relay_pid(via)?;
    let out = bench
        .work
        .join(format!("strace-{}-{}.txt", s.name, via.name()));
    let mut strace = Command::new("strace")
        .args(["-f", "-c", "-q", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if !wait_until_traced(pid, &mut strace) {
        stop(strace);
        return None;
    }
    let run = bench.run_sampled(s, via, false);
    stop(strace);
    let calls = total_calls(&out)?;
    let _ = fs::remove_file(&out);
    let transfers = run.load.transfers_ok;
    (transfers > 0).then(|| calls as f64 / transfers as f64)
}

/// Waits (up to 10 s) until the kernel says `pid` has a tracer.
fn wait_until_traced(pid: u32, strace: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if strace.try_wait().ok().flatten().is_some() {
            return false; // strace gave up (no permission, say)
        }
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let tracer = status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok());
        if tracer.is_some_and(|t| t != 0) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10)); // polling a condition
    }
    false
}

/// Detaches strace (SIGINT makes it write its summary) and waits for it.
fn stop(mut strace: Child) {
    // SAFETY: signalling a child of ours by its PID.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = strace.wait();
}

/// The `total` line of `strace -c` output: the calls column.
fn total_calls(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    parse_total(&text)
}

fn parse_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.trim_end().ends_with(" total"))?;
    // "100.00    1.288260          23     54536      2139 total"
    line.split_whitespace().nth(3)?.parse().ok()
}
