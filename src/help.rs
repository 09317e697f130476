//! What each command's `--help` ends with, and what its man page says
//! under EXAMPLES and EXIT STATUS (see [`crate::man`]): written once, here,
//! for both, so the two cannot disagree. `tests/examples.rs` runs every
//! example through a shell and checks the exit codes against README's
//! table.

/// What a command's `--help` ends with, and what its man page says under
/// EXAMPLES and EXIT STATUS: written once, here, for both.
pub struct Epilogue {
    /// Command lines, each runnable as written in a POSIX shell (a `#`
    /// comment may follow).
    pub examples: &'static [&'static str],
    /// What the command prints, when that is worth a sentence.
    pub output: &'static str,
    /// Each exit code and what it means.
    pub exit_codes: &'static [(u8, &'static str)],
}

impl Epilogue {
    /// The text `--help` ends with.
    pub fn help(&self) -> String {
        let mut out = String::from("Examples:\n");
        for example in self.examples {
            out += &format!("  {example}\n");
        }
        if !self.output.is_empty() {
            out += &format!("\n{}\n", self.output);
        }
        out += "\nExit codes:\n";
        for (code, meaning) in self.exit_codes {
            out += &format!("  {code}  {meaning}\n");
        }
        out.trim_end().to_string()
    }
}

const USAGE_ERROR: (u8, &str) = (2, "usage error: a bad flag or value");

/// `stopover` itself.
pub const STOPOVER: Epilogue = Epilogue {
    examples: &[
        "stopover server --dir received &",
        "stopover proxy --dir spool --upstream 127.0.0.1:9000 &",
        "stopover client --to 127.0.0.1:8000 README.md",
        "stopover help load        # a subcommand's options and examples",
    ],
    output: "",
    exit_codes: &[
        (0, "success"),
        (1, "failure at run time"),
        USAGE_ERROR,
        (
            3,
            "(client) the server stored different bytes than were sent",
        ),
        (4, "(load) a --fail-if threshold was crossed"),
    ],
};

/// `stopover server`.
pub const SERVER: Epilogue = Epilogue {
    examples: &[
        "stopover server",
        "stopover server --listen 127.0.0.1:9000 --dir /tmp/uploads --fsync",
        "stopover server --max-conns 500 --max-bytes 1GiB --min-rate 1KiB/30s",
        "stopover server --discard        # verify and count uploads, store nothing",
    ],
    output: "",
    exit_codes: &[
        (0, "stopped by SIGINT or SIGTERM"),
        (1, "cannot start (address, directory)"),
        USAGE_ERROR,
    ],
};

/// `stopover proxy`.
pub const PROXY: Epilogue = Epilogue {
    examples: &[
        "stopover proxy",
        "stopover proxy --listen 127.0.0.1:8000 --upstream localhost:9000 --dir spool",
        "stopover proxy --hold 30s        # store, hold 30 s for editing, then forward",
        "stopover proxy --toxic latency:downstream:latency=50,jitter=10   # answers 50 +- 10 ms late",
        "stopover proxy --api-addr 127.0.0.1:8474   # toxiproxy's clients drive it",
    ],
    output: "",
    exit_codes: &[
        (0, "stopped by SIGINT or SIGTERM"),
        (1, "cannot start (address, directory, upstream name)"),
        USAGE_ERROR,
    ],
};

/// `stopover client`.
pub const CLIENT: Epilogue = Epilogue {
    examples: &[
        "stopover client notes.txt",
        "stopover client --to 127.0.0.1:9000 big.iso    # straight to a server",
        "tar c docs | stopover client -                  # standard input",
    ],
    output: "Prints the answer line on stdout.",
    exit_codes: &[
        (
            0,
            "verified: OK, with the same byte count and CRC-32C as sent",
        ),
        (
            1,
            "failed: cannot read, connect or finish, an ERR or malformed answer",
        ),
        USAGE_ERROR,
        (3, "the server stored different bytes than were sent"),
    ],
};

/// `stopover load`.
pub const LOAD: Epilogue = Epilogue {
    examples: &[
        "stopover load -c 64 -n 20000 -s 1KiB",
        "stopover load -c 16 -d 30s -s 64KiB..1MiB --json > result.json",
        "stopover load -c 2000 -s 64KiB --all-at-once --hold-open 1s",
        "stopover load --rate 500 -d 60s --warmup 5s -i 1s --fail-if 'p99>50ms'",
        "stopover load --replay spool --speed 2 --max-wait 1s --to 127.0.0.1:9000",
        "stopover load --replay spool --dry-run    # what a replay would send, and how long it takes",
    ],
    output: "Prints a summary (transfers ok and failed by kind, MB/s, transfers/s,
latency percentiles, each --fail-if passed or FAILED), or one JSON object
with --json, on stdout; with -i, one line per interval first. Quote each
--fail-if condition: unquoted, a shell takes > and < as redirections.",
    exit_codes: &[
        (0, "every transfer verified, every --fail-if passed"),
        (1, "a transfer failed, or none ran"),
        USAGE_ERROR,
        (
            4,
            "every transfer verified, but a --fail-if threshold was crossed",
        ),
    ],
};

/// `stopover completions`.
pub const COMPLETIONS: Epilogue = Epilogue {
    examples: &[
        "stopover completions bash > ~/.local/share/bash-completion/completions/stopover",
        "stopover completions zsh > ~/.zfunc/_stopover",
    ],
    output: "",
    exit_codes: &[(0, "printed"), (1, "cannot write"), USAGE_ERROR],
};

/// `stopover trace-view`.
pub const TRACE_VIEW: Epilogue = Epilogue {
    examples: &[
        "stopover -vv proxy 2> proxy.log    # run a transfer through it, then stop it",
        "stopover trace-view proxy.log -o proxy-trace.svg",
    ],
    output: "Writes one self-contained SVG (standard output, or -o FILE).",
    exit_codes: &[
        (0, "drawn"),
        (
            1,
            "cannot read the log, it holds no trace lines, or cannot write",
        ),
        USAGE_ERROR,
    ],
};

/// `stopover manpage`.
pub const MANPAGE: Epilogue = Epilogue {
    examples: &[
        "stopover manpage > stopover.1",
        "stopover manpage load | man -l -",
        "stopover manpage --dir ~/.local/share/man/man1",
    ],
    output: "",
    exit_codes: &[(0, "printed or written"), (1, "cannot write"), USAGE_ERROR],
};
