//! A plain blocking, thread-per-connection receiver: what many servers
//! that people put stopover in front of look like. It accepts, gives each
//! connection a thread, writes the upload to its own file, and answers the
//! same `OK bytes=.. crc32c=.. file=..` line as our server, so the load
//! generator verifies it the same way.
//!
//! It runs as its own process (the bench binary started again with
//! `--receiver ADDR DIR`), so its CPU and memory are measured like the
//! daemons'. It logs `listening on ADDR` as they do.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// `--receiver ADDR DIR` in the bench's arguments, if present.
pub fn requested() -> Option<(String, PathBuf)> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == "--receiver")?;
    Some((args.get(at + 1)?.clone(), PathBuf::from(args.get(at + 2)?)))
}

/// Serves until killed.
pub fn serve(addr: &str, dir: &Path) -> ! {
    std::fs::create_dir_all(dir).expect("receiver: create its directory");
    // As our daemons do, and as any server meant for many clients must: a
    // socket and a file per connection need more than the usual 1,024
    // descriptors, and a thousand connects at once a deep listen backlog.
    if let Err(e) = stopover::sys::raise_nofile_limit() {
        eprintln!("receiver: raising RLIMIT_NOFILE: {e}");
    }
    let addr: std::net::SocketAddr = addr.parse().expect("receiver: an address");
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("receiver: socket");
    socket
        .set_reuse_address(true)
        .expect("receiver: SO_REUSEADDR");
    socket.bind(&addr.into()).expect("receiver: bind");
    socket.listen(4096).expect("receiver: listen");
    let listener: TcpListener = socket.into();
    eprintln!(
        "receiver listening on {}",
        listener.local_addr().expect("receiver: local address")
    );
    let counter = Arc::new(AtomicU64::new(0));
    for sock in listener.incoming() {
        let sock = match sock {
            Ok(sock) => sock,
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning.
                eprintln!("receiver: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let (dir, counter) = (dir.to_path_buf(), counter.clone());
        let _ = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || receive(sock, &dir, &counter));
    }
    std::process::exit(1);
}

fn receive(mut sock: TcpStream, dir: &Path, counter: &AtomicU64) {
    let name = format!("upload-{}", counter.fetch_add(1, Ordering::Relaxed));
    let Ok(mut file) = std::fs::File::create(dir.join(&name)) else {
        let _ = sock.write_all(b"ERR cannot store\n");
        return;
    };
    let mut buf = vec![0u8; 256 * 1024];
    let (mut bytes, mut crc) = (0u64, 0u32);
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if file.write_all(&buf[..n]).is_err() {
                    let _ = sock.write_all(b"ERR cannot store\n");
                    return;
                }
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return, // a reset: no answer, like any server
        }
    }
    let line = format!("OK bytes={bytes} crc32c={crc:08x} file={name}\n");
    let _ = sock.write_all(line.as_bytes());
    let _ = sock.shutdown(Shutdown::Write);
}
