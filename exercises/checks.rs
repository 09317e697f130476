//! One check per exercise of docs/GUIDE.md ("Exercises"). Each judges the
//! behaviour the exercise asks for, from outside (see `support`): it
//! returns `Err(what was seen)` on today's code and `Ok` once the change
//! works, whichever way it was written.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use crate::support::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// 1. The server's `OK` line carries `kib=<size in KiB>`, and our own
///    client still accepts it.
pub fn kib_field() -> Check {
    let dir = scratch_dir();
    let server = Daemon::start(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &path_in(dir.path(), "r"),
    ])?;
    let line = upload(server.addr, &pattern(5000))?;
    let line = line.trim_end();
    let fields: Vec<&str> = line.split(' ').collect();
    if !fields.iter().any(|f| *f == "kib=4" || *f == "kib=5") {
        return Err(format!(
            "a 5000-byte upload was answered {line:?}: no kib=4 field"
        ));
    }
    let (code, said) = stopover_client(server.addr, dir.path(), 5000)?;
    if code != 0 {
        return Err(format!(
            "the answer has kib= now, but `stopover client` rejects it (exit {code}: {said})"
        ));
    }
    Ok(())
}

/// 2. A proxy with `--max-bytes 1MiB` refuses a 2 MiB upload with `ERR`
///    without sending a byte of it upstream, and still relays small ones.
pub fn refuse_without_forwarding() -> Check {
    let dir = scratch_dir();
    let server = Daemon::start(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &path_in(dir.path(), "r"),
    ])?;
    let relay = CountingRelay::start(server.addr)?;
    let upstream = relay.addr.to_string();
    let proxy = Daemon::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--dir",
        &path_in(dir.path(), "s"),
        "--max-bytes",
        "1MiB",
    ])?;
    let answer = upload(proxy.addr, &pattern(2 * MIB))?;
    if !answer.starts_with("ERR") {
        return Err(format!(
            "a 2 MiB upload was answered {:?}, not ERR",
            answer.trim_end()
        ));
    }
    relay.wait_until_idle();
    let sent = relay.upstream_bytes();
    if sent > 0 {
        return Err(format!(
            "the 2 MiB upload was refused, but {sent} bytes of it had already gone upstream"
        ));
    }
    let (code, said) = stopover_client(proxy.addr, dir.path(), 100 * KIB)?;
    if code != 0 {
        return Err(format!(
            "a 100 KiB upload no longer goes through (exit {code}: {said})"
        ));
    }
    Ok(())
}

/// A WARN line about a slow upload.
fn slow_warning(line: &str) -> bool {
    line.contains("WARN") && line.to_lowercase().contains("slow")
}

/// A server with `--slow-upload THRESHOLD`, or the hint that the flag is missing.
fn server_warning_after(dir: &std::path::Path, threshold: &str) -> Result<Daemon, String> {
    Daemon::start(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &path_in(dir, "r"),
        "--min-rate",
        "0",
        "--slow-upload",
        threshold,
    ])
    .map_err(|e| format!("the server does not take --slow-upload yet ({e})"))
}

/// 3. `--slow-upload 1s`: an upload that takes longer gets a warning, a
///    quick one does not.
pub fn slow_upload_warning() -> Check {
    let dir = scratch_dir();
    let server = server_warning_after(dir.path(), "1s")?;
    let quick = upload(server.addr, b"quick")?;
    if !quick.starts_with("OK") {
        return Err(format!("a quick upload was answered {quick:?}"));
    }
    // A slow client: half now, the rest once the server has warned or 2.5 s
    // have passed (the warning may come at the end, as the GUIDE's answer does).
    let mut sock = connect(server.addr)?;
    sock.write_all(b"slow, ").map_err(|e| e.to_string())?;
    server.wait_for_line(Duration::from_millis(2500), slow_warning);
    sock.write_all(b"slow upload").map_err(|e| e.to_string())?;
    sock.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let answer = read_answer(&mut sock)?;
    if !answer.starts_with("OK") {
        return Err(format!("the slow upload was answered {answer:?}, not OK"));
    }
    if server
        .wait_for_line(Duration::from_secs(5), slow_warning)
        .is_none()
    {
        return Err(
            "an upload that took 2.5 s with --slow-upload 1s got no WARN line saying \"slow\""
                .into(),
        );
    }
    let warnings = server.lines().iter().filter(|l| slow_warning(l)).count();
    if warnings != 1 {
        return Err(format!(
            "{warnings} slow-upload warnings for one slow and one quick upload"
        ));
    }
    Ok(())
}

/// 4. The server counts reads that found nothing (`WouldBlock`) and
///    reports the count when it stops: 0 without transfers, more with one.
pub fn wouldblock_counter() -> Check {
    const WORDS: &[&str] = &["wouldblock", "would_block", "would block", "would-block"];
    let stopped_count = |server: &Daemon| -> Result<u64, String> {
        server
            .lines()
            .iter()
            .rev()
            .find_map(|l| number_near(l, WORDS))
            .ok_or_else(|| "when the server stopped, no line counted WouldBlocks".to_string())
    };
    let dir = scratch_dir();
    let args = [
        "server",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &path_in(dir.path(), "r"),
        "--stats-addr",
        "127.0.0.1:0",
    ];
    let mut idle = Daemon::start(&args)?;
    idle.terminate()?;
    let none = stopped_count(&idle)?;
    if none != 0 {
        return Err(format!(
            "a server that had no connection at all counted {none} WouldBlocks"
        ));
    }
    let mut server = Daemon::start(&args)?;
    // Half the upload, and wait until the server has it: it read until the
    // socket was empty, so its last read said WouldBlock.
    let mut sock = connect(server.addr)?;
    sock.write_all(&pattern(256 * KIB))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + PATIENCE;
    while server
        .metric("stopover_bytes_received_total")?
        .unwrap_or(0.0)
        < (256 * KIB) as f64
    {
        if Instant::now() > deadline {
            return Err("the server did not read the first 256 KiB of an upload".into());
        }
        std::thread::sleep(Duration::from_millis(10)); // polling a condition
    }
    sock.write_all(&pattern(256 * KIB))
        .map_err(|e| e.to_string())?;
    sock.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let answer = read_answer(&mut sock)?;
    if !answer.starts_with("OK") {
        return Err(format!("a 512 KiB upload was answered {answer:?}"));
    }
    server.terminate()?;
    let some = stopped_count(&server)?;
    if some == 0 {
        return Err(
            "after an upload that paused half-way, the server counted 0 WouldBlocks".into(),
        );
    }
    Ok(())
}

/// 5. With the drain loop broken, a 10 MiB upload stops half-way: the
///    server holds unread bytes and never answers.
pub fn broken_edge_trigger() -> Check {
    let dir = scratch_dir();
    let server = Daemon::start(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &path_in(dir.path(), "r"),
        "--stats-addr",
        "127.0.0.1:0",
        "--idle-timeout",
        "0s",
        "--min-rate",
        "0",
    ])?;
    const SIZE: usize = 10 * MIB;
    let addr = server.addr;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(upload(addr, &pattern(SIZE)));
    });
    // The upload hangs if what the server has read stops growing and no
    // answer comes: bytes or the FIN are left unread in the socket. (The
    // unchanged code reads the whole upload and answers in well under a
    // second; two seconds of nothing is not a slow machine.)
    let (mut last, mut since) = (-1.0, Instant::now());
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if let Ok(answer) = rx.try_recv() {
            let answer = answer?;
            return Err(format!(
                "the 10 MiB upload went through ({:?}): the drain loop still works",
                answer.trim_end()
            ));
        }
        let read = server
            .metric("stopover_bytes_received_total")?
            .unwrap_or(0.0);
        if read != last {
            (last, since) = (read, Instant::now());
        } else if since.elapsed() > Duration::from_secs(2) {
            return Ok(()); // stuck: no answer, and nothing more is read
        }
        std::thread::sleep(Duration::from_millis(100)); // sampling a counter
    }
    Err("the 10 MiB upload neither finished nor stopped".into())
}

/// 6. The slow-upload warning of exercise 3, on time: while the upload is
///    still running, and not before the threshold.
pub fn slow_upload_timer() -> Check {
    let dir = scratch_dir();
    let server = server_warning_after(dir.path(), "500ms")?;
    let quick = upload(server.addr, b"quick")?;
    if !quick.starts_with("OK") {
        return Err(format!("a quick upload was answered {quick:?}"));
    }
    let began = Instant::now();
    let mut sock = connect(server.addr)?;
    sock.write_all(b"slow, ").map_err(|e| e.to_string())?;
    let Some(_) = server.wait_for_line(Duration::from_secs(10), slow_warning) else {
        return Err(
            "an upload still running after 10 s with --slow-upload 500ms got no warning yet".into(),
        );
    };
    let after = began.elapsed();
    if after < Duration::from_millis(500) {
        return Err(format!(
            "the warning came {} ms after the connect, before the 500 ms threshold",
            after.as_millis()
        ));
    }
    sock.write_all(b"slow upload").map_err(|e| e.to_string())?;
    sock.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let answer = read_answer(&mut sock)?;
    if !answer.starts_with("OK") {
        return Err(format!("the slow upload was answered {answer:?}, not OK"));
    }
    // The quick upload's timer (if it was never cancelled) has had its
    // chance to fire by now; it must not have warned.
    let warnings = server.lines().iter().filter(|l| slow_warning(l)).count();
    if warnings != 1 {
        return Err(format!(
            "{warnings} slow-upload warnings for one slow and one quick upload"
        ));
    }
    Ok(())
}

/// Answers every upload with `len` bytes of [`pattern`].
fn big_answer(len: usize) -> impl Fn(&mut std::net::TcpStream, &[u8]) + Send + Sync + 'static {
    move |sock, _upload| {
        let _ = sock.write_all(&pattern(len));
    }
}

/// 7. Back-pressure made visible: a client that does not read its answer
///    makes the proxy stop reading the upstream; the trace says so and
///    `stopover_answer_paused_total` counts it.
pub fn answer_back_pressure() -> Check {
    const METRIC: &str = "stopover_answer_paused_total";
    const ANSWER: usize = 32 * MIB;
    let dir = scratch_dir();
    let upstream = fake_upstream(big_answer(ANSWER))?.to_string();
    let proxy = Daemon::start(&[
        "-vv",
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--dir",
        &path_in(dir.path(), "s"),
        "--stats-addr",
        "127.0.0.1:0",
        "--min-rate",
        "0",
    ])?;
    match proxy.metric(METRIC)? {
        Some(0.0) => {}
        Some(v) => return Err(format!("{METRIC} is {v} before any transfer")),
        None => return Err(format!("the proxy's /metrics has no {METRIC}")),
    }
    let mut sock = connect(proxy.addr)?;
    sock.write_all(b"please answer at length")
        .map_err(|e| e.to_string())?;
    sock.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    // Do not read: the answer fills our socket, then the proxy's.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut paused = 0.0;
    while paused == 0.0 && Instant::now() < deadline {
        paused = proxy.metric(METRIC)?.unwrap_or(0.0);
        std::thread::sleep(Duration::from_millis(20)); // polling a condition
    }
    if paused == 0.0 {
        return Err(format!(
            "a client left a 32 MiB answer unread for 10 s, and {METRIC} stayed 0"
        ));
    }
    let traced = proxy.lines().iter().any(|l| {
        l.contains("TRACE")
            && l.find(" upstream ")
                .is_some_and(|at| l[at..].to_lowercase().contains("paus"))
    });
    if !traced {
        return Err(
            "no trace line says the upstream's reads are paused (`#N upstream ... paused`)".into(),
        );
    }
    let mut got = Vec::with_capacity(ANSWER);
    sock.read_to_end(&mut got)
        .map_err(|e| format!("reading the answer: {e}"))?;
    if got != pattern(ANSWER) {
        return Err(format!(
            "the client got {} bytes of a {ANSWER}-byte answer, or not the same bytes",
            got.len()
        ));
    }
    Ok(())
}

/// The server's answer line for `upload`, with `crc` as the checksum,
/// written in two pieces: a proxy that looks at the answer must put
/// them together.
fn answer_in_pieces(lie: bool) -> impl Fn(&mut std::net::TcpStream, &[u8]) + Send + Sync + 'static {
    move |sock, upload| {
        let crc = crc32c::crc32c(upload) ^ u32::from(lie);
        let line = format!(
            "OK bytes={} crc32c={crc:08x} file=fake-{}\n",
            upload.len(),
            upload.len()
        );
        let (a, b) = line.split_at(12);
        let _ = sock.write_all(a.as_bytes());
        let _ = sock.flush();
        // Separate segments, so the proxy reads them in separate calls.
        std::thread::sleep(Duration::from_millis(100));
        let _ = sock.write_all(b.as_bytes());
    }
}

/// A WARN line about an answer that does not match.
fn mismatch_warning(line: &str) -> bool {
    line.contains("WARN") && line.to_lowercase().contains("mismatch")
}

/// 8. The answer direction: the proxy reads the answer the upstream sends
///    after the client's FIN (in pieces), checks it against its own spool,
///    warns on a mismatch, and relays it untouched either way.
pub fn answer_check() -> Check {
    let dir = scratch_dir();
    for (lie, size) in [(false, 3000), (true, 4000)] {
        let upstream = fake_upstream(answer_in_pieces(lie))?.to_string();
        let proxy = Daemon::start(&[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--dir",
            &path_in(dir.path(), &format!("s{size}")),
        ])?;
        let data = pattern(size);
        let answer = upload(proxy.addr, &data)?;
        let crc = crc32c::crc32c(&data) ^ u32::from(lie);
        let expected = format!("OK bytes={size} crc32c={crc:08x} file=fake-{size}\n");
        if answer != expected {
            return Err(format!(
                "the client got {answer:?}, not the upstream's {expected:?}"
            ));
        }
        if lie {
            if proxy
                .wait_for_line(Duration::from_secs(5), mismatch_warning)
                .is_none()
            {
                return Err("the upstream answered with a wrong crc32c and the proxy logged no WARN line saying \"mismatch\"".into());
            }
        } else {
            // The transfer's own info line comes after the answer is relayed.
            proxy.wait_for_line(Duration::from_secs(10), |l| l.contains("relayed"));
            if proxy.lines().iter().any(|l| mismatch_warning(l)) {
                return Err("the proxy warned of a mismatch for a correct answer".into());
            }
        }
    }
    Ok(())
}
