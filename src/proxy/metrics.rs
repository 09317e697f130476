//! The proxy's metrics (`/metrics` and the stats line).

use crate::event_loop::Exposition;

use super::Core;

impl Core {
    /// The proxy's own metrics (see `event_loop::Handler::metrics`).
    pub(super) fn write_metrics(&self, out: &mut Exposition) {
        self.retention.metrics(out);
        let s = &self.stats;
        out.counter_labelled(
            "stopover_transfers_total",
            "Transfers by outcome: relayed (the server's answer reached the client), refused (our own ERR), aborted (the client went away), kept (held, not forwarded: the proxy stopped first).",
            &[
                ("outcome", "relayed", s.relayed),
                ("outcome", "refused", s.refused),
                ("outcome", "aborted", s.aborted),
                ("outcome", "kept", s.kept),
            ],
        );
        out.counter(
            "stopover_bytes_received_total",
            "Upload bytes received from clients, counted as transfers end.",
            s.received,
        );
        out.counter(
            "stopover_bytes_forwarded_total",
            "Upload bytes sent to the upstream, counted as transfers end.",
            s.forwarded,
        );
        out.counter(
            "stopover_recordings_failed_total",
            "Uploads whose recording failed (a full or failing disk): relayed without it (--on-disk-error relay) or refused.",
            s.recordings_failed,
        );
        out.gauge(
            "stopover_recordings_closing",
            "Recordings of ended transfers waiting for their last disk operations.",
            self.closing.len() as f64,
        );
        out.counter(
            "stopover_toxics_applied_total",
            "Toxics drawn by transfers (each toxic a transfer got counts once, as the transfer ends).",
            s.toxics_applied,
        );
        out.counter_labelled(
            "stopover_toxic_ends_total",
            "Transfers ended by a toxic: reset (reset_peer) or closed (timeout, limit_data, limit_time).",
            &[
                ("how", "reset", s.toxic_resets),
                ("how", "closed", s.toxic_closes),
            ],
        );
        out.counter(
            "stopover_bytes_delayed_total",
            "Bytes a toxic held back (latency, bandwidth, slicer), counted as transfers end.",
            s.bytes_delayed,
        );
        let held = self.transfers.iter().filter(|(_, t)| t.is_held()).count();
        out.gauge(
            "stopover_uploads_held",
            "Uploads held now (--hold).",
            held as f64,
        );
    }
}
