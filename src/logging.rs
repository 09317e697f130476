//! Our logger: a log line can be lost, counted, but it can never stop,
//! stall or kill a daemon.
//!
//! ```text
//!   any thread (the loop)                       the writer thread
//!   log::info!(..)                              (outside every loop)
//!     format the line here  ──push──>  [ queue, at most MAX_QUEUED bytes ]
//!     full: drop it, count it                     │ take everything queued
//!                                                 v
//!                                       write(2) to stderr: may block (a
//!                                       pipe nobody reads), may fail (EPIPE,
//!                                       ENOSPC): lines lost are counted
//! ```
//!
//! Why not write to stderr where the line is logged, as most loggers do:
//! stderr is a device or a peer like any other. A pipe whose reader is slow
//! or gone, or a file on a full disk, makes that write block or fail. A
//! blocked write on the loop thread stalls every connection (the loop never
//! waits: see `event_loop`), and a failed one inside `eprintln!` panics,
//! which with `panic = "abort"` kills the daemon. Found the hard way: with
//! `stopover server 2>&1 | head -1`, the second log line met the closed
//! pipe and the server died between storing an upload and answering it, so
//! the client's retry stored it twice.
//!
//! So the calling thread only formats its line and pushes it into a bounded
//! queue (a short lock, never a wait for the device); one writer thread,
//! which belongs to no loop, does the writing and is the only one that can
//! block. What cannot be queued or written is counted in [`dropped`], which
//! both daemons expose as `stopover_log_lines_dropped_total`, and said in
//! the log itself where that can still be read: when lines had to be
//! dropped and writing resumes, one line `N log lines dropped (...)` marks
//! the gap, where the lines were lost. A pipe whose reader has exited
//! (`EPIPE`) never comes back: from then on lines are counted without even
//! being formatted.
//!
//! SIGPIPE: a write to a pipe with no reader raises it, and its default
//! action ends the process. The Rust runtime sets it to "ignore" before
//! `main` (the write then fails with `EPIPE`), and nothing here changes
//! that; `tests/logging.rs` checks it on a running daemon.
//!
//! At exit, [`flush`] waits (bounded by [`EXIT_FLUSH`]) for what is queued,
//! so the final summary lines reach a working stderr; a blocked one cannot
//! hold the exit.
//!
//! The format is one line per record, for people first:
//!
//! ```text
//! 2026-12-02T01:02:03.456Z INFO  server: stored ... crc32c=8a9136aa         (default)
//! 2026-12-02T01:02:03.456Z DEBUG [stopover::server] server: accepted ...   (-v, -vv)
//! ```
//!
//! Every line names the role that logged it (`server: `, `proxy: `, ...):
//! call sites that know their role say it, and this logger adds it to those
//! that cannot know it (the store, the disk) so a user never has to guess.
//! Module paths are for developers, so they appear only at `-v` and above.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The most bytes of log lines waiting for the writer. About 2,500 lines of
/// `-vv` trace: enough for any burst a terminal or a file absorbs at once;
/// past it, stderr is not keeping up and lines are dropped rather than
/// memory grown. (Costs nothing until lines actually wait.)
pub const MAX_QUEUED: usize = 256 * 1024;

/// How long the writer lets lines gather after writing a batch. Without
/// it, a daemon logging a line per transfer at thousands of transfers a
/// second woke the writer for every line: a `futex` call on the loop's
/// thread and a context switch and a `write` on the writer's, per line
/// (7% of the proxy's CPU under `perf` with 1 KiB transfers). With it,
/// at most one wake-up and one `write` per 10 ms, and a line reaches
/// stderr at most that much later. (The queue holds 10 ms of even `-vv`
/// tracing many times over.)
const GATHER: Duration = Duration::from_millis(10);

/// How long [`flush`] waits for queued lines at exit.
pub const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// The queue between the logging threads and the writer, once installed.
static QUEUE: OnceLock<Queue> = OnceLock::new();

/// Log lines lost so far (for `stopover_log_lines_dropped_total`).
pub fn dropped() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
}

/// How a line looks: which role it names, and whether it shows the module.
#[derive(Debug, Clone, Copy)]
struct Format {
    role: &'static str,
    modules: bool,
}

impl Format {
    /// One record as one line, newline included. Line breaks inside the
    /// message (an error chain, a peer's text) are folded: one record is
    /// one line, so lines can be counted and grepped.
    fn line(&self, level: Level, target: &str, args: &fmt::Arguments) -> String {
        use fmt::Write as _;
        let mut line = String::with_capacity(128);
        let now = humantime::format_rfc3339_millis(SystemTime::now());
        let _ = write!(line, "{now} {level:<5} ");
        if self.modules {
            let _ = write!(line, "[{target}] ");
        }
        let start = line.len();
        let _ = write!(line, "{args}");
        if line[start..].contains(['\n', '\r']) {
            let folded = line[start..].replace(['\n', '\r'], " ");
            line.replace_range(start.., &folded);
        }
        if !self.role.is_empty() && !names_a_role(&line[start..]) {
            line.insert_str(start, &format!("{}: ", self.role));
        }
        line.push('\n');
        line
    }

    /// The line that marks a gap of `n` lost lines.
    fn gap(&self, n: u64, why: &str) -> String {
        let s = if n == 1 { "" } else { "s" };
        self.line(
            Level::Warn,
            module_path!(),
            &format_args!("{n} log line{s} dropped ({why})"),
        )
    }
}

/// The roles a line may name. The load generator's clients log as
/// `client:`, which is what they are, so a line that names any role keeps
/// it.
const ROLES: [&str; 4] = ["server", "proxy", "client", "load"];

/// True if `message` starts with `<role>:` for one of [`ROLES`].
fn names_a_role(message: &str) -> bool {
    ROLES.iter().any(|role| {
        message
            .strip_prefix(role)
            .is_some_and(|rest| rest.starts_with(':'))
    })
}

/// The lines waiting for the writer.
struct Queue {
    pending: Mutex<Pending>,
    /// Signalled when a line is queued (the writer waits on it).
    queued: Condvar,
    /// Signalled when the writer has nothing left (flush waits on it).
    idle: Condvar,
    format: Format,
    /// Lines lost so far: refused by a full queue, or not written because
    /// stderr failed.
    dropped: AtomicU64,
    /// Set once stderr is gone for good (its pipe's reader has exited).
    dead: AtomicBool,
}

#[derive(Default)]
struct Pending {
    text: String,
    /// Lines refused (queue full) since the last line queued.
    refused: u64,
    /// The writer holds a batch it has not finished writing.
    busy: bool,
    /// The writer is waiting for a line (only then does a push wake it).
    waiting: bool,
}

impl Queue {
    fn new(format: Format) -> Queue {
        Queue {
            pending: Mutex::new(Pending::default()),
            queued: Condvar::new(),
            idle: Condvar::new(),
            format,
            dropped: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock aborts the process (panic =
        // "abort"), so a poisoned lock can only be seen by tests.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `line`, or drops and counts it when the queue is full.
    fn push(&self, line: &str) {
        let mut pending = self.lock();
        if pending.text.len() + line.len() > MAX_QUEUED {
            pending.refused += 1;
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if pending.refused > 0 {
            // The gap is marked where it is, before the first line after it.
            let gap = self.format.gap(pending.refused, "stderr too slow");
            pending.text.push_str(&gap);
            pending.refused = 0;
        }
        pending.text.push_str(line);
        // Wake the writer only if it waits: a notify is a system call
        // (`futex`) on the logging thread, which is the loop.
        let wake = std::mem::take(&mut pending.waiting);
        drop(pending);
        if wake {
            self.queued.notify_one();
        }
    }

    /// The writer thread: takes everything queued, writes it, repeats.
    fn write_forever(&self, out: &mut dyn Write) {
        let mut batch = String::new();
        // Lines that stderr refused since the last successful write.
        let mut failed = 0u64;
        // The last write stopped in the middle of a line.
        let mut mid_line = false;
        loop {
            {
                let mut pending = self.lock();
                pending.busy = false;
                while pending.text.is_empty() {
                    self.idle.notify_all();
                    pending.waiting = true;
                    pending = self.queued.wait(pending).unwrap_or_else(|p| p.into_inner());
                    pending.waiting = false;
                }
                batch.clear();
                std::mem::swap(&mut pending.text, &mut batch);
                pending.busy = true;
            }
            if self.dead.load(Ordering::Relaxed) {
                self.dropped
                    .fetch_add(count_lines(batch.as_bytes()), Ordering::Relaxed);
                continue;
            }
            // A gap left by failed writes is marked before what follows it.
            let mut head = String::new();
            if mid_line {
                head.push('\n');
            }
            if failed > 0 {
                head.push_str(&self.format.gap(failed, "stderr failed"));
            }
            let (written, error) = write_out(out, head.as_bytes(), batch.as_bytes());
            let head_len = head.len();
            if written >= head_len {
                failed = 0;
                mid_line = false;
            }
            if let Some(e) = error {
                let lost = count_lines(&batch.as_bytes()[written.saturating_sub(head_len)..]);
                failed += lost;
                self.dropped.fetch_add(lost, Ordering::Relaxed);
                let all = head_len + batch.len();
                mid_line = written > 0 && written < all && !ends_line(&head, &batch, written);
                if gone_for_good(&e) {
                    self.dead.store(true, Ordering::Relaxed);
                }
            }
            // Let lines gather before the next batch (see GATHER).
            std::thread::sleep(GATHER);
        }
    }
}

/// Writes `head` then `body` to `out`; returns the bytes written in all and
/// the error that stopped it, if any.
fn write_out(out: &mut dyn Write, head: &[u8], body: &[u8]) -> (usize, Option<io::Error>) {
    let mut written = 0;
    for part in [head, body] {
        let mut at = 0;
        while at < part.len() {
            match out.write(&part[at..]) {
                Ok(0) => return (written, Some(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    at += n;
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (written, Some(e)),
            }
        }
    }
    (written, None)
}

/// True if the byte before offset `written` of `head` + `body` is a newline.
fn ends_line(head: &str, body: &str, written: usize) -> bool {
    let all = head.as_bytes().iter().chain(body.as_bytes());
    all.take(written).last() == Some(&b'\n')
}

/// Lines in `text`; a line cut short counts as a whole one.
fn count_lines(text: &[u8]) -> u64 {
    let full = text.iter().filter(|&&b| b == b'\n').count() as u64;
    full + u64::from(!text.is_empty() && !text.ends_with(b"\n"))
}

/// Errors after which stderr never works again: the pipe's reader exited.
fn gone_for_good(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe || e.raw_os_error() == Some(libc::EBADF)
}

/// The `log` facade's end of it.
struct Logger {
    level: LevelFilter,
    queue: &'static Queue,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // Other crates (mio traces its own registrations) at info at most:
        // our trace says the same in our terms.
        metadata.level() <= self.level
            && (metadata.target().starts_with("stopover") || metadata.level() <= Level::Info)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if self.queue.dead.load(Ordering::Relaxed) {
            self.queue.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let line = self
            .queue
            .format
            .line(record.level(), record.target(), record.args());
        self.queue.push(&line);
    }

    fn flush(&self) {
        flush(EXIT_FLUSH);
    }
}

/// Installs the logger: lines at `level` and above, each naming `role`
/// (empty: none added), with module paths from debug on.
///
/// Logging is a convenience: if it cannot be set up (a logger is already
/// installed, no thread can be started), the process runs without it.
pub fn init(level: LevelFilter, role: &'static str) {
    let format = Format {
        role,
        modules: level >= LevelFilter::Debug,
    };
    if QUEUE.get().is_some() {
        return;
    }
    let queue = QUEUE.get_or_init(|| Queue::new(format));
    let writer = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || queue.write_forever(&mut io::stderr()));
    if let Err(e) = writer {
        // No writer, no logging; say so once, directly (nothing else has
        // been written yet, and this is startup, not the loop).
        let _ = writeln!(io::stderr(), "stopover: logging disabled: {e}");
        return;
    }
    // Installed once per process, for the rest of it.
    let logger: &'static Logger = Box::leak(Box::new(Logger { level, queue }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// A message for the user that is not a log record (the one-line error
/// `main` prints before exiting): the same non-blocking path as every log
/// line when the logger runs, a direct write otherwise. Never panics.
pub fn message(text: &str) {
    match QUEUE.get() {
        Some(queue) if !queue.dead.load(Ordering::Relaxed) => queue.push(&format!("{text}\n")),
        Some(queue) => {
            queue.dropped.fetch_add(1, Ordering::Relaxed);
        }
        None => {
            let _ = writeln!(io::stderr(), "{text}");
        }
    }
}

/// Waits, at most `timeout`, until every queued line is written (or
/// stderr is found gone). A gap not yet marked is marked first.
pub fn flush(timeout: Duration) {
    let Some(queue) = QUEUE.get() else {
        return;
    };
    let deadline = Instant::now() + timeout;
    let mut pending = queue.lock();
    if pending.refused > 0 {
        let gap = queue.format.gap(pending.refused, "stderr too slow");
        pending.text.push_str(&gap);
        pending.refused = 0;
        queue.queued.notify_one();
    }
    while (pending.busy || !pending.text.is_empty()) && !queue.dead.load(Ordering::Relaxed) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        pending = queue
            .idle
            .wait_timeout(pending, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(role: &'static str, modules: bool) -> Format {
        Format { role, modules }
    }

    #[test]
    fn info_lines_have_time_level_role_and_message_only() {
        let line = format("server", false).line(
            Level::Info,
            "stopover::server::conn",
            &format_args!("server: stored x"),
        );
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(time.ends_with('Z') && time.contains('T'), "{line:?}");
        assert_eq!(rest, "INFO  server: stored x\n");
    }

    #[test]
    fn debug_lines_show_the_module() {
        let line = format("proxy", true).line(
            Level::Debug,
            "stopover::event_loop::accept",
            &format_args!("proxy: accepted"),
        );
        assert!(
            line.ends_with(" DEBUG [stopover::event_loop::accept] proxy: accepted\n"),
            "{line:?}"
        );
    }

    #[test]
    fn the_role_is_added_where_the_message_lacks_it() {
        let f = format("proxy", false);
        for (message, want) in [
            ("holding x", "proxy: holding x"),
            ("proxy: relayed", "proxy: relayed"),
            ("client: connected", "client: connected"),
            ("proxying", "proxy: proxying"),
            ("a\nb", "proxy: a b"),
        ] {
            let line = f.line(Level::Warn, "stopover::store", &format_args!("{message}"));
            assert!(line.ends_with(&format!("WARN  {want}\n")), "{line:?}");
        }
    }

    /// stderr as a test controls it: fails while `failing` is set.
    #[derive(Clone, Default)]
    struct Stderr {
        failing: std::sync::Arc<AtomicBool>,
        text: std::sync::Arc<Mutex<String>>,
    }

    impl Write for Stderr {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let mut text = self.text.lock().unwrap();
            text.push_str(std::str::from_utf8(buf).unwrap());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Waits until the writer has written all it was given.
    fn settle(queue: &Queue) {
        let mut pending = queue.lock();
        while pending.busy || !pending.text.is_empty() {
            pending = queue.idle.wait(pending).unwrap();
        }
    }

    #[test]
    fn a_failing_stderr_loses_lines_counted_and_marks_the_gap_when_it_works_again() {
        let queue: &'static Queue = Box::leak(Box::new(Queue::new(format("server", false))));
        let stderr = Stderr::default();
        let mut out = stderr.clone();
        std::thread::spawn(move || queue.write_forever(&mut out));
        queue.push("server: one\n");
        settle(queue);
        stderr.failing.store(true, Ordering::SeqCst);
        queue.push("server: two\n");
        settle(queue);
        queue.push("server: three\n");
        settle(queue);
        assert_eq!(queue.dropped.load(Ordering::SeqCst), 2);
        stderr.failing.store(false, Ordering::SeqCst);
        queue.push("server: four\n");
        settle(queue);
        let text = stderr.text.lock().unwrap().clone();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "server: one");
        assert!(
            lines[1].ends_with("WARN  server: 2 log lines dropped (stderr failed)"),
            "{text}"
        );
        assert_eq!(lines[2], "server: four");
    }

    #[test]
    fn a_full_queue_drops_lines_and_marks_the_gap_where_it_is() {
        // No writer: the queue only fills.
        let queue = Queue::new(format("proxy", false));
        let line = "x".repeat(1023) + "\n";
        for _ in 0..MAX_QUEUED / line.len() {
            queue.push(&line);
        }
        assert_eq!(queue.dropped.load(Ordering::SeqCst), 0);
        queue.push(&line);
        queue.push(&line);
        assert_eq!(queue.dropped.load(Ordering::SeqCst), 2);
        queue.lock().text.clear();
        queue.push("proxy: after\n");
        let text = queue.lock().text.clone();
        assert!(
            text.contains("WARN  proxy: 2 log lines dropped (stderr too slow)\nproxy: after\n"),
            "{text}"
        );
    }

    #[test]
    fn lost_lines_are_counted_whole() {
        assert_eq!(count_lines(b""), 0);
        assert_eq!(count_lines(b"a\nb\n"), 2);
        assert_eq!(count_lines(b"tail of a\nb\nc"), 3);
    }
}
