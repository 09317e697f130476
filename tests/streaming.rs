//! Streaming under load, for real: forwarding overlaps the client's reads,
//! and what the proxy records stays out of the page cache (issue 12).

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::*;

/// Runs `stopover load` against `to`: `clients` clients, `n` transfers of
/// 1 MiB, every one verified.
fn load_1mib(to: std::net::SocketAddr, clients: usize, n: usize) {
    let out = Command::new(bin())
        .args(["load", "--no-progress", "-q", "-s", "1MiB"])
        .args(["--to", &to.to_string()])
        .args(["-c", &clients.to_string(), "-n", &n.to_string()])
        .output()
        .expect("run stopover load");
    assert!(
        out.status.success(),
        "every transfer verified: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// What the trace says about one transfer.
#[derive(Default)]
struct Seen {
    /// Upload bytes read from the client so far.
    read: u64,
    /// Upload bytes read from the client before the first upstream write.
    read_before_forwarding: Option<u64>,
    forwarded: u64,
}

#[test]
fn under_load_the_proxy_forwards_while_it_reads() {
    const CLIENTS: usize = 20;
    const TRANSFERS: usize = 60;
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(server.addr, &dirs.path().join("s"), &["-vv"]);
    load_1mib(proxy.addr, CLIENTS, TRANSFERS);
    wait_until("every transfer is closed", || {
        let lines = proxy.log_lines();
        lines
            .iter()
            .filter(|l| l.contains("closed (Relayed)"))
            .count()
            == TRANSFERS
    });
    // Follow each transfer through the trace. Slab keys are reused, so a
    // transfer is everything between its key's accept and its close.
    let mut open: HashMap<String, Seen> = HashMap::new();
    let mut done: Vec<Seen> = Vec::new();
    for line in proxy.log_lines() {
        let Some(at) = line.find('#') else { continue };
        let mut words = line[at..].split_whitespace();
        let key = words.next().unwrap_or_default().to_string();
        let rest: Vec<&str> = words.collect();
        if line.contains("proxy: accept ") {
            let key = line
                .rsplit("-> ")
                .next()
                .unwrap()
                .split(',')
                .next()
                .unwrap();
            open.insert(key.trim().to_string(), Seen::default());
            continue;
        }
        let Some(seen) = open.get_mut(&key) else {
            continue;
        };
        match rest.as_slice() {
            ["client", "read", n] => {
                if let Ok(n) = n.parse::<u64>() {
                    seen.read += n;
                }
            }
            ["upstream", "write", n] => {
                // Not `write WouldBlock`: an upstream that was full for a moment.
                if let Ok(n) = n.parse::<u64>() {
                    seen.read_before_forwarding.get_or_insert(seen.read);
                    seen.forwarded += n;
                }
            }
            ["closed", ..] => done.push(open.remove(&key).unwrap()),
            _ => {}
        }
    }
    assert_eq!(done.len(), TRANSFERS, "every transfer was followed");
    // Streaming: the first upstream write came before the client's upload
    // was all read (store-and-forward would read 1 MiB first, then send).
    let streamed = done
        .iter()
        .filter(|s| s.read_before_forwarding.is_some_and(|r| r < s.read))
        .count();
    let first_sends: Vec<u64> = done
        .iter()
        .filter_map(|s| s.read_before_forwarding)
        .collect();
    eprintln!(
        "{streamed} of {TRANSFERS} transfers forwarded while reading; bytes read before the first upstream write: max {:?}",
        first_sends.iter().max()
    );
    assert!(done
        .iter()
        .all(|s| s.read == 1 << 20 && s.forwarded == 1 << 20));
    assert!(
        streamed * 10 >= TRANSFERS * 9,
        "only {streamed} of {TRANSFERS} transfers forwarded while still reading"
    );
}

#[test]
fn what_the_proxy_records_stays_out_of_the_page_cache() {
    const TRANSFERS: usize = 40;
    let dirs = tempfile::tempdir().unwrap();
    let (recv, spool) = (dirs.path().join("r"), dirs.path().join("s"));
    let server = spawn_server(&recv, &[]);
    let proxy = spawn_proxy(server.addr, &spool, &[]);
    load_1mib(proxy.addr, 8, TRANSFERS);
    let in_cache = |dir: &std::path::Path| -> (u64, u64) {
        final_files(dir)
            .iter()
            .fold((0, 0), |(cached, total), name| {
                let path = dir.join(name);
                let len = std::fs::metadata(&path).unwrap().len();
                (cached + cached_bytes(&path), total + len)
            })
    };
    let (spool_cached, spool_total) = in_cache(&spool);
    let (recv_cached, recv_total) = in_cache(&recv);
    eprintln!(
        "page cache: proxy spool {spool_cached} of {spool_total} bytes, server {recv_cached} of {recv_total}"
    );
    assert_eq!(
        spool_total,
        (TRANSFERS << 20) as u64,
        "every upload recorded"
    );
    // The measure works: the server writes through the page cache, and its
    // files are (mostly) there.
    assert!(
        recv_cached * 2 > recv_total,
        "the server's files should be in the page cache"
    );
    // The proxy's are not, but for the few pages written the ordinary way.
    assert!(
        spool_cached * 10 < spool_total,
        "the proxy's spool holds {spool_cached} of {spool_total} bytes in the page cache"
    );
}
