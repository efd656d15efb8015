//! Process-wide counters, updated with relaxed atomics by the ingest thread and the
//! reactors, rendered as Prometheus text by the admin port. Never holds a secret.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::event::EventType;
use crate::proto::ws::CloseReason;

/// Upper bounds (µs) of the ingest→write latency histogram's buckets (+Inf follows).
const LATENCY_BUCKETS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// HTTP statuses a handshake can end with, in the order they are rendered.
const STATUSES: [u16; 11] = [101, 200, 400, 401, 403, 404, 405, 408, 426, 431, 503];

/// The index of a close reason kind in `CloseReason::KINDS`.
fn kind(name: &str) -> usize {
    CloseReason::KINDS
        .iter()
        .position(|k| *k == name)
        .expect("a close reason kind")
}

#[derive(Default)]
pub struct Metrics {
    /// Open subscribers per reactor (shows how SO_REUSEPORT spread them).
    reactor_subscribers: Vec<AtomicI64>,
    /// Bytes queued for subscribers and not yet written, per reactor (sampled 4×/s).
    reactor_queued: Vec<AtomicI64>,
    /// Ingest→write latency.
    latency: Histogram,
    events_in: [AtomicU64; 11],
    pub events_rejected: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub writevs: AtomicU64,
    pub subscribers: AtomicI64,
    /// What the replay window holds (see `--replay-memory`), updated once per ingest batch.
    pub replay_bytes: AtomicI64,
    /// Closes started, by reason (`CloseReason::KINDS`).
    closes: [AtomicU64; CloseReason::KINDS.len()],
    handshakes: [AtomicU64; STATUSES.len()],
    /// TLS handshakes completed: full, and resumed with a session ticket.
    pub tls_full: AtomicU64,
    pub tls_resumed: AtomicU64,
    /// permessage-deflate: subscribers that negotiated it, compressed frames made (one
    /// per event at most), and the payload bytes they took in and gave out.
    pub deflate_subscribers: AtomicI64,
    pub deflate_frames: AtomicU64,
    pub deflate_bytes_in: AtomicU64,
    pub deflate_bytes_out: AtomicU64,
    /// Cluster mode (`--nats`); `None` standalone.
    pub cluster: Option<ClusterMetrics>,
}

/// One series of one sample: name, type, help text, value.
type Scalar = (&'static str, &'static str, &'static str, i64);

fn write_scalars(out: &mut String, series: &[Scalar]) {
    for (name, kind, help, v) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
}

/// A latency histogram: per-bucket counts (not cumulative; the last is +Inf) and the sum.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            cumulative += c.load(Relaxed);
            let le = LATENCY_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// The cluster path: JetStream publishes on the ingest side, the node's consumer.
#[derive(Default)]
pub struct ClusterMetrics {
    /// 1 while the node reaches JetStream and its consumer runs (`/readyz` is 200).
    pub ready: std::sync::atomic::AtomicBool,
    /// From a batch's publish to its acknowledgement.
    pub publish_latency: Histogram,
    pub acks_in_flight: AtomicI64,
    pub publish_retries: AtomicU64,
    /// The stream sequence of the last message the node's consumer took.
    pub consumer_stream_seq: AtomicU64,
    /// Messages the stream holds beyond the consumer's position.
    pub consumer_lag: AtomicU64,
    /// Resumes served (in part) from the stream, beyond the node's window.
    pub history_fetches: AtomicU64,
    /// Payload bytes of the stream messages the consumer took, as stored (compressed).
    pub consumed_bytes: AtomicU64,
    /// Messages in the node format whose MAC did not verify: dropped whole.
    pub forged_messages: AtomicU64,
    /// Events of the stream not delivered: lines of foreign messages that are not valid
    /// events, and records of damaged messages.
    pub rejected_events: AtomicU64,
}

impl Metrics {
    /// Metrics of a server with `reactors` reactors, and of the cluster path if `cluster`.
    pub fn new(reactors: usize, cluster: bool) -> Metrics {
        Metrics {
            cluster: cluster.then(ClusterMetrics::default),
            reactor_subscribers: (0..reactors).map(|_| AtomicI64::new(0)).collect(),
            reactor_queued: (0..reactors).map(|_| AtomicI64::new(0)).collect(),
            ..Metrics::default()
        }
    }

    /// A subscriber joined (`+1`) or left (`-1`) reactor `r`.
    pub fn subscriber_delta(&self, r: usize, delta: i64) {
        self.subscribers.fetch_add(delta, Relaxed);
        if let Some(g) = self.reactor_subscribers.get(r) {
            g.fetch_add(delta, Relaxed);
        }
    }

    /// The cluster path's metrics; only a cluster node (`--nats`) has them.
    pub fn cluster(&self) -> &ClusterMetrics {
        self.cluster.as_ref().expect("a cluster node")
    }

    pub fn event_in(&self, t: EventType) {
        self.events_in[t.index()].fetch_add(1, Relaxed);
    }

    pub fn set_reactor_queued(&self, r: usize, bytes: usize) {
        if let Some(g) = self.reactor_queued.get(r) {
            g.store(bytes as i64, Relaxed);
        }
    }

    /// One gathered write completed: its oldest event frame was accepted `d` ago.
    pub fn observe_ingest_to_write(&self, d: std::time::Duration) {
        self.latency.observe(d);
    }

    /// A subscriber's close sequence began with `code`.
    pub fn closed(&self, reason: &CloseReason) {
        self.closes[reason.kind()].fetch_add(1, Relaxed);
    }

    pub fn handshake(&self, status: u16) {
        if let Some(i) = STATUSES.iter().position(|&s| s == status) {
            self.handshakes[i].fetch_add(1, Relaxed);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP krux_events_in_total Events accepted from publishers, by type.\n# TYPE krux_events_in_total counter");
        for t in EventType::ALL {
            let _ = writeln!(
                out,
                "krux_events_in_total{{type=\"{}\"}} {}",
                t.name(),
                self.events_in[t.index()].load(Relaxed)
            );
        }
        let scalars: [Scalar; 11] = [
            (
                "krux_events_rejected_total",
                "counter",
                "Published lines rejected.",
                self.events_rejected.load(Relaxed) as i64,
            ),
            (
                "krux_frames_out_total",
                "counter",
                "Frames written to subscribers.",
                self.frames_out.load(Relaxed) as i64,
            ),
            (
                "krux_bytes_out_total",
                "counter",
                "Bytes written to subscribers.",
                self.bytes_out.load(Relaxed) as i64,
            ),
            (
                "krux_writev_total",
                "counter",
                "Gathered writes submitted.",
                self.writevs.load(Relaxed) as i64,
            ),
            (
                "krux_subscribers",
                "gauge",
                "Open subscriber WebSockets.",
                self.subscribers.load(Relaxed),
            ),
            (
                "krux_replay_retained_bytes",
                "gauge",
                "Bytes the replay window holds (bounded by --replay-memory).",
                self.replay_bytes.load(Relaxed),
            ),
            (
                "krux_compression_subscribers",
                "gauge",
                "Open subscribers that negotiated permessage-deflate.",
                self.deflate_subscribers.load(Relaxed),
            ),
            (
                "krux_compressed_frames_total",
                "counter",
                "Event frames compressed (each event at most once, shared by every subscriber with the extension).",
                self.deflate_frames.load(Relaxed) as i64,
            ),
            (
                "krux_compression_bytes_in_total",
                "counter",
                "Payload bytes of the events compressed, before compression.",
                self.deflate_bytes_in.load(Relaxed) as i64,
            ),
            (
                "krux_compression_bytes_out_total",
                "counter",
                "Payload bytes of the events compressed, after compression.",
                self.deflate_bytes_out.load(Relaxed) as i64,
            ),
            (
                "krux_slow_consumer_closes_total",
                "counter",
                "Subscribers closed with 4001 (live, replaying or lapped).",
                ["slow_consumer", "lapped"]
                    .iter()
                    .map(|k| self.closes[kind(k)].load(Relaxed))
                    .sum::<u64>() as i64,
            ),
        ];
        write_scalars(&mut out, &scalars);
        let per_reactor = [
            (
                "krux_reactor_subscribers",
                "Open subscriber WebSockets per reactor thread.",
                &self.reactor_subscribers,
            ),
            (
                "krux_reactor_queued_bytes",
                "Bytes queued for subscribers and not yet written, per reactor.",
                &self.reactor_queued,
            ),
        ];
        for (name, help, gauges) in per_reactor {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (i, g) in gauges.iter().enumerate() {
                let _ = writeln!(out, "{name}{{reactor=\"{i}\"}} {}", g.load(Relaxed));
            }
        }
        self.latency.render(&mut out, "krux_ingest_to_write_seconds", "From ingest acceptance to the kernel taking the write, for the oldest event frame of each gathered write.");
        if let Some(c) = &self.cluster {
            c.render(&mut out);
        }
        let _ = writeln!(out, "# HELP krux_closes_total Subscriber closes the relay started or echoed, by reason.\n# TYPE krux_closes_total counter");
        for (reason, n) in CloseReason::KINDS.iter().zip(&self.closes) {
            let _ = writeln!(
                out,
                "krux_closes_total{{reason=\"{reason}\"}} {}",
                n.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP krux_handshakes_total Handshake results on port 7701, by HTTP status.\n# TYPE krux_handshakes_total counter");
        for (i, s) in STATUSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "krux_handshakes_total{{status=\"{s}\"}} {}",
                self.handshakes[i].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP krux_tls_handshakes_total TLS handshakes completed on port 7701, full or resumed with a session ticket.\n# TYPE krux_tls_handshakes_total counter");
        for (kind, n) in [("full", &self.tls_full), ("resumed", &self.tls_resumed)] {
            let _ = writeln!(
                out,
                "krux_tls_handshakes_total{{kind=\"{kind}\"}} {}",
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP krux_build_info The relay's version.\n# TYPE krux_build_info gauge\nkrux_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

impl ClusterMetrics {
    fn render(&self, out: &mut String) {
        let series: [Scalar; 9] = [
            (
                "krux_cluster_ready",
                "gauge",
                "1 while the node reaches JetStream and consumes the stream.",
                i64::from(self.ready.load(Relaxed)),
            ),
            (
                "krux_cluster_acks_in_flight",
                "gauge",
                "Batches published to JetStream and not yet acknowledged.",
                self.acks_in_flight.load(Relaxed).max(0),
            ),
            (
                "krux_cluster_publish_retries_total",
                "counter",
                "Publishes of a batch repeated (same message id) after JetStream did not acknowledge.",
                self.publish_retries.load(Relaxed) as i64,
            ),
            (
                "krux_cluster_consumer_stream_seq",
                "gauge",
                "Stream sequence of the last message this node consumed.",
                self.consumer_stream_seq.load(Relaxed) as i64,
            ),
            (
                "krux_cluster_consumer_lag_messages",
                "gauge",
                "Messages in the stream beyond this node's consumer.",
                self.consumer_lag.load(Relaxed) as i64,
            ),
            (
                "krux_cluster_history_fetches_total",
                "counter",
                "Resumes served from the stream because the node's window no longer reached them.",
                self.history_fetches.load(Relaxed) as i64,
            ),
            (
                "krux_cluster_consumed_bytes_total",
                "counter",
                "Payload bytes of the stream messages this node consumed, as stored (batches are LZ4-compressed).",
                self.consumed_bytes.load(Relaxed) as i64,
            ),
            (
                "krux_cluster_forged_messages_total",
                "counter",
                "Stream messages in the node format whose MAC did not verify (not written by a node with the cluster's key): dropped.",
                self.forged_messages.load(Relaxed) as i64,
            ),
            (
                "krux_cluster_rejected_events_total",
                "counter",
                "Events of the stream not delivered: invalid lines of foreign messages, records of damaged ones.",
                self.rejected_events.load(Relaxed) as i64,
            ),
        ];
        write_scalars(out, &series);
        self.publish_latency.render(
            out,
            "krux_cluster_publish_seconds",
            "From publishing a batch to JetStream to its acknowledgement.",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_with_krux_prefix() {
        let m = Metrics::new(2, false);
        m.subscriber_delta(1, 1);
        m.event_in(EventType::HealthAlert);
        m.handshake(401);
        m.closed(&CloseReason::SlowConsumer { since: 7 });
        m.closed(&CloseReason::Lapped { since: 9 });
        m.closed(&CloseReason::Peer(4999));
        let text = m.render();
        assert!(
            text.contains("krux_closes_total{reason=\"slow_consumer\"} 1"),
            "{text}"
        );
        assert!(text.contains("krux_closes_total{reason=\"peer\"} 1"));
        assert!(text.contains("krux_closes_total{reason=\"revoked\"} 0"));
        assert!(text.contains("krux_slow_consumer_closes_total 2"));
        assert!(text.contains("krux_events_in_total{type=\"health_alert\"} 1"));
        assert!(text.contains("krux_handshakes_total{status=\"401\"} 1"));
        assert!(text.contains(&format!(
            "krux_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("krux_reactor_subscribers{reactor=\"1\"} 1"));
        assert!(text.contains("krux_subscribers 1"));
        m.observe_ingest_to_write(std::time::Duration::from_micros(300));
        m.observe_ingest_to_write(std::time::Duration::from_secs(5));
        m.set_reactor_queued(0, 1234);
        let text = m.render();
        assert!(
            text.contains("krux_ingest_to_write_seconds_bucket{le=\"0.00025\"} 0"),
            "{text}"
        );
        assert!(text.contains("krux_ingest_to_write_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("krux_ingest_to_write_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("krux_ingest_to_write_seconds_count 2"));
        assert!(text.contains("krux_reactor_queued_bytes{reactor=\"0\"} 1234"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("krux_"), "{line}");
        }
    }
}
