//! The pipeline's rules on a made-up clock.

use super::*;
use crate::toxics::Stream;

fn toxic(spec: &str) -> Toxic {
    spec.parse().unwrap()
}

fn pipe(specs: &[&str], now: Instant) -> Pipe {
    let chain: Vec<Toxic> = specs.iter().map(|s| toxic(s)).collect();
    Pipe::draw(&chain, now, Rng::new(7))
}

/// Drains everything due at `now`, returning it.
fn drain(p: &mut Pipe, now: Instant) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let n = p.ready(now).len();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(p.ready(now));
        p.consume(n);
    }
}

#[test]
fn latency_is_from_each_chunks_arrival_and_chains_add_up() {
    let t0 = Instant::now();
    let mut p = pipe(&["latency:latency=100"], t0);
    p.push(t0, b"a");
    p.push(t0 + ms(10), b"b");
    assert_eq!(p.next_due(), Some(t0 + ms(100)));
    assert!(drain(&mut p, t0 + ms(99)).is_empty());
    assert_eq!(drain(&mut p, t0 + ms(100)), b"a");
    assert_eq!(p.next_due(), Some(t0 + ms(110)), "delays do not add up");
    assert_eq!(drain(&mut p, t0 + ms(110)), b"b");

    let mut two = pipe(
        &["latency:latency=500,name=a", "latency:latency=500,name=b"],
        t0,
    );
    two.push(t0, b"x");
    assert_eq!(two.next_due(), Some(t0 + ms(1000)));
    assert_eq!(two.delayed, 1);
}

#[test]
fn jitter_stays_within_bounds_and_order_is_kept() {
    let t0 = Instant::now();
    let mut p = pipe(&["latency:latency=50,jitter=10"], t0);
    for i in 0..200u8 {
        p.push(t0, &[i]);
    }
    let first = p.next_due().unwrap();
    assert!(first >= t0 + ms(40) && first <= t0 + ms(60));
    let all = drain(&mut p, t0 + ms(60));
    assert_eq!(all, (0..200u8).collect::<Vec<_>>());
}

#[test]
fn bandwidth_paces_at_its_rate() {
    let t0 = Instant::now();
    let mut p = pipe(&["bandwidth:rate=1000"], t0);
    let mut now = t0;
    let mut sent = 0;
    // 480,000 bytes at 1,000 KB/s: 480 ms, whatever the chunking.
    while sent < 480_000 {
        let n = p.room().min(480_000 - sent).min(20_000);
        if n > 0 {
            p.push(now, &vec![1; n]);
            sent += n;
        }
        now = p.next_due().unwrap().max(now);
        drain(&mut p, now);
    }
    while let Some(due) = p.next_due() {
        now = due;
        drain(&mut p, now);
    }
    assert_eq!(now - t0, ms(480));
}

#[test]
fn slicer_cuts_like_toxiproxys() {
    let t0 = Instant::now();
    let data: Vec<u8> = b"hello world ".repeat(40_000); // 480 KB
    let mut p = pipe(
        &["slicer:average_size=1024,size_variation=512,delay=10"],
        t0,
    );
    let mut out = Vec::new();
    let mut reads = 0;
    for chunk in data.chunks(MAX_QUEUED) {
        p.push(t0, chunk);
        let end = t0 + Duration::from_secs(10);
        while !p.ready(end).is_empty() {
            let n = p.ready(end).len();
            assert!(n <= 1536, "a slice of {n} bytes");
            out.extend_from_slice(p.ready(end));
            p.consume(n);
            reads += 1;
        }
    }
    assert_eq!(out, data);
    assert!((240..=720).contains(&reads), "{reads} slices");
}

#[test]
fn limit_data_passes_exactly_its_bytes_then_ends() {
    let t0 = Instant::now();
    let mut p = pipe(&["limit_data:bytes=10"], t0);
    p.push(t0, b"012345");
    assert_eq!(p.end(t0), None);
    p.push(t0, b"6789abcdef");
    assert_eq!(p.room(), 0);
    assert_eq!(drain(&mut p, t0), b"0123456789");
    assert_eq!(p.end(t0), Some(End::Close));
}

#[test]
fn timeouts_resets_and_time_limits_end_the_connection() {
    let t0 = Instant::now();
    let mut p = pipe(&["timeout:timeout=100"], t0);
    p.push(t0, b"lost");
    assert!(
        drain(&mut p, t0 + ms(50)).is_empty(),
        "a timeout passes nothing"
    );
    assert_eq!(p.end(t0 + ms(99)), None);
    assert_eq!(p.end(t0 + ms(100)), Some(End::Close));

    let never = pipe(&["timeout:timeout=0"], t0);
    assert_eq!(never.next_due(), None);

    let mut r = pipe(&["reset_peer:timeout=20"], t0);
    assert_eq!(r.next_due(), None, "the reset counts from the first byte");
    r.push(t0 + ms(5), b"x");
    assert_eq!(r.end(t0 + ms(25)), Some(End::Reset));

    let l = pipe(&["limit_time:duration=30"], t0);
    assert_eq!(l.end(t0 + ms(30)), Some(End::Close));
}

#[test]
fn slow_close_delays_the_eof_after_the_data() {
    let t0 = Instant::now();
    let mut p = pipe(&["latency:latency=10", "slow_close:delay=100"], t0);
    p.push(t0, b"x");
    p.push_eof(t0);
    assert!(!p.take_eof(t0 + ms(50)));
    assert_eq!(drain(&mut p, t0 + ms(10)), b"x");
    assert!(!p.take_eof(t0 + ms(109)));
    assert!(p.take_eof(t0 + ms(110)));
    assert!(!p.take_eof(t0 + ms(111)), "once");
}

#[test]
fn toxicity_is_drawn_per_connection() {
    let t0 = Instant::now();
    assert!(pipe(&["latency:latency=10,toxicity=0"], t0).is_empty());
    assert!(!pipe(&["latency:latency=10,toxicity=1"], t0).is_empty());
    let half = toxic("latency:latency=10,toxicity=0.5");
    let drawn = (0..1000)
        .filter(|i| !Pipe::draw([&half], t0, Rng::new(*i)).is_empty())
        .count();
    assert!((400..600).contains(&drawn), "{drawn} of 1000");
}

#[test]
fn a_removed_toxic_ends_nothing() {
    let t0 = Instant::now();
    let mut r = pipe(&["reset_peer:timeout=20"], t0);
    r.push(t0, b"x");
    r.rechain([], t0 + ms(1));
    assert_eq!(r.end(t0 + ms(50)), None);
    let mut l = pipe(&["limit_data:bytes=1"], t0);
    l.push(t0, b"xy");
    assert_eq!(drain(&mut l, t0), b"x");
    l.rechain([], t0);
    assert_eq!(l.end(t0), None);
    let kept = toxic("limit_data:bytes=1");
    let mut k = Pipe::draw([&kept], t0, Rng::new(1));
    k.push(t0, b"xy");
    k.rechain([&kept], t0);
    assert_eq!(drain(&mut k, t0), b"x");
    assert_eq!(
        k.end(t0),
        Some(End::Close),
        "a kept limit_data still ends it"
    );
}

#[test]
fn rechain_keeps_queued_bytes_and_stage_state() {
    let t0 = Instant::now();
    let lat = toxic("latency:latency=100");
    let mut p = Pipe::draw([&lat], t0, Rng::new(1));
    p.push(t0, b"ab");
    p.rechain([], t0 + ms(1));
    assert!(p.is_empty());
    p.push(t0 + ms(2), b"cd");
    assert!(drain(&mut p, t0 + ms(50)).is_empty(), "no overtaking");
    assert_eq!(drain(&mut p, t0 + ms(100)), b"abcd");
    let slow = Toxic {
        stream: Stream::Upstream,
        ..toxic("latency:latency=200")
    };
    p.rechain([&slow], t0 + ms(100));
    assert_eq!(p.names().collect::<Vec<_>>(), ["latency_downstream"]);
}
