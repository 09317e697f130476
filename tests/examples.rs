//! Every command README.md, docs/GUIDE.md and `--help` show is runnable
//! as written in a POSIX shell, and the ones that are safe to run do what
//! the text says (see also `tests/docs.rs`, which checks how the two
//! documents render and the figures they quote).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(doc: &str) -> String {
    std::fs::read_to_string(root().join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"))
}

fn stopover(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run stopover")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The lines of `--help`'s section `heading` ("Examples:", "Exit codes:").
fn help_section(help: &str, heading: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect()
}

/// The subcommands, `""` being `stopover` itself.
const SUBCOMMANDS: [&str; 7] = [
    "",
    "server",
    "proxy",
    "client",
    "load",
    "completions",
    "manpage",
];

fn help_of(sub: &str) -> String {
    let args: Vec<&str> = [sub, "--help"]
        .into_iter()
        .filter(|a| !a.is_empty())
        .collect();
    let out = stopover(&args);
    assert_eq!(out.status.code(), Some(0), "stopover {sub} --help");
    stdout(&out)
}

/// Every `stopover ...` command line the documents and `--help` show, with
/// where it was found. Synopses (`stopover completions SHELL`, `[--dir
/// DIR]`) are not examples and are left out.
fn documented_commands() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for sub in SUBCOMMANDS {
        for example in help_section(&help_of(sub), "Examples:") {
            found.push((format!("stopover {sub} --help"), example));
        }
    }
    let synopsis = |cmd: &str| {
        cmd.contains('[')
            || cmd.contains("...")
            || cmd
                .split_whitespace()
                .any(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
    };
    for doc in ["README.md", "docs/GUIDE.md"] {
        let text = read(doc);
        let mut fence: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let at = format!("{doc}:{}", n + 1);
            if let Some(info) = line.strip_prefix("```") {
                fence = match fence {
                    Some(_) => None,
                    None => Some(info.trim().to_string()),
                };
                continue;
            }
            let Some(info) = &fence else { continue };
            let line = line.trim();
            // Shell blocks, and the `$ ` lines of recorded sessions.
            let command = match (info.as_str(), line.strip_prefix("$ ")) {
                ("sh", _) => line,
                (_, Some(typed)) => typed,
                _ => continue,
            };
            let command = command
                .trim_start_matches("time ")
                .replace("target/release/stopover", "stopover")
                .replace("$B ", "stopover ");
            if command.starts_with("stopover ") && !synopsis(&command) {
                found.push((at, command));
            }
        }
        // Inline: `stopover load -n 1000 -c 16 -s 64KiB`, `--fail-if '...'`.
        for span in text.split('`').skip(1).step_by(2) {
            let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
            let command = if span.starts_with("--fail-if ") {
                format!("stopover load {span}")
            } else {
                span
            };
            if command.starts_with("stopover ") && !synopsis(&command) {
                found.push((format!("{doc} (inline)"), command));
            }
        }
    }
    found
}

/// The files a command line redirects its output to on purpose.
fn redirect_targets(command: &str, home: &Path) -> BTreeSet<PathBuf> {
    let words: Vec<&str> = command.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == ">")
        .map(|w| match w[1].strip_prefix("~/") {
            Some(rest) => home.join(rest),
            None => PathBuf::from(w[1]),
        })
        .collect()
}

/// Every file under `dir`.
fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap().map_while(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.insert(path);
        }
    }
    files
}

/// Runs `command` through `sh -c` in an empty directory, with `stopover`
/// the binary under test given `--help` at the end (so it parses its
/// arguments and starts nothing). Returns what went wrong.
fn try_in_a_shell(command: &str) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let failed = dir.path().join("failed");
    let targets = redirect_targets(command, &home);
    for target in &targets {
        let parent = dir.path().join(target).parent().unwrap().to_path_buf();
        std::fs::create_dir_all(parent).unwrap();
    }
    let script = format!(
        "stopover() {{ if [ \"$1\" = help ]; then set -- \"$@\"; else set -- \"$@\" --help; fi; \
         \"$STOPOVER\" \"$@\" >/dev/null 2>>\"$FAILED\" || echo \"stopover-exit $?\" >>\"$FAILED\"; }}\n{command}\nwait\n"
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("STOPOVER", bin())
        .env("FAILED", &failed)
        .env("HOME", &home)
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    let complaint = std::fs::read_to_string(&failed).unwrap_or_default();
    if complaint.contains("stopover-exit ") {
        return Some(format!("stopover rejects it: {}", complaint.trim()));
    }
    let _ = std::fs::remove_file(&failed);
    let expected: BTreeSet<PathBuf> = targets.iter().map(|t| dir.path().join(t)).collect();
    let stray: Vec<PathBuf> = files_under(dir.path())
        .into_iter()
        .filter(|f| !expected.contains(f))
        .collect();
    if !stray.is_empty() {
        return Some(format!(
            "a shell makes files of it ({stray:?}; an unquoted > or <?); sh said: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    None
}

#[test]
fn every_documented_command_runs_as_written_in_a_posix_shell() {
    let commands = documented_commands();
    let mut problems = Vec::new();
    for (at, command) in &commands {
        if let Some(problem) = try_in_a_shell(command) {
            problems.push(format!("{at}: {command}\n    {problem}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let from_help = commands
        .iter()
        .filter(|(at, _)| at.ends_with("--help"))
        .count();
    assert!(
        from_help >= 15,
        "expected --help's examples; found {from_help}"
    );
    assert!(
        commands.len() >= from_help + 8,
        "expected README's commands too: {commands:?}"
    );
}

#[test]
fn the_shell_check_catches_an_unquoted_condition() {
    let problem = try_in_a_shell("stopover load --fail-if p99>50ms");
    assert!(
        problem.as_deref().is_some_and(|p| p.contains("50ms")),
        "{problem:?}"
    );
    assert_eq!(try_in_a_shell("stopover load --fail-if 'p99>50ms'"), None);
    assert_eq!(
        try_in_a_shell("stopover manpage > stopover.1"),
        None,
        "a redirection on purpose is fine"
    );
    let problem = try_in_a_shell("stopover load -n 0");
    assert!(problem.is_some_and(|p| p.contains("rejects")));
}

/// Runs `command` through `sh -c` with `stopover` the binary under test,
/// in `dir`.
fn run_in_a_shell(command: &str, dir: &Path) -> Output {
    let script = format!("stopover() {{ \"$STOPOVER\" \"$@\"; }}\n{command}\n");
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("STOPOVER", bin())
        .stdin(Stdio::null())
        .output()
        .expect("run sh")
}

#[test]
fn readmes_fail_if_example_gates_a_real_run_as_the_text_says() {
    let sys = start_system();
    let dir = tempfile::tempdir().unwrap();
    // README's own example, as written, against a real proxy and server.
    let readme = read("README.md");
    let example = readme
        .split('`')
        .find(|span| span.starts_with("--fail-if '"))
        .expect("README shows a --fail-if example")
        .to_string();
    let command = format!(
        "stopover load --to {} -n 20 -c 2 -s 1KiB --no-progress {example}",
        sys.proxy.addr
    );
    let out = run_in_a_shell(&command, dir.path());
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("threshold")).collect();
    let conditions: Vec<&str> = example
        .split("--fail-if")
        .map(|c| c.trim().trim_matches('\''))
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(lines.len(), conditions.len(), "{command}: {text}");
    for (line, condition) in lines.iter().zip(&conditions) {
        // `threshold         p99>50ms: passed, measured 1.234 ms`
        let verdict = line
            .split_once(&format!("{condition}: "))
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("{condition} in {line:?}"));
        let (outcome, measured) = verdict.split_once(", measured ").expect(verdict);
        assert!(["passed", "FAILED"].contains(&outcome), "{line}");
        let unit = measured.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
        assert!(!unit.trim().is_empty(), "no unit: {line}");
    }
    let crossed = lines.iter().any(|l| l.contains("FAILED"));
    // README: 0 every transfer verified and every threshold passed; 4 a
    // threshold crossed.
    assert_eq!(
        out.status.code(),
        Some(if crossed { 4 } else { 0 }),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        files_under(dir.path()).is_empty(),
        "the shell made files: {:?}",
        files_under(dir.path())
    );
    // Both exits, for certain: no error passes, a latency under an hour
    // crosses `p50<1h`; the JSON says `passed` and the unit, as README says.
    let to = sys.proxy.addr.to_string();
    for (condition, code, passed, unit) in
        [("errors>0", 0, true, "errors"), ("p50<1h", 4, false, "ms")]
    {
        let out = run_in_a_shell(
            &format!("stopover load --to {to} -n 5 -c 1 --json --fail-if '{condition}'"),
            dir.path(),
        );
        assert_eq!(out.status.code(), Some(code), "{condition}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let result = &json["thresholds"][0];
        assert_eq!(result["threshold"], condition);
        assert_eq!(result["passed"], passed, "{json}");
        assert_eq!(result["unit"], unit, "{json}");
        let documented: serde_json::Value = serde_json::from_str(
            readme
                .split('`')
                .find(|s| s.starts_with("{\"threshold\""))
                .expect("README shows a threshold's JSON"),
        )
        .expect("README's threshold JSON parses");
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(
            keys(&documented),
            keys(result),
            "README documents the JSON keys"
        );
    }
}

#[test]
fn each_help_lists_the_exit_codes_readmes_table_gives() {
    // | code | `server`, `proxy` | `client` | `load` | `completions`, `manpage`, `trace-view` |
    let readme = read("README.md");
    let mut rows = readme.lines().skip_while(|l| !l.starts_with("| code |"));
    let header: Vec<String> = rows
        .next()
        .expect("README's exit code table")
        .split('|')
        .map(|c| c.trim().to_string())
        .collect();
    let body: Vec<Vec<String>> = rows
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    let mut checked = 0;
    for (column, subs) in header
        .iter()
        .enumerate()
        .skip(2)
        .filter(|(_, h)| !h.is_empty())
    {
        let documented: Vec<String> = body
            .iter()
            .filter(|row| row.get(column).is_some_and(|c| !c.is_empty()))
            .map(|row| row[1].clone())
            .collect();
        for sub in subs.split(',').map(|s| s.trim().trim_matches('`')) {
            let help = help_of(sub);
            let listed: Vec<String> = help_section(&help, "Exit codes:")
                .iter()
                .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
                .collect();
            assert_eq!(listed, documented, "{sub} --help against README's table");
            checked += 1;
        }
    }
    assert_eq!(
        checked, 7,
        "server, proxy, client, load, completions, manpage, trace-view"
    );
}

#[test]
fn completions_and_man_pages_are_what_readme_and_make_install_promise() {
    for shell in ["bash", "zsh", "fish"] {
        let out = stopover(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        assert!(stdout(&out).contains("fail-if"), "{shell}");
    }
    let dir = tempfile::tempdir().unwrap();
    let man1 = dir.path().join("man1");
    let out = stopover(&["manpage", "--dir", man1.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let names: BTreeSet<String> = files_under(&man1)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let pages = [
        "stopover.1",
        "stopover-server.1",
        "stopover-proxy.1",
        "stopover-client.1",
        "stopover-load.1",
        "stopover-trace-view.1",
        "stopover-completions.1",
        "stopover-manpage.1",
    ];
    assert_eq!(names, pages.iter().map(|p| p.to_string()).collect());
    for page in &pages[1..] {
        let sub = page.trim_start_matches("stopover-").trim_end_matches(".1");
        let printed = stdout(&stopover(&["manpage", sub]));
        let written = std::fs::read_to_string(man1.join(page)).unwrap();
        assert_eq!(printed, written, "{page}");
        assert!(
            written.starts_with(".ie") || written.starts_with(".TH"),
            "roff: {page}"
        );
        assert!(written.contains(&format!(".TH stopover-{sub} 1")), "{page}");
        for section in ["OPTIONS", "\"EXIT STATUS\"", "EXAMPLES"] {
            assert!(
                written.contains(&format!(".SH {section}")),
                "{page}: {section}"
            );
        }
        // Every long option of the subcommand is documented.
        for flag in help_of(sub)
            .split_whitespace()
            .filter(|w| w.starts_with("--"))
        {
            let flag = flag
                .trim_end_matches([',', '.', ')'])
                .split(['=', '<'])
                .next()
                .unwrap();
            if flag.len() > 2
                && flag
                    .chars()
                    .skip(2)
                    .all(|c| c.is_ascii_lowercase() || c == '-')
            {
                assert!(
                    written.contains(&flag.replace('-', "\\-")),
                    "{page} lacks {flag}"
                );
            }
        }
    }
    // Every page a page names exists (stopover(1) once named
    // stopover-completions(1), which was never made).
    for page in pages {
        let written = std::fs::read_to_string(man1.join(page)).unwrap();
        for named in written
            .split_whitespace()
            .filter(|w| w.ends_with("(1)") || w.ends_with("(1),"))
        {
            let name = named
                .trim_end_matches(',')
                .trim_end_matches("(1)")
                .replace("\\-", "-");
            let placeholder = name.chars().any(|c| c.is_ascii_uppercase()); // stopover-SUBCOMMAND(1)
            assert!(
                placeholder || pages.contains(&format!("{name}.1").as_str()),
                "{page} names {named}"
            );
        }
    }
    // What `make install` writes, `make uninstall` removes; the binary is
    // stripped. (`make -n` only prints the commands.)
    let make = |target: &str| {
        Command::new("make")
            .args(["-n", target, "PREFIX=/nonexistent/prefix"])
            .current_dir(root())
            .output()
            .map(|o| stdout(&o))
    };
    match (make("install"), make("uninstall")) {
        (Ok(install), Ok(uninstall)) => {
            assert!(install.contains("install -s"), "strips: {install}");
            assert!(
                install.contains("manpage --dir /nonexistent/prefix/share/man/man1"),
                "{install}"
            );
            for page in pages {
                assert!(
                    uninstall.contains(&format!("/nonexistent/prefix/share/man/man1/{page}")),
                    "{uninstall}"
                );
            }
            assert!(uninstall.contains("/nonexistent/prefix/bin/stopover"));
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("make not found ({e}): skipping the Makefile's part")
        }
    }
}

#[test]
fn make_demo_shows_a_verified_transfer_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(root().join("scripts/demo.sh"))
        .arg(bin())
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/demo.sh");
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("client exit code: 0"), "{text}");
    assert!(text.contains("OK bytes="), "{text}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "make demo left its directory behind"
    );
}

#[test]
fn a_client_that_never_half_closes_is_cut_by_min_rate_as_the_guide_says() {
    // GUIDE section 6: `nc` without -N sends its 13 bytes and waits; the
    // proxy's --min-rate ends it, logged as `too slow: 13 bytes in 10s`
    // at the default window (1 s here, to keep the test short).
    use std::io::Write;
    let dirs = tempfile::tempdir().unwrap();
    let server = spawn_server(&dirs.path().join("r"), &[]);
    let proxy = spawn_proxy(
        server.addr,
        &dirs.path().join("s"),
        &["--min-rate", "128B/1s"],
    );
    let mut nc = std::net::TcpStream::connect(proxy.addr).unwrap();
    nc.write_all(b"hello, world\n").unwrap();
    let line = proxy.wait_for_log("too slow:");
    assert!(line.contains("too slow: 13 bytes in 1s"), "{line}");
    let guide = read("docs/GUIDE.md");
    assert!(
        guide.contains("`too slow: 13 bytes in 10s`"),
        "GUIDE section 6"
    );
}
