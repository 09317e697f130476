//! The parser and the renderer, on a trace captured from a real run of
//! the demo (`SIZE=300000 TRACE=1 scripts/demo.sh`, the proxy's log).

use super::*;

/// The proxy's `-vv` log of one 300 kB transfer, as the demo wrote it.
const CAPTURED: &str = include_str!("demo-proxy.log");

fn lane(key: usize, side: &str) -> Lane {
    Lane::Socket {
        key,
        side: side.into(),
    }
}

#[test]
fn every_traced_line_of_a_real_run_is_understood() {
    let traced = CAPTURED.lines().filter(|l| l.contains(" TRACE ")).count();
    let events = parse(CAPTURED);
    // The trace lines, and nothing else (info and debug lines are skipped).
    assert_eq!(events.len(), traced, "{events:#?}");
    let kinds = |lane: &Lane, kind: Kind| {
        events
            .iter()
            .filter(|e| &e.lane == lane && e.kind == kind)
            .count()
    };
    assert_eq!(kinds(&lane(0, "client"), Kind::Read), 3);
    assert_eq!(kinds(&lane(0, "upstream"), Kind::Write), 3);
    assert_eq!(kinds(&lane(0, "upstream"), Kind::Read), 1);
    assert_eq!(kinds(&lane(0, "client"), Kind::Write), 1);
    assert_eq!(kinds(&lane(0, "upstream"), Kind::WouldBlock), 1);
    assert_eq!(kinds(&Lane::Loop, Kind::WouldBlock), 1);
    assert_eq!(kinds(&Lane::Loop, Kind::Wake), 7);
    assert_eq!(kinds(&Lane::Loop, Kind::State), 2);
    assert_eq!(kinds(&Lane::Disk, Kind::Disk), 4);
    assert_eq!(kinds(&lane(0, "client"), Kind::Eof), 1);
    assert_eq!(kinds(&lane(0, "upstream"), Kind::Fin), 1);
    assert!(events.iter().all(|e| e.role == "proxy" && e.at.is_some()));
}

#[test]
fn the_message_is_found_whatever_precedes_it() {
    let forms = [
        "2026-12-02T01:10:23.651Z TRACE [stopover::event_loop::peer] proxy: #0 client read 1024",
        "2026-12-02T01:10:23.651Z TRACE proxy: #0 client read 1024",
        "proxy | TRACE [stopover::event_loop::peer] proxy: #0 client read 1024",
        "proxy: #0 client read 1024",
    ];
    for line in forms {
        let e = parse_line(line).unwrap_or_else(|| panic!("not understood: {line}"));
        assert_eq!(
            (e.lane, e.kind, e.label.as_str()),
            (lane(0, "client"), Kind::Read, "read 1024"),
            "{line}"
        );
    }
    // The server's own lines have no side: its socket is its client.
    let e = parse_line("2026-12-02T00:52:30.505Z TRACE server: #3 read WouldBlock").unwrap();
    assert_eq!(
        (e.role.as_str(), e.lane, e.kind),
        ("server", lane(3, "client"), Kind::WouldBlock)
    );
    let e = parse_line("2026-12-02T00:52:30.505Z INFO  server: stored 20261202T005230Z-1-000001 from 127.0.0.1:1: 5 bytes").unwrap();
    assert_eq!((e.lane, e.kind), (Lane::Disk, Kind::Disk));
    let e = parse_line("2026-12-02T00:52:31.000Z TRACE proxy: timer fired: Idle { key: 4, id: 9 }")
        .unwrap();
    assert_eq!(
        (e.lane, e.kind, e.key, e.label.as_str()),
        (Lane::Timers, Kind::Timer, Some(4), "Idle #4")
    );
    let e = parse_line("proxy: #2 client read paused: waiting for the upstream").unwrap();
    assert_eq!(e.kind, Kind::Pause);
    // Not trace lines: skipped.
    for other in [
        "2026-12-02T00:52:30.505Z INFO  proxy listening on 127.0.0.1:8000",
        "2026-12-02T00:52:30.505Z DEBUG proxy: accepted 127.0.0.1:5 as #0",
        "the proxy: a relay",
        "",
    ] {
        assert_eq!(parse_line(other), None, "{other}");
    }
}

#[test]
fn timestamps_become_seconds_since_midnight() {
    let at = timestamp("2026-12-02T01:10:23.651Z TRACE x").unwrap();
    assert!((at - (3600.0 + 600.0 + 23.651)).abs() < 1e-9, "{at}");
    let at = timestamp("proxy | 2026-12-02T00:00:01.000250Z x").unwrap();
    assert!((at - 1.000250).abs() < 1e-9, "{at}");
    assert_eq!(timestamp("proxy: #0 client read 5"), None);
}

/// A small well-formedness check: every tag closes, in order, and
/// attribute values are quoted. Returns the element names opened.
fn well_formed(xml: &str) -> Result<Vec<String>, String> {
    let mut stack: Vec<String> = Vec::new();
    let mut seen = Vec::new();
    let mut rest = xml;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        if text.contains('>') || text.contains('&') && !entities_ok(text) {
            return Err(format!("bad text {text:?}"));
        }
        let close = rest[open..].find('>').ok_or("unclosed tag")? + open;
        let tag = &rest[open + 1..close];
        rest = &rest[close + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack.pop().ok_or(format!("</{name}> with nothing open"))?;
            if top != name {
                return Err(format!("</{name}> closes <{top}>"));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name = body
            .split_whitespace()
            .next()
            .ok_or("empty tag")?
            .to_string();
        if body.matches('"').count() % 2 != 0 || body.contains('<') {
            return Err(format!("bad attributes in <{tag}>"));
        }
        seen.push(name.clone());
        if !self_closing {
            stack.push(name);
        }
    }
    if !stack.is_empty() {
        return Err(format!("never closed: {stack:?}"));
    }
    Ok(seen)
}

#[test]
fn the_well_formedness_check_can_fail() {
    assert!(well_formed("<svg><g></svg>").is_err());
    assert!(well_formed("<svg><text>a < b</text></svg>").is_err());
    assert!(well_formed("<svg><text>R&D</text></svg>").is_err());
    assert!(well_formed("<svg x=\"1/></svg>").is_err());
    assert!(well_formed("<svg><text>a &amp; b</text><g/></svg>").is_ok());
}

fn entities_ok(text: &str) -> bool {
    text.split('&').skip(1).all(|e| {
        ["amp;", "lt;", "gt;", "quot;"]
            .iter()
            .any(|ent| e.starts_with(ent))
    })
}

#[test]
fn the_picture_is_well_formed_svg_with_a_lane_per_socket() {
    let svg = render(&parse(CAPTURED));
    let elements = well_formed(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
    assert_eq!(elements.first().map(String::as_str), Some("svg"));
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    for lane in [
        "proxy loop",
        "proxy #0 client",
        "proxy #0 upstream",
        "proxy disk",
        "proxy timers",
    ] {
        assert!(svg.contains(&format!(">{lane}</text>")), "no lane {lane:?}");
    }
    for label in [
        "read 127973",
        "write 127973",
        "read WouldBlock",
        "#0 Connecting \u{2192} Streaming",
        "#0 write done",
    ] {
        assert!(svg.contains(label), "no {label:?} in the picture");
    }
    // A relay arrow for each read that was written on the other side.
    assert_eq!(
        svg.matches("class=\"flow\"").count(),
        4 + 1,
        "three up, one down, one in the legend"
    );
}

/// The x and y of the glyph drawn for the `n`th label `label`.
fn position(svg: &str, label: &str, n: usize) -> (f64, f64) {
    let line = svg
        .lines()
        .filter(|l| l.contains(&format!(">{label}</text>")))
        .nth(n)
        .unwrap_or_else(|| panic!("no {label:?} #{n}"));
    let attr = |name: &str| -> f64 {
        let at = line.find(&format!(" {name}=\"")).expect(name) + name.len() + 3;
        line[at..].split('"').next().unwrap().parse().unwrap()
    };
    (attr("cx"), attr("cy"))
}

#[test]
fn reads_and_writes_of_the_two_sockets_interleave_down_the_picture() {
    let svg = render(&parse(CAPTURED));
    let (read_x, read_y) = position(&svg, "read 127973", 0);
    let (write_x, write_y) = position(&svg, "write 127973", 0);
    let (next_read_x, next_read_y) = position(&svg, "read 95232", 0);
    assert!(
        write_x > read_x,
        "the upstream's lane is right of the client's"
    );
    assert_eq!(next_read_x, read_x, "both reads in the client's lane");
    assert!(
        read_y < write_y && write_y < next_read_y,
        "read, write, read, in time order"
    );
}

#[test]
fn several_logs_make_one_timeline() {
    let proxy = "2026-12-02T00:00:00.002Z TRACE proxy: #0 client read 5\n";
    let server = "2026-12-02T00:00:00.001Z TRACE server: #0 read 5\n2026-12-02T00:00:00.003Z TRACE server: #0 write 70\n";
    let events = timeline(&[server.to_string(), proxy.to_string()]);
    let roles: Vec<&str> = events.iter().map(|e| e.role.as_str()).collect();
    assert_eq!(roles, ["server", "proxy", "server"]);
    let svg = render(&events);
    assert!(svg.contains(">server #0 client</text>") && svg.contains(">proxy #0 client</text>"));
    well_formed(&svg).unwrap();
}
