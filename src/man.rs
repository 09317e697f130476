//! Man pages, generated from the same clap definitions as `--help`:
//! `stopover(1)` for the whole tool and `stopover-server(1)`,
//! `stopover-proxy(1)`, `stopover-client(1)`, `stopover-load(1)`,
//! `stopover-completions(1)` and `stopover-manpage(1)`, each
//! with every option, and EXIT STATUS and EXAMPLES sections written from
//! the same [`Epilogue`] that ends its `--help`.
//!
//! `stopover manpage [SUBCOMMAND]` prints one page; `stopover manpage
//! --dir DIR` writes them all, which is what `make install` does.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use roff::{bold, roman, Roff};

use crate::cli::Cli;
use crate::error::Context;
use crate::help::{self, Epilogue};

/// The subcommands, each with a page of its own (stopover(1) names them
/// all).
pub const PAGES: [&str; 7] = [
    "server",
    "proxy",
    "client",
    "load",
    "trace-view",
    "completions",
    "manpage",
];

/// Renders `stopover(1)`, or `stopover-SUBCOMMAND(1)` for one of [`PAGES`].
pub fn render(page: Option<&str>) -> io::Result<Vec<u8>> {
    let mut root = Cli::command().disable_help_subcommand(true);
    root.build();
    let (cmd, epilogue) = match page {
        None => (root.clone(), &help::STOPOVER),
        Some(name) => {
            let epilogue = match name {
                "server" => &help::SERVER,
                "proxy" => &help::PROXY,
                "client" => &help::CLIENT,
                "load" => &help::LOAD,
                "trace-view" => &help::TRACE_VIEW,
                "completions" => &help::COMPLETIONS,
                "manpage" => &help::MANPAGE,
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("no man page for {name:?} (pages: {})", PAGES.join(", ")),
                    ))
                }
            };
            let sub = root
                .find_subcommand(name)
                .ok_or_else(|| io::Error::other(format!("no subcommand {name}")))?;
            (sub.clone(), epilogue)
        }
    };
    let title = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let man = clap_mangen::Man::new(cmd);
    let mut out = Vec::new();
    // The title line by hand: clap_mangen leaves an empty date unquoted,
    // which shifts the source and manual into the wrong fields.
    writeln!(
        out,
        ".TH {title} 1 \"\" \"stopover {}\" \"stopover manual\"",
        env!("CARGO_PKG_VERSION")
    )?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    if page.is_none() {
        man.render_subcommands_section(&mut out)?;
    }
    sections(epilogue, page).to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// EXIT STATUS, EXAMPLES and SEE ALSO.
fn sections(epilogue: &Epilogue, page: Option<&str>) -> Roff {
    let mut roff = Roff::new();
    if !epilogue.output.is_empty() {
        roff.control("SH", ["OUTPUT"]);
        roff.text([roman(epilogue.output.replace('\n', " "))]);
    }
    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in epilogue.exit_codes {
        roff.control("TP", []);
        roff.text([bold(code.to_string())]);
        roff.text([roman(*meaning)]);
    }
    roff.control("SH", ["EXAMPLES"]);
    roff.control("nf", []);
    roff.control("RS", ["4"]);
    for example in epilogue.examples {
        roff.text([roman(*example)]);
    }
    roff.control("RE", []);
    roff.control("fi", []);
    roff.control("SH", ["SEE ALSO"]);
    let this = file_name(page);
    let others: Vec<String> = std::iter::once(None)
        .chain(PAGES.iter().map(|p| Some(*p)))
        .map(file_name)
        .filter(|name| *name != this)
        .map(|name| format!("{}(1)", name.trim_end_matches(".1")))
        .collect();
    roff.text([roman(others.join(", "))]);
    roff
}

/// `stopover manpage`: prints `page` (stopover(1) without one), or with
/// `dir` writes every page there and prints their paths.
pub fn run(page: Option<&str>, dir: Option<&Path>) -> Result<(), String> {
    let mut stdout = io::stdout();
    match dir {
        Some(dir) => {
            for path in write_all(dir).map_err(|e| e.to_string())? {
                writeln!(stdout, "{}", path.display())
                    .map_err(|e| format!("writing the list of pages: {e}"))?;
            }
        }
        None => {
            let text = render(page).map_err(|e| format!("rendering the man page: {e}"))?;
            stdout
                .write_all(&text)
                .map_err(|e| format!("writing the man page: {e}"))?;
        }
    }
    Ok(())
}

/// The file name of a page: `stopover.1`, `stopover-load.1`.
pub fn file_name(page: Option<&str>) -> String {
    match page {
        None => "stopover.1".to_string(),
        Some(p) => format!("stopover-{p}.1"),
    }
}

/// Writes every page into `dir` (created if missing); returns their paths.
pub fn write_all(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for page in std::iter::once(None).chain(PAGES.iter().map(|p| Some(*p))) {
        let path = dir.join(file_name(page));
        let text = render(page)?;
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(&text))
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(name: Option<&str>) -> String {
        String::from_utf8(render(name).unwrap()).unwrap()
    }

    #[test]
    fn each_subcommand_page_has_its_options_exit_status_and_examples() {
        for name in PAGES {
            let text = page(Some(name));
            // Title, section, (no) date, source, manual: each in its field.
            let th = format!(
                ".TH stopover-{name} 1 \"\" \"stopover {}\" \"stopover manual\"\n",
                env!("CARGO_PKG_VERSION")
            );
            assert!(text.starts_with(&th), "{name}: {text}");
            for section in ["OPTIONS", "\"EXIT STATUS\"", "EXAMPLES", "\"SEE ALSO\""] {
                assert!(
                    text.contains(&format!(".SH {section}")),
                    "{name}: {section}"
                );
            }
            assert!(text.contains("stopover(1)"), "{name}: {text}");
        }
        let load = page(Some("load"));
        assert!(load.contains("fail\\-if"), "{load}");
        assert!(load.contains("p99>50ms"), "{load}");
        let proxy = page(Some("proxy"));
        assert!(proxy.contains("spool\\-memory"), "{proxy}");
        let main = page(None);
        assert!(main.contains("stopover\\-load(1)") || main.contains("stopover-load(1)"));
        assert!(main.contains(".SH \"EXIT STATUS\""));
    }
}
