//! A cluster node's ingest: each publisher's lines are validated exactly as standalone,
//! batched (one JetStream message per batch of lines read together), and stored in the
//! stream. A line counts as accepted only once JetStream has acknowledged its batch.
//!
//! Acks are pipelined: a connection keeps reading while up to `MAX_PENDING` batches await
//! theirs, and stops reading (holding the publisher) beyond that. A batch JetStream does
//! not acknowledge is published again with the same message id until it is (the stream's
//! duplicate window makes the retry store it once), so nothing is reported accepted and
//! then lost, and nothing is stored twice. At shutdown, a batch still unacknowledged is
//! reported line by line as not stored.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::batch::{event_seq, Batch, BatchBuilder, TooLarge, MAC_HEADER};
use super::credentials::StreamKeys;
use crate::config::cluster::NatsSettings;
use crate::event::{now_rfc3339_millis, LineError};
use crate::ingest::{Checker, Line, LineSplitter, Sink, Tally};
use crate::metrics::Metrics;

/// Batches one connection may have awaiting their acks before it stops reading.
const MAX_PENDING: usize = 64;

/// Stores batches in the stream (one per node; shared by its publisher connections).
struct Storer {
    js: async_nats::jetstream::Context,
    subject: String,
    /// Message ids are `<node>-<n>`: unique across nodes and restarts.
    node: String,
    next_id: Cell<u64>,
    /// The highest stream sequence JetStream acknowledged to this node.
    max_stored: Cell<u64>,
    /// When a retry was last logged (one line a second, however many batches wait).
    warned_at: Cell<Option<Instant>>,
    client: async_nats::Client,
    /// Bumped at each (re)connection: a publish awaiting its ack through a connection
    /// that broke is sent again at once rather than after its ack timeout.
    connects: Arc<std::sync::atomic::AtomicU64>,
    /// Every message is signed with the cluster's stream key.
    keys: Arc<StreamKeys>,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Storer {
    fn new(
        nats: super::Nats,
        subject: String,
        keys: Arc<StreamKeys>,
        metrics: Arc<Metrics>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<Storer> {
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id)?;
        let client = nats.client;
        Ok(Storer {
            js: super::jetstream(client.clone()),
            connects: nats.connects,
            subject,
            node: crate::auth::hex(&id),
            next_id: Cell::new(0),
            max_stored: Cell::new(0),
            warned_at: Cell::new(None),
            client,
            keys,
            metrics,
            shutdown,
        })
    }

    /// The largest message the server takes (1 MiB, its default, until it has said).
    fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => 1 << 20,
            n => n,
        }
    }

    /// Returns once this node's consumer has taken every message it stored.
    async fn consumed_all_stored(&self) {
        let consumed = || self.metrics.cluster().consumer_stream_seq.load(Relaxed);
        while consumed() < self.max_stored.get() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Publishes `payload` until JetStream acknowledges it; returns its stream sequence.
    /// Gives up only once the server is shutting down.
    async fn store(self: Rc<Self>, payload: Bytes) -> Result<u64, String> {
        let n = self.next_id.get();
        self.next_id.set(n + 1);
        let id = format!("{}-{n}", self.node);
        let m = self.metrics.cluster();
        m.acks_in_flight.fetch_add(1, Relaxed);
        let _in_flight = scopeguard(|| {
            m.acks_in_flight.fetch_sub(1, Relaxed);
        });
        let started = Instant::now();
        let mut delay = Duration::from_millis(20);
        // The key arrives with the credentials bucket, just after the node connects.
        let key = loop {
            if let Some(key) = self.keys.signing() {
                break key;
            }
            if *self.shutdown.borrow() {
                return Err(
                    "not stored: the cluster's stream key was not known before the relay shut down"
                        .into(),
                );
            }
            tokio::time::sleep(delay).await;
        };
        let mac = super::batch::mac(&key, &payload);
        loop {
            let publish = PublishMessage::build()
                .payload(payload.clone())
                .message_id(&id)
                .header(MAC_HEADER, mac.as_str());
            let attempt = async {
                let ack = self
                    .js
                    .send_publish(self.subject.clone(), publish)
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())
            };
            let connects = self.connects.load(Relaxed);
            let reconnected = async {
                while self.connects.load(Relaxed) == connects {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            let err = tokio::select! {
                r = attempt => match r {
                    Ok(ack) => {
                        m.publish_latency.observe(started.elapsed());
                        self.max_stored.set(self.max_stored.get().max(ack.sequence));
                        return Ok(ack.sequence);
                    }
                    Err(e) => e,
                },
                // Its ack, if any, went with the old connection.
                () = reconnected => {
                    m.publish_retries.fetch_add(1, Relaxed);
                    delay = Duration::from_millis(20);
                    continue;
                }
            };
            if *self.shutdown.borrow() {
                return Err(format!(
                    "not stored: JetStream did not acknowledge it before the relay shut down ({err})"
                ));
            }
            m.publish_retries.fetch_add(1, Relaxed);
            if self
                .warned_at
                .get()
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.warned_at.set(Some(Instant::now()));
                tracing::warn!(
                    in_flight = m.acks_in_flight.load(Relaxed),
                    "JetStream did not acknowledge a batch ({err}); publishing again (same message id) until it does"
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}

/// A batch on its way into the stream.
struct Pending {
    task: tokio::task::JoinHandle<Result<u64, String>>,
    lines: Vec<u64>,
}

/// What one connection has read, rejected and got acknowledged.
struct Conn {
    tally: Tally,
    replies: String,
    builder: BatchBuilder,
    pending: VecDeque<Pending>,
    metrics: Arc<Metrics>,
}

impl Conn {
    fn reject(&mut self, line: u64, e: &LineError) {
        self.tally.reject(line, e, &mut self.replies, &self.metrics);
    }

    fn line(&mut self, checker: &mut Checker, no: u64, line: Line<'_>, closed: &mut Vec<Batch>) {
        let (text, valid) = match checker.check(line) {
            Ok(ok) => ok,
            Err(e) => return self.reject(no, &e),
        };
        let stamp = valid.needs_stamp.then(now_rfc3339_millis);
        match self.builder.push(no, text, &valid.keys, stamp.as_deref()) {
            Ok(full) => closed.extend(full),
            Err(TooLarge { len, max }) => self.reject(no, &LineError::TooLong { len, max }),
        }
    }

    async fn settle_front(&mut self) {
        let Some(p) = self.pending.pop_front() else {
            return;
        };
        let outcome = p
            .task
            .await
            .unwrap_or_else(|e| Err(format!("not stored: {e}")));
        match outcome {
            Ok(stream_seq) => {
                self.tally.accepted += p.lines.len() as u64;
                // A batch published again after a failure may be stored after later
                // ones: `last_seq` covers every accepted line.
                let last = event_seq(stream_seq, p.lines.len() - 1);
                self.tally.last_seq = self.tally.last_seq.max(Some(last));
            }
            Err(why) => {
                for line in p.lines {
                    self.reject(line, &LineError::Unavailable(why.clone()));
                }
            }
        }
    }
}

/// A cluster node's ingest sink: lines are checked here and stored in the stream; they
/// reach this node's ring (and every other node's) through its consumer.
pub struct ClusterSink {
    checker: Rc<RefCell<Checker>>,
    storer: Rc<Storer>,
}

impl ClusterSink {
    /// Connects on the calling thread's runtime (and reconnects in the background).
    pub async fn start(
        nats: &NatsSettings,
        subject: String,
        keys: Arc<StreamKeys>,
        max_line: usize,
        metrics: Arc<Metrics>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<ClusterSink> {
        let nats = super::connect(nats, "krux-relay ingest").await?;
        Ok(ClusterSink {
            checker: Rc::new(RefCell::new(Checker::new(max_line))),
            storer: Rc::new(Storer::new(nats, subject, keys, metrics, shutdown)?),
        })
    }
}

impl Sink for ClusterSink {
    fn serve<S: AsyncRead + AsyncWrite + 'static>(
        &self,
        s: S,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let (checker, storer) = (self.checker.clone(), self.storer.clone());
        tokio::task::spawn_local(serve_publisher(s, checker, storer, stop))
    }

    /// What this node stored reaches its ring through the stream: its own subscribers get
    /// it too before they are closed.
    async fn drained(&self) {
        self.storer.consumed_all_stored().await;
    }
}

/// Serves one publisher connection of a cluster node (see the module comment); the
/// publisher gets its summary once every batch is settled.
async fn serve_publisher<S: AsyncRead + AsyncWrite>(
    stream: S,
    checker: Rc<RefCell<Checker>>,
    storer: Rc<Storer>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut splitter = LineSplitter::new(checker.borrow().max_line());
    let mut buf = vec![0u8; crate::ingest::PUBLISHER_READ];
    let mut conn = Conn {
        tally: Tally::default(),
        replies: String::new(),
        builder: BatchBuilder::new(storer.max_payload()),
        pending: VecDeque::new(),
        metrics: storer.metrics.clone(),
    };
    let mut closed = Vec::new();
    let start = |conn: &mut Conn, closed: &mut Vec<Batch>| {
        for b in closed.drain(..).chain(conn.builder.take()) {
            let task = tokio::task::spawn_local(storer.clone().store(b.payload));
            conn.pending.push_back(Pending {
                task,
                lines: b.lines,
            });
        }
    };
    let ended_by_peer = loop {
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) => break true,
                Ok(n) => n,
                Err(_) => break false, // reset: what is being stored is still settled
            },
            _ = shutdown.wait_for(|s| *s) => break false,
        };
        {
            let mut c = checker.borrow_mut();
            splitter.feed(&buf[..n], &mut |no, line| {
                conn.line(&mut c, no, line, &mut closed)
            });
        }
        start(&mut conn, &mut closed);
        // Settle what is done; wait (not reading) while too much awaits its ack.
        while conn.pending.len() > MAX_PENDING
            || conn.pending.front().is_some_and(|p| p.task.is_finished())
        {
            conn.settle_front().await;
        }
        if !conn.replies.is_empty() {
            if wr.write_all(conn.replies.as_bytes()).await.is_err() {
                break false;
            }
            conn.replies.clear();
        }
    };
    if ended_by_peer {
        let mut c = checker.borrow_mut();
        splitter.finish(&mut |no, line| conn.line(&mut c, no, line, &mut closed));
    }
    start(&mut conn, &mut closed);
    while !conn.pending.is_empty() {
        conn.settle_front().await;
    }
    conn.replies.push_str(&conn.tally.summary_line());
    let _ = wr.write_all(conn.replies.as_bytes()).await;
    let _ = wr.shutdown().await;
}
