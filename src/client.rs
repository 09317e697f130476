//! The client: a minimal blocking sender.
//!
//! It follows the seed's client step by step, with plain blocking
//! `std::net` sockets, because a client with one job has no reason to be
//! clever:
//!
//! 1. open the file (or stdin);
//! 2. connect to the proxy ([`TcpStream::connect_timeout`]);
//! 3. send the bytes, in chunks, computing CRC-32C as they go (never the
//!    whole file in memory);
//! 4. **half-close** (`shutdown(Write)`): this is how the receiver learns the
//!    upload is over. The seed's client skipped it and went straight to
//!    `recv()`, which deadlocks against any receiver that waits for EOF;
//! 5. read the answer line to EOF, and close.
//!
//! Then it checks the answer against what it sent: the byte count and the
//! checksum must match, or the bytes stored are not the bytes sent.

use std::fmt;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::answer::{Answer, MAX_LINE};

/// Size of each read from the file and write to the socket.
pub const CHUNK: usize = 256 * 1024;

/// Settings for [`send_file`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where to send: `host:port` (the proxy, or a server directly).
    pub to: String,
    /// The file to send; `-` reads stdin.
    pub file: PathBuf,
    /// Bound on connecting, on each blocked write, and on waiting for the answer.
    pub timeout: Duration,
    /// Show a progress bar on stderr when it is a terminal.
    pub progress: bool,
}

/// Why a transfer failed (the exit code 1 cases).
#[derive(Debug)]
pub enum ClientError {
    /// The file could not be read.
    Source(String, io::Error),
    /// No connection could be made.
    Connect(String, io::Error),
    /// The connection broke while sending or receiving.
    Lost(&'static str, io::Error),
    /// A step took longer than `--timeout`.
    Timeout(&'static str, Duration),
    /// The answer was not in the contract's form.
    BadAnswer(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Source(what, e) => write!(f, "reading {what}: {e}"),
            ClientError::Connect(to, e) => write!(f, "connecting to {to}: {e}"),
            ClientError::Lost(during, e) => write!(f, "connection lost while {during}: {e}"),
            ClientError::Timeout(during, t) => write!(
                f,
                "timed out after {} while {during}",
                humantime::format_duration(*t)
            ),
            ClientError::BadAnswer(why) => write!(f, "bad answer: {why}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// What was sent and what came back.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// Bytes sent.
    pub sent_bytes: u64,
    /// CRC-32C of the bytes sent.
    pub sent_crc32c: u32,
    /// The answer line, without its newline.
    pub line: String,
    /// The parsed answer.
    pub answer: Answer,
    /// Connect to answer.
    pub elapsed: Duration,
}

/// The verdict on a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `OK`, and the server stored exactly what we sent.
    Verified,
    /// The server (or proxy) answered `ERR`.
    Refused(String),
    /// `OK`, but the server's count or checksum differs from ours.
    Mismatch {
        sent_bytes: u64,
        sent_crc32c: u32,
        stored_bytes: u64,
        stored_crc32c: u32,
    },
}

impl Receipt {
    /// Compares the answer with what was sent.
    pub fn verdict(&self) -> Verdict {
        match &self.answer {
            Answer::Err(reason) => Verdict::Refused(reason.clone()),
            Answer::Ok { bytes, crc32c, .. }
                if *bytes == self.sent_bytes && *crc32c == self.sent_crc32c =>
            {
                Verdict::Verified
            }
            Answer::Ok { bytes, crc32c, .. } => Verdict::Mismatch {
                sent_bytes: self.sent_bytes,
                sent_crc32c: self.sent_crc32c,
                stored_bytes: *bytes,
                stored_crc32c: *crc32c,
            },
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Verified => f.write_str("verified"),
            Verdict::Refused(reason) => write!(f, "refused: {reason}"),
            Verdict::Mismatch {
                sent_bytes,
                sent_crc32c,
                stored_bytes,
                stored_crc32c,
            } => write!(
                f,
                "the server stored different bytes than were sent: sent {sent_bytes} bytes crc32c={sent_crc32c:08x}, \
                 server stored {stored_bytes} bytes crc32c={stored_crc32c:08x}"
            ),
        }
    }
}

/// Where the bytes of an upload come from, one chunk at a time.
///
/// A chunk is borrowed, so a source that already has the bytes in memory
/// (the load generator's payload pool) hands them over without a copy.
pub trait Source {
    /// The next chunk of the upload; an empty slice means the end.
    fn next_chunk(&mut self) -> io::Result<&[u8]>;
}

/// Any reader (a file, stdin) as a [`Source`], through a chunk buffer.
pub struct ReadSource<R> {
    reader: R,
    buf: Vec<u8>,
}

impl<R: Read> ReadSource<R> {
    /// Reads `reader` in chunks of [`CHUNK`] bytes.
    pub fn new(reader: R) -> Self {
        ReadSource {
            reader,
            buf: vec![0; CHUNK],
        }
    }
}

impl<R: Read> Source for ReadSource<R> {
    fn next_chunk(&mut self) -> io::Result<&[u8]> {
        loop {
            match self.reader.read(&mut self.buf) {
                Ok(n) => return Ok(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A byte slice as a [`Source`] (tests, small in-memory payloads).
impl Source for &[u8] {
    fn next_chunk(&mut self) -> io::Result<&[u8]> {
        let (chunk, rest) = self.split_at(self.len().min(CHUNK));
        *self = rest;
        Ok(chunk)
    }
}

/// Sends the file named in `config` and returns the receipt.
pub fn send_file(config: &ClientConfig) -> Result<Receipt, ClientError> {
    // Seed step 1: the file to send. Opened before connecting, so a missing
    // file costs the proxy nothing.
    let (reader, len, what): (Box<dyn Read>, Option<u64>, String) = if config.file == Path::new("-")
    {
        (Box::new(io::stdin().lock()), None, "stdin".to_string())
    } else {
        let what = config.file.display().to_string();
        let file = File::open(&config.file).map_err(|e| ClientError::Source(what.clone(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| ClientError::Source(what.clone(), e))?;
        if meta.is_dir() {
            return Err(ClientError::Source(
                what,
                io::Error::new(io::ErrorKind::InvalidInput, "is a directory"),
            ));
        }
        (Box::new(file), Some(meta.len()), what)
    };
    let mut progress = Progress::new(config.progress, len);
    let mut source = ReadSource::new(reader);
    let receipt = upload(&config.to, &mut source, &what, config.timeout, &mut |n| {
        progress.advance(n)
    });
    progress.finish();
    receipt
}

/// Connects to `to` and uploads everything `source` yields, then reads and
/// parses the answer. `what` names the source in error messages; `on_sent`
/// is told the byte count of each chunk sent.
pub fn upload(
    to: &str,
    source: &mut dyn Source,
    what: &str,
    timeout: Duration,
    on_sent: &mut dyn FnMut(u64),
) -> Result<Receipt, ClientError> {
    let started = Instant::now();
    // Seed step 2: connect.
    let mut sock = connect(to, timeout)?;
    if log::log_enabled!(log::Level::Debug) {
        let local = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        log::debug!(
            "client: connected to {peer} from {local} in {:.3}s; sending {what}",
            started.elapsed().as_secs_f64()
        );
    }
    let io_timeout = Some(timeout.max(Duration::from_millis(1)));
    sock.set_write_timeout(io_timeout)
        .and_then(|()| sock.set_read_timeout(io_timeout))
        .map_err(|e| ClientError::Connect(to.to_string(), e))?;
    // Until the upload is over, closing means "abort": with SO_LINGER 0 the
    // kernel resets the connection if this process dies (Ctrl-C, kill -9),
    // instead of sending the FIN that would make a half-sent upload look
    // complete. The receiver then keeps no final copy of it.
    set_linger(&sock, Some(Duration::ZERO))?;

    // Seed step 3: send the data, chunk by chunk.
    let mut sent_bytes = 0u64;
    let mut sent_crc32c = 0u32;
    loop {
        let chunk = source
            .next_chunk()
            .map_err(|e| ClientError::Source(what.to_string(), e))?;
        if chunk.is_empty() {
            break;
        }
        if let Err(e) = sock.write_all(chunk) {
            if is_timeout(&e) {
                return Err(ClientError::Timeout("sending", timeout));
            }
            // The receiver may have refused the upload and said why before
            // closing: an answer beats "broken pipe" as an explanation.
            log::debug!("client: sending failed after {sent_bytes} bytes ({e}); reading an answer");
            return match read_answer(&mut sock, timeout) {
                Ok(line) => finish(line, sent_bytes, sent_crc32c, started),
                Err(_) => Err(ClientError::Lost("sending", e)),
            };
        }
        sent_crc32c = crc32c::crc32c_append(sent_crc32c, chunk);
        sent_bytes += chunk.len() as u64;
        log::trace!("client: sent {} bytes ({sent_bytes} in all)", chunk.len());
        on_sent(chunk.len() as u64);
    }

    // The half-close: "that is all". Without it the receiver cannot tell
    // the end of the upload from a pause, and both sides wait forever.
    if let Err(e) = sock.shutdown(Shutdown::Write) {
        return Err(ClientError::Lost("half-closing", e));
    }
    log::debug!(
        "client: sent {sent_bytes} bytes crc32c={sent_crc32c:08x} in {:.3}s; half-closed, waiting for the answer",
        started.elapsed().as_secs_f64()
    );
    // Seed step 4: wait for the answer (seed step 5, close, is the drop,
    // a normal one now that the exchange is complete).
    let line = read_answer(&mut sock, timeout)?;
    set_linger(&sock, None)?;
    finish(line, sent_bytes, sent_crc32c, started)
}

fn set_linger(sock: &TcpStream, linger: Option<Duration>) -> Result<(), ClientError> {
    socket2::SockRef::from(sock)
        .set_linger(linger)
        .map_err(|e| ClientError::Lost("setting SO_LINGER", e))
}

fn finish(
    line: String,
    sent_bytes: u64,
    sent_crc32c: u32,
    started: Instant,
) -> Result<Receipt, ClientError> {
    log::debug!(
        "client: answer after {:.3}s: {}",
        started.elapsed().as_secs_f64(),
        crate::human::printable(line.trim_end_matches('\n'))
    );
    let answer = Answer::parse(&line).map_err(ClientError::BadAnswer)?;
    Ok(Receipt {
        sent_bytes,
        sent_crc32c,
        line: line.trim_end_matches('\n').to_string(),
        answer,
        elapsed: started.elapsed(),
    })
}

/// Tries each address `to` resolves to, like `nc` does.
fn connect(to: &str, timeout: Duration) -> Result<TcpStream, ClientError> {
    let addrs: Vec<SocketAddr> = to
        .to_socket_addrs()
        .map_err(|e| ClientError::Connect(to.to_string(), e))?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(sock) => return Ok(sock),
            Err(e) if is_timeout(&e) => return Err(ClientError::Timeout("connecting", timeout)),
            Err(e) => last = e,
        }
    }
    Err(ClientError::Connect(to.to_string(), last))
}

/// Reads to EOF (the answer is one line, then the sender closes), bounded
/// by [`MAX_LINE`] so a misbehaving peer cannot make us read forever.
fn read_answer(sock: &mut TcpStream, timeout: Duration) -> Result<String, ClientError> {
    let mut answer = Vec::with_capacity(128);
    let mut buf = [0u8; 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() > MAX_LINE {
                    return Err(ClientError::BadAnswer(format!(
                        "longer than {MAX_LINE} bytes"
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(ClientError::Timeout("waiting for the answer", timeout))
            }
            Err(e) => {
                if answer.ends_with(b"\n") {
                    break; // the whole line arrived before the reset
                }
                return Err(ClientError::Lost("waiting for the answer", e));
            }
        }
    }
    if answer.is_empty() {
        return Err(ClientError::Lost(
            "waiting for the answer",
            io::Error::new(io::ErrorKind::UnexpectedEof, "closed without answering"),
        ));
    }
    let text = String::from_utf8(answer).map_err(|_| ClientError::BadAnswer("not UTF-8".into()))?;
    match text.find('\n') {
        Some(end) if end + 1 == text.len() => Ok(text),
        Some(_) => Err(ClientError::BadAnswer(format!(
            "more than one line: {text:?}"
        ))),
        None => Err(ClientError::BadAnswer(format!(
            "no newline (truncated?): {text:?}"
        ))),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A progress bar on stderr, shown only on a terminal and only once an
/// upload has taken more than a moment (short uploads print nothing extra).
struct Progress {
    enabled: bool,
    len: Option<u64>,
    sent: u64,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    const DELAY: Duration = Duration::from_millis(700);

    fn new(wanted: bool, len: Option<u64>) -> Progress {
        Progress {
            enabled: wanted && io::stderr().is_terminal(),
            len,
            sent: 0,
            started: Instant::now(),
            bar: None,
        }
    }

    fn advance(&mut self, n: u64) {
        self.sent += n;
        if !self.enabled {
            return;
        }
        if self.bar.is_none() && self.started.elapsed() >= Self::DELAY {
            self.bar = Some(crate::human::progress_bar(
                self.len,
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ));
        }
        if let Some(bar) = &self.bar {
            bar.set_position(self.sent);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
