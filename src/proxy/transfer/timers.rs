//! The transfer's timers: what each deadline means when it fires.
//!
//! A transfer can have three deadlines at once: its connect (or hold) timer,
//! its idle timer and its `--min-rate` window. Each fires into one of these
//! functions, which decides whose fault the silence is before anything
//! changes state, and reports what happened to `Transfer::on`.

use std::io;
use std::time::{Duration, Instant};

use crate::event_loop::Context;

use super::{Happened, Policy, State, Timer, Transfer, LAG_LIMIT};

impl Transfer {
    /// The connect timer fired: if still connecting, the upstream failed.
    pub fn connect_timed_out(&mut self, cx: &mut Context<Timer>, policy: &Policy) {
        if let State::Connecting { .. } = self.state {
            let reason = format!(
                "connect timed out after {}",
                humantime::format_duration(policy.connect_timeout)
            );
            self.on(Happened::UpstreamFailed(reason), cx, policy);
        }
    }

    /// The hold timer fired.
    pub fn hold_over(&mut self, cx: &mut Context<Timer>, policy: &Policy) {
        if let State::Holding { .. } = self.state {
            self.on(Happened::HoldOver, cx, policy);
        }
    }

    /// A `--min-rate` window is over: abort an upload that brought in too
    /// little, unless we were the ones not reading (back-pressure) or the
    /// upload is already complete. Re-arms itself while the upload runs.
    pub fn check_rate(&mut self, cx: &mut Context<Timer>, policy: &Policy) {
        self.rate_timer = None;
        let Some(rate) = policy.min_rate else {
            return;
        };
        if self.client.eof() {
            return; // the upload is over: nothing left to judge
        }
        let now = Instant::now();
        let (received, our_fault) = match &self.state {
            State::Receiving { spool } | State::Salvaging { spool, .. } => {
                (spool.bytes(), spool.held_back())
            }
            // Not reading while connecting is our doing, not the client's.
            State::Connecting { spool, .. } => (spool.bytes(), true),
            State::Streaming { spool, link } => (
                spool.bytes(),
                spool.held_back() || (link.forwarding() && link.lag(spool) >= LAG_LIMIT),
            ),
            _ => return,
        };
        let next = if our_fault {
            self.rate.restart(now, received, &rate)
        } else {
            match self.rate.check(&rate, now, received) {
                Ok(next) => next,
                Err(came) => {
                    let e = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "too slow: {came} bytes in {}, below --min-rate {rate}",
                            humantime::format_duration(rate.window)
                        ),
                    );
                    self.on(Happened::ClientLost(e), cx, policy);
                    return;
                }
            }
        };
        let (key, id) = (self.key, self.id);
        self.rate_timer = Some(cx.timers.schedule(next, Timer::Rate { key, id }));
    }

    /// The idle timer fired. Returns when to check again, or `None` when
    /// the transfer is being ended.
    ///
    /// Nothing moved for `idle`: whose fault is it? If we are waiting on
    /// the upstream (it will not take the upload, or will not answer), the
    /// upstream has failed: salvage the upload and answer `ERR` (or, with
    /// part of its answer relayed, cut it). Otherwise the client has gone
    /// quiet mid-upload (or will not read the answer, ours or the
    /// server's): abort. A held transfer is idle on purpose and is left
    /// alone.
    pub fn check_idle(
        &mut self,
        cx: &mut Context<Timer>,
        policy: &Policy,
        idle: Duration,
    ) -> Option<Instant> {
        self.idle_timer = None;
        let now = Instant::now();
        if let State::Holding { .. } = self.state {
            return Some(now + idle);
        }
        let due = self.last_active + idle;
        if now < due {
            return Some(due);
        }
        if let State::Streaming { spool, .. }
        | State::Receiving { spool }
        | State::Salvaging { spool, .. } = &self.state
        {
            if spool.held_back() {
                // Waiting for spool memory is our doing.
                return Some(now + idle);
            }
        }
        log::trace!("proxy: #{} timer fired: idle", self.key);
        let waiting_on_upstream = match &self.state {
            State::Connecting { .. } => true,
            // Answer bytes we hold that the client does not take: it is
            // the client that is idle (were the upstream blamed, its
            // answer would be cut, and the client given a second timeout).
            State::Streaming { spool, link } => {
                !link.answer_held()
                    && (self.client.eof() || (link.forwarding() && link.lag(spool) >= LAG_LIMIT))
            }
            _ => false,
        };
        let for_how_long = humantime::format_duration(idle);
        if waiting_on_upstream {
            let reason = format!("no progress for {for_how_long}");
            self.on(Happened::UpstreamFailed(reason), cx, policy);
            self.last_active = now;
            return Some(now + idle);
        }
        if let State::Replying(_) = self.state {
            log::warn!(
                "proxy: client {} idle for {for_how_long} after our answer: closed",
                self.client_addr
            );
            self.on(Happened::ReplyEnded { delivered: false }, cx, policy);
        } else {
            let e = io::Error::new(io::ErrorKind::TimedOut, format!("idle for {for_how_long}"));
            self.on(Happened::ClientLost(e), cx, policy);
        }
        None
    }
}
