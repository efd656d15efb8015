//! The hot path's steps, each run a given number of times, for instruction counts under
//! callgrind: machine load does not move them, so CI can compare them with a baseline
//! (`benches/callgrind/check.sh`). Each step runs a warm-up first, so that the difference
//! between two runs of N and 2N iterations is N iterations of steady state.
//!
//! ```sh
//! target/release/examples/instruction_counts <ingest_batch|validate_frame|index_match|enqueue_1k|seal_64> N
//! ```

use std::hint::black_box;
use std::sync::Arc;

use krux_relay::event::{FilterKeys, Validator};
use krux_relay::filter::SubscriberIndex;
use krux_relay::fleet::Fleet;
use krux_relay::frame::{FrameArena, Span};
use krux_relay::ingest::{LineSplitter, Pipeline, SeqAllocator};
use krux_relay::io::tls;
use krux_relay::reactor::Outbox;
use krux_relay::ring::FrameRing;

#[path = "../benches/support/mod.rs"]
mod support;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WARMUP: u64 = 50;

/// One step of the hot path, set up once and then run repeatedly.
trait Step {
    fn run(&mut self, i: u64);
}

/// A 64 KiB read of the fleet's mixed lines: split, validate, sequence, frame, publish.
struct IngestBatch {
    pipeline: Pipeline,
    splitter: LineSplitter,
    batch: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Step for IngestBatch {
    fn run(&mut self, _: u64) {
        let p = &mut self.pipeline;
        self.splitter.feed(&self.batch, &mut |_, line| {
            black_box(p.accept(line).ok());
        });
        p.flush();
    }
}

fn ingest_batch() -> IngestBatch {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (producer, _cursors) = FrameRing::with_readers(4096, 1, 2);
    let seq = SeqAllocator::open(dir.path()).expect("seq file");
    let pipeline = Pipeline::new(producer, seq, Arc::default(), 1 << 20);
    let mut fleet = Fleet::new(300, 7);
    let mut batch = Vec::with_capacity(64 * 1024);
    while batch.len() < 63 * 1024 {
        batch.extend_from_slice(fleet.next_line().as_bytes());
        batch.push(b'\n');
    }
    IngestBatch {
        pipeline,
        splitter: LineSplitter::new(1 << 20),
        batch,
        _dir: dir,
    }
}

const LINE: &str = r#"{"type":"capability_invoked","timestamp":"2026-03-15T10:30:00.123Z","agent":"research-agent","session_id":"sess-a1b2c3d4","data":{"capability":"filesystem.read","arguments":{"path":"/workspace/data.csv"},"permission_tier":"autonomous","duration_ms":12,"note":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#;

/// One ~300 B event validated and framed.
struct ValidateFrame(Validator, FrameArena);

impl Step for ValidateFrame {
    fn run(&mut self, i: u64) {
        let ev = self.0.validate(LINE.as_bytes()).expect("valid event");
        black_box((self.1.event_frame(LINE.as_bytes(), None, i), ev.keys));
    }
}

/// One event matched against 10,000 subscribers of mixed filters.
struct IndexMatch(SubscriberIndex, FilterKeys);

impl Step for IndexMatch {
    fn run(&mut self, _: u64) {
        let mut n = 0usize;
        self.0.for_each_match(black_box(&self.1), |_| n += 1);
        black_box(n);
    }
}

fn index_match() -> IndexMatch {
    IndexMatch(support::mixed_index(10_000), support::sample_keys())
}

/// One frame queued into 1,000 outboxes (drained every 64 frames, as writers keep them).
struct Enqueue1k(Vec<Outbox>, FrameArena, Vec<krux_relay::frame::Span>);

impl Step for Enqueue1k {
    fn run(&mut self, i: u64) {
        let frame = self.1.event_frame(LINE.as_bytes(), None, i + 1);
        let at = std::time::Instant::now();
        for o in self.0.iter_mut() {
            black_box(o.push_event(&frame, i + 1, at));
        }
        if i % 64 == 63 {
            for o in self.0.iter_mut() {
                self.2.clear();
                o.take_batch(&mut self.2);
                o.wrote(o.unsent());
            }
        }
    }
}

/// A TLS subscriber's write: 64 frames, each its own span (gathered, the costlier case),
/// sealed into records in the reactor's buffer.
struct Seal64(tls::Session, tls::Buffers, Vec<Span>);

impl Step for Seal64 {
    fn run(&mut self, _i: u64) {
        black_box(self.1.seal(&mut self.0, &[], &self.2).expect("sealed"));
    }
}

fn seal_64() -> Seal64 {
    let mut arena = FrameArena::new();
    let spans = (0..64u64)
        .map(|i| Span::event(&arena.event_frame(LINE.as_bytes(), None, i + 1)))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, client) = support::tls_configs(dir.path());
    let (tls, _) = support::tls_handshake(&server, &client);
    let session = tls::Session::established(tls).expect("established");
    assert!(
        matches!(session, tls::Session::Own(_)),
        "TLS 1.3 records are the relay's"
    );
    Seal64(session, tls::Buffers::default(), spans)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_default();
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let mut step: Box<dyn Step> = match name.as_str() {
        "ingest_batch" => Box::new(ingest_batch()),
        "validate_frame" => Box::new(ValidateFrame(Validator::new(), FrameArena::new())),
        "index_match" => Box::new(index_match()),
        "enqueue_1k" => Box::new(Enqueue1k(
            (0..1000).map(|_| Outbox::new(usize::MAX, 0)).collect(),
            FrameArena::new(),
            Vec::new(),
        )),
        "seal_64" => Box::new(seal_64()),
        other => {
            eprintln!(
                "unknown step `{other}`: ingest_batch, validate_frame, index_match, enqueue_1k, seal_64"
            );
            std::process::exit(2);
        }
    };
    for i in 0..WARMUP + n {
        step.run(i);
    }
}
