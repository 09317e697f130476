//! Exercises that check themselves (docs/GUIDE.md, "Exercises").
//!
//! ```text
//! make exercises      every exercise and whether it is done
//! make exercise 3     check exercise 3; if it is not done, say what was
//!                     seen and where to look
//! ```
//!
//! A test target without the test harness: cargo builds it with the
//! `stopover` binary, and `main` decides what to run. Run bare (as `make
//! test` does, through `cargo test --tests`), it runs no exercise, since
//! on unchanged code every one of them is *meant* to fail; it checks
//! instead that the exercises still fit the code: every function a hint
//! names exists, and every answer in `exercises/answers/` still applies.
//! `make exercises-proof` goes further: each check fails on today's code
//! and passes with its answer applied (`scripts/exercises-proof.sh`).
//!
//! Its own flags (`--status`, `--exercise N`) are named so that cargo's
//! and libtest's (a filter, `--list`, `--nocapture`) never start a check:
//! anything else is the bare run.

mod checks;
mod support;

use std::path::Path;
use std::process::ExitCode;

/// One exercise: its number and title as in the GUIDE, where to look, and
/// its check.
struct Exercise {
    title: &'static str,
    /// Where to change the code: `src/file.rs:function` references, each
    /// checked to exist.
    hint: &'static str,
    check: fn() -> support::Check,
}

const EXERCISES: &[Exercise] = &[
    Exercise {
        title: "the OK line says kib=",
        hint: "build it in `src/server/conn.rs:finish_upload`, and teach `src/answer.rs:parse` the new field",
        check: checks::kib_field,
    },
    Exercise {
        title: "refuse large uploads without sending them upstream",
        hint: "a streaming proxy forwards before it knows the size; see `src/proxy/transfer/upload.rs:read_client` and what hold mode does in `src/proxy/transfer/mod.rs:new`",
        check: checks::refuse_without_forwarding,
    },
    Exercise {
        title: "warn about slow uploads (--slow-upload)",
        hint: "add the flag to `src/cli.rs` (ServerArgs) and `src/server/mod.rs` (ServerConfig), and compare `started.elapsed()` in `src/server/conn.rs:finish_upload`",
        check: checks::slow_upload_warning,
    },
    Exercise {
        title: "count the WouldBlocks",
        hint: "count `Io::Blocked` in `src/server/conn.rs:drive` into the server's Stats (only after a read was made: see `src/event_loop/peer.rs:read`), and print it in `src/server/mod.rs:stopped`",
        check: checks::wouldblock_counter,
    },
    Exercise {
        title: "break edge-triggering on purpose",
        hint: "in `src/server/conn.rs:drive`, return after the first read that brought data instead of reading until WouldBlock",
        check: checks::broken_edge_trigger,
    },
    Exercise {
        title: "the slow-upload warning, on time (a timer)",
        hint: "schedule a timer in `src/server/mod.rs:accepted` as the idle timer is, and warn in `src/server/mod.rs:timer_fired` if the upload is still running",
        check: checks::slow_upload_timer,
    },
    Exercise {
        title: "make back-pressure on the answer visible",
        hint: "where `src/proxy/transfer/answer.rs:relay_answer` stops because the client's write says Blocked, trace it and count it; export the count in `src/proxy/mod.rs:metrics`",
        check: checks::answer_back_pressure,
    },
    Exercise {
        title: "check the answer on its way back",
        hint: "collect the first line in `src/proxy/transfer/answer.rs:relay_answer`, parse it with `src/answer.rs:parse`, and compare it with the spool's bytes and crc32c",
        check: checks::answer_check,
    },
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name);
    if flag("--status").is_some() {
        list();
        return ExitCode::SUCCESS;
    }
    if let Some(at) = flag("--exercise") {
        let n = args.get(at + 1).and_then(|n| n.parse::<usize>().ok());
        return match n.filter(|n| (1..=EXERCISES.len()).contains(n)) {
            Some(n) => check_one(n),
            None => {
                eprintln!(
                    "usage: make exercise N, with N from 1 to {}",
                    EXERCISES.len()
                );
                ExitCode::from(2)
            }
        };
    }
    still_fit()
}

/// Runs exercise `n` and says how it went.
fn check_one(n: usize) -> ExitCode {
    let ex = &EXERCISES[n - 1];
    match (ex.check)() {
        Ok(()) => {
            println!("exercise {n} ({}): done", ex.title);
            ExitCode::SUCCESS
        }
        Err(seen) => {
            println!("exercise {n} ({}): not done: {seen}", ex.title);
            println!(
                "  hint: docs/GUIDE.md, Exercises, {n}: {}",
                ex.hint.replace('`', "")
            );
            ExitCode::FAILURE
        }
    }
}

/// Runs every exercise; one line each.
fn list() {
    for (i, ex) in EXERCISES.iter().enumerate() {
        let status = match (ex.check)() {
            Ok(()) => "done".to_string(),
            Err(_) => format!("not done  (make exercise {})", i + 1),
        };
        println!("{:>2}. {:<52} {status}", i + 1, ex.title);
    }
}

/// Without arguments (under `make test`): checks that the exercises still
/// fit the code, without running any.
fn still_fit() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();
    for (i, ex) in EXERCISES.iter().enumerate() {
        for span in ex.hint.split('`').skip(1).step_by(2) {
            let Some((file, function)) = span.split_once(':').filter(|_| span.starts_with("src/"))
            else {
                continue;
            };
            let source = std::fs::read_to_string(root.join(file)).unwrap_or_default();
            if !source.contains(&format!("fn {function}(")) {
                problems.push(format!(
                    "exercise {}'s hint names {span}, which does not exist",
                    i + 1
                ));
            }
        }
        let patch = answer_patch(root, i + 1);
        if !patch.exists() {
            problems.push(format!(
                "exercise {} has no answer ({})",
                i + 1,
                patch.display()
            ));
        }
    }
    match applies(root) {
        Ok(checked) => println!("exercises: {checked} answers still apply"),
        Err(mut p) => problems.append(&mut p),
    }
    if problems.is_empty() {
        println!(
            "exercises: {} exercises fit the code (run them with `make exercises`)",
            EXERCISES.len()
        );
        ExitCode::SUCCESS
    } else {
        for p in problems {
            eprintln!("exercises: {p}");
        }
        ExitCode::FAILURE
    }
}

/// The GUIDE's answer to exercise `n`, as a patch.
fn answer_patch(root: &Path, n: usize) -> std::path::PathBuf {
    root.join(format!("exercises/answers/{n}.patch"))
}

/// Checks with `git apply --check` that each answer still applies to the
/// last commit. Outside a git checkout (a tarball), there is nothing to
/// check against and it says so.
fn applies(root: &Path) -> Result<usize, Vec<String>> {
    let in_git = std::process::Command::new("git")
        .args(["rev-parse", "--is-inside-work-tree"])
        .current_dir(root)
        .output()
        .is_ok_and(|o| o.status.success());
    if !in_git {
        println!("exercises: not a git checkout: the answers' patches were not checked");
        return Ok(0);
    }
    // Against the last commit, in an index of our own, so that a
    // learner's own (uncommitted) answers do not count as conflicts.
    let index = tempfile::NamedTempFile::new().map_err(|e| vec![format!("temp index: {e}")])?;
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .env("GIT_INDEX_FILE", index.path())
            .current_dir(root)
            .output()
    };
    if !git(&["read-tree", "HEAD"]).is_ok_and(|o| o.status.success()) {
        return Err(vec!["git read-tree HEAD failed".into()]);
    }
    let mut problems = Vec::new();
    for n in 1..=EXERCISES.len() {
        let patch = answer_patch(root, n);
        let out = git(&["apply", "--cached", "--check", &patch.display().to_string()]);
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => problems.push(format!(
                "{} no longer applies to HEAD (refresh it as exercises/answers/README.md says; if you committed your own answer, that is why): {}",
                patch.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => problems.push(format!("running git apply: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(EXERCISES.len())
    } else {
        Err(problems)
    }
}
