//! The value parsers behind the flags: each turns the text a user typed
//! into a value or a one-line reason, checked at parse time so that a bad
//! value is a usage error (exit 2) before anything starts.

use std::time::Duration;

use crate::event_loop::MinRate;

/// Checks `host:port` (a name or an address, and a port), without
/// resolving it: names are resolved when they are used, so a typo in a
/// host name is a clear runtime error and a missing port a usage error.
pub fn parse_host_port(text: &str) -> Result<String, String> {
    let port = text
        .rsplit_once(':')
        .map(|(host, port)| (host.trim_start_matches('[').trim_end_matches(']'), port));
    match port {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(text.to_string())
        }
        _ => Err(format!(
            "{text:?} is not host:port (e.g. 127.0.0.1:8000, localhost:9000, [::1]:8000)"
        )),
    }
}

/// A count of at least 1 (`-n`, `-c`, `--max-conns`), worded the same
/// for each.
pub fn parse_count<T: TryFrom<u64>>(text: &str) -> Result<T, String> {
    let n = text
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("{text:?}: want a whole number, at least 1"))?;
    T::try_from(n).map_err(|_| format!("{text:?}: too large"))
}

/// `--spool-memory`: a size of at least [`MIN_SPOOL_MEMORY`].
pub fn parse_spool_memory(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if bytes < MIN_SPOOL_MEMORY {
        return Err(format!(
            "{text} is less than the least allowed, 4MiB (one transfer streams with four 1 MiB chunks)"
        ));
    }
    Ok(bytes)
}

/// The smallest `--spool-memory`: the disk's smallest budget.
pub const MIN_SPOOL_MEMORY: u64 =
    (crate::event_loop::disk::MIN_CHUNKS * crate::event_loop::disk::CHUNK) as u64;

/// A positive number of transfers a second.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1e7 => Ok(r),
        _ => Err(format!(
            "{text:?}: want transfers per second, e.g. 500 or 0.5"
        )),
    }
}

/// Like [`parse_duration`], but zero is refused (a timeout of nothing).
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err(format!("{text} is zero: give a positive duration"));
    }
    Ok(d)
}

/// Parses `64KiB`, `100MB`, `1GiB` (parse-size's syntax).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    parse_size::parse_size(text).map_err(|e| format!("{e} (try e.g. 64KiB, 100MB, 1GiB)"))
}

/// Like [`parse_bytes`], but zero is refused.
pub fn parse_positive_bytes(text: &str) -> Result<u64, String> {
    match parse_bytes(text)? {
        0 => Err(format!("{text} is zero: give a positive size")),
        n => Ok(n),
    }
}

/// `--min-rate`: a minimum, or `0` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRateArg(pub Option<MinRate>);

/// Parses `0`, `RATE` (bytes a second, e.g. `128B`, `1KiB`) or
/// `RATE/WINDOW` (e.g. `1KiB/30s`).
pub fn parse_min_rate(text: &str) -> Result<MinRateArg, String> {
    if text.trim() == "0" {
        return Ok(MinRateArg(None));
    }
    let (rate, window) = match text.split_once('/') {
        Some((rate, window)) => (rate, parse_duration(window)?),
        None => (text, MinRate::WINDOW),
    };
    let per_second = parse_bytes(rate)?;
    if per_second == 0 || window.is_zero() {
        return Err("use 0 to turn the minimum rate off".into());
    }
    Ok(MinRateArg(Some(MinRate { per_second, window })))
}

/// The longest duration any flag takes. Far beyond any real use, and far
/// below what a clock can add without overflowing (a larger value once
/// made `--grace` panic on SIGTERM).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses `10s`, `500ms`, `2m`, `1h 30m` (humantime's syntax), at most
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(text).map_err(|e| format!("{e} (try e.g. 30s, 500ms, 2m)"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "{text} is longer than the longest allowed, {}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(d)
}
