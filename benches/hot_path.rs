//! Hot-path micro-benchmarks: validate + frame one event, index matching over 10k mixed
//! subscribers, index churn of 10k subscribers, and queueing one frame to 1k subscriber
//! outboxes.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use krux_relay::event::{EventType, Validator};
use krux_relay::filter::{Filter, SubscriberIndex};
use krux_relay::frame::FrameArena;
use krux_relay::reactor::Outbox;

mod support;

// Measure with the allocator the relay runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn event_of_size(target: usize) -> String {
    let base = r#"{"type":"capability_invoked","timestamp":"2026-03-15T10:30:00.123Z","agent":"research-agent","session_id":"sess-a1b2c3d4","data":{"capability":"filesystem.read","arguments":{"path":"/workspace/data.csv"},"permission_tier":"autonomous","duration_ms":12,"note":""}}"#;
    let pad = target.saturating_sub(base.len());
    base.replace(r#""note":"""#, &format!(r#""note":"{}""#, "x".repeat(pad)))
}

fn validate_and_frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate_frame");
    for size in [300usize, 2048] {
        let line = event_of_size(size);
        let mut v = Validator::new();
        let mut arena = FrameArena::new();
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{size}B"), |b| {
            let mut seq = 0u64;
            b.iter(|| {
                seq += 1;
                let ev = v.validate(black_box(line.as_bytes())).expect("valid");
                black_box((arena.event_frame(line.as_bytes(), None, seq), ev.keys))
            })
        });
    }
    g.finish();
}

fn index_match(c: &mut Criterion) {
    let idx = support::mixed_index(10_000);
    let keys = support::sample_keys();
    c.bench_function("index_match_10k_mixed", |b| {
        b.iter(|| {
            let mut n = 0usize;
            idx.for_each_match(black_box(&keys), |_| n += 1);
            n
        })
    });
    // A reconnect storm: 10k subscribers of one event type leave and come back.
    let one_type = Filter {
        types: Some(EventType::CapabilityInvoked.bit()),
        ..Filter::default()
    };
    let mut idx = SubscriberIndex::default();
    c.bench_function("index_churn_10k_one_type", |b| {
        b.iter(|| {
            for id in 0..10_000 {
                idx.insert(id, one_type.clone());
            }
            for id in 0..10_000 {
                idx.remove(black_box(id));
            }
        })
    });
}

fn enqueue_fanout(c: &mut Criterion) {
    // Consecutive ~300 B frames of one arena, as the ingest builds them.
    let mut arena = FrameArena::new();
    let line = event_of_size(290);
    c.bench_function("enqueue_1k_subscribers", |b| {
        let mut outs: Vec<Outbox> = (0..1000).map(|_| Outbox::new(usize::MAX, 0)).collect();
        let mut seq = 0u64;
        let mut batch = Vec::new();
        let at = std::time::Instant::now();
        b.iter(|| {
            seq += 1;
            let frame = arena.event_frame(line.as_bytes(), None, seq);
            for o in outs.iter_mut() {
                o.push_event(&frame, seq, at);
            }
            // Drain so that queues stay short, as writers keep them in the relay.
            if seq.is_multiple_of(64) {
                for o in outs.iter_mut() {
                    batch.clear();
                    o.take_batch(&mut batch);
                }
            }
        })
    });
}

/// CPU per TLS handshake, each side's alone (timed around its own steps): a full one, and
/// one resumed with a ticket from an earlier connection of the same client. The server
/// side is the relay's; the client side is rustls's client, as the load client runs it.
fn tls_handshake(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = support::tls_configs(dir.path());
    let mut no_tickets = (*client).clone();
    no_tickets.resumption = rustls::client::Resumption::disabled();
    let no_tickets = std::sync::Arc::new(no_tickets);
    type Side = fn(&support::HandshakeTimes) -> std::time::Duration;
    let sides: [(&str, Side); 2] = [("server", |t| t.server), ("client", |t| t.client)];
    for (name, side) in sides {
        let mut g = c.benchmark_group(format!("tls_handshake_{name}_side"));
        g.bench_function("full", |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| side(&support::tls_handshake(&server, &no_tickets).1))
                    .sum()
            })
        });
        g.bench_function("resumed", |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| {
                        // Each resumption takes a ticket; the client gets new ones as it goes.
                        let (hs, t) = support::tls_handshake(&server, &client);
                        black_box(hs.tls.is_handshaking());
                        side(&t)
                    })
                    .sum()
            })
        });
        g.finish();
    }
}

criterion_group!(
    benches,
    validate_and_frame,
    index_match,
    enqueue_fanout,
    tls_handshake
);
criterion_main!(benches);
