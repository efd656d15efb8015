//! The load client: raw WebSocket subscribers that count frames from their headers and
//! parse a sample of payloads for latency, and publishers that embed their send time in
//! each event (`"lt"`, nanoseconds since the Unix epoch) at a fixed rate or, at `max`,
//! bounded by a window of events in flight.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use krux_testkit::{FrameCounter, Seen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::scenario::{Fanout, Pool, Published};

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Latency histograms (microseconds): the whole measurement, and the current second.
pub struct Latency {
    pub total: Histogram<u64>,
    pub interval: Histogram<u64>,
}

impl Latency {
    fn new() -> Latency {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        Latency {
            total: h(),
            interval: h(),
        }
    }
}

/// Everything the client's tasks share: what they count, and what steers them.
pub struct Shared {
    pub counts: Counters,
    pub control: Control,
}

/// What the subscribers and publishers count (summed over worker processes).
pub struct Counters {
    pub delivered: AtomicU64,
    /// Bytes subscribers read off their sockets (WebSocket framing included; TLS not).
    pub wire_bytes: AtomicU64,
    pub published: AtomicU64,
    /// Sum over published events of the subscribers each should reach.
    pub expected: AtomicU64,
    pub rejected: AtomicU64,
    pub latency: Mutex<Latency>,
    /// Closes seen, by code (1006: the stream ended without one; 0: a resume failed).
    pub closes: Mutex<BTreeMap<u16, u64>>,
    /// Notified on every delivery: a windowed publisher waits on it.
    pub progress: Notify,
    pub reconnects: AtomicU64,
    pub reconnect_latency: Mutex<Histogram<u64>>,
    pub duplicates: AtomicU64,
    /// TLS handshakes made in full, and resumed with a session ticket.
    pub tls_full: AtomicU64,
    pub tls_resumed: AtomicU64,
    /// Per subscriber slot: frames its current connection has received (duplicates
    /// excluded), read at the quiet point so that loss covers the measured window alone.
    pub frames: Vec<AtomicU64>,
}

/// What the run tells its tasks.
pub struct Control {
    /// Latency samples count only while this is set.
    pub measuring: AtomicBool,
    /// Publishers stop at this flag, subscribers at `stop` (after the drain).
    pub stop_publishing: AtomicBool,
    pub stop: AtomicBool,
    /// Publishers hold while this is set (the quiet point before the measured window).
    pub paused: AtomicBool,
    /// Events per second over all publishers; 0: as fast as the window allows.
    pub rate: AtomicU64,
    /// Raised per subscriber to make it reconnect (churn, storm).
    pub churn: Vec<AtomicBool>,
    /// Per subscriber slot: the life of the connection that holds it. A connection whose
    /// life is no longer its slot's leaves for good (a stage ramping down); a subscriber
    /// that joins the slot later starts a new life.
    pub life: Vec<AtomicU64>,
}

impl Shared {
    pub fn new(subscribers: usize) -> Arc<Shared> {
        Arc::new(Shared {
            counts: Counters {
                delivered: AtomicU64::new(0),
                wire_bytes: AtomicU64::new(0),
                published: AtomicU64::new(0),
                expected: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                latency: Mutex::new(Latency::new()),
                closes: Mutex::new(BTreeMap::new()),
                progress: Notify::new(),
                reconnects: AtomicU64::new(0),
                reconnect_latency: Mutex::new(
                    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
                ),
                duplicates: AtomicU64::new(0),
                tls_full: AtomicU64::new(0),
                tls_resumed: AtomicU64::new(0),
                frames: (0..subscribers).map(|_| AtomicU64::new(0)).collect(),
            },
            control: Control {
                measuring: AtomicBool::new(false),
                stop_publishing: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                paused: AtomicBool::new(false),
                rate: AtomicU64::new(0),
                churn: (0..subscribers).map(|_| AtomicBool::new(false)).collect(),
                life: (0..subscribers).map(|_| AtomicU64::new(0)).collect(),
            },
        })
    }
}

impl Counters {
    pub fn count_close(&self, code: u16) {
        *self
            .closes
            .lock()
            .expect("closes lock")
            .entry(code)
            .or_default() += 1;
    }
}

/// A subscriber's byte stream: plain TCP, or TLS over it.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A subscription made: the stream, the bytes that followed the 101 head, the handshake
/// time, and the 101's `Krux-Seq` (the last seq published before it began).
pub struct Opened {
    pub stream: Box<dyn Stream>,
    pub leftover: Vec<u8>,
    pub took: Duration,
    pub krux_seq: Option<u64>,
}

/// Opens a subscriber: TCP connect and WebSocket upgrade.
pub async fn connect(
    ep: &Endpoint,
    query: &str,
    since: Option<u64>,
    counts: &Counters,
) -> anyhow::Result<Opened> {
    let (ws, token, tls) = (ep.ws, &ep.token, ep.tls.as_ref());
    let t0 = Instant::now();
    let tcp = TcpStream::connect(ws)
        .await
        .with_context(|| format!("connecting a subscriber to {ws}"))?;
    tcp.set_nodelay(true)?;
    let mut s: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some(c) => {
            let name = rustls::pki_types::ServerName::IpAddress(ws.ip().into());
            let tls = c.connect(name, tcp).await.context("TLS handshake")?;
            let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            let counter = if resumed {
                &counts.tls_resumed
            } else {
                &counts.tls_full
            };
            counter.fetch_add(1, Relaxed);
            Box::new(tls)
        }
    };
    let mut q = query.to_string();
    if let Some(since) = since {
        q = if q.is_empty() {
            format!("since={since}")
        } else {
            format!("{q}&since={since}")
        };
    }
    let sep = if q.is_empty() { "" } else { "&" };
    let target = format!("/events?access_token={token}{sep}{q}");
    let offer = match ep.deflate {
        true => "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        false => "",
    };
    let req = krux_testkit::upgrade_request(&target, &ws.to_string(), offer);
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let n = s.read_buf(&mut buf).await?;
        if n == 0 {
            bail!("the server closed the connection during the handshake");
        }
        if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                bail!(
                    "handshake refused: {}",
                    String::from_utf8_lossy(&buf[..end])
                        .lines()
                        .next()
                        .unwrap_or("")
                );
            }
            let krux_seq = String::from_utf8_lossy(&buf[..end]).lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("krux-seq")
                    .then(|| value.trim().parse().ok())?
            });
            return Ok(Opened {
                stream: s,
                leftover: buf.split_off(end + 4),
                took: t0.elapsed(),
                krux_seq,
            });
        }
        if buf.len() > 16 * 1024 {
            bail!("handshake response too long");
        }
    }
}

/// The send time embedded by the publisher, from a payload prefix.
fn sent_at(payload: &[u8]) -> Option<u64> {
    // Built once: constructing a searcher per sample showed up in profiles.
    static LT: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"lt\":"));
    number_after(&LT, payload)
}

/// The decimal number right after `key` (`"name":`) in `payload`.
fn number_after<T: std::str::FromStr>(
    key: &memchr::memmem::Finder<'_>,
    payload: &[u8],
) -> Option<T> {
    let i = key.find(payload)? + key.needle().len();
    let digits = payload[i..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[i..i + digits])
        .ok()?
        .parse()
        .ok()
}

/// Where subscribers connect, and as whom.
#[derive(Clone)]
pub struct Endpoint {
    pub ws: SocketAddr,
    pub token: String,
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// Offer permessage-deflate, as browsers do.
    pub deflate: bool,
}

/// How a subscriber reconnects when asked to (churn and storm runs).
#[derive(Clone)]
pub struct Reconnect {
    pub ep: Endpoint,
    /// The subscriber's filter as a query string.
    pub query: String,
}

/// How one subscriber connection (one slot's life) ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SubEnd {
    /// Frames received (duplicates excluded); once the run is over, those after the
    /// quiet point that starts the window…
    pub frames: u64,
    /// …and those before it (connected before the warm-up).
    #[serde(default)]
    pub before: u64,
    /// The server closed it (or a resume failed).
    pub closed: bool,
    /// Joined during the measured window: the 101's `Krux-Seq` (owed what came after).
    pub joined_after: Option<u64>,
    /// Left during the window (a stage ramping down): owed what came up to `last_seq`.
    pub left: bool,
    /// The seq of its last frame (0 unless seqs are tracked).
    pub last_seq: u64,
}

/// Subscriber tasks; each yields its slot and how it ended.
pub type Readers = tokio::task::JoinSet<(usize, SubEnd)>;

/// Connects one subscriber per filter query, `concurrency` handshakes at a time (calling
/// `on_connected` after each), then starts reading them all. Returns the readers and the
/// handshake times.
pub async fn start_subscribers(
    ep: &Endpoint,
    queries: &[String],
    concurrency: usize,
    shared: &Arc<Shared>,
    sample_every: u64,
    reconnect: bool,
    mut on_connected: impl FnMut(),
) -> anyhow::Result<(Readers, Histogram<u64>)> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut connecting = tokio::task::JoinSet::new();
    for (i, q) in queries.iter().enumerate() {
        let (sem, q, ep, shared) = (sem.clone(), q.clone(), ep.clone(), shared.clone());
        connecting.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let c = connect(&ep, &q, None, &shared.counts);
            (i, c.await)
        });
    }
    let mut hs = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut conns = Vec::with_capacity(queries.len());
    while let Some(r) = connecting.join_next().await {
        let (i, res) = r?;
        let opened = res.with_context(|| format!("subscriber {i}"))?;
        let _ = hs.record((opened.took.as_micros() as u64).max(1));
        conns.push((i, opened));
        on_connected();
    }
    let mut readers = Readers::new();
    for (i, opened) in conns {
        let reconnect = reconnect.then(|| Reconnect {
            ep: ep.clone(),
            query: queries[i].clone(),
        });
        let shared = shared.clone();
        readers.spawn(async move {
            let got = subscribe(opened, shared, sample_every, i, 0, reconnect).await;
            (i, got)
        });
    }
    Ok((readers, hs))
}

/// A subscriber that joins while the load runs (a stage ramping up) in slot `i`: it
/// connects, then reads like the others. It tracks seqs, so it can leave with an account.
pub fn join(readers: &mut Readers, r: Reconnect, shared: Arc<Shared>, sample_every: u64, i: usize) {
    let life = shared.control.life[i].fetch_add(1, Relaxed) + 1;
    // A storm raised every slot's flag, this one's too while it was empty: a subscriber
    // that has not joined yet has nothing to resume.
    shared.control.churn[i].store(false, Relaxed);
    readers.spawn(async move {
        let c = connect(&r.ep, &r.query, None, &shared.counts);
        match c.await {
            Ok(opened) => {
                let joined_after = Some(opened.krux_seq.unwrap_or(0));
                let end = subscribe(opened, shared, sample_every, i, life, Some(r)).await;
                (
                    i,
                    SubEnd {
                        joined_after,
                        ..end
                    },
                )
            }
            Err(_) => {
                shared.counts.count_close(0);
                let end = SubEnd {
                    closed: true,
                    joined_after: Some(u64::MAX), // never subscribed: owed nothing
                    ..SubEnd::default()
                };
                (i, end)
            }
        }
    });
}

/// Reads the subscriber in slot `idx` until it is closed, its `life` is over (it leaves),
/// or the run stops. With `reconnect`, it tracks seqs, and drops its connection whenever
/// `shared.control.churn[idx]` is raised and resumes with `since`.
pub async fn subscribe(
    opened: Opened,
    shared: Arc<Shared>,
    sample_every: u64,
    idx: usize,
    life: u64,
    reconnect: Option<Reconnect>,
) -> SubEnd {
    let Opened {
        stream: mut s,
        leftover,
        krux_seq,
        ..
    } = opened;
    let mut counter = FrameCounter::new(sample_every, reconnect.is_some());
    // Before its first event, a subscriber resumes from where its subscription began.
    counter.last_seq = krux_seq.unwrap_or(0);
    let mut buf = vec![0u8; 64 * 1024];
    let mut closed = false;
    let handle = |data: &[u8], counter: &mut FrameCounter, closed: &mut bool| {
        shared
            .counts
            .wire_bytes
            .fetch_add(data.len() as u64, Relaxed);
        let before = (counter.frames, counter.duplicates);
        counter.feed(data, &mut |seen| match seen {
            Seen::Text {
                sample: Some(p), ..
            } if shared.control.measuring.load(Relaxed) => {
                if let Some(t) = sent_at(p) {
                    let us = now_ns().saturating_sub(t) / 1000;
                    let mut l = shared.counts.latency.lock().expect("latency lock");
                    let _ = l.total.record(us.max(1));
                    let _ = l.interval.record(us.max(1));
                }
            }
            Seen::Text { .. } => {}
            Seen::Close(code, _) => {
                shared.counts.count_close(code);
                *closed = true;
            }
        });
        let n = counter.frames - before.0;
        shared
            .counts
            .duplicates
            .fetch_add(counter.duplicates - before.1, Relaxed);
        if n > 0 {
            shared.counts.frames[idx].fetch_add(n, Relaxed);
            shared.counts.delivered.fetch_add(n, Relaxed);
            shared.counts.progress.notify_waiters();
        }
    };
    handle(&leftover, &mut counter, &mut closed);
    // One timer for the subscriber's life, re-armed only when it fires: a timeout per
    // read would insert a timer entry per read.
    let tick = tokio::time::sleep(Duration::from_millis(100));
    tokio::pin!(tick);
    let mut left = false;
    loop {
        let mut asked = false;
        while !closed && !shared.control.stop.load(Relaxed) {
            if shared.control.life[idx].load(Relaxed) != life {
                left = true;
                break;
            }
            if reconnect.is_some() && shared.control.churn[idx].swap(false, Relaxed) {
                asked = true;
                break;
            }
            let read = tokio::select! {
                r = s.read(&mut buf) => Ok(r),
                () = &mut tick => {
                    tick.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(100));
                    Err(())
                }
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    shared.counts.count_close(1006);
                    closed = true;
                }
                Ok(Ok(n)) => handle(&buf[..n], &mut counter, &mut closed),
                Err(_) => {} // idle: re-check stop and churn
            }
        }
        let end = SubEnd {
            frames: counter.frames,
            closed,
            left,
            last_seq: counter.last_seq,
            ..SubEnd::default()
        };
        let Some(r) = reconnect.as_ref().filter(|_| asked) else {
            return end;
        };
        drop(s);
        match connect(&r.ep, &r.query, Some(counter.last_seq), &shared.counts).await {
            Ok(next) => {
                s = next.stream;
                counter.new_stream();
                shared.counts.reconnects.fetch_add(1, Relaxed);
                let _ = shared
                    .counts
                    .reconnect_latency
                    .lock()
                    .expect("latency lock")
                    .record((next.took.as_micros() as u64).max(1));
                handle(&next.leftover, &mut counter, &mut closed);
            }
            Err(_) => {
                shared.counts.count_close(0);
                return SubEnd {
                    closed: true,
                    ..end
                };
            }
        }
    }
}

/// What the observer saw: per event, in seq order, its seq and its index in the pool.
#[derive(Debug, Default)]
pub struct Observed {
    pub events: Vec<(u64, u32)>,
    /// The observer's own stream had a hole (a `replay_gap`) or a frame it could not
    /// place: counts built on it would be wrong.
    pub broken: bool,
}

/// An extra subscriber without filters that records which event every seq carries, so
/// that a subscriber that joined or left during the window can be told what it was owed
/// (`Krux-Seq` at its start, its last seq at its end). Its frames are not counted as
/// deliveries. `last_seq` follows what it has received.
pub async fn observe(ep: Endpoint, shared: Arc<Shared>, last_seq: Arc<AtomicU64>) -> Observed {
    let mut seen = Observed::default();
    let mut counter = FrameCounter::new(1, true);
    let mut buf = vec![0u8; 256 * 1024];
    let mut since = None;
    while !shared.control.stop.load(Relaxed) {
        let Ok(opened) = connect(&ep, "", since, &shared.counts).await else {
            seen.broken = true;
            break;
        };
        let mut s = opened.stream;
        counter.new_stream();
        let mut open = seen.feed(&mut counter, &opened.leftover);
        while open && !shared.control.stop.load(Relaxed) {
            last_seq.store(counter.last_seq, Relaxed);
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => open = false,
                Ok(Ok(n)) => open = seen.feed(&mut counter, &buf[..n]),
                Err(_) => {} // idle: re-check stop
            }
        }
        // Closed by the server: resume where it was.
        since = Some(counter.last_seq);
    }
    seen
}

impl Observed {
    /// Records the events in `data`; false once a close frame came.
    fn feed(&mut self, counter: &mut FrameCounter, data: &[u8]) -> bool {
        static LI: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"li\":"));
        let mut open = true;
        counter.feed(data, &mut |f| match f {
            Seen::Text { sample, seq } => {
                let idx = sample.and_then(|p| number_after(&LI, p));
                match (seq, idx) {
                    (Some(seq), Some(idx)) => self.events.push((seq, idx)),
                    // Another publisher's event: nobody here is owed it.
                    (Some(_), None) => {}
                    // A `replay_gap`: what it skipped is unknown.
                    (None, _) => self.broken = true,
                }
            }
            Seen::Close(..) => open = false,
        });
        open
    }
}

/// Reads a stalled subscriber to its end: the close code the server sent (0 if the
/// stream ended without one, e.g. shut because even the close could not be written).
pub async fn final_close(mut s: Box<dyn Stream>) -> u16 {
    let mut counter = FrameCounter::new(u64::MAX, false);
    let mut buf = vec![0u8; 256 * 1024];
    let mut code = 0;
    let read_all = async {
        while code == 0 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => counter.feed(&buf[..n], &mut |seen| {
                    if let Seen::Close(c, _) = seen {
                        code = c;
                    }
                }),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), read_all).await;
    code
}

/// One publisher connection's settings.
#[derive(Debug, Clone, Copy)]
pub struct PublisherConfig {
    pub ingest: SocketAddr,
    /// Where in the pool this publisher starts (so publishers send different events).
    pub offset: usize,
    /// Publishers sharing `shared.control.rate`: this one sends its share.
    pub publishers: u64,
    /// Events in flight (published, not yet delivered) that all publishers allow.
    pub window: u64,
}

/// What is published and who should get it, shared by the publishers.
pub struct Workload {
    pub pool: Pool,
    pub book: Mutex<Book>,
}

/// The publishers' accounts, under one lock.
pub struct Book {
    /// How many subscribers an event reaches (the window and progress; changes as
    /// stages add and remove subscribers).
    pub fanout: Fanout,
    /// Per filter key, how many events went out (the expected deliveries, afterwards).
    pub published: Published,
}

/// Publishes until `stop_publishing`: at the shared rate, or as fast as the window allows;
/// holds while `paused`.
pub async fn publish(
    cfg: PublisherConfig,
    work: Arc<Workload>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let PublisherConfig {
        ingest,
        offset,
        publishers,
        window,
    } = cfg;
    let pool = &work.pool;
    let s = TcpStream::connect(ingest)
        .await
        .with_context(|| format!("connecting a publisher to {ingest}"))?;
    s.set_nodelay(true)?;
    let (mut rd, mut wr) = s.into_split();
    let sh = shared.clone();
    let replies = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        let rejected = out
            .split(|&b| b == b'\n')
            .filter(|l| memchr::memmem::find(l, b"\"line\":").is_some())
            .count();
        sh.counts.rejected.fetch_add(rejected as u64, Relaxed);
    });
    let mut i = offset;
    let mut batch = Vec::with_capacity(64 * 1024);
    // At a fixed rate: events owed so far, topped up from the clock (at most a second's
    // worth, so that a slow write is caught up but a pause is not).
    let mut credit = 0.0f64;
    let mut last = Instant::now();
    while !shared.control.stop_publishing.load(Relaxed) {
        let control = &shared.control;
        if control.paused.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            (credit, last) = (0.0, Instant::now());
            continue;
        }
        let rate = control.rate.load(Relaxed);
        let n = if rate > 0 {
            let r = (rate as f64 / publishers as f64).max(1.0);
            credit = (credit + r * last.elapsed().as_secs_f64()).min(r.max(1.0));
            last = Instant::now();
            if credit < 1.0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let n = (credit as u64).min(256);
            credit -= n as f64;
            n
        } else {
            let expected = shared.counts.expected.load(Relaxed) as f64;
            let published = shared.counts.published.load(Relaxed) as f64;
            let delivered = shared.counts.delivered.load(Relaxed) as f64;
            let avg_fanout = if published > 0.0 {
                (expected / published).max(1e-9)
            } else {
                1.0
            };
            let in_flight = (expected - delivered) / avg_fanout;
            let room = window as f64 - in_flight;
            if room < 1.0 {
                // Wait for deliveries (or at most 1 ms, so a stalled run still ends).
                let _ = tokio::time::timeout(
                    Duration::from_millis(1),
                    shared.counts.progress.notified(),
                )
                .await;
                continue;
            }
            (room as u64).min(256)
        };
        batch.clear();
        let mut expected = 0;
        {
            let mut book = work.book.lock().expect("book lock");
            for _ in 0..n {
                let at = i % pool.events.len();
                let ev = &pool.events[at];
                i += 1;
                batch.extend_from_slice(b"{\"lt\":");
                batch.extend_from_slice(now_ns().to_string().as_bytes());
                batch.extend_from_slice(b",\"li\":");
                batch.extend_from_slice(at.to_string().as_bytes());
                batch.push(b',');
                batch.extend_from_slice(&ev.rest);
                batch.push(b'\n');
                expected += book.fanout.of(&ev.keys);
                book.published.add(&ev.keys);
            }
        }
        shared.counts.expected.fetch_add(expected, Relaxed);
        shared.counts.published.fetch_add(n, Relaxed);
        wr.write_all(&batch).await.context("publishing")?;
    }
    wr.shutdown().await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), replies).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_send_time_from_a_sampled_prefix() {
        assert_eq!(
            sent_at(br#"{"type":"x","data":{"lt":1234,"pad":"x"}"#),
            Some(1234)
        );
        assert_eq!(sent_at(br#"{"type":"x","data":{"pad":"x"}"#), None);
    }
}
