//! Retention on both daemons (`--retain-bytes`, `--retain-for`,
//! `--min-free`): the recordings stay within their budget, the oldest go
//! first, files from earlier runs count, and uploads in progress or held
//! are never deleted. Real processes on loopback; every wait is bounded
//! and on a condition.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;
use stopover::answer::Answer;
use stopover::client::{Receipt, Verdict};

const KIB: usize = 1024;

/// A file name as the store makes them, for an upload that arrived at `t`.
fn name_at(t: SystemTime, seq: u32) -> String {
    let stamp: String = humantime::format_rfc3339_micros(t)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    format!("{stamp}-4242-{seq:06}")
}

/// `n` recordings of `len` bytes, named as if they had arrived one second
/// apart, ending `ago` ago; returns their names, oldest first.
fn plant(dir: &Path, n: u32, len: usize, ago: Duration) -> Vec<String> {
    let last = SystemTime::now() - ago;
    (0..n)
        .map(|i| {
            let name = name_at(last - Duration::from_secs(u64::from(n - 1 - i)), i);
            fs::write(dir.join(&name), vec![b'x'; len]).unwrap();
            name
        })
        .collect()
}

/// Finished and `.incomplete` files in `dir`: (names, total bytes).
fn recordings(dir: &Path) -> (Vec<String>, u64) {
    let names: Vec<String> = file_names(dir)
        .into_iter()
        .filter(|n| !n.ends_with(".part") && stopover::retention::parse_name(n).is_some())
        .collect();
    // (A file may be deleted between the listing and its size.)
    let bytes = names
        .iter()
        .filter_map(|n| fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum();
    (names, bytes)
}

/// The name the server stored a verified upload under.
fn stored(receipt: Receipt) -> String {
    assert_eq!(receipt.verdict(), Verdict::Verified, "{}", receipt.line);
    match receipt.answer {
        Answer::Ok { file, .. } => file,
        Answer::Err(e) => panic!("ERR {e}"),
    }
}

fn stats_flags() -> [&'static str; 2] {
    ["--stats-addr", "127.0.0.1:0"]
}

#[test]
fn both_daemons_keep_at_most_the_byte_budget() {
    let (server_dir, proxy_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let flags = ["--retain-bytes", "64KiB", "--stats-addr", "127.0.0.1:0"];
    let server = spawn_server(server_dir.path(), &flags);
    let proxy = spawn_proxy(server.addr, proxy_dir.path(), &flags);
    // 64 uploads of 8 KiB from 4 clients at once: 512 KiB, 8 times the budget.
    let clients: Vec<_> = (0..4u64)
        .map(|c| {
            let to = proxy.addr;
            std::thread::spawn(move || {
                for i in 0..16u64 {
                    let data = random_bytes(8 * KIB, c * 100 + i);
                    let receipt = send(to, &data).expect("upload relayed");
                    assert_eq!(receipt.verdict(), Verdict::Verified);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    for (daemon, dir) in [(&server, server_dir.path()), (&proxy, proxy_dir.path())] {
        // Each deletion happens only while the total is over 64 KiB, so
        // at rest exactly 8 files of 8 KiB remain.
        wait_until("the recordings are within --retain-bytes", || {
            recordings(dir).1 <= 64 * KIB as u64
        });
        let (names, bytes) = recordings(dir);
        assert_eq!((names.len(), bytes), (8, 64 * KIB as u64), "{names:?}");
        let metrics = scrape(stats_addr(daemon));
        assert_eq!(sample(&metrics, "stopover_recordings_files"), 8.0);
        assert_eq!(sample(&metrics, "stopover_recordings_bytes"), 65536.0);
        assert_eq!(sample(&metrics, "stopover_recordings_deleted_total"), 56.0);
        assert_eq!(
            sample(&metrics, "stopover_recordings_deleted_bytes_total"),
            (56 * 8 * KIB) as f64
        );
    }
}

#[test]
fn startup_scan_counts_existing_files_and_enforces_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let planted = plant(dir.path(), 10, 16 * KIB, Duration::from_secs(60));
    let mut flags = vec!["--retain-bytes", "64KiB"];
    flags.extend(stats_flags());
    let server = spawn_server(dir.path(), &flags);
    wait_until("the oldest 6 are deleted", || {
        recordings(dir.path()).0.len() == 4
    });
    assert_eq!(
        recordings(dir.path()).0,
        planted[6..],
        "the newest 4 are kept"
    );
    let metrics = scrape(stats_addr(&server));
    assert_eq!(sample(&metrics, "stopover_recordings_files"), 4.0);
    assert_eq!(sample(&metrics, "stopover_recordings_deleted_total"), 6.0);
    // A new upload is the newest: the oldest of the four makes room.
    let file = stored(send(server.addr, &random_bytes(16 * KIB, 1)).unwrap());
    wait_until("the oldest planted file is deleted", || {
        !dir.path().join(&planted[6]).exists()
    });
    let mut expected = planted[7..].to_vec();
    expected.push(file);
    assert_eq!(recordings(dir.path()).0, expected);
}

#[test]
fn retain_for_deletes_older_recordings_on_both_daemons() {
    let (server_dir, proxy_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let day = Duration::from_secs(24 * 3600);
    for dir in [server_dir.path(), proxy_dir.path()] {
        let old = plant(dir, 3, KIB, 3 * day);
        let old_time = SystemTime::now() - 2 * day;
        fs::write(
            dir.join(format!("{}.incomplete", name_at(old_time, 90))),
            b"part of it",
        )
        .unwrap();
        fs::write(
            dir.join(format!("{}.part", name_at(old_time, 91))),
            b"a crash",
        )
        .unwrap();
        fs::write(dir.join("notes.txt"), b"not ours").unwrap();
        assert_eq!(old.len(), 3);
    }
    let server = spawn_server(server_dir.path(), &["--retain-for", "1h"]);
    let _proxy = spawn_proxy(server.addr, proxy_dir.path(), &["--retain-for", "1h"]);
    for dir in [server_dir.path(), proxy_dir.path()] {
        let fresh = plant(dir, 2, KIB, Duration::ZERO);
        wait_until("old recordings are deleted", || recordings(dir).0 == fresh);
        let left = file_names(dir);
        assert!(
            left.iter().any(|n| n.ends_with(".part")),
            "a leftover .part is never deleted: {left:?}"
        );
        assert!(
            left.contains(&"notes.txt".to_string()),
            "a file not ours is never deleted: {left:?}"
        );
    }
}

#[test]
fn an_upload_in_progress_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--retain-bytes", "40KiB"]);
    let big = random_bytes(32 * KIB, 7);
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    slow.write_all(&big).unwrap();
    wait_until("its .part exists", || {
        file_names(dir.path()).iter().any(|n| n.ends_with(".part"))
    });
    let small: Vec<String> = (0..6)
        .map(|i| stored(send(server.addr, &random_bytes(8 * KIB, i)).unwrap()))
        .collect();
    wait_until("five 8 KiB files remain", || {
        recordings(dir.path()).0 == small[1..]
    });
    assert!(
        file_names(dir.path()).iter().any(|n| n.ends_with(".part")),
        "the upload in progress is still there"
    );
    // Finished, the 32 KiB upload is a recording, and the oldest: its name
    // says when it arrived, before all the others. So it goes first.
    slow.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    let file = answer
        .trim_end()
        .rsplit_once("file=")
        .map(|(_, f)| f.to_string())
        .unwrap_or_else(|| panic!("an OK answer: {answer:?}"));
    assert!(file < small[0], "{file} arrived first");
    wait_until("the finished upload is deleted", || {
        !dir.path().join(&file).exists()
    });
    assert_eq!(
        recordings(dir.path()),
        (small[1..].to_vec(), 40 * KIB as u64)
    );
}

#[test]
fn a_held_upload_is_never_deleted() {
    let (server_dir, proxy_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let planted = plant(proxy_dir.path(), 2, 8 * KIB, Duration::from_secs(60));
    let server = spawn_server(server_dir.path(), &[]);
    let mut flags = vec!["--hold", "1h", "--retain-bytes", "16KiB"];
    flags.extend(stats_flags());
    let proxy = spawn_proxy(server.addr, proxy_dir.path(), &flags);
    let to = proxy.addr;
    // The client waits for its answer; it gets none until the proxy goes.
    let client = std::thread::spawn(move || send(to, &random_bytes(32 * KIB, 3)));
    let line = proxy.wait_for_log("holding ");
    let held = PathBuf::from(
        line.split("holding ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap(),
    );
    // 16 KiB planted + 32 KiB held: over the budget. The planted files go;
    // the held one, alone over the budget, stays.
    wait_until("the planted files are deleted", || {
        planted.iter().all(|n| !proxy_dir.path().join(n).exists())
    });
    assert_eq!(
        fs::metadata(&held).map(|m| m.len()).ok(),
        Some(32 * KIB as u64)
    );
    let metrics = scrape(stats_addr(&proxy));
    assert_eq!(
        sample(&metrics, "stopover_recordings_files"),
        1.0,
        "held files are counted"
    );
    assert_eq!(sample(&metrics, "stopover_recordings_bytes"), 32768.0);
    drop(proxy);
    assert!(
        client.join().unwrap().is_err(),
        "no answer: the proxy was killed"
    );
    assert!(held.exists());
}

/// A tmpfs of `size`, mounted for one test and unmounted after it.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (and why, printed) where this process cannot mount.
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }

    fn free(&self) -> u64 {
        let dir = fs::File::open(&self.0).unwrap();
        stopover::sys::fs_space(&dir).unwrap().0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn min_free_deletes_the_oldest_until_space_returns() {
    let base = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(base.path(), "4m") else {
        return;
    };
    let dir = base.path().join("received");
    fs::create_dir(&dir).unwrap();
    // 3 MiB of recordings on a 4 MiB filesystem; 50% free wanted.
    let planted = plant(&dir, 24, 128 * KIB, Duration::from_secs(60));
    assert!(fs.free() < 2 << 20);
    let mut flags = vec!["--min-free", "50%"];
    flags.extend(stats_flags());
    let server = spawn_server(&dir, &flags);
    wait_until("2 MiB are free", || fs.free() >= 2 << 20);
    let (left, _) = recordings(&dir);
    assert!(
        left.len() >= 14,
        "only what the shortfall needs is deleted: {} left",
        left.len()
    );
    assert_eq!(
        left,
        planted[planted.len() - left.len()..],
        "the oldest went first"
    );
    // Someone else fills the disk: the keeper looks again within a second.
    fs::write(dir.join("ballast"), vec![0u8; 1 << 20]).unwrap();
    assert!(fs.free() < 2 << 20);
    wait_until("2 MiB are free again", || fs.free() >= 2 << 20);
    let (now_left, _) = recordings(&dir);
    assert!(
        now_left.len() < left.len() && !now_left.is_empty(),
        "{now_left:?}"
    );
    assert_eq!(now_left, planted[planted.len() - now_left.len()..]);
    assert!(
        dir.join("ballast").exists(),
        "a file not ours is never deleted"
    );
    let metrics = scrape(stats_addr(&server));
    assert!(sample(&metrics, "stopover_filesystem_free_bytes") >= (2 << 20) as f64);
    drop(server);
}

#[test]
fn bad_retention_values_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("--retain-bytes", "lots", "try e.g. 64KiB"),
        ("--retain-bytes", "0", "is zero"),
        ("--retain-files", "0", "not in 1.."),
        ("--retain-for", "0s", "is zero"),
        ("--retain-for", "forever", "try e.g. 30s"),
        (
            "--retain-for",
            "11000days",
            "longer than the longest allowed",
        ),
        ("--min-free", "150%", "above 0 and below 100"),
        ("--min-free", "0", "keeps nothing free"),
        ("--min-free", "half", "try e.g. 64KiB"),
    ];
    for role in ["server", "proxy"] {
        for (flag, value, why) in cases {
            let mut child = Command::new(bin())
                .args([role, "--listen", "127.0.0.1:0", "--dir"])
                .arg(dir.path())
                .args([flag, value])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // Bounded: a value wrongly accepted starts a daemon, which
            // must fail the test, not hang it.
            let deadline = std::time::Instant::now() + PATIENCE;
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{role} {flag} {value} was accepted: the daemon started");
                }
                std::thread::sleep(Duration::from_millis(10)); // polling a condition
            };
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert_eq!(status.code(), Some(2), "{role} {flag} {value}: {err}");
            assert!(
                err.contains(flag) && err.contains(why),
                "{role} {flag} {value}: {err}"
            );
        }
    }
}

#[test]
fn retain_files_keeps_a_ring_of_the_newest_n() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &["--retain-files", "3"]);
    let stored: Vec<String> = (0..8)
        .map(|i| stored(send(server.addr, &random_bytes(KIB, i)).unwrap()))
        .collect();
    wait_until("three files remain", || recordings(dir.path()).0.len() == 3);
    assert_eq!(recordings(dir.path()).0, stored[5..], "the newest three");
}
