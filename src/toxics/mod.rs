//! Toxics: faults injected on purpose, with toxiproxy's names, attributes,
//! units and semantics, so that toxiproxy's own clients can drive them.
//!
//! A **toxic** acts on one direction of a connection: `upstream` (what the
//! client sends, on its way to the server) or `downstream` (the server's
//! answer, on its way back). Each has a `toxicity`, the probability that a
//! connection gets it, drawn once when the connection starts. The toxics a
//! connection drew for a direction form a chain, in the order they were
//! added; every byte of that direction goes through the whole chain.
//!
//! | type         | attributes                                   | what it does |
//! |--------------|----------------------------------------------|--------------|
//! | `latency`    | `latency`, `jitter` (ms)                     | each chunk waits `latency` +- `jitter` from when it arrived |
//! | `bandwidth`  | `rate` (KB/s, 1 KB = 1,000 bytes)            | a token bucket: bytes leave no faster than `rate` |
//! | `slow_close` | `delay` (ms)                                 | the FIN is passed on `delay` after it arrived |
//! | `timeout`    | `timeout` (ms)                               | nothing passes; the connection is closed after `timeout` (0: never) |
//! | `reset_peer` | `timeout` (ms)                               | `timeout` after the first byte, the connection is reset |
//! | `slicer`     | `average_size`, `size_variation` (bytes), `delay` (us) | chunks are cut into slices, `delay` apart |
//! | `limit_data` | `bytes`                                      | `bytes` pass, then the connection is closed |
//! | `limit_time` | `duration` (ms)                              | the connection is closed `duration` after it started |
//!
//! **The recording is of what the client sent**: the spool is written from
//! the client's bytes as they arrive, before any upstream toxic.
//!
//! This module is the concept, without sockets: the model ([`Toxic`],
//! [`Kind`]), its two textual forms (the command line's compact form here,
//! toxiproxy's JSON in [`json`]), and the per-direction pipeline
//! ([`pipe::Pipe`]), a state machine that takes bytes at a time, says when
//! each may leave, and never sleeps: the proxy arms a loop timer for
//! [`pipe::Pipe::next_due`] (see `proxy::transfer::toxic`).

pub mod json;
pub mod pipe;

use std::fmt;
use std::str::FromStr;

pub use crate::rng::Rng;

/// A direction of a connection, in toxiproxy's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Client to server: the upload.
    Upstream,
    /// Server to client: the answer.
    Downstream,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Upstream => "upstream",
            Stream::Downstream => "downstream",
        }
    }
}

impl FromStr for Stream {
    type Err = String;
    fn from_str(s: &str) -> Result<Stream, String> {
        match s {
            "upstream" => Ok(Stream::Upstream),
            "downstream" => Ok(Stream::Downstream),
            other => Err(format!(
                "unknown stream {other:?} (expected upstream or downstream)"
            )),
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a toxic does, with its attributes in toxiproxy's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Latency {
        latency: u64,
        jitter: u64,
    },
    Bandwidth {
        rate: u64,
    },
    SlowClose {
        delay: u64,
    },
    Timeout {
        timeout: u64,
    },
    ResetPeer {
        timeout: u64,
    },
    Slicer {
        average_size: u64,
        size_variation: u64,
        delay: u64,
    },
    LimitData {
        bytes: u64,
    },
    LimitTime {
        duration: u64,
    },
}

/// Every toxic type, by name.
pub const TYPES: [&str; 8] = [
    "latency",
    "bandwidth",
    "slow_close",
    "timeout",
    "reset_peer",
    "slicer",
    "limit_data",
    "limit_time",
];

impl Kind {
    /// The type's name, as toxiproxy spells it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::Latency { .. } => "latency",
            Kind::Bandwidth { .. } => "bandwidth",
            Kind::SlowClose { .. } => "slow_close",
            Kind::Timeout { .. } => "timeout",
            Kind::ResetPeer { .. } => "reset_peer",
            Kind::Slicer { .. } => "slicer",
            Kind::LimitData { .. } => "limit_data",
            Kind::LimitTime { .. } => "limit_time",
        }
    }

    /// The type's attributes, with their values (toxiproxy's order).
    pub fn attributes(&self) -> Vec<(&'static str, u64)> {
        match *self {
            Kind::Latency { latency, jitter } => vec![("latency", latency), ("jitter", jitter)],
            Kind::Bandwidth { rate } => vec![("rate", rate)],
            Kind::SlowClose { delay } => vec![("delay", delay)],
            Kind::Timeout { timeout } | Kind::ResetPeer { timeout } => vec![("timeout", timeout)],
            Kind::Slicer {
                average_size,
                size_variation,
                delay,
            } => vec![
                ("average_size", average_size),
                ("size_variation", size_variation),
                ("delay", delay),
            ],
            Kind::LimitData { bytes } => vec![("bytes", bytes)],
            Kind::LimitTime { duration } => vec![("duration", duration)],
        }
    }

    /// A toxic of type `name` with every attribute zero (toxiproxy's
    /// defaults), or an error naming the known types.
    pub fn zero(name: &str) -> Result<Kind, String> {
        Ok(match name {
            "latency" => Kind::Latency {
                latency: 0,
                jitter: 0,
            },
            "bandwidth" => Kind::Bandwidth { rate: 0 },
            "slow_close" => Kind::SlowClose { delay: 0 },
            "timeout" => Kind::Timeout { timeout: 0 },
            "reset_peer" => Kind::ResetPeer { timeout: 0 },
            "slicer" => Kind::Slicer {
                average_size: 0,
                size_variation: 0,
                delay: 0,
            },
            "limit_data" => Kind::LimitData { bytes: 0 },
            "limit_time" => Kind::LimitTime { duration: 0 },
            other => {
                return Err(format!(
                    "unknown toxic type {other:?} (known: {})",
                    TYPES.join(", ")
                ))
            }
        })
    }

    /// Sets one attribute; an error names the type's attributes.
    pub fn set(&mut self, attr: &str, value: u64) -> Result<(), String> {
        let slot = match (self as &mut Kind, attr) {
            (Kind::Latency { latency, .. }, "latency") => latency,
            (Kind::Latency { jitter, .. }, "jitter") => jitter,
            (Kind::Bandwidth { rate }, "rate") => rate,
            (Kind::SlowClose { delay }, "delay") => delay,
            (Kind::Timeout { timeout } | Kind::ResetPeer { timeout }, "timeout") => timeout,
            (Kind::Slicer { average_size, .. }, "average_size") => average_size,
            (Kind::Slicer { size_variation, .. }, "size_variation") => size_variation,
            (Kind::Slicer { delay, .. }, "delay") => delay,
            (Kind::LimitData { bytes }, "bytes") => bytes,
            (Kind::LimitTime { duration }, "duration") => duration,
            (kind, _) => {
                let known: Vec<&str> = kind.attributes().iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "{} has no attribute {attr:?} (it has: {})",
                    kind.type_name(),
                    known.join(", ")
                ));
            }
        };
        *slot = value;
        Ok(())
    }
}

/// One toxic: what it does, to which direction, how often.
#[derive(Debug, Clone, PartialEq)]
pub struct Toxic {
    /// Unique per proxy; by default `<type>_<stream>`.
    pub name: String,
    pub kind: Kind,
    pub stream: Stream,
    /// Probability, in [0, 1], that a connection gets it.
    pub toxicity: f64,
}

impl Toxic {
    /// The default name: `<type>_<stream>` (toxiproxy's).
    pub fn default_name(kind: &Kind, stream: Stream) -> String {
        format!("{}_{}", kind.type_name(), stream)
    }
}

/// Checks a toxicity: a probability.
pub fn check_toxicity(t: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&t) {
        Ok(t)
    } else {
        Err(format!("toxicity {t} is not between 0 and 1"))
    }
}

/// The command line's compact form, `TYPE[:STREAM][:ATTR=VALUE,...]`,
/// where the attributes are the type's own plus `toxicity` and `name`:
/// `latency:downstream:latency=50,jitter=10`,
/// `bandwidth:upstream:rate=100,toxicity=0.5`, `reset_peer::timeout=200`.
/// The stream defaults to `downstream` and the name to `<type>_<stream>`,
/// as in toxiproxy.
impl FromStr for Toxic {
    type Err = String;
    fn from_str(s: &str) -> Result<Toxic, String> {
        let mut parts = s.splitn(3, ':');
        let type_name = parts.next().unwrap_or_default();
        let mut kind = Kind::zero(type_name)?;
        let (stream, attrs) = match (parts.next(), parts.next()) {
            (None, _) => ("", ""),
            (Some(a), None) if a.contains('=') => ("", a),
            (Some(stream), None) => (stream, ""),
            (Some(stream), Some(attrs)) => (stream, attrs),
        };
        let stream = match stream {
            "" => Stream::Downstream,
            s => s.parse()?,
        };
        let (mut name, mut toxicity) = (None, 1.0);
        for pair in attrs.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not ATTR=VALUE"))?;
            match key {
                "name" if !value.is_empty() => name = Some(value.to_string()),
                "toxicity" => {
                    let t = value
                        .parse::<f64>()
                        .map_err(|_| format!("toxicity {value:?} is not a number"))?;
                    toxicity = check_toxicity(t)?;
                }
                attr => {
                    let v = value.parse::<u64>().map_err(|_| {
                        format!("{attr}={value:?}: expected a whole number, at least 0")
                    })?;
                    kind.set(attr, v)?;
                }
            }
        }
        Ok(Toxic {
            name: name.unwrap_or_else(|| Toxic::default_name(&kind, stream)),
            kind,
            stream,
            toxicity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_form_with_defaults_and_errors() {
        let t: Toxic = "latency:downstream:latency=50,jitter=10".parse().unwrap();
        assert_eq!(
            t.kind,
            Kind::Latency {
                latency: 50,
                jitter: 10
            }
        );
        assert_eq!(
            (t.name.as_str(), t.stream, t.toxicity),
            ("latency_downstream", Stream::Downstream, 1.0)
        );
        let t: Toxic = "bandwidth:upstream:rate=100,toxicity=0.5,name=slow"
            .parse()
            .unwrap();
        assert_eq!(
            (t.name.as_str(), t.stream, t.toxicity),
            ("slow", Stream::Upstream, 0.5)
        );
        let t: Toxic = "limit_data:bytes=10".parse().unwrap();
        assert_eq!(
            (t.stream, t.kind),
            (Stream::Downstream, Kind::LimitData { bytes: 10 })
        );
        let t: Toxic = "timeout".parse().unwrap();
        assert_eq!(t.kind, Kind::Timeout { timeout: 0 });
        for bad in [
            "lag:downstream",
            "latency:sideways",
            "latency::rate=5",
            "latency::latency=-1",
            "latency::toxicity=2",
            "latency::latency",
        ] {
            assert!(bad.parse::<Toxic>().is_err(), "{bad} accepted");
        }
    }
}
