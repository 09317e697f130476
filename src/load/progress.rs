//! While the client threads run, the main thread watches: a progress bar
//! (on a terminal), and the `-i` interval lines closed on time even when no
//! transfer finishes to close them.

use std::io::{self, IsTerminal};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::record::Recorder;
use super::LoadConfig;

/// Until every client thread is done: shows a progress bar (terminal
/// only) and closes the intervals that end, so their lines appear on time
/// even when no transfer finishes.
pub(super) fn watch_progress(
    config: &LoadConfig,
    finished: &AtomicU64,
    running: &AtomicUsize,
    total: Option<u64>,
    recorder: &Mutex<Recorder>,
) {
    let show = config.progress && io::stderr().is_terminal();
    let bar = show.then(|| {
        crate::human::progress_bar(
            total,
            "{bar:40} {pos}/{len} transfers, {per_sec}, {elapsed}",
        )
    });
    while running.load(Ordering::SeqCst) > 0 {
        if let Some(bar) = &bar {
            bar.set_position(finished.load(Ordering::Relaxed));
        }
        recorder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .roll(Instant::now());
        // The main thread has nothing else to do; 50 ms keeps the bar and
        // the interval lines lively and costs nothing.
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
