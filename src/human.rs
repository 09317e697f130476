//! Output for people, shared by every role: the rates that log lines and
//! summaries print (so that every role means the same thing by "MB/s"),
//! and the progress bar of the client and the load generator.

use std::time::Duration;

/// Megabytes (10^6 bytes) per second; 0 for an empty interval.
pub fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / 1e6 / secs
    } else {
        0.0
    }
}

/// A progress bar on stderr: a bar for a known `len`, a spinner otherwise,
/// drawn with `template` (indicatif's syntax).
pub fn progress_bar(len: Option<u64>, template: &str) -> indicatif::ProgressBar {
    let bar = match len {
        Some(len) => indicatif::ProgressBar::new(len),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let style = indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// `text` with every control character escaped (`\u{1b}`), so that what a
/// peer sent cannot drive the user's terminal when it is printed.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Prints `line` on standard output. A closed or full-and-gone stdout
/// (`stopover client f | head -0`) loses the line and nothing else: the
/// exit code still says what happened, and there is no panic (which
/// `println!` would give on `EPIPE`).
pub fn out(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("OK bytes=1"), "OK bytes=1");
        assert_eq!(
            printable("ERR \u{1b}[31mred\u{7}"),
            "ERR \\u{1b}[31mred\\u{7}"
        );
    }

    #[test]
    fn megabytes_are_decimal() {
        assert_eq!(mb_per_s(2_000_000, Duration::from_secs(2)), 1.0);
        assert_eq!(mb_per_s(5, Duration::ZERO), 0.0);
    }
}
