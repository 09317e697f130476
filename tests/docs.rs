//! README.md and docs/GUIDE.md cannot drift from the code:
//!
//! - **They render as written.** Both are parsed as CommonMark (with
//!   tables, as GitHub renders them): no code fence left open or closed in
//!   the wrong place, no table row cut off from its table by a paragraph,
//!   no link to a file that a clone does not have (or to a heading that
//!   is not there).
//! - **Their commands run.** Every `stopover` command they show, and every
//!   example `--help` ends with, is run through `sh -c` in an empty
//!   directory (with `--help` added, so nothing starts): it must parse, and
//!   leave no file but those it redirects to on purpose (an unquoted
//!   `--fail-if p99>50ms` leaves one called `50ms`). The `--fail-if`
//!   example runs for real against a server and a proxy, and `completions`,
//!   `manpage` and `make demo` do what the text says.
//! - **Their figures are the code's.** Each default or constant the text
//!   quotes is spelled here from the constant itself (`tests/guide.rs`
//!   does the same for the code references).

use std::collections::BTreeSet;
use std::path::Path;

use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const DOCS: [&str; 2] = ["README.md", "docs/GUIDE.md"];

fn read(doc: &str) -> String {
    std::fs::read_to_string(root().join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"))
}

/// Line number (1-based) of byte `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count() + 1
}

/// What the parser made of a document.
#[derive(Default)]
struct Parsed {
    /// Fenced code blocks: info string, byte range, text.
    fences: Vec<(String, std::ops::Range<usize>, String)>,
    /// Byte ranges of every code block and table.
    code_and_tables: Vec<std::ops::Range<usize>>,
    /// Link and image targets, with their offsets.
    links: Vec<(String, usize)>,
    /// GitHub's anchors of the headings.
    anchors: BTreeSet<String>,
    /// Inline code spans.
    spans: Vec<String>,
}

fn parse(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let mut heading: Option<String> = None;
    let mut fence: Option<(String, std::ops::Range<usize>, String)> = None;
    for (event, range) in Parser::new_ext(text, Options::ENABLE_TABLES).into_offset_iter() {
        match event {
            Event::Start(Tag::CodeBlock(kind)) => {
                parsed.code_and_tables.push(range.clone());
                if let CodeBlockKind::Fenced(info) = kind {
                    fence = Some((info.to_string(), range, String::new()));
                }
            }
            Event::End(TagEnd::CodeBlock) => {
                parsed.fences.extend(fence.take());
            }
            Event::Start(Tag::Table(_)) => parsed.code_and_tables.push(range),
            Event::Start(Tag::Link { dest_url, .. })
            | Event::Start(Tag::Image { dest_url, .. }) => {
                parsed.links.push((dest_url.to_string(), range.start));
            }
            Event::Start(Tag::Heading { .. }) => {
                heading = Some(String::new());
            }
            Event::End(TagEnd::Heading(_)) => {
                parsed.anchors.extend(heading.take().map(|h| slug(&h)));
            }
            Event::Text(t) => {
                if let Some(f) = &mut fence {
                    f.2.push_str(&t);
                }
                if let Some(h) = &mut heading {
                    h.push_str(&t);
                }
            }
            Event::Code(c) => {
                if let Some(h) = &mut heading {
                    h.push_str(&c);
                }
                parsed.spans.push(c.to_string());
            }
            _ => {}
        }
    }
    parsed
}

/// A heading's anchor as GitHub makes it: lower case, spaces to hyphens,
/// other punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Structural problems of one document (see the module docs).
fn problems_of(doc: &str, text: &str) -> Vec<String> {
    let parsed = parse(text);
    let mut problems = Vec::new();
    for (info, range, body) in &parsed.fences {
        let at = line_of(text, range.start);
        let source = text[range.clone()].trim_end();
        let lines: Vec<&str> = source.lines().collect();
        let closed = lines.len() >= 2 && {
            let last = lines[lines.len() - 1].trim();
            last.len() >= 3 && (last.chars().all(|c| c == '`') || last.chars().all(|c| c == '~'))
        };
        if !closed {
            problems.push(format!("{doc}:{at}: the ```{info} fence is never closed"));
        }
        // A fence line inside a block: a fence that closed early or late
        // ("``` text" does not close a fence: it is content).
        if let Some(line) = body.lines().find(|l| l.trim_start().starts_with("```")) {
            problems.push(format!(
                "{doc}:{at}: the ```{info} block contains a fence line {line:?}: a fence that was meant to close it does not"
            ));
        }
    }
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('|')
            && !parsed.code_and_tables.iter().any(|r| r.contains(&offset))
        {
            problems.push(format!(
                "{doc}:{}: a table row outside any table (a paragraph or blank line cut the table): {}",
                line_of(text, offset),
                line.trim_end()
            ));
        }
        offset += line.len();
    }
    let dir = root().join(doc).parent().unwrap().to_path_buf();
    for (link, at) in &parsed.links {
        let at = line_of(text, *at);
        if link.contains("://") || link.starts_with("mailto:") {
            continue;
        }
        let (file, anchor) = link.split_once('#').unwrap_or((link, ""));
        let target = if file.is_empty() {
            root().join(doc)
        } else {
            dir.join(file)
        };
        match target.canonicalize() {
            Ok(path) if path.starts_with(root().canonicalize().unwrap()) => {
                if !anchor.is_empty() && path.extension().is_some_and(|e| e == "md") {
                    let anchors = parse(&std::fs::read_to_string(&path).unwrap()).anchors;
                    if !anchors.contains(anchor) {
                        problems.push(format!("{doc}:{at}: link {link}: no heading #{anchor}"));
                    }
                }
            }
            Ok(_) => problems.push(format!(
                "{doc}:{at}: link {link} leaves the repository: a clone does not have it"
            )),
            Err(_) => problems.push(format!("{doc}:{at}: link {link}: no such file")),
        }
    }
    for span in &parsed.spans {
        if span.starts_with("../") {
            problems.push(format!(
                "{doc}: `{span}` points outside the repository: a clone does not have it"
            ));
        }
    }
    problems
}

#[test]
fn readme_and_guide_render_as_written_and_link_only_what_a_clone_has() {
    let mut problems = Vec::new();
    for doc in DOCS {
        problems.extend(problems_of(doc, &read(doc)));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_markdown_check_finds_what_it_is_for() {
    // Each defect this test once found in README.md, in miniature; a check
    // that cannot fail is no check.
    let cases = [
        (
            "```sh\nstopover client x\n``` A client\nthat resets\n\n## Next\n",
            "fence",
        ),
        ("```sh\nopen\n", "never closed"),
        (
            "| a | b |\n|---|---|\n| 1 | 2 |\n\nA paragraph.\n| 3 | 4 |\n",
            "outside any table",
        ),
        (
            "See [the seed](../shared/seed/skeletal-model.txt).\n",
            "link",
        ),
        ("See [nothing](docs/no-such-file.md).\n", "no such file"),
        (
            "See [a section](#no-such-heading).\n\n## A heading\n",
            "no heading",
        ),
        (
            "Kept in `../shared/seed/skeletal-model.txt`.\n",
            "outside the repository",
        ),
    ];
    for (text, needle) in cases {
        let problems = problems_of("README.md", text);
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "{text:?}: expected a problem with {needle:?}, got {problems:?}"
        );
    }
    let fine = "```sh\nstopover server\n```\n\n| a |\n|---|\n| 1 |\n\n[x](README.md#stopover)\n";
    assert_eq!(problems_of("README.md", fine), Vec::<String>::new());
}

/// `text` with every run of white space made one space, so a phrase is
/// found wherever the paragraph happens to wrap.
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn the_figures_the_docs_quote_are_the_codes() {
    use stopover::cli::{Cli, Command, MAX_DURATION, MIN_SPOOL_MEMORY};
    use stopover::event_loop::{disk, stats, MinRate, Throttle};
    let readme = flat(&read("README.md"));
    let guide = flat(&read("docs/GUIDE.md"));
    let Command::Server(server) = <Cli as clap::Parser>::parse_from(["stopover", "server"]).command
    else {
        unreachable!("parsed as the server")
    };
    let rate = MinRate::DEFAULT;
    let window = rate.window.as_secs();
    let mib = |bytes: usize| bytes / (1024 * 1024);
    // (document, phrase spelled from the code)
    let claims: Vec<(&str, &String, String)> = vec![
        // GUIDE section 6: what closes a plain `nc` that never half-closes.
        ("GUIDE", &guide, format!("default of {} bytes a second over {window} s", rate.per_second)),
        ("GUIDE", &guide, format!("closes the first one after {window} s")),
        ("GUIDE", &guide, format!("too slow: 13 bytes in {window}s")),
        (
            "GUIDE",
            &guide,
            format!("after {} s of silence", server.limits.idle_timeout.as_secs()),
        ),
        (
            "GUIDE",
            &guide,
            format!(
                "`src/sys.rs:set_recv_low_water`) of {} KiB",
                stopover::server::RECV_LOW_WATER / 1024
            ),
        ),
        (
            "GUIDE",
            &guide,
            format!(
                "The limits ({} clients, {} KiB, {} s)",
                stats::MAX_CONNS,
                stats::MAX_REQUEST / 1024,
                stats::DEADLINE.as_secs()
            ),
        ),
        ("README", &readme, format!("`{}B/{window}s`", rate.per_second)),
        (
            "README",
            &readme,
            format!("`{}s`", server.limits.idle_timeout.as_secs()),
        ),
        (
            "README",
            &readme,
            format!("at most {} years", MAX_DURATION.as_secs() / (365 * 24 * 3600)),
        ),
        (
            "README",
            &readme,
            format!("(1 MiB chunks, at least {})", MIN_SPOOL_MEMORY as usize / disk::CHUNK),
        ),
        (
            "README",
            &readme,
            format!("`--spool-memory` ({} MiB)", mib(disk::DEFAULT_BUDGET)),
        ),
        (
            "README",
            &readme,
            format!("at most {} bytes, newline included", stopover::answer::MAX_LINE),
        ),
        (
            "README",
            &readme,
            format!(
                "at most {} are served at once (more wait in the backlog), a request may be at most {} KiB, and a connection not done within {} s",
                stats::MAX_CONNS,
                stats::MAX_REQUEST / 1024,
                stats::DEADLINE.as_secs()
            ),
        ),
        (
            "README",
            &readme,
            format!(
                "throttled to {} per {} s",
                Throttle::BURST,
                Throttle::PERIOD.as_secs()
            ),
        ),
    ];
    let missing: Vec<String> = claims
        .iter()
        .filter(|(_, text, phrase)| !text.contains(phrase.as_str()))
        .map(|(doc, _, phrase)| format!("{doc} should say {phrase:?}"))
        .collect();
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// The Usage table's defaults are clap's: `| \`server --listen\` |
/// \`127.0.0.1:9000\` |` and `| \`--max-bytes\` | no limit |` (a flag
/// without a role is a LIMITS flag, checked on the server).
#[test]
fn the_usage_tables_defaults_are_claps() {
    let mut cmd = <stopover::cli::Cli as clap::CommandFactory>::command();
    cmd.build();
    let readme = read("README.md");
    let mut checked = 0;
    let mut problems = Vec::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // ["", "`server --listen`", "`127.0.0.1:9000`", "notes", ""]
        if cells.len() < 4 || !cells[1].starts_with('`') || !cells[1].contains("--") {
            continue;
        }
        let name = cells[1].trim_matches('`');
        let (role, flag) = match name.split_once(' ') {
            Some((role, flag)) => (role, flag),
            None => ("server", name),
        };
        let Some(sub) = cmd.find_subcommand(role) else {
            continue;
        };
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long().is_some_and(|l| format!("--{l}") == flag))
        else {
            problems.push(format!(
                "README's Usage table names {name}, which clap lacks"
            ));
            continue;
        };
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let documented = cells[2];
        let ok = match default.as_slice() {
            // A switch: off unless given.
            [value] if value == "false" => documented == "off",
            [value] => documented == format!("`{value}`"),
            // A switch, or a flag without a default: the table says so in words.
            _ => !documented.starts_with('`'),
        };
        if !ok {
            problems.push(format!(
                "{name}: README says {documented}, clap's default is {default:?}"
            ));
        }
        checked += 1;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        checked >= 15,
        "expected the Usage table's rows; found {checked}"
    );
}
