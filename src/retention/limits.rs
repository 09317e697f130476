//! The retention limits, from the command line: `--retain-bytes`,
//! `--retain-files`, `--retain-for` and `--min-free`.

use std::time::Duration;

/// The retention limits (`--retain-*`, `--min-free`); all off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// `--retain-bytes`: most bytes of recordings kept.
    pub bytes: Option<u64>,
    /// `--retain-files`: most recordings kept.
    pub files: Option<u64>,
    /// `--retain-for`: recordings older than this are deleted.
    pub age: Option<Duration>,
    /// `--min-free`: the free space to keep on the filesystem.
    pub min_free: Option<MinFree>,
}

impl Limits {
    /// True if any limit is set.
    pub fn any(&self) -> bool {
        self.bytes.is_some()
            || self.files.is_some()
            || self.age.is_some()
            || self.min_free.is_some()
    }

    /// True if a limit needs the clock or the filesystem (a timer).
    pub(super) fn periodic(&self) -> bool {
        self.age.is_some() || self.min_free.is_some()
    }
}

/// `--min-free`: bytes, or a percentage of the filesystem's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    Bytes(u64),
    Percent(f64),
}

impl MinFree {
    /// The free bytes wanted on a filesystem of `total` bytes.
    pub fn bytes(&self, total: u64) -> u64 {
        match *self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Bytes(b) => write!(f, "{b} bytes"),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Parses `--min-free`: a size (`10GiB`) or a percentage (`5%`, `2.5%`),
/// more than 0 and less than 100.
pub fn parse_min_free(text: &str) -> Result<MinFree, String> {
    if let Some(p) = text.trim().strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(p) if p > 0.0 && p < 100.0 => Ok(MinFree::Percent(p)),
            _ => Err(format!(
                "{text:?}: want a percentage above 0 and below 100, e.g. 5%"
            )),
        };
    }
    match crate::cli::parse_bytes(text)? {
        0 => Err("0 keeps nothing free: leave --min-free out instead".into()),
        b => Ok(MinFree::Bytes(b)),
    }
}

/// The limits, for the startup line.
pub(super) fn describe(limits: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(b) = limits.bytes {
        parts.push(format!("at most {b} bytes"));
    }
    if let Some(n) = limits.files {
        parts.push(format!("at most {n} files"));
    }
    if let Some(age) = limits.age {
        parts.push(format!(
            "nothing older than {}",
            humantime::format_duration(age)
        ));
    }
    if let Some(m) = limits.min_free {
        parts.push(format!("{m} free"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_free_parses_sizes_and_percentages() {
        assert_eq!(parse_min_free("5%"), Ok(MinFree::Percent(5.0)));
        assert_eq!(parse_min_free("2.5%"), Ok(MinFree::Percent(2.5)));
        assert_eq!(parse_min_free("1GiB"), Ok(MinFree::Bytes(1 << 30)));
        for bad in ["0%", "100%", "150%", "-1%", "x%", "lots", "0"] {
            assert!(parse_min_free(bad).is_err(), "{bad}");
        }
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
    }
}
