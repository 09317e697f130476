//! A process killed mid-upload must never leave a truncated upload under a
//! final name. The upload's end is the client's half-close (a FIN), so a
//! process that dies must reset its connections instead (SO_LINGER 0 until
//! the exchange is over), and its peers must treat the reset as an abort.
//!
//! Each test kills one process (SIGKILL, by PID) at several points of an
//! 8 MiB upload and checks every directory: a final-named file holds the
//! whole upload or does not exist; partials are `.part` or `.incomplete`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const UPLOAD: usize = 8 << 20;
/// Where each upload is cut: early, half-way, nearly done.
const CUTS: [usize; 3] = [1 << 20, 4 << 20, (8 << 20) - (256 << 10)];

/// Every final-named file in `dir` is the whole upload; everything else
/// is a `.part` or `.incomplete` partial.
fn assert_only_whole_uploads_have_final_names(dir: &Path, data: &[u8], what: &str) {
    for name in file_names(dir) {
        if name.ends_with(".part") || name.ends_with(".incomplete") {
            continue;
        }
        let stored = std::fs::read(dir.join(&name)).unwrap();
        assert!(
            stored.len() == data.len() && stored == data,
            "{what}: final name {name} holds {} of {} bytes",
            stored.len(),
            data.len()
        );
    }
}

/// Sum of the sizes of the files in `dir` (how much a daemon has stored).
fn stored_bytes(dir: &Path) -> u64 {
    file_names(dir)
        .iter()
        .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn a_proxy_killed_mid_upload_leaves_no_final_file_at_the_server() {
    for (i, cut) in CUTS.into_iter().enumerate() {
        let dirs = tempfile::tempdir().unwrap();
        let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
        let server = spawn_server(&recv, &[]);
        let proxy = spawn_proxy(server.addr, &spool, &[]);
        let data = random_bytes(UPLOAD, 80 + i as u64);
        let mut sock = TcpStream::connect(proxy.addr).unwrap();
        sock.write_all(&data[..cut]).unwrap();
        wait_until("the server has started storing", || stored_bytes(&recv) > 0);
        drop(proxy); // SIGKILL
                     // The server sees a reset and removes its partial. (Were it a FIN,
                     // the partial would be renamed to a final name instead.)
        wait_until("the server has let go of the partial", || {
            file_names(&recv).iter().all(|n| !n.ends_with(".part"))
        });
        assert_only_whole_uploads_have_final_names(&recv, &data, "server");
        assert_only_whole_uploads_have_final_names(&spool, &data, "proxy");
        assert!(
            final_files(&recv).is_empty(),
            "cut at {cut}: the server stored {:?}",
            final_files(&recv)
        );
        drop(sock);
    }
}

#[test]
fn a_client_killed_mid_upload_leaves_no_final_file_anywhere() {
    for (i, cut) in CUTS.into_iter().enumerate() {
        let dirs = tempfile::tempdir().unwrap();
        let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
        let server = spawn_server(&recv, &[]);
        let proxy = spawn_proxy(server.addr, &spool, &[]);
        let data = random_bytes(UPLOAD, 90 + i as u64);
        // `stopover client -` reads the upload from a pipe we hold, so it
        // is still sending when it dies.
        let mut client = Command::new(bin())
            .args([
                "client",
                "--no-progress",
                "--to",
                &proxy.addr.to_string(),
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = client.stdin.take().unwrap();
        stdin.write_all(&data[..cut]).unwrap();
        wait_until("the proxy has most of what was written", || {
            stored_bytes(&spool) >= (cut as u64) / 2
        });
        client.kill().unwrap();
        client.wait().unwrap();
        drop(stdin);
        proxy.wait_for_log("aborted its upload");
        wait_until("the server has let go of the partial", || {
            file_names(&recv).iter().all(|n| !n.ends_with(".part"))
        });
        // The proxy names its partial once its last disk writes have landed.
        wait_until("the proxy has kept its partial", || {
            file_names(&spool).iter().all(|n| !n.ends_with(".part"))
        });
        assert_only_whole_uploads_have_final_names(&recv, &data, "server");
        assert_only_whole_uploads_have_final_names(&spool, &data, "proxy");
        assert!(final_files(&recv).is_empty() && final_files(&spool).is_empty());
        let kept = file_names(&spool);
        assert!(
            kept.len() == 1 && kept[0].ends_with(".incomplete"),
            "cut at {cut}: the proxy keeps the partial as .incomplete: {kept:?}"
        );
    }
}

#[test]
fn a_server_killed_mid_upload_leaves_only_its_partial_and_the_proxy_keeps_the_whole() {
    for (i, cut) in CUTS.into_iter().enumerate() {
        let dirs = tempfile::tempdir().unwrap();
        let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
        let server = spawn_server(&recv, &[]);
        let proxy = spawn_proxy(server.addr, &spool, &[]);
        let data = random_bytes(UPLOAD, 100 + i as u64);
        let mut sock = TcpStream::connect(proxy.addr).unwrap();
        sock.write_all(&data[..cut]).unwrap();
        wait_until("the server has started storing", || stored_bytes(&recv) > 0);
        drop(server); // SIGKILL
        sock.write_all(&data[cut..]).unwrap();
        sock.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        sock.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("ERR upstream unavailable"),
            "cut at {cut}: {answer}"
        );
        assert!(
            final_files(&recv).is_empty(),
            "a killed server renames nothing"
        );
        assert_only_whole_uploads_have_final_names(&spool, &data, "proxy");
        assert_eq!(
            final_files(&spool).len(),
            1,
            "the proxy kept the whole upload"
        );
    }
}
