//! Errors that say what was being done, and to what.
//!
//! Every fallible step in stopover returns `io::Result`. A bare `io::Error`
//! ("Permission denied (os error 13)") does not tell a user which file or
//! which address was the problem, so at the point where we know that, we wrap
//! the error with [`Context::context`]: the message becomes
//! `creating spool dir "spool": Permission denied (os error 13)` and the
//! original [`io::ErrorKind`] is kept, so callers can still branch on it.
//! `main` prints the result on one line and picks the exit code.

use std::fmt::Display;
use std::io;

/// Adds a description of what was being attempted to an `io::Error`.
pub trait Context<T> {
    /// Wraps the error as `"{what}: {error}"`, keeping its kind.
    fn context<D: Display>(self, what: D) -> io::Result<T>;
    /// Like [`Context::context`], but builds the description only on error.
    fn with_context<D: Display, F: FnOnce() -> D>(self, what: F) -> io::Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context<D: Display>(self, what: D) -> io::Result<T> {
        self.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
    }

    fn with_context<D: Display, F: FnOnce() -> D>(self, what: F) -> io::Result<T> {
        self.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", what())))
    }
}

/// Short human text for an error, without the "(os error N)" suffix.
///
/// Used in `ERR` answers, which go to remote users who cannot act on errno
/// numbers.
pub fn brief(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_kind_and_prefixes_message() {
        let r: io::Result<()> = Err(io::Error::from(io::ErrorKind::NotFound));
        let e = r.context("opening \"x\"").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with("opening \"x\": "), "{e}");
    }

    #[test]
    fn brief_strips_errno() {
        let e = io::Error::from_raw_os_error(28);
        assert_eq!(brief(&e), "No space left on device");
    }
}
