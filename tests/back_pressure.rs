//! A slow upstream must slow the client down, not grow the proxy's memory.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use stopover::client::Verdict;

#[test]
fn slow_upstream_reading_in_small_sips_bounds_proxy_memory_and_completes() {
    const SIZE: usize = 48 * 1024 * 1024;
    let data = Arc::new(random_bytes(SIZE, 11));
    let upstream = TcpListener::bind(loopback0()).unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    {
        let received = received.clone();
        let data = data.clone();
        std::thread::spawn(move || {
            let (mut sock, _) = upstream.accept().unwrap();
            let mut sip = [0u8; 16 * 1024];
            let mut got = Vec::with_capacity(SIZE);
            loop {
                let n = sock.read(&mut sip).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&sip[..n]);
                received.fetch_add(n as u64, Ordering::SeqCst);
                // Pacing the fake peer (this is what makes it slow), not
                // synchronisation: about 16 MB/s at most.
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(got == *data, "upstream received different bytes");
            answer_and_close(&mut sock, &ok_line(&got, "slow"));
            done_tx.send(()).unwrap();
        });
    }
    let spool = tempfile::tempdir().unwrap();
    let proxy = spawn_proxy(up_addr, spool.path(), &[]);
    let baseline = proxy.rss_kib();
    let to = proxy.addr;
    let sender = {
        let data = data.clone();
        std::thread::spawn(move || send(to, &data))
    };

    // While the transfer runs: sample the proxy's RSS and how far the spool
    // is ahead of what the upstream took.
    let mut peak_rss = baseline;
    let mut peak_lag = 0u64;
    while done_rx.try_recv().is_err() {
        peak_rss = peak_rss.max(proxy.rss_kib());
        let spooled: u64 = std::fs::read_dir(spool.path())
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        peak_lag = peak_lag.max(spooled.saturating_sub(received.load(Ordering::SeqCst)));
        assert!(!sender.is_finished() || received.load(Ordering::SeqCst) == SIZE as u64);
        std::thread::sleep(Duration::from_millis(20)); // sampling interval
    }
    let receipt = sender.join().unwrap().expect("transfer completes");
    assert_eq!(receipt.verdict(), Verdict::Verified, "{}", receipt.line);
    eprintln!(
        "proxy RSS baseline {baseline} KiB, peak {peak_rss} KiB; peak spool lag {peak_lag} bytes"
    );
    assert!(
        peak_rss < baseline + 8 * 1024,
        "proxy RSS grew from {baseline} KiB to {peak_rss} KiB while relaying to a slow upstream"
    );
    // The spool may run ahead of the upstream by the proxy's lag limit plus
    // what the kernel's socket buffers hold, never by most of the file.
    assert!(
        peak_lag < (SIZE / 3) as u64,
        "spool ran {peak_lag} bytes ahead of the upstream: no back-pressure on the client"
    );
}
