//! `stopover load --replay`: a recording (a spool, a server's directory)
//! sent again as a load test, on real sockets.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::Value;
use stopover::load::arrival_time;

/// Arrival times in the stored names of `dir`'s finished files, sorted.
fn arrivals(dir: &Path) -> Vec<SystemTime> {
    let mut times: Vec<SystemTime> = final_files(dir)
        .iter()
        .map(|n| arrival_time(n).unwrap_or_else(|| panic!("{n} carries its arrival time")))
        .collect();
    times.sort();
    times
}

/// Seconds from the first arrival in `dir` to the last.
fn span_s(dir: &Path) -> f64 {
    let t = arrivals(dir);
    t[t.len() - 1].duration_since(t[0]).unwrap().as_secs_f64()
}

/// The contents of `dir`'s finished files, sorted: equal for two
/// directories when they hold the same uploads, byte for byte, whatever
/// their names and order.
fn contents(dir: &Path) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = final_files(dir)
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect();
    all.sort();
    all
}

fn assert_same_uploads(a: &Path, b: &Path) {
    let (x, y) = (contents(a), contents(b));
    assert_eq!(x.len(), y.len(), "{} and {}", a.display(), b.display());
    let differ = x.iter().zip(&y).filter(|(p, q)| p != q).count();
    assert_eq!(
        differ,
        0,
        "{} and {} hold different bytes",
        a.display(),
        b.display()
    );
}

/// Writes recorded files into `dir` as a proxy would name them, arriving
/// at `offsets` after a fixed start, with `size(i)` random bytes each.
fn plant(dir: &Path, offsets: &[Duration], size: impl Fn(usize) -> usize) {
    let start = humantime::parse_rfc3339("2026-11-25T12:00:00Z").unwrap();
    for (i, offset) in offsets.iter().enumerate() {
        let stamp: String = humantime::format_rfc3339_micros(start + *offset)
            .to_string()
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        let name = format!("{stamp}-4242-{:06}", i + 1);
        std::fs::write(dir.join(name), random_bytes(size(i), i as u64)).unwrap();
    }
}

/// Runs `stopover load ARGS` against a fresh server; returns the server's
/// directory and what load printed.
fn replay_to_fresh_server(args: &[&str]) -> (tempfile::TempDir, Output, Value) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let (out, json) = run_load(&[&["--to", &server.addr.to_string()], args].concat());
    (dir, out, json)
}

fn f64_of(json: &Value, path: &[&str]) -> f64 {
    let mut v = json;
    for key in path {
        v = &v[key];
    }
    v.as_f64().unwrap_or_else(|| panic!("{path:?} in {json}"))
}

fn assert_close(what: &str, measured: f64, expected: f64, tolerance: f64) {
    assert!(
        (measured - expected).abs() <= expected * tolerance,
        "{what}: {measured:.3} s, expected {expected:.3} s within {:.0}%",
        tolerance * 100.0
    );
}

#[test]
fn a_recording_replayed_twice_as_fast_arrives_in_half_the_time_byte_for_byte() {
    // Record: 200 uploads of mixed sizes through a proxy, 100 a second.
    let recorded = start_system();
    let (out, json) = run_load(&[
        "--to",
        &recorded.proxy.addr.to_string(),
        "--rate",
        "100",
        "-n",
        "200",
        "-s",
        "1KiB..64KiB",
        "-c",
        "64",
    ]);
    assert_eq!(out.status.code(), Some(0), "recording: {json}");
    let spool = recorded.proxy_dir.path();
    assert_eq!(final_files(spool).len(), 200);
    let recorded_s = span_s(spool);

    // Replay it at twice the speed through a fresh proxy to a fresh server.
    // (64 clients, here and above: enough for the rate times the slowest
    // transfer, so that the schedule, not busy clients, decides when each
    // upload starts.)
    let fresh = start_system();
    let (out, json) = run_load(&[
        "--to",
        &fresh.proxy.addr.to_string(),
        "--replay",
        spool.to_str().unwrap(),
        "--speed",
        "2",
        "-c",
        "64",
    ]);
    assert_eq!(out.status.code(), Some(0), "replay: {json}");
    assert_eq!(json["transfers_ok"], 200, "{json}");
    assert_eq!(json["transfers_failed"], 0, "{json}");
    let replay = &json["config"]["replay"];
    assert_eq!(replay["files"], 200, "{json}");
    assert_eq!(replay["skipped_unfinished"], 0, "{json}");
    assert_eq!(replay["speed"], 2.0, "{json}");
    assert_eq!(replay["dir"], spool.to_str().unwrap(), "{json}");
    assert_eq!(json["config"]["mode"], "open", "{json}");
    assert_eq!(json["config"]["transfers"], 200, "{json}");
    // The schedule is the recording's, halved...
    assert_close(
        "planned replay",
        f64_of(replay, &["expected_s"]),
        recorded_s / 2.0,
        1e-6,
    );
    // ...and the uploads really arrived on it: at the server, and in the
    // fresh proxy's spool, which has recorded the replay in its turn.
    for dir in [fresh.server_dir.path(), fresh.proxy_dir.path()] {
        assert_eq!(final_files(dir).len(), 200, "{}", dir.display());
        assert_close(
            &format!("arrivals in {}", dir.display()),
            span_s(dir),
            recorded_s / 2.0,
            0.2,
        );
        assert_same_uploads(spool, dir);
    }
    let recorded_bytes: usize = contents(spool).iter().map(Vec::len).sum();
    assert_eq!(
        json["bytes"], recorded_bytes,
        "every byte sent and verified"
    );
}

#[test]
fn max_wait_caps_a_planted_gap_and_the_dry_run_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ms = Duration::from_millis;
    plant(dir.path(), &[ms(0), ms(10), ms(30_010), ms(30_020)], |i| {
        1000 * (i + 1)
    });
    let replay_dir = dir.path().to_str().unwrap();
    let (out, plan) = run_load(&["--replay", replay_dir, "--max-wait", "100ms", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{plan}");
    assert_eq!(plan["files"], 4);
    assert_eq!(plan["bytes"], 10_000);
    assert_close("recording", f64_of(&plan, &["recorded_s"]), 30.02, 1e-9);
    assert_close("longest gap", f64_of(&plan, &["longest_gap_s"]), 30.0, 1e-9);
    assert_close(
        "capped",
        f64_of(&plan, &["longest_gap_replay_s"]),
        0.1,
        1e-9,
    );
    assert_close("replay", f64_of(&plan, &["expected_s"]), 0.12, 1e-9);
    // The same, for people.
    let text = Command::new(bin())
        .args([
            "load",
            "--replay",
            replay_dir,
            "--max-wait",
            "100ms",
            "--dry-run",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    for line in [
        "dry run, nothing sent",
        "0.120 s for 4 uploads",
        "30.000 s recorded, 0.100 s in the replay",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }

    // The replay: without the cap it would wait 30 s.
    let (server_dir, out, json) =
        replay_to_fresh_server(&["--replay", replay_dir, "--max-wait", "100ms"]);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["transfers_ok"], 4, "{json}");
    let wall = f64_of(&json, &["wall_s"]);
    assert!(
        (0.12..10.0).contains(&wall),
        "capped at 0.1 s, the replay took {wall} s"
    );
    assert!(span_s(server_dir.path()) < 10.0);
    assert_same_uploads(dir.path(), server_dir.path());
}

#[test]
fn a_dry_run_predicts_the_replay_and_everything_load_reports_works() {
    // 21 files over one second, the gaps growing; plus what is not a
    // finished upload, to be skipped and counted.
    let dir = tempfile::tempdir().unwrap();
    let offsets: Vec<Duration> = (0..21u64)
        .map(|i| Duration::from_micros(i * i * 2500))
        .collect();
    plant(dir.path(), &offsets, |i| 100 + 37 * i);
    std::fs::write(
        dir.path().join("20261125T120005.000000Z-4242-000099.part"),
        b"x",
    )
    .unwrap();
    std::fs::write(
        dir.path()
            .join("20261125T120006.000000Z-4242-000098.incomplete"),
        b"y",
    )
    .unwrap();
    let replay_dir = dir.path().to_str().unwrap();
    let how = ["--replay", replay_dir, "--speed", "2", "--loop", "2"];
    let (out, plan) = run_load(&[&how[..], &["--dry-run"]].concat());
    assert_eq!(out.status.code(), Some(0), "{plan}");
    assert_eq!(plan["transfers"], 42, "{plan}");
    assert_eq!(plan["skipped_unfinished"], 2, "{plan}");
    // One pass is 0.5 s at speed 2; the second starts one average gap
    // (0.5 s / 20) after the first one's last file.
    let expected = f64_of(&plan, &["expected_s"]);
    assert_close("planned", expected, 0.5 + 0.025 + 0.5, 1e-9);
    // A window: files 7 to 14 arrived between 0.1 and 0.5 s; the second
    // bound can be a file's name.
    let until = final_files(dir.path())[14].clone();
    let window = [
        "--replay", replay_dir, "--since", "100ms", "--until", &until,
    ];
    let (_, plan) = run_load(&[&window[..], &["--dry-run"]].concat());
    assert_eq!(plan["files"], 8, "{plan}");
    assert_eq!(plan["outside_window"], 13, "{plan}");
    assert_close(
        "window",
        f64_of(&plan, &["recorded_s"]),
        0.49 - 0.1225,
        1e-9,
    );

    let logs = tempfile::tempdir().unwrap();
    let hdr = logs.path().join("replay.hlog");
    let hdr = hdr.to_str().unwrap();
    let report = [
        "-i",
        "250ms",
        "--hdr-log",
        hdr,
        "--fail-if",
        "transfers_per_s>1",
    ];
    let (server_dir, out, json) = replay_to_fresh_server(&[&how[..], &report].concat());
    let hlog = std::fs::read_to_string(hdr).unwrap();
    assert!(hlog.contains(",HISTF"), "{hlog}");
    assert_eq!(json["transfers_ok"], 42, "{json}");
    assert_eq!(
        out.status.code(),
        Some(4),
        "--fail-if gates a replay: {json}"
    );
    assert_eq!(
        json["thresholds"].as_array().map(Vec::len),
        Some(1),
        "{json}"
    );
    assert!(
        json["intervals"].as_array().is_some_and(|i| i.len() >= 4),
        "{json}"
    );
    assert!(json["rate"]["offered"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["service_time_ms"].is_object(), "open loop: {json}");
    // What the dry run said is how long it took: the last upload cannot
    // start before its time, and its own transfer is small.
    let wall = f64_of(&json, &["wall_s"]);
    assert!(
        wall >= expected && wall <= expected * 1.2,
        "planned {expected} s, took {wall} s"
    );
    assert_close("arrivals", span_s(server_dir.path()), expected, 0.2);
    // Every file twice, and nothing that was skipped.
    let sent = contents(server_dir.path());
    let mut twice = contents(dir.path());
    twice.extend(contents(dir.path()));
    twice.retain(|c| c != b"x" && c != b"y");
    twice.sort();
    assert!(sent == twice, "the server holds each recorded file twice");
}

#[test]
fn bad_recordings_are_one_line_and_untimed_names_need_a_rate() {
    let fail = |args: &[&str]| {
        let out = Command::new(bin()).arg("load").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr)
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let (code, e) = fail(&["--replay", path]);
    assert_eq!(code, Some(1));
    assert!(
        e.contains("no finished upload") && e.lines().count() == 1,
        "{e}"
    );
    let missing = dir.path().join("missing");
    let (code, e) = fail(&["--replay", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        e.contains("cannot read it") && e.lines().count() == 1,
        "{e}"
    );

    std::fs::write(dir.path().join("b.txt"), b"second").unwrap();
    std::fs::write(dir.path().join("a.txt"), b"first").unwrap();
    let (code, e) = fail(&["--replay", path]);
    assert_eq!(code, Some(1));
    assert!(
        e.contains("carry no arrival time") && e.contains("--rate"),
        "{e}"
    );
    // With --rate: every file, in name order.
    let (server_dir, out, json) = replay_to_fresh_server(&["--replay", path, "--rate", "50"]);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["transfers_ok"], 2, "{json}");
    let stored: Vec<Vec<u8>> = final_files(server_dir.path())
        .iter()
        .map(|n| std::fs::read(server_dir.path().join(n)).unwrap())
        .collect();
    assert_eq!(
        stored,
        [b"first".to_vec(), b"second".to_vec()],
        "name order"
    );

    // Usage errors.
    for args in [
        &["--speed", "2"][..],
        &["--replay", path, "-n", "5"],
        &["--replay", path, "--rate", "5", "--speed", "2"],
        &["--replay", path, "--speed", "0"],
        &["--replay", path, "--since", "whenever"],
    ] {
        assert_eq!(fail(args).0, Some(2), "{args:?}");
    }
}
