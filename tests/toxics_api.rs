//! The toxiproxy-compatible API (`--api-addr`) over real HTTP on
//! loopback: its shapes, codes and defaults, proxies added and disabled,
//! and toxics changed under live connections without losing a byte.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use stopover::proxy::{Proxy, ProxyConfig};

/// A proxy with the API on; returns it and the API's address.
fn proxy(upstream: SocketAddr, dir: &std::path::Path) -> (InProcess, SocketAddr) {
    let proxy = Proxy::bind(&ProxyConfig {
        listen: loopback0(),
        upstream,
        dir: dir.to_path_buf(),
        api_addr: Some(loopback0()),
        ..ProxyConfig::default()
    })
    .expect("proxy binds");
    let api = proxy.api_addr().expect("the API is on");
    (InProcess::run(proxy), api)
}

/// One HTTP request; the status and the JSON body (`Null` if empty).
fn http(api: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut sock = TcpStream::connect(api).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        sock,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    sock.read_to_string(&mut text).unwrap();
    let status: u16 = text[9..12].parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"))
    };
    (status, value)
}

fn round_trip(addr: SocketAddr, data: &[u8]) -> (Vec<u8>, Duration) {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let start = Instant::now();
    sock.write_all(data).unwrap();
    let mut got = vec![0u8; data.len()];
    sock.read_exact(&mut got).unwrap();
    (got, start.elapsed())
}

#[test]
fn toxics_crud_with_toxiproxys_shapes_and_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, api) = proxy(echo_server(), dir.path());
    let (status, v) = http(api, "GET", "/version", None);
    assert_eq!(status, 200);
    assert!(v["version"].as_str().unwrap().starts_with("stopover"));
    let (status, v) = http(api, "GET", "/proxies", None);
    assert_eq!(status, 200);
    assert_eq!(v["stopover"]["enabled"], true);
    assert_eq!(v["stopover"]["toxics"], json!([]));

    let toxic = json!({"type": "latency", "attributes": {"latency": 10}});
    let (status, v) = http(api, "POST", "/proxies/stopover/toxics", Some(toxic.clone()));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "latency_downstream");
    assert_eq!(v["stream"], "downstream");
    assert_eq!(v["toxicity"], 1.0);
    assert_eq!(v["attributes"], json!({"latency": 10, "jitter": 0}));
    let (status, v) = http(api, "POST", "/proxies/stopover/toxics", Some(toxic));
    assert_eq!((status, &v["status"]), (409, &json!(409)), "{v}");
    assert!(v["error"].is_string());

    let patch = json!({"attributes": {"jitter": 3}});
    let (status, v) = http(
        api,
        "PATCH",
        "/proxies/stopover/toxics/latency_downstream",
        Some(patch),
    );
    assert_eq!(status, 200);
    assert_eq!(v["attributes"], json!({"latency": 10, "jitter": 3}));
    let (status, v) = http(api, "GET", "/proxies/stopover/toxics", None);
    assert_eq!((status, v.as_array().unwrap().len()), (200, 1));

    let (status, _) = http(
        api,
        "DELETE",
        "/proxies/stopover/toxics/latency_downstream",
        None,
    );
    assert_eq!(status, 204);
    let (status, v) = http(
        api,
        "GET",
        "/proxies/stopover/toxics/latency_downstream",
        None,
    );
    assert_eq!((status, &v["status"]), (404, &json!(404)));
    let (status, _) = http(api, "GET", "/proxies/nope", None);
    assert_eq!(status, 404);
    let bad = json!({"type": "latency", "attributes": {"rate": 1}});
    let (status, _) = http(api, "POST", "/proxies/stopover/toxics", Some(bad));
    assert_eq!(status, 400);
    let (status, _) = http(
        api,
        "POST",
        "/proxies/stopover/toxics",
        Some(json!({"type": "nope"})),
    );
    assert_eq!(status, 400);

    http(
        api,
        "POST",
        "/proxies/stopover/toxics",
        Some(json!({"type": "timeout"})),
    );
    let (status, _) = http(api, "POST", "/reset", None);
    assert_eq!(status, 204);
    let (_, v) = http(api, "GET", "/proxies/stopover/toxics", None);
    assert_eq!(v, json!([]));
}

#[test]
fn a_toxic_added_through_the_api_applies_to_live_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (p, api) = proxy(echo_server(), dir.path());
    let mut sock = TcpStream::connect(p.addr).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 4];
    sock.write_all(b"ping").unwrap();
    sock.read_exact(&mut buf).unwrap();
    let toxic = json!({"type": "latency", "attributes": {"latency": 200}});
    assert_eq!(
        http(api, "POST", "/proxies/stopover/toxics", Some(toxic)).0,
        200
    );
    let start = Instant::now();
    sock.write_all(b"pong").unwrap();
    sock.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "the live connection took {took:?}"
    );
}

#[test]
fn proxies_are_created_disabled_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (p, api) = proxy(echo_server(), dir.path());
    let echo = echo_server();
    let spec = json!({"name": "second", "listen": "127.0.0.1:0", "upstream": echo.to_string()});
    let (status, v) = http(api, "POST", "/proxies", Some(spec.clone()));
    assert_eq!(status, 201, "{v}");
    let listen: SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(
        listen.port(),
        0,
        "a proxy created with port 0 shows its real port"
    );
    assert_eq!(http(api, "POST", "/proxies", Some(spec)).0, 409);

    // Recorded under its own name.
    let data = random_bytes(10_000, 1);
    let mut sock = TcpStream::connect(listen).unwrap();
    sock.write_all(&data).unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    sock.read_to_end(&mut got).unwrap();
    assert!(got == data);
    let sub = dir.path().join("second");
    wait_until("the second proxy's recording", || {
        final_files(&sub).len() == 1
    });
    assert!(std::fs::read(sub.join(&final_files(&sub)[0])).unwrap() == data);

    // Disabled: refused; enabled again: served.
    let (status, v) = http(
        api,
        "POST",
        "/proxies/stopover",
        Some(json!({"enabled": false})),
    );
    assert_eq!((status, &v["enabled"]), (200, &json!(false)));
    let err = TcpStream::connect(p.addr).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    http(
        api,
        "POST",
        "/proxies/stopover",
        Some(json!({"enabled": true})),
    );
    assert_eq!(round_trip(p.addr, b"back").0, b"back");

    assert_eq!(http(api, "DELETE", "/proxies/second", None).0, 204);
    assert_eq!(
        TcpStream::connect(listen).unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
    assert_eq!(http(api, "GET", "/proxies/second", None).0, 404);
}

#[test]
fn populate_is_all_or_nothing_and_honours_toxics() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, api) = proxy(echo_server(), dir.path());
    let echo = echo_server().to_string();
    let bad = json!([
        {"name": "a", "listen": "127.0.0.1:0", "upstream": echo},
        {"name": "b", "listen": "127.0.0.1:0", "upstream": "not an address"},
    ]);
    assert_eq!(http(api, "POST", "/populate", Some(bad)).0, 400);
    assert_eq!(
        http(api, "GET", "/proxies/a", None).0,
        404,
        "half a populate"
    );
    let good = json!([
        {"name": "a", "listen": "127.0.0.1:0", "upstream": echo,
         "toxics": [{"type": "latency", "attributes": {"latency": 100}}]},
        {"name": "b", "listen": "127.0.0.1:0", "upstream": echo},
    ]);
    let (status, v) = http(api, "POST", "/populate", Some(good));
    assert_eq!(status, 201, "{v}");
    let proxies = v["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 2);
    let a: SocketAddr = proxies[0]["listen"].as_str().unwrap().parse().unwrap();
    let (got, took) = round_trip(a, b"slow");
    assert_eq!(got, b"slow");
    assert!(
        took >= Duration::from_millis(100),
        "the populated toxic did not act: {took:?}"
    );
}

#[test]
fn no_byte_lost_or_reordered_while_toxics_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let (p, api) = proxy(echo_server(), dir.path());
    let data = random_bytes(4 << 20, 7);
    let sock = TcpStream::connect(p.addr).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut w = sock.try_clone().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started, first_change) = std::sync::mpsc::channel();
    let stop = done.clone();
    // Toxics come and go for as long as the stream runs (the stream starts
    // after the first change, and the changes stop when it has ended).
    let toggler = std::thread::spawn(move || {
        let toxics = [
            json!({"type": "latency", "stream": "upstream", "attributes": {"latency": 5, "jitter": 5}}),
            json!({"type": "slicer", "attributes": {"average_size": 500, "size_variation": 200, "delay": 50}}),
            json!({"type": "bandwidth", "attributes": {"rate": 20000}}),
            json!({"type": "latency", "attributes": {"latency": 3}}),
        ];
        let mut changes = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            for t in &toxics {
                assert_eq!(
                    http(api, "POST", "/proxies/stopover/toxics", Some(t.clone())).0,
                    200
                );
                changes += 1;
                let _ = started.send(());
            }
            for t in &toxics {
                let name = format!(
                    "{}_{}",
                    t["type"].as_str().unwrap(),
                    t["stream"].as_str().unwrap_or("downstream")
                );
                let path = format!("/proxies/stopover/toxics/{name}");
                assert_eq!(http(api, "DELETE", &path, None).0, 204);
                changes += 1;
            }
        }
        changes
    });
    first_change.recv().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        for chunk in sent.chunks(64 * 1024) {
            w.write_all(chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    (&sock).read_to_end(&mut got).unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let changes = toggler.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes changed or reordered");
    println!("{changes} toxic changes during a 4 MiB stream");
    assert!(changes >= 8, "only {changes} changes during the stream");
}
