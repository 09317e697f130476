//! docs/GUIDE.md must stay true to the code: every `src/file.rs:function`
//! or `benches/file.rs:function` it names must exist, every file it links
//! must exist, and the diagrams it shows must be the ones in docs/ (text
//! source and rendered SVG).

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `...` span in the guide.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

#[test]
fn every_code_reference_in_the_guide_exists() {
    let guide = std::fs::read_to_string(root().join("docs/GUIDE.md")).expect("docs/GUIDE.md");
    let mut checked = 0;
    let mut problems = Vec::new();
    for span in code_spans(&guide) {
        if !span.starts_with("src/") && !span.starts_with("benches/") {
            continue;
        }
        let (file, function) = match span.split_once(':') {
            Some((f, func)) => (f, Some(func)),
            None => (span, None),
        };
        let Ok(source) = std::fs::read_to_string(root().join(file)) else {
            problems.push(format!("{span}: no file {file}"));
            continue;
        };
        if let Some(function) = function {
            if !source.contains(&format!("fn {function}("))
                && !source.contains(&format!("fn {function}<"))
            {
                problems.push(format!("{span}: {file} has no fn {function}"));
            }
        }
        checked += 1;
    }
    assert!(
        problems.is_empty(),
        "the guide names what the code lacks:\n{}",
        problems.join("\n")
    );
    assert!(
        checked >= 40,
        "expected the guide to reference the code throughout; found {checked}"
    );
}

#[test]
fn the_guide_shows_the_diagrams_that_docs_holds() {
    let guide = std::fs::read_to_string(root().join("docs/GUIDE.md")).unwrap();
    for name in ["transfer-sequence", "proxy-states"] {
        let source = std::fs::read_to_string(root().join(format!("docs/{name}.txt"))).unwrap();
        assert!(
            guide.contains(source.trim_end()),
            "docs/GUIDE.md's copy of docs/{name}.txt is out of date"
        );
        let svg = root().join(format!("docs/{name}.svg"));
        assert!(svg.exists(), "docs/{name}.svg missing: run `make diagrams`");
        let svg_text = std::fs::read_to_string(&svg).unwrap();
        // Every word label of the source is in the rendered picture.
        for label in ["Streaming", "Salvaging", "accept", "FIN", "verify"] {
            if source.contains(label) {
                assert!(
                    svg_text.contains(label),
                    "docs/{name}.svg lacks {label:?}: run `make diagrams`"
                );
            }
        }
        assert!(
            guide.contains(&format!("({name}.svg)")),
            "the guide links docs/{name}.svg"
        );
    }
}

#[test]
fn the_guide_states_the_real_defaults() {
    // Numbers the guide quotes that live in the code.
    let guide = std::fs::read_to_string(root().join("docs/GUIDE.md")).unwrap();
    assert_eq!(stopover::proxy::transfer::LAG_LIMIT, 1024 * 1024);
    assert!(guide.contains("1 MiB ahead"));
    assert_eq!(stopover::event_loop::SCRATCH_SIZE, 1024 * 1024);
    assert!(guide.contains("up to 1 MiB"));
    assert_eq!(stopover::event_loop::disk::DEFAULT_BUDGET, 8 * 1024 * 1024);
    assert!(guide.contains("8 MiB by default"));
    assert_eq!(stopover::event_loop::disk::CHUNK, 1024 * 1024);
    assert!(guide.contains("aligned 1 MiB chunks"));
}

#[test]
fn the_guide_shows_the_trace_picture_drawn_from_a_real_demo_log() {
    let guide = std::fs::read_to_string(root().join("docs/GUIDE.md")).unwrap();
    assert!(
        guide.contains("(demo-trace.svg)"),
        "the guide links docs/demo-trace.svg"
    );
    let log = std::fs::read_to_string(root().join("docs/demo-trace.log"))
        .expect("docs/demo-trace.log: run `make diagrams`");
    // A real run: the demo's proxy, listening, with a whole transfer in it.
    for line in [
        "proxy listening on",
        "state Connecting -> Streaming",
        "closed (Relayed)",
    ] {
        assert!(
            log.contains(line),
            "docs/demo-trace.log lacks {line:?}: run `make diagrams`"
        );
    }
    let svg = std::fs::read_to_string(root().join("docs/demo-trace.svg")).unwrap();
    let drawn = stopover::trace_view::render(&stopover::trace_view::parse(&log));
    assert!(
        svg == drawn,
        "docs/demo-trace.svg is not trace-view's picture of docs/demo-trace.log: run `make diagrams`"
    );
}
