//! # stopover: a file relay on hand-driven readiness loops
//!
//! ```text
//!   client ----upload----> proxy ----upload----> server
//!   (blocking)             | one mio loop        | one mio loop
//!                          v                     v
//!                      spool/<name>          received/<name>
//!   client <---answer----- proxy <---answer----- server
//!          "OK bytes=.. crc32c=.. file=.."
//! ```
//!
//! A **client** sends a file's raw bytes and half-closes. The **proxy**
//! writes them to a spool file and streams them to the **server** at the
//! same time; the server writes them to its own file and answers one line
//! with the byte count and CRC-32C of what it stored; the proxy relays the
//! line back and the client checks it. The proxy and server are each one
//! thread running one `mio::Poll` loop over a `slab::Slab` of connections.
//!
//! ## Map of the modules
//!
//! | module | what it is |
//! |---|---|
//! | [`answer`] | the wire answer line (`OK ...` / `ERR ...`): format and parse |
//! | [`store`] | files on disk: unique names, `.part` then rename, O_EXCL, 0600 |
//! | [`retention`] | deleting the oldest recordings, a little every turn (`--retain-*`, `--min-free`) |
//! | [`rng`] | a small pseudo-random generator (SplitMix64) for the load generator and the toxics |
//! | [`event_loop`] | poll plumbing both loops share: the loop, tokens, timers, the acceptor (gate, back-off, stop, signals), the peer and its one I/O verdict, our own reply line, asynchronous disk operations (`io_uring`) |
//! | [`server`] | the server role; `server/conn.rs` is one connection, `server/sink.rs` where its upload goes (a file, or nowhere with `--discard`), `server/upload.rs` its file through the ring |
//! | [`proxy`] | the proxy role; [`proxy::transfer`] is one transfer's state machine; `proxy/routes.rs` and `proxy/api.rs` its toxiproxy-style proxies and API (`--api-addr`) |
//! | [`toxics`] | faults on purpose, with toxiproxy's names and units: the model, the per-direction delay queue on a clock passed in, the JSON forms |
//! | [`client`] | the blocking client, and the verification of an answer |
//! | [`load`] | the load generator: many concurrent verified clients, a summary |
//! | [`cli`] | command-line definitions |
//! | [`help`] | the examples and exit codes `--help` ends with (and the man pages show) |
//! | [`man`] | man pages from the same definitions: `stopover(1)`, `stopover-SUBCOMMAND(1)` |
//! | [`error`] | errors that say what was being done, and to what |
//! | [`human`] | output for people: MB/s, progress bars |
//! | [`logging`] | the logger: lines queued to a writer thread, so a closed or full stderr loses lines (counted), never the daemon |
//! | [`trace_view`] | `stopover trace-view`: a `-vv` trace drawn as an SVG timeline |
//! | [`sys`] | every direct libc call, each with its SAFETY note (the other `unsafe`: `event_loop::disk`) |
//!
//! For a guided tour of the code, read `docs/GUIDE.md`.
//!
//! Each role can be started in-process (tests and benches do): `bind` it,
//! read `local_addr`, keep a `shutdown_handle`, and `run` it on a thread.

pub mod answer;
pub mod cli;
pub mod client;
pub mod error;
pub mod event_loop;
pub mod help;
pub mod human;
pub mod load;
pub mod logging;
pub mod man;
pub mod proxy;
pub mod retention;
pub mod rng;
pub mod server;
pub mod store;
pub mod sys;
pub mod toxics;
pub mod trace_view;
