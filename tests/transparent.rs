//! The proxy is a transparent relay: whatever the upstream answers, any
//! size, reaches the client whole, with bounded memory in the proxy. Only
//! our own client enforces the one-line answer (see `tests/hardening.rs`
//! for that side).
//!
//! The upstreams here speak other protocols: HTTP (a server thread of our
//! own, plain and chunked, and Python's `http.server` where Python is
//! installed) fetched with `curl` where it is installed and with a raw
//! socket always; and an echo protocol whose answer is as large as the
//! upload.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// The body size the issue measured: 300,000 bytes.
const BODY: usize = 300_000;

/// A thread-per-connection HTTP/1.1 server that answers every request with
/// `body` and closes (it refuses keep-alive: `Connection: close`), either
/// with a `Content-Length` or in chunks of varied sizes.
fn http_server(body: Vec<u8>, chunked: bool) -> SocketAddr {
    let listener = TcpListener::bind(loopback0()).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(sock.try_clone().unwrap());
                let mut line = String::new();
                // The request: headers up to the empty line.
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" || line == "\n" => break,
                        Ok(_) => {}
                    }
                }
                let mut sock = sock;
                let _ = if chunked {
                    write_chunked(&mut sock, &body)
                } else {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    sock.write_all(head.as_bytes())
                        .and_then(|()| sock.write_all(&body))
                };
                let _ = sock.shutdown(Shutdown::Write);
                // Drain what the client still sends, so our close is a FIN,
                // not a reset that could cut the answer short.
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
            });
        }
    });
    addr
}

fn write_chunked(sock: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    sock.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")?;
    let mut rest = body;
    let mut size = 1;
    while !rest.is_empty() {
        let n = size.min(rest.len());
        sock.write_all(format!("{n:x}\r\n").as_bytes())?;
        sock.write_all(&rest[..n])?;
        sock.write_all(b"\r\n")?;
        rest = &rest[n..];
        size = size * 7 % 70_001 + 1; // 1, 8, 57, ... varied sizes
    }
    sock.write_all(b"0\r\n\r\n")
}

/// `GET /` over a raw socket, the way a browser or curl sends it: the
/// client never half-closes; it reads until the server closes. Returns the
/// whole response, head and body.
fn raw_get(to: SocketAddr) -> Vec<u8> {
    let mut sock = TcpStream::connect(to).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    sock.read_to_end(&mut got).expect("the response, then EOF");
    got
}

fn body_of(response: &[u8]) -> &[u8] {
    let at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    &response[at + 4..]
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fetches `url` with curl into a file; `None` where curl is not installed.
fn curl(url: &str, out: &Path) -> Option<Vec<u8>> {
    if !have("curl") {
        eprintln!("curl is not installed: the curl half of this test is skipped");
        return None;
    }
    let status = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "60", "-o"])
        .arg(out)
        .arg(url)
        .status()
        .expect("curl runs");
    assert!(status.success(), "curl {url}: {status}");
    Some(std::fs::read(out).unwrap())
}

#[test]
fn a_300000_byte_http_answer_reaches_the_client_whole() {
    let body = random_bytes(BODY, 1);
    let upstream = http_server(body.clone(), false);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(upstream, dir.path());
    let direct = raw_get(upstream);
    for i in 0..5 {
        let proxied = raw_get(proxy.addr);
        assert_eq!(
            proxied.len(),
            direct.len(),
            "fetch {i}: through the proxy {} bytes, directly {}",
            proxied.len(),
            direct.len()
        );
        assert!(proxied == direct, "fetch {i}: the bytes differ");
        let out = dir.path().join("curl.out");
        if let Some(got) = curl(&format!("http://{}/", proxy.addr), &out) {
            assert_eq!(got.len(), BODY, "curl fetch {i}");
            assert!(got == body, "curl fetch {i}: the body differs");
        }
    }
    assert_eq!(body_of(&direct), &body[..]);
}

#[test]
fn a_chunked_http_answer_reaches_curl_whole() {
    let body = random_bytes(BODY, 2);
    let upstream = http_server(body.clone(), true);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(upstream, dir.path());
    let direct = raw_get(upstream);
    let proxied = raw_get(proxy.addr);
    assert!(
        proxied == direct,
        "chunked: {} bytes through the proxy, {} directly",
        proxied.len(),
        direct.len()
    );
    let out = dir.path().join("curl.out");
    if let Some(got) = curl(&format!("http://{}/", proxy.addr), &out) {
        assert!(got == body, "curl decoded {} bytes of {BODY}", got.len());
    }
}

/// Python's own HTTP server (HTTP/1.0: one response per connection), where
/// Python is installed: a real server that is not ours.
#[test]
fn a_file_from_pythons_http_server_reaches_curl_whole() {
    if !have("python3") {
        eprintln!("python3 is not installed: skipped");
        return;
    }
    let site = tempfile::tempdir().unwrap();
    let body = random_bytes(BODY, 3);
    std::fs::write(site.path().join("big.bin"), &body).unwrap();
    // Port 0: Python picks a free port and says which on its first line.
    let mut python = Command::new("python3")
        .args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "0"])
        .current_dir(site.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 starts");
    let mut first = String::new();
    let stdout = python.stdout.take().unwrap();
    let _python = Killed(python);
    BufReader::new(stdout).read_line(&mut first).unwrap();
    // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    let port: u16 = first
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {first:?}"));
    let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(upstream, dir.path());
    let out = dir.path().join("curl.out");
    for i in 0..5 {
        let url = format!("http://{}/big.bin", proxy.addr);
        if let Some(got) = curl(&url, &out) {
            assert!(got == body, "fetch {i}: {} bytes of {BODY}", got.len());
        }
    }
}

/// Kills (by PID) a child this test started, when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An echo server: every byte of the upload comes back as it arrives, then
/// a FIN after the client's.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(loopback0()).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut sock in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut back = sock.try_clone().unwrap();
                let _ = std::io::copy(&mut sock, &mut back);
                let _ = back.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Sends `len` bytes and reads the echo at the same time (an echo client
/// must: the answer comes while the upload goes). Returns the bytes and
/// CRC-32C sent, and those received.
fn echo_round_trip(to: SocketAddr, len: usize) -> ((usize, u32), (usize, u32)) {
    let sock = TcpStream::connect(to).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = sock.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let block = random_bytes(256 * 1024, 4);
        let (mut sent, mut crc) = (0usize, 0u32);
        while sent < len {
            let n = block.len().min(len - sent);
            writer.write_all(&block[..n]).unwrap();
            crc = crc32c::crc32c_append(crc, &block[..n]);
            sent += n;
        }
        writer.shutdown(Shutdown::Write).unwrap();
        (sent, crc)
    });
    let mut reader = sock;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut got, mut crc) = (0usize, 0u32);
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                got += n;
            }
            Err(e) => panic!("reading the echo after {got} bytes: {e}"),
        }
    }
    (sender.join().unwrap(), (got, crc))
}

#[test]
fn an_echo_as_large_as_the_upload_comes_back_whole_in_bounded_memory() {
    const LEN: usize = 64 * 1024 * 1024;
    let upstream = echo_server();
    let dir = tempfile::tempdir().unwrap();
    let proxy = spawn_proxy(upstream, dir.path(), &["--spool-memory", "4MiB"]);
    let (sent, echoed) = echo_round_trip(proxy.addr, LEN);
    assert_eq!(sent.0, LEN);
    assert_eq!(
        echoed, sent,
        "the whole upload came back, byte for byte (bytes, crc32c)"
    );
    // The answer direction holds at most one 64 KiB buffer, the upload
    // direction its share of --spool-memory: tens of MiB moved, a few held.
    let peak = peak_rss_kib(proxy.pid());
    eprintln!("proxy peak RSS after 64 MiB each way: {peak} KiB");
    assert!(
        peak < 24 * 1024,
        "the proxy's peak RSS was {peak} KiB after relaying 64 MiB each way"
    );
    // And the recording is of the upload, whole.
    wait_until("the spool file is final", || {
        final_files(dir.path()).len() == 1
    });
    let name = &final_files(dir.path())[0];
    let stored = std::fs::metadata(dir.path().join(name)).unwrap().len();
    assert_eq!(stored, LEN as u64, "the spool holds the whole upload");
}

#[test]
fn a_held_upload_gets_a_large_answer_whole() {
    let body = random_bytes(BODY, 5);
    let upstream = {
        let listener = TcpListener::bind(loopback0()).unwrap();
        let addr = listener.local_addr().unwrap();
        let body = body.clone();
        std::thread::spawn(move || {
            for mut sock in listener.incoming().flatten() {
                let _ = read_all(&mut sock);
                let _ = sock.write_all(&body);
                let _ = sock.shutdown(Shutdown::Write);
            }
        });
        addr
    };
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy_with(
        upstream,
        dir.path(),
        Some(std::time::Duration::from_millis(50)),
    );
    let mut sock = TcpStream::connect(proxy.addr).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    sock.write_all(b"a held upload").unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    let got = read_all(&mut sock).expect("the answer, then EOF");
    assert_eq!(got.len(), BODY, "the held upload's answer, whole");
    assert!(got == body);
}
