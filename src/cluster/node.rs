//! The cluster side of a node, on its own thread ("krux-cluster"): the stream's one
//! consumer feeding the ring, the history fetches that serve resumes beyond the window,
//! the credentials watch, and readiness.
//!
//! The consumer is an ordered consumer over the whole stream (no filter: subscriber filters
//! stay in the relay). An event a node stored carries the filter keys that node computed
//! when it validated it, so it is framed here without being parsed again; an event in a
//! message no node wrote is validated here in full. Each is framed once for this node.
//!
//! A message in the node format must carry a node's MAC (see `batch`): one that does not
//! is dropped whole and counted, so what anyone else publishes on the subject can only
//! reach subscribers as foreign lines, each validated in full.
//!
//! Readiness: the node is ready while its consumer runs, and stays ready through a
//! JetStream outage shorter than `--nats-unready-after` (a leader election, a server
//! restart): its subscribers are still served from its window meanwhile, and a load
//! balancer should not drop every node at once for a pause every node shares. A consumer
//! that falls silent while the stream holds newer messages is started again, as is one
//! that was running when the client reconnected.
//!
//! The stream's creation time is its epoch. Four times a second the node looks at the stream: if
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

use super::batch::{event_seq, events, split_seq, Malformed, Stored, MAC_HEADER, MAX_EVENTS};
use super::credentials::{StreamKeys, Watched};
use crate::auth::LiveCredentials;
use crate::config::cluster::{NatsSettings, StreamArgs};
use crate::event::{now_rfc3339_millis, Validator};
use crate::frame::FrameArena;
use crate::metrics::Metrics;
use crate::reactor::{Fetched, HistoryReply, HistoryRequest};
use crate::ring::{Deflated, Entry, Producer};

/// How long the consumer may take no message while the stream holds newer ones: an
/// ordered consumer that lived on a server that died stays silent.
const STALLED: Duration = Duration::from_secs(1);
/// How often the stream is looked at (recreated? stalled?).
const CHECK: Duration = Duration::from_millis(250);
/// Longest wait before a consumer or watch is started again after a failure.
const MAX_RETRY: Duration = Duration::from_millis(500);

/// What the cluster thread needs.
pub struct Node {
    pub nats: NatsSettings,
    pub stream: StreamArgs,
    pub keys: Arc<StreamKeys>,
    pub data_dir: PathBuf,
    pub producer: Producer,
    pub metrics: Arc<Metrics>,
    pub credentials: Arc<LiveCredentials>,
    pub history: mpsc::UnboundedReceiver<HistoryRequest>,
}

/// Runs the node's cluster side until the process ends.
pub async fn run(node: Node) -> anyhow::Result<()> {
    let nats = super::connect(&node.nats, "krux-relay node").await?;
    let js = super::jetstream(nats.client.clone());
    let creds_loaded = Arc::new(AtomicBool::new(false));
    tokio::task::spawn_local(super::credentials::watch(
        js.clone(),
        nats.clone(),
        Watched {
            bucket: node.nats.bucket.clone(),
            replicas: node.nats.replicas,
            live: node.credentials.clone(),
            keys: node.keys.clone(),
            loaded: creds_loaded.clone(),
        },
    ));
    tokio::task::spawn_local(serve_history(
        js.clone(),
        node.stream.clone(),
        node.keys.clone(),
        node.history,
        node.metrics.clone(),
    ));
    let consuming = Rc::new(AtomicBool::new(false));
    tokio::task::spawn_local(readiness(
        nats.client.clone(),
        consuming.clone(),
        creds_loaded,
        node.metrics.clone(),
        node.stream.unready_after,
    ));
    let mut consumer = Consumer {
        framer: Framer::default(),
        producer: node.producer,
        metrics: node.metrics,
        hwm: HighWater::load(&node.data_dir, &node.stream.name)?,
        replicas: node.nats.replicas,
        args: node.stream,
        keys: node.keys,
        epoch: None,
        config: None,
        next_msg: None,
        consuming,
        warned_at: None,
    };
    consumer.run(&js, &nats).await;
    Ok(())
}

/// Keeps `krux_cluster_ready` (and `/readyz`): ready once the credentials are loaded and
/// the consumer runs, and until the consumer or the connection has been down for
/// `grace`.
async fn readiness(
    client: async_nats::Client,
    consuming: Rc<AtomicBool>,
    creds_loaded: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    grace: Duration,
) {
    let (mut was, mut healthy_at, mut down_since) = (false, None::<Instant>, None::<Instant>);
    loop {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        if connected && consuming.load(SeqCst) {
            healthy_at = Some(Instant::now());
            if let Some(t) = down_since.take() {
                tracing::info!(
                    after_ms = t.elapsed().as_millis() as u64,
                    "consuming the stream again"
                );
            }
        } else if healthy_at.is_some() && down_since.is_none() {
            down_since = Some(Instant::now());
        }
        let ready = creds_loaded.load(SeqCst) && healthy_at.is_some_and(|t| t.elapsed() < grace);
        metrics.cluster().ready.store(ready, SeqCst);
        if ready != was {
            tracing::info!(ready, "cluster readiness changed");
            was = ready;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
        match crate::datadir::write_private_atomic(&self.path, format!("{}\n", self.seq).as_bytes())
        {
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
    producer: Producer,
    metrics: Arc<Metrics>,
    hwm: HighWater,
    args: StreamArgs,
    replicas: usize,
    keys: Arc<StreamKeys>,
    /// The creation time of the stream being consumed.
    epoch: Option<String>,
    /// The stream's settings as last seen: a stream this node recreates gets them back.
    config: Option<stream::Config>,
    /// The next stream message to take.
    next_msg: Option<u64>,
    consuming: Rc<AtomicBool>,
    /// When a dropped message was last logged (at most one line a second).
    warned_at: Option<Instant>,
}

impl Consumer {
    async fn run(&mut self, js: &JetStream, nats: &super::Nats) {
        let mut delay = Duration::from_millis(50);
        // Nothing is signed or checked before the stream key is known.
        while !self.keys.loaded() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        loop {
            match self.consume(js, nats).await {
                Ok(()) => delay = Duration::from_millis(50),
                Err(e) => tracing::warn!("stream {}: {e:#}; consuming again", self.args.name),
            }
            self.consuming.store(false, SeqCst);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY);
        }
    }

    /// One consumer's life: from where the node is in the stream until the stream fails
    /// or changes under it, the consumer stalls, or the client reconnects.
    async fn consume(&mut self, js: &JetStream, nats: &super::Nats) -> anyhow::Result<()> {
        let connects = nats.connects.load(SeqCst);
        let first_message = self.hwm.first_message();
        let stream = match js.get_stream(&self.args.name).await {
            Ok(s) => s,
            Err(e) if stream_missing(&e) => self.create_stream(js, first_message, e).await?,
            // Unanswered (JetStream electing a leader): it may well exist.
            Err(e) => return Err(e).context("looking up the stream"),
        };
        let info = stream.cached_info().clone();
        if self.config.is_none() {
            self.check_settings(&info.config);
        }
        self.config = Some(info.config.clone());
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
        let mut check = tokio::time::interval(CHECK);
        check.tick().await;
        let mut reconnected = tokio::time::interval(Duration::from_millis(100));
        // Since when the stream has held a message the consumer has not delivered.
        let mut behind_since: Option<Instant> = None;
        loop {
            tokio::select! {
                m = messages.next() => match m {
                    Some(Ok(m)) => {
                        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                        let (seq, pending) = (info.stream_sequence, info.pending);
                        if seq < self.next_msg.unwrap_or(0) {
                            continue; // already taken before a restart of the consumer
                        }
                        let mac = m.headers.as_ref().and_then(|h| h.get(MAC_HEADER)).map(|v| v.as_str());
                        self.take(seq, &m.payload, mac);
                        behind_since = None;
                        let c = self.metrics.cluster();
                        c.consumer_stream_seq.store(seq, Relaxed);
                        c.consumer_lag.store(pending, Relaxed);
                        c.consumed_bytes.fetch_add(m.payload.len() as u64, Relaxed);
                    }
                    Some(Err(e)) => return Err(anyhow::anyhow!("{e}")),
                    None => anyhow::bail!("the consumer ended"),
                },
                _ = reconnected.tick() => {
                    // A consumer through a connection that broke can stay silent.
                    if nats.connects.load(SeqCst) != connects {
                        tracing::info!(stream = %self.args.name, "reconnected to NATS: consuming again");
                        return Ok(());
                    }
                }
                _ = check.tick() => {
                    self.hwm.save_if_due();
                    // One STREAM.INFO request: `get_stream` brings the info with it.
                    match js.get_stream(&self.args.name).await {
                        Ok(s) if s.cached_info().created.to_string() != created => return Ok(()), // recreated
                        Ok(s) => {
                            let i = s.cached_info();
                            self.consuming.store(true, SeqCst);
                            self.config = Some(i.config.clone());
                            // Compared with the stream's last message, not with when the
                            // last one came: an idle stream is not a stall.
                            if i.state.last_sequence >= self.next_msg.unwrap_or(0) {
                                let since = *behind_since.get_or_insert_with(Instant::now);
                                if since.elapsed() >= STALLED {
                                    tracing::warn!(stream = %self.args.name, "the consumer is stalled; consuming again");
                                    return Ok(());
                                }
                            } else {
                                behind_since = None;
                            }
                        }
                        Err(e) if stream_missing(&e) => {
                            tracing::warn!(stream = %self.args.name, "the stream is gone; recreating it");
                            return Ok(());
                        }
                        Err(_) => self.consuming.store(false, SeqCst),
                    }
                }
            }
        }
    }

    /// Creates the stream, missing since `missing`, with its first sequence `first` — and
    /// the settings the node last saw it with, if it saw it (a deleted stream comes back
    /// as it was, its replicas included), else the flags'.
    async fn create_stream(
        &mut self,
        js: &JetStream,
        first: u64,
        missing: impl std::fmt::Display,
    ) -> anyhow::Result<Stream> {
        let config = match self.config.clone() {
            Some(old) => stream::Config {
                first_sequence: Some(first).filter(|&f| f > 1),
                ..old
            },
            None => stream_config(&self.args, self.replicas, first),
        };
        let replicas = config.num_replicas;
        match js.create_stream(config).await {
            Ok(s) => {
                tracing::info!(stream = %self.args.name, first_message = first, replicas, "created the stream");
                Ok(s)
            }
            // Another node may have created it meanwhile: look again next round.
            Err(e) => Err(anyhow::anyhow!("{missing}; creating it: {e}")),
        }
    }

    /// Says once, at start, where the existing stream's settings differ from the flags
    /// (a node only applies them when it creates the stream).
    fn check_settings(&self, has: &stream::Config) {
        let want = stream_config(&self.args, self.replicas, 1);
        let mut differ = Vec::new();
        if has.num_replicas != want.num_replicas {
            differ.push(format!(
                "{} replica(s), --nats-replicas {}",
                has.num_replicas, want.num_replicas
            ));
        }
        if has.max_bytes != want.max_bytes {
            differ.push(format!(
                "max_bytes {}, --nats-max-bytes {}",
                has.max_bytes, want.max_bytes
            ));
        }
        if has.max_age != want.max_age {
            differ.push(format!(
                "max_age {:?}, --nats-max-age {:?}",
                has.max_age, want.max_age
            ));
        }
        if !differ.is_empty() {
            tracing::warn!(
                stream = %self.args.name,
                "the stream's settings differ from this node's flags ({}); a node applies them only when it creates the stream (change it with `nats stream edit`)",
                differ.join("; ")
            );
        }
    }

    /// Frames the events of stream message `msg` into the ring.
    fn take(&mut self, msg: u64, payload: &[u8], mac: Option<&str>) {
        let ring = self.producer.ring().clone();
        let now = Instant::now(); // one clock read per message
        let (producer, metrics, hwm) = (&mut self.producer, &self.metrics, &mut self.hwm);
        let dropped = self.framer.message(
            msg,
            payload,
            mac,
            &self.keys,
            now,
            &|| ring.head(),
            &mut |entry| {
                metrics.event_in(entry.keys.etype);
                hwm.seq = entry.seq;
                producer.publish(entry);
            },
        );
        self.next_msg = Some(msg + 1);
        self.producer.wake_parked();
        self.metrics
            .replay_bytes
            .store(self.producer.retained_bytes() as i64, Relaxed);
        self.report(msg, &dropped);
    }

    /// Counts what a message did not deliver, and logs it: once per message for invalid
    /// lines (with the first reason), at most once a second for forged messages.
    fn report(&mut self, msg: u64, d: &Dropped) {
        let c = self.metrics.cluster();
        if d.forged {
            let n = c.forged_messages.fetch_add(1, Relaxed) + 1;
            if self
                .warned_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.warned_at = Some(Instant::now());
                tracing::warn!(
                    message = msg,
                    forged_total = n,
                    "dropped a stream message in the node format without a valid MAC (not written by a node with the cluster's stream key)"
                );
            }
        }
        if let Some(first) = &d.first {
            c.rejected_events.fetch_add(d.rejected as u64, Relaxed);
            tracing::warn!(
                message = msg,
                rejected = d.rejected,
                first = %first,
                "events of a stream message not delivered"
            );
        }
    }
}

/// What a stream message did not deliver.
#[derive(Debug, Default)]
struct Dropped {
    /// In the node format without a valid MAC: none of it.
    forged: bool,
    /// Events (lines, records) not delivered, and why the first was not.
    rejected: usize,
    first: Option<String>,
}

/// Turns stored events into ring entries, framed once. An event a node stored comes with
/// the keys that node computed when it validated it; any other is validated here (for its
/// keys, and so that nothing but valid events reaches subscribers).
#[derive(Default)]
struct Framer {
    validator: Validator,
    arena: FrameArena,
    /// A compressed message's records while they are framed.
    scratch: Vec<u8>,
}

impl Framer {
    /// Frames the valid events of stream message `msg` (numbered in order, from 0) and
    /// hands each to `out`, at the ring position `pos()`. A message in the node format
    /// is framed only if `mac` verifies. An event without `timestamp` is framed with the
    /// stamp the storing node gave it (so every node frames the same text), else (a line
    /// not written by a node) with now.
    #[allow(clippy::too_many_arguments)]
    fn message(
        &mut self,
        msg: u64,
        payload: &[u8],
        mac: Option<&str>,
        keys: &StreamKeys,
        at: Instant,
        pos: &dyn Fn() -> u64,
        out: &mut dyn FnMut(Entry),
    ) -> Dropped {
        let mut dropped = Dropped::default();
        if super::batch::node_written(payload) && !mac.is_some_and(|m| keys.verify(payload, m)) {
            dropped.forged = true;
            return dropped;
        }
        let Framer {
            validator,
            arena,
            scratch,
        } = self;
        let mut index = 0;
        for event in events(payload, scratch) {
            let why = match event {
                Err(Malformed) => "a damaged record: the rest of the message cannot be read".into(),
                Ok(_) if index == MAX_EVENTS => {
                    format!("more than {MAX_EVENTS} events in one message")
                }
                Ok(e) => match keys_of(validator, &e) {
                    Ok((keys, fresh)) => {
                        let stamp = e.stamp.or(fresh.as_deref());
                        let seq = event_seq(msg, index);
                        index += 1;
                        out(Entry {
                            pos: pos(),
                            seq,
                            frame: arena.event_frame(e.text, stamp, seq),
                            keys,
                            accepted_at: at,
                            deflated: Default::default(),
                        });
                        continue;
                    }
                    Err(e) => e.to_string(),
                },
            };
            dropped.rejected += 1;
            dropped.first.get_or_insert(why);
        }
        // One large compressed message must not hold its buffer for good.
        if self.scratch.capacity() > 4 << 20 {
            self.scratch = Vec::new();
        }
        dropped
    }
}

/// An event's filter keys, and a stamp of now when it has no `timestamp` and no stamp
/// of its storing node.
fn keys_of(
    validator: &mut Validator,
    e: &Stored<'_>,
) -> Result<(crate::event::FilterKeys, Option<String>), crate::event::LineError> {
    match &e.keys {
        Some(k) => Ok((k.to_keys(), None)),
        None => {
            let valid = validator.validate(e.text)?;
            Ok((valid.keys, valid.needs_stamp.then(now_rfc3339_millis)))
        }
    }
}

/// Whether JetStream answered that the stream does not exist.
fn stream_missing(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::{context::GetStreamErrorKind, ErrorCode};
    matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// The stream's settings from the flags (first sequence `first`).
fn stream_config(args: &StreamArgs, replicas: usize, first: u64) -> stream::Config {
    stream::Config {
        name: args.name.clone(),
        subjects: vec![args.subject()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_bytes: i64::try_from(args.max_bytes).unwrap_or(i64::MAX),
        max_age: args.max_age,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        first_sequence: Some(first).filter(|&f| f > 1),
        description: Some("krux-relay events: one message per batch of lines".into()),
        ..Default::default()
    }
}

async fn serve_history(
    js: JetStream,
    args: StreamArgs,
    keys: Arc<StreamKeys>,
    mut requests: mpsc::UnboundedReceiver<HistoryRequest>,
    metrics: Arc<Metrics>,
) {
    let args = Rc::new(args);
    while let Some(req) = requests.recv().await {
        let (js, args, metrics, keys) = (js.clone(), args.clone(), metrics.clone(), keys.clone());
        tokio::task::spawn_local(async move {
            let fetched = fetch(&js, &args, &keys, &req).await;
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
async fn fetch(
    js: &JetStream,
    args: &StreamArgs,
    keys: &StreamKeys,
    req: &HistoryRequest,
) -> anyhow::Result<Fetched> {
    let stream = js
        .get_stream(&args.name)
        .await
        .context("finding the stream")?;
    let state = stream.cached_info().state.clone(); // fetched by `get_stream` just now
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
    let mut entries = Vec::new();
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
        let mac = msg.headers.get(MAC_HEADER).map(|v| v.as_str());
        // The same events, numbered the same, as the consumer takes (what it dropped, it
        // counted and logged already); never in a ring: no position.
        framer.message(m, &msg.payload, mac, keys, at, &|| 0, &mut |mut e| {
            e.deflated = Deflated::outside_window();
            entries.push(e)
        });
        for entry in entries.drain(..) {
            if entry.seq <= req.after {
                continue;
            }
            if entry.seq >= req.until {
                out.reached = true;
                out.covered = req.until - 1;
                break 'messages;
            }
            bytes += entry.frame.len();
            out.entries.push(Arc::new(entry));
        }
        m += 1;
    }
    Ok(out)
}
