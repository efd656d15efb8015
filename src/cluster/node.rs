//! The cluster side of a node, on its own thread ("krux-cluster"): the stream's one
//! consumer feeding the ring, the history fetches that serve resumes beyond the window,
//! the credentials watch, and readiness.
//!
//! The consumer is an ordered consumer over the whole stream (no filter: subscriber filters
//! stay in the relay). An event a node stored carries the filter keys that node computed
//! when it validated it, so it is framed here without being parsed again; an event in a
//! message no node wrote is validated here in full. Each is framed once for this node.
//!
//! The stream's creation time is its epoch. Once a second the node looks at the stream: if
//! it is gone, or was deleted and recreated (a new epoch), the consumer starts again. A
//! stream is always created with its first sequence above the high-water mark (the last
//! `seq` this node delivered, kept in `<data-dir>/cluster-hwm`), so `seq` never goes below
//! what subscribers were sent; a recreated stream numbered below it is refused (the node
//! stays unready and says why) unless it is empty, in which case it is recreated above.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::stream::{self, Stream};
use async_nats::jetstream::Context as JetStream;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::batch::{event_seq, events, split_seq, Stored, MAX_EVENTS};
use crate::auth::LiveCredentials;
use crate::config::cluster::{NatsArgs, StreamArgs};
use crate::event::{now_rfc3339_millis, Validator};
use crate::frame::FrameArena;
use crate::metrics::Metrics;
use crate::reactor::{Fetched, HistoryReply, HistoryRequest};
use crate::ring::{Entry, Producer};

/// How long the consumer may take no message while the stream holds newer ones.
const STALLED: Duration = Duration::from_secs(2);

/// What the cluster thread needs.
pub struct Node {
    pub nats: NatsArgs,
    pub stream: StreamArgs,
    pub data_dir: PathBuf,
    pub producer: Producer,
    pub metrics: Arc<Metrics>,
    pub credentials: Arc<LiveCredentials>,
    pub history: mpsc::UnboundedReceiver<HistoryRequest>,
}

/// Runs the node's cluster side until the process ends.
pub async fn run(node: Node) -> anyhow::Result<()> {
    let url = node.nats.url.clone().expect("cluster mode has --nats");
    let client = super::connect(&url, "krux-relay node").await?;
    let js = super::jetstream(client.clone());
    let creds_loaded = Arc::new(AtomicBool::new(false));
    tokio::task::spawn_local(super::credentials::watch(
        js.clone(),
        node.nats.bucket.clone(),
        node.credentials.clone(),
        creds_loaded.clone(),
    ));
    tokio::task::spawn_local(serve_history(
        js.clone(),
        node.stream.clone(),
        node.history,
        node.metrics.clone(),
    ));
    let consuming = Rc::new(AtomicBool::new(false));
    let metrics = node.metrics.clone();
    {
        let consuming = consuming.clone();
        tokio::task::spawn_local(async move {
            let mut was = false;
            loop {
                let connected =
                    client.connection_state() == async_nats::connection::State::Connected;
                let ready = connected && consuming.load(SeqCst) && creds_loaded.load(SeqCst);
                metrics.cluster().ready.store(ready, SeqCst);
                if ready != was {
                    tracing::info!(ready, "cluster readiness changed");
                    was = ready;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    let mut consumer = Consumer {
        framer: Framer::default(),
        scratch: Vec::new(),
        producer: node.producer,
        metrics: node.metrics,
        hwm: HighWater::load(&node.data_dir, &node.stream.name)?,
        args: node.stream,
        epoch: None,
        next_msg: None,
        consuming,
    };
    consumer.run(&js).await;
    Ok(())
}

/// The last `seq` this node delivered, persisted at most once a second.
struct HighWater {
    path: PathBuf,
    seq: u64,
    saved: u64,
    saved_at: Instant,
}

impl HighWater {
    fn load(data_dir: &Path, stream: &str) -> anyhow::Result<HighWater> {
        let path = data_dir.join(format!("cluster-hwm.{stream}"));
        let seq = match std::fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("{} does not hold a number", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(HighWater {
            path,
            seq,
            saved: seq,
            saved_at: Instant::now(),
        })
    }

    /// Writes the mark if it moved and the last write is a second old: on disk it lags
    /// at most a second (in memory, where a running node takes it from, it never lags).
    fn save_if_due(&mut self) {
        if self.seq == self.saved || self.saved_at.elapsed() < Duration::from_secs(1) {
            return;
        }
        match crate::auth::write_private_atomic(&self.path, format!("{}\n", self.seq).as_bytes()) {
            Ok(()) => (self.saved, self.saved_at) = (self.seq, Instant::now()),
            Err(e) => tracing::warn!("cannot record the high-water mark: {e:#}"),
        }
    }

    /// The first stream sequence a stream created now must have.
    fn first_message(&self) -> u64 {
        split_seq(self.seq).0 + 1
    }
}

struct Consumer {
    framer: Framer,
    /// A compressed message's records while they are framed.
    scratch: Vec<u8>,
    producer: Producer,
    metrics: Arc<Metrics>,
    hwm: HighWater,
    args: StreamArgs,
    /// The creation time of the stream being consumed.
    epoch: Option<String>,
    /// The next stream message to take.
    next_msg: Option<u64>,
    consuming: Rc<AtomicBool>,
}

impl Consumer {
    async fn run(&mut self, js: &JetStream) {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.consume(js).await {
                Ok(()) => delay = Duration::from_millis(50),
                Err(e) => tracing::warn!("stream {}: {e:#}; consuming again", self.args.name),
            }
            self.consuming.store(false, SeqCst);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// One consumer's life: from where the node is in the stream until the stream fails
    /// or changes under it.
    async fn consume(&mut self, js: &JetStream) -> anyhow::Result<()> {
        let mut stream = ensure_stream(js, &self.args, self.hwm.first_message()).await?;
        let info = stream
            .info()
            .await
            .context("reading the stream's state")?
            .clone();
        let created = info.created.to_string();
        let state = info.state;
        let floor = split_seq(self.hwm.seq).0;
        if self.hwm.seq > 0 && state.last_sequence < floor {
            if state.messages == 0 {
                tracing::warn!(
                    last = state.last_sequence,
                    high_water = self.hwm.seq,
                    "the stream was recreated with sequences below what was delivered; recreating it above"
                );
                js.delete_stream(&self.args.name)
                    .await
                    .context("deleting it")?;
                return Ok(());
            }
            anyhow::bail!(
                "the stream holds messages numbered below seq {} that subscribers were already sent (last message {}); not consuming it — delete it and let a node recreate it",
                self.hwm.seq,
                state.last_sequence
            );
        }
        let start = match (&self.epoch, self.next_msg) {
            (Some(e), Some(next)) if *e == created => next,
            (Some(_), _) => {
                tracing::warn!(stream = %self.args.name, "the stream was deleted and recreated: consuming its new messages");
                state.first_sequence.max(1)
            }
            // The node's start: the ring begins with the next message; older events
            // are served from the stream.
            (None, _) => state.last_sequence + 1,
        };
        if self.epoch.as_ref() != Some(&created) {
            // Resumes from before this point go to the stream (which says what is gone).
            self.producer.ring().set_complete_from(event_seq(start, 0));
            self.epoch = Some(created.clone());
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .context("creating the node's consumer")?;
        let mut messages = consumer.messages().await.context("consuming")?;
        self.next_msg = Some(start);
        self.consuming.store(true, SeqCst);
        tracing::info!(stream = %self.args.name, from = start, "consuming the stream");
        let mut check = tokio::time::interval(Duration::from_secs(1));
        check.tick().await;
        let mut progress = Instant::now();
        loop {
            tokio::select! {
                m = messages.next() => match m {
                    Some(Ok(m)) => {
                        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                        let (seq, pending) = (info.stream_sequence, info.pending);
                        if seq < self.next_msg.unwrap_or(0) {
                            continue; // already taken before a restart of the consumer
                        }
                        self.take(seq, &m.payload);
                        progress = Instant::now();
                        let c = self.metrics.cluster();
                        c.consumer_stream_seq.store(seq, Relaxed);
                        c.consumer_lag.store(pending, Relaxed);
                        c.consumed_bytes.fetch_add(m.payload.len() as u64, Relaxed);
                    }
                    Some(Err(e)) => return Err(anyhow::anyhow!("{e}")),
                    None => anyhow::bail!("the consumer ended"),
                },
                _ = check.tick() => {
                    self.hwm.save_if_due();
                    match js.get_stream(&self.args.name).await {
                        Ok(mut s) => match s.info().await {
                            Ok(i) if i.created.to_string() != created => return Ok(()), // recreated
                            // Messages wait and none came for a while: after a server
                            // restart an ordered consumer can stay silent; start another.
                            Ok(i) if i.state.last_sequence >= self.next_msg.unwrap_or(0)
                                && progress.elapsed() > STALLED =>
                            {
                                tracing::warn!(stream = %self.args.name, "the consumer is stalled; consuming again");
                                return Ok(());
                            }
                            Ok(_) => self.consuming.store(true, SeqCst),
                            Err(_) => self.consuming.store(false, SeqCst),
                        },
                        Err(e) if e.to_string().contains("not found") => {
                            tracing::warn!(stream = %self.args.name, "the stream is gone; recreating it");
                            return Ok(());
                        }
                        Err(_) => self.consuming.store(false, SeqCst),
                    }
                }
            }
        }
    }

    /// Frames the events of stream message `msg` into the ring.
    fn take(&mut self, msg: u64, payload: &[u8]) {
        let ring = self.producer.ring().clone();
        let now = Instant::now(); // one clock read per message
        for (i, event) in events(payload, &mut self.scratch)
            .take(MAX_EVENTS)
            .enumerate()
        {
            let seq = event_seq(msg, i);
            let Some(entry) = event
                .ok()
                .and_then(|e| self.framer.entry(ring.head(), seq, &e, now))
            else {
                tracing::warn!(
                    message = msg,
                    index = i,
                    "skipping a malformed event in the stream"
                );
                continue;
            };
            self.metrics.event_in(entry.keys.etype);
            self.producer.publish(entry);
            self.hwm.seq = seq;
        }
        self.next_msg = Some(msg + 1);
        self.producer.wake_parked();
        self.metrics
            .replay_bytes
            .store(self.producer.retained_bytes() as i64, Relaxed);
    }
}

/// Turns a stored event into a ring entry, framed once. An event a node stored comes with
/// the keys that node computed when it validated it; any other is validated here (for its
/// keys, and so that nothing but valid events reaches subscribers).
#[derive(Default)]
struct Framer {
    validator: Validator,
    arena: FrameArena,
}

impl Framer {
    /// `None` for a malformed event. An event without `timestamp` is framed with the stamp
    /// the storing node gave it (so every node frames the same text), else (a message not
    /// written by a node) with now.
    fn entry(&mut self, pos: u64, seq: u64, event: &Stored<'_>, at: Instant) -> Option<Entry> {
        let fresh;
        let (keys, stamp) = match &event.keys {
            Some(k) => (k.to_keys(), event.stamp),
            None => {
                let valid = self.validator.validate(event.text).ok()?;
                if !valid.needs_stamp {
                    (valid.keys, None)
                } else {
                    fresh = now_rfc3339_millis();
                    (valid.keys, Some(fresh.as_str()))
                }
            }
        };
        Some(Entry {
            pos,
            seq,
            frame: self.arena.event_frame(event.text, stamp, seq),
            keys,
            accepted_at: at,
        })
    }
}

/// The stream, created if missing (first sequence `first_message`).
async fn ensure_stream(
    js: &JetStream,
    args: &StreamArgs,
    first_message: u64,
) -> anyhow::Result<Stream> {
    let get = match js.get_stream(&args.name).await {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let config = stream::Config {
        name: args.name.clone(),
        subjects: vec![args.subject()],
        storage: stream::StorageType::File,
        max_bytes: i64::try_from(args.max_bytes).unwrap_or(i64::MAX),
        max_age: args.max_age,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        first_sequence: Some(first_message).filter(|&f| f > 1),
        description: Some("krux-relay events: one message per batch of lines".into()),
        ..Default::default()
    };
    match js.create_stream(config).await {
        Ok(s) => {
            tracing::info!(stream = %args.name, first_message, "created the stream");
            Ok(s)
        }
        // Another node may have created it meanwhile: look again next round.
        Err(e) => Err(anyhow::anyhow!("{get}; creating it: {e}")),
    }
}

async fn serve_history(
    js: JetStream,
    args: StreamArgs,
    mut requests: mpsc::UnboundedReceiver<HistoryRequest>,
    metrics: Arc<Metrics>,
) {
    let args = Rc::new(args);
    while let Some(req) = requests.recv().await {
        let (js, args, metrics) = (js.clone(), args.clone(), metrics.clone());
        tokio::task::spawn_local(async move {
            let fetched = fetch(&js, &args, &req).await;
            if let Some(m) = &metrics.cluster {
                m.history_fetches.fetch_add(1, Relaxed);
            }
            if matches!(&fetched, Ok(f) if f.entries.is_empty() && f.gap_oldest.is_none()) {
                // Nothing new yet: the asker will ask again; do not let it spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = req.reply.send(HistoryReply {
                sub: req.sub,
                fetched,
            });
        });
    }
}

/// The stored events after `req.after` and below `req.until`, up to `req.max_bytes`.
async fn fetch(js: &JetStream, args: &StreamArgs, req: &HistoryRequest) -> anyhow::Result<Fetched> {
    let mut stream = js
        .get_stream(&args.name)
        .await
        .context("finding the stream")?;
    let state = stream
        .info()
        .await
        .context("reading the stream")?
        .state
        .clone();
    let (after_msg, _) = split_seq(req.after);
    let (until_msg, _) = split_seq(req.until);
    let first = state.first_sequence.max(1);
    let mut out = Fetched::default();
    // The message holding `after` is gone: what followed it in that message, and the
    // messages after it, may be gone too (or the stream was recreated since).
    if first > after_msg.max(1) {
        out.gap_oldest = Some(event_seq(first, 0));
    }
    let (mut framer, mut bytes, at) = (Framer::default(), 0, Instant::now());
    let mut scratch = Vec::new();
    let mut m = after_msg.max(first);
    out.covered = req.after;
    'messages: loop {
        if m > until_msg || m > state.last_sequence || bytes >= req.max_bytes {
            out.reached = m > until_msg || m > state.last_sequence;
            out.covered = out.covered.max(event_seq(m, 0).saturating_sub(1));
            break;
        }
        let msg = match stream
            .raw_message_builder()
            .sequence(m)
            .next_by_subject(args.subject())
            .send()
            .await
        {
            Ok(msg) => msg,
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                out.reached = true;
                out.covered = event_seq(state.last_sequence + 1, 0) - 1;
                break;
            }
            Err(e) => return Err(e).context("reading a stored message"),
        };
        m = msg.sequence;
        for (i, event) in events(&msg.payload, &mut scratch)
            .take(MAX_EVENTS)
            .enumerate()
        {
            let seq = event_seq(m, i);
            if seq <= req.after {
                continue;
            }
            if seq >= req.until {
                out.reached = true;
                out.covered = req.until - 1;
                break 'messages;
            }
            // Never in a ring: no position. Skipped when malformed, as the consumer does.
            if let Some(entry) = event.ok().and_then(|e| framer.entry(0, seq, &e, at)) {
                bytes += entry.frame.len();
                out.entries.push(Arc::new(entry));
            }
        }
        m += 1;
    }
    Ok(out)
}
