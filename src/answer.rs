//! The wire answer: the one line a server sends back after an upload.
//!
//! The upload itself has no framing at all: it is the raw bytes of the file,
//! and its end is the client's half-close. The answer is one line of text,
//! after which the server closes the connection:
//!
//! ```text
//! OK bytes=<decimal> crc32c=<8 lowercase hex> file=<stored name>\n
//! ERR <human-readable reason>\n
//! ```
//!
//! `OK` is the client's proof of delivery: the server has the bytes under a
//! final name, and `bytes`/`crc32c` let the client check that they are the
//! bytes it sent. The proxy relays the server's line untouched, and writes
//! its own `ERR` line only when the server could not give one.
//!
//! A server started with `--discard` keeps nothing and says so:
//! `file=-` ([`NOT_STORED`]); `bytes` and `crc32c` are still those of what
//! it received, so the client checks the delivery just the same.

use std::fmt;

/// The longest answer line we accept, newline included. Real answers are
/// under 100 bytes; the limit keeps a hostile peer from feeding us forever.
pub const MAX_LINE: usize = 4096;

/// The `file=` of an `OK` from a server that stores nothing (`--discard`).
/// Never a stored name: those are timestamps.
pub const NOT_STORED: &str = "-";

/// A parsed answer line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The server stored `bytes` bytes with checksum `crc32c` as `file`.
    Ok {
        bytes: u64,
        crc32c: u32,
        file: String,
    },
    /// The transfer failed; the text says why.
    Err(String),
}

impl Answer {
    /// Builds an `ERR` answer, folding any line breaks in `reason` so the
    /// answer stays one line.
    pub fn err(reason: impl Into<String>) -> Answer {
        let reason: String = reason.into();
        Answer::Err(reason.replace(['\r', '\n'], " "))
    }

    /// Parses one answer line (with or without its trailing newline).
    ///
    /// Strict on purpose: anything not in the contract's form is an error,
    /// because a client that guesses at a garbled answer could report a
    /// delivery that did not happen.
    pub fn parse(line: &str) -> Result<Answer, String> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if let Some(reason) = line.strip_prefix("ERR ") {
            return Ok(Answer::Err(reason.to_string()));
        }
        let Some(rest) = line.strip_prefix("OK ") else {
            return Err(format!("not an answer line: {line:?}"));
        };
        let mut fields = rest.splitn(3, ' ');
        let bytes = field(fields.next(), "bytes")?
            .parse::<u64>()
            .map_err(|e| format!("bad bytes= in {line:?}: {e}"))?;
        let crc_text = field(fields.next(), "crc32c")?;
        if crc_text.len() != 8
            || !crc_text
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(format!(
                "bad crc32c= in {line:?}: want 8 lowercase hex digits"
            ));
        }
        let crc32c = u32::from_str_radix(crc_text, 16)
            .map_err(|e| format!("bad crc32c= in {line:?}: {e}"))?;
        let file = field(fields.next(), "file")?;
        if file.is_empty() {
            return Err(format!("empty file= in {line:?}"));
        }
        Ok(Answer::Ok {
            bytes,
            crc32c,
            file: file.to_string(),
        })
    }

    /// The answer as it goes on the wire, newline included.
    pub fn to_line(&self) -> String {
        format!("{self}\n")
    }
}

fn field<'a>(part: Option<&'a str>, name: &str) -> Result<&'a str, String> {
    let part = part.ok_or_else(|| format!("answer is missing {name}="))?;
    part.strip_prefix(name)
        .and_then(|p| p.strip_prefix('='))
        .ok_or_else(|| format!("expected {name}=..., got {part:?}"))
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Ok {
                bytes,
                crc32c,
                file,
            } => write!(f, "OK bytes={bytes} crc32c={crc32c:08x} file={file}"),
            Answer::Err(reason) => write!(f, "ERR {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_round_trips() {
        let a = Answer::Ok {
            bytes: 42,
            crc32c: 0x00ab_cdef,
            file: "20261125T000000.000000Z-1-000001".into(),
        };
        let line = a.to_line();
        assert_eq!(
            line,
            "OK bytes=42 crc32c=00abcdef file=20261125T000000.000000Z-1-000001\n"
        );
        assert_eq!(Answer::parse(&line), Ok(a));
    }

    #[test]
    fn err_round_trips_and_stays_one_line() {
        let a = Answer::err("disk full\nreally");
        assert_eq!(a.to_line(), "ERR disk full really\n");
        assert_eq!(Answer::parse(&a.to_line()), Ok(a));
    }

    #[test]
    fn rejects_what_is_not_in_the_contract() {
        for bad in [
            "",
            "OK",
            "OK bytes=1",
            "OK bytes=x crc32c=00000000 file=a",
            "OK bytes=1 crc32c=ABCDEF00 file=a",
            "OK bytes=1 crc32c=123 file=a",
            "OK bytes=1 crc32c=00000000 file=",
            "ok bytes=1 crc32c=00000000 file=a",
            "HTTP/1.1 200 OK",
        ] {
            assert!(Answer::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
