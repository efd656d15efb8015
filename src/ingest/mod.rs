//! The ingest thread: publishers' NDJSON over TCP (and a Unix socket) → validate → assign
//! `seq` → build the frame once → publish to the ring.
//!
//! One thread owns the ring's producer and the sequence allocator, so `seq` order is
//! ring order. Publisher connections are tasks on that thread's runtime; a publisher that
//! does not read its replies only stalls itself.

mod lines;
pub mod run;
pub mod seq;

pub use lines::{Line, LineSplitter};
pub use run::{LocalSink, Sink};
pub use seq::SeqAllocator;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::event::{now_rfc3339_millis, LineError, ValidEvent, Validator};
use crate::frame::FrameArena;
use crate::metrics::Metrics;
use crate::ring::{Entry, Producer};

/// The check every line gets, standalone or in a cluster: its length, then validation.
pub struct Checker {
    validator: Validator,
    max_line: usize,
}

impl Checker {
    pub fn new(max_line: usize) -> Checker {
        Checker {
            validator: Validator::new(),
            max_line,
        }
    }

    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// The event's text (without surrounding whitespace) and what validation learned.
    pub fn check<'a>(&mut self, line: Line<'a>) -> Result<(&'a [u8], ValidEvent), LineError> {
        let text = match line {
            Line::Text(t) => t.trim_ascii(),
            Line::TooLong(len) => {
                return Err(LineError::TooLong {
                    len,
                    max: self.max_line,
                })
            }
        };
        Ok((text, self.validator.validate(text)?))
    }
}

/// Validation, sequencing and framing of accepted lines: everything between the bytes of
/// a line and its entry in the ring.
pub struct Pipeline {
    checker: Checker,
    /// Frames are built here, back to back (see `FrameArena`).
    arena: FrameArena,
    producer: Producer,
    seq: SeqAllocator,
    metrics: Arc<Metrics>,
    /// The clock, read once per batch (see `flush`): the lines of one read arrived
    /// together, and a clock read plus an RFC 3339 stamp per event were a tenth of the
    /// ingest's instructions.
    batch_at: Option<std::time::Instant>,
    batch_stamp: Option<String>,
}

impl Pipeline {
    pub fn new(
        producer: Producer,
        seq: SeqAllocator,
        metrics: Arc<Metrics>,
        max_line: usize,
    ) -> Pipeline {
        Pipeline {
            checker: Checker::new(max_line),
            arena: FrameArena::new(),
            producer,
            seq,
            metrics,
            batch_at: None,
            batch_stamp: None,
        }
    }

    pub fn ring(&self) -> &Arc<crate::ring::FrameRing> {
        self.producer.ring()
    }

    pub fn max_line(&self) -> usize {
        self.checker.max_line()
    }

    /// Accepts one line into the ring, returning its `seq`.
    pub fn accept(&mut self, line: Line<'_>) -> Result<u64, LineError> {
        let (text, valid) = self.checker.check(line)?;
        let seq = self.seq.allocate().map_err(|e| {
            tracing::error!("cannot persist sequence numbers: {e:#}");
            LineError::Unavailable("the relay cannot persist sequence numbers".into())
        })?;
        let stamp = valid.needs_stamp.then(|| {
            self.batch_stamp
                .get_or_insert_with(now_rfc3339_millis)
                .as_str()
        });
        let frame = self.arena.event_frame(text, stamp, seq);
        self.metrics.event_in(valid.keys.etype);
        self.producer.publish(Entry {
            pos: seq,
            seq,
            accepted_at: *self.batch_at.get_or_insert_with(std::time::Instant::now),
            frame,
            keys: valid.keys,
            deflated: Default::default(),
        });
        Ok(seq)
    }

    /// Ends a batch of lines: wakes reactors that parked, and the next batch reads the
    /// clock afresh.
    pub fn flush(&mut self) {
        (self.batch_at, self.batch_stamp) = (None, None);
        self.producer.wake_parked();
        self.metrics.replay_bytes.store(
            self.producer.retained_bytes() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// What one publisher connection has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub accepted: u64,
    pub rejected: u64,
    pub last_seq: Option<u64>,
}

impl Tally {
    /// Counts line `n` as rejected and queues its reply.
    pub fn reject(&mut self, n: u64, err: &LineError, replies: &mut String, metrics: &Metrics) {
        self.rejected += 1;
        metrics
            .events_rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        replies.push_str(&rejection_line(n, err));
    }

    pub fn summary_line(&self) -> String {
        let last = self.last_seq.map_or("null".to_string(), |s| s.to_string());
        format!(
            "{{\"accepted\":{},\"rejected\":{},\"last_seq\":{last}}}\n",
            self.accepted, self.rejected
        )
    }
}

/// The rejection reply for line `n`.
pub fn rejection_line(n: u64, err: &LineError) -> String {
    let msg = serde_json::to_string(&err.to_string()).expect("a string serializes");
    format!("{{\"line\":{n},\"error\":{msg}}}\n")
}

/// The most one read from a publisher takes. Each read ends a batch, and each batch wakes
/// the parked reactors (an eventfd write and a context switch each, several µs on this VM)
/// or, in cluster mode, becomes one JetStream message: a fast publisher's 256 KiB reads
/// made ingest 20-25% cheaper per event than 64 KiB ones (docs/benchmarks.md). A slow
/// publisher's reads are as small as before, so its latency is unchanged.
pub const PUBLISHER_READ: usize = 256 * 1024;

/// Serves one publisher connection until it half-closes or goes away, or the server shuts
/// down; the publisher then gets its summary. At shutdown, lines already received are
/// accepted or rejected as usual, and an unfinished last line is dropped (never half
/// accepted).
pub async fn serve_publisher<S: AsyncRead + AsyncWrite>(
    stream: S,
    pipeline: Rc<RefCell<Pipeline>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut splitter = LineSplitter::new(pipeline.borrow().max_line());
    let mut buf = vec![0u8; PUBLISHER_READ];
    let mut replies = String::new();
    let mut tally = Tally::default();
    let mut handle =
        |pipeline: &mut Pipeline, replies: &mut String, n: u64, line: Line<'_>| match pipeline
            .accept(line)
        {
            Ok(seq) => {
                tally.accepted += 1;
                tally.last_seq = Some(seq);
            }
            Err(e) => tally.reject(n, &e, replies, &pipeline.metrics),
        };
    let ended_by_peer = loop {
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) => break true,
                Ok(n) => n,
                Err(_) => return, // reset mid-stream: what was accepted stays accepted
            },
            _ = shutdown.wait_for(|s| *s) => break false,
        };
        {
            let mut p = pipeline.borrow_mut();
            splitter.feed(&buf[..n], &mut |no, line| {
                handle(&mut p, &mut replies, no, line)
            });
            p.flush();
        }
        if !replies.is_empty() {
            if wr.write_all(replies.as_bytes()).await.is_err() {
                return;
            }
            replies.clear();
        }
    };
    if ended_by_peer {
        let mut p = pipeline.borrow_mut();
        splitter.finish(&mut |no, line| handle(&mut p, &mut replies, no, line));
        p.flush();
    }
    replies.push_str(&tally.summary_line());
    let _ = wr.write_all(replies.as_bytes()).await;
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{FrameRing, Slot};

    fn pipeline(dir: &std::path::Path) -> (Pipeline, Arc<FrameRing>) {
        let (producer, _) = FrameRing::with_readers(64, 1, 1);
        let ring = producer.ring().clone();
        let seq = SeqAllocator::open(dir).unwrap();
        (Pipeline::new(producer, seq, Arc::default(), 1024), ring)
    }

    #[test]
    fn accepted_lines_become_framed_entries_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut p, ring) = pipeline(dir.path());
        let seed = include_str!("../../tests/data/seed_events.ndjson");
        for (i, line) in seed.lines().enumerate() {
            let seq = p
                .accept(Line::Text(format!("  {line} ").as_bytes()))
                .unwrap();
            assert_eq!(seq, i as u64 + 1);
            let Slot::Ready(e) = ring.get(seq) else {
                panic!("seq {seq} published")
            };
            let got: serde_json::Value =
                serde_json::from_slice(crate::frame::payload(&e.frame)).unwrap();
            let mut want: serde_json::Value = serde_json::from_str(line).unwrap();
            want["seq"] = seq.into();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn rejections_do_not_consume_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (mut p, _ring) = pipeline(dir.path());
        assert!(matches!(
            p.accept(Line::TooLong(5000)),
            Err(LineError::TooLong {
                len: 5000,
                max: 1024
            })
        ));
        assert!(p.accept(Line::Text(b"{}")).is_err());
        let ok = br#"{"type":"health_alert","agent":null,"data":{"component":"c","severity":"s","message":"m","threshold":"t"}}"#;
        assert_eq!(p.accept(Line::Text(ok)).unwrap(), 1);
    }

    #[test]
    fn reply_lines_are_json() {
        let r = rejection_line(3, &LineError::MissingField("type"));
        let v: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(v["line"], 3);
        assert_eq!(v["error"], "missing field `type`");
        let t = Tally {
            accepted: 2,
            rejected: 1,
            last_seq: None,
        };
        assert_eq!(
            t.summary_line(),
            "{\"accepted\":2,\"rejected\":1,\"last_seq\":null}\n"
        );
    }
}
