//! The drivers (accept loop, handshake, reader, writer, fan-out, housekeeping) around the
//! shard, run for real on in-memory connections: validated events from the ingest's
//! pipeline, through the ring, to a subscriber reading raw frames. Time is tokio's paused
//! clock, so keepalive and timeouts take no wall time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::Settings;
use crate::auth::{LiveCredentials, TokenRecord};
use crate::ingest::{Line, Pipeline, SeqAllocator};
use crate::io::accept::SocketBudget;
use crate::io::mem::{self, MemConn, TlsClient};
use crate::io::{write_all, Conn};
use crate::live::Live;
use crate::metrics::Metrics;
use crate::proto::ws::opcode;
use crate::ring::FrameRing;

const TOKEN: &str = "krx_user_0123456789abcdef0123456789abcdef";
const SEED: &str = include_str!("../../tests/data/seed_events.ndjson");

struct Relay {
    pipeline: Pipeline,
    conns: mpsc::UnboundedSender<MemConn>,
    live: Arc<Live>,
    ring: Arc<FrameRing>,
    shutdown: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn settings() -> Settings {
    Settings {
        client_queue: 1 << 20,
        max_frame: 1 << 20,
        max_connections: 100,
        ping_interval: Duration::from_secs(30),
        read_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(5),
        tls: None,
        history: None,
        allowed_origins: Vec::new(),
        compression: None,
    }
}

/// One reactor on the current `LocalSet`, accepting what `Relay::conns` sends.
fn start(settings: Settings) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let credentials = Arc::new(LiveCredentials::empty(dir.path()));
    credentials
        .replace(&[TokenRecord::new("alice", TOKEN)], None)
        .unwrap();
    let metrics = Arc::new(Metrics::new(1, false));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let live = Arc::new(Live::new(
        credentials,
        metrics.clone(),
        SocketBudget::new(1000),
        shutdown_rx,
        Duration::from_secs(2),
    ));
    let (producer, mut cursors) = FrameRing::bounded(10_000, 1 << 26, 1, 1);
    let ring = producer.ring().clone();
    let seq = SeqAllocator::open(dir.path()).unwrap();
    let pipeline = Pipeline::new(producer, seq, metrics, 1 << 20);
    let (conns, listener) = mem::listener();
    tokio::task::spawn_local(super::run(
        0,
        Arc::new(settings),
        live.clone(),
        listener,
        cursors.pop().unwrap(),
    ));
    Relay {
        pipeline,
        conns,
        live,
        ring,
        shutdown,
        _dir: dir,
    }
}

impl Relay {
    /// Publishes `n` seed events through the ingest pipeline.
    fn publish(&mut self, n: usize) {
        for line in SEED.lines().cycle().take(n) {
            self.pipeline.accept(Line::Text(line.as_bytes())).unwrap();
        }
        self.pipeline.flush();
    }

    /// A new connection whose pipes hold `capacity` bytes each way.
    fn connect(&self, capacity: usize) -> MemConn {
        let (client, server) = mem::pair(capacity);
        self.conns.send(server).unwrap();
        client
    }

    /// What a shutdown does: the ingest has stopped at the ring's head, and every thread
    /// is told.
    fn shut_down(&self) {
        let head = self.ring.head();
        self.live
            .ingest_final_pos
            .store(head, std::sync::atomic::Ordering::SeqCst);
        self.shutdown.send(true).unwrap();
    }
}

fn upgrade(query: &str) -> Bytes {
    Bytes::from(krux_testkit::upgrade_request(
        &format!("/events?{query}"),
        "relay",
        "",
    ))
}

/// A client's view of a connection: what it read so far.
struct Reader<'a, C: Conn> {
    conn: &'a C,
    buf: Vec<u8>,
}

impl<'a, C: Conn> Reader<'a, C> {
    fn new(conn: &'a C) -> Self {
        Reader {
            conn,
            buf: Vec::new(),
        }
    }

    async fn fill(&mut self) -> bool {
        let (n, buf) = self.conn.read(std::mem::take(&mut self.buf)).await;
        self.buf = buf;
        n.unwrap() > 0
    }

    /// The response head's status line and headers.
    async fn head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
                self.buf.drain(..end + 4);
                return head;
            }
            assert!(self.fill().await, "EOF before a response head");
        }
    }

    /// The next frame: opcode and payload; `None` at EOF.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((f, used)) = krux_testkit::parse_frame(&self.buf) {
                let out = (f.opcode, f.payload.to_vec());
                self.buf.drain(..used);
                return Some(out);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The seqs of text frames until `n` of them, answering nothing.
    async fn seqs(&mut self, n: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.len() < n {
            let (op, payload) = self.frame().await.expect("EOF before every event");
            if op == opcode::TEXT {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                seqs.push(v["seq"].as_u64().unwrap());
            }
        }
        seqs
    }

    /// Frames until the close frame: its code, and the opcodes seen before it.
    async fn until_close(&mut self) -> (u16, Vec<u8>) {
        let mut seen = Vec::new();
        while let Some((op, payload)) = self.frame().await {
            if op == opcode::CLOSE {
                return (u16::from_be_bytes([payload[0], payload[1]]), seen);
            }
            seen.push(op);
        }
        panic!("EOF without a close frame after {seen:?}");
    }
}

fn run(test: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, test);
}

#[test]
fn every_event_arrives_in_order_through_small_partial_writes_then_a_shutdown_close() {
    run(async {
        let mut relay = start(settings());
        // 300 bytes in flight: each event frame crosses in several partial writes.
        let client = relay.connect(300);
        write_all(&client, upgrade(&format!("access_token={TOKEN}")))
            .await
            .unwrap();
        let mut reader = Reader::new(&client);
        assert!(reader.head().await.starts_with("HTTP/1.1 101"));
        relay.publish(500);
        assert_eq!(reader.seqs(500).await, (1..=500).collect::<Vec<_>>());
        relay.shut_down();
        assert_eq!(reader.until_close().await, (1001, vec![]));
    });
}

#[test]
fn a_refused_token_and_a_filtered_subscriber_on_one_reactor() {
    run(async {
        let mut relay = start(settings());
        let refused = relay.connect(64 * 1024);
        write_all(&refused, upgrade("access_token=krx_user_wrong"))
            .await
            .unwrap();
        let mut r = Reader::new(&refused);
        assert!(r.head().await.starts_with("HTTP/1.1 401"));

        let filtered = relay.connect(64 * 1024);
        write_all(
            &filtered,
            upgrade(&format!("access_token={TOKEN}&type=policy_violation")),
        )
        .await
        .unwrap();
        let mut f = Reader::new(&filtered);
        assert!(f.head().await.starts_with("HTTP/1.1 101"));
        let violations = SEED
            .lines()
            .cycle()
            .take(22)
            .filter(|l| l.contains(r#""type":"policy_violation""#))
            .count();
        assert!(violations > 0);
        relay.publish(22);
        relay.shut_down();
        let mut got = 0;
        while let Some((op, payload)) = f.frame().await {
            if op == opcode::CLOSE {
                break;
            }
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(v["type"], "policy_violation");
            got += 1;
        }
        assert_eq!(got, violations);
    });
}

#[test]
fn a_silent_peer_gets_pings_then_is_closed_after_the_read_timeout() {
    run(async {
        let relay = start(Settings {
            ping_interval: Duration::from_secs(1),
            read_timeout: Duration::from_secs(3),
            ..settings()
        });
        let client = relay.connect(64 * 1024);
        write_all(&client, upgrade(&format!("access_token={TOKEN}")))
            .await
            .unwrap();
        let mut reader = Reader::new(&client);
        assert!(reader.head().await.starts_with("HTTP/1.1 101"));
        let t0 = tokio::time::Instant::now();
        let (code, before) = reader.until_close().await;
        assert_eq!(code, 1001);
        assert!(before.iter().all(|&op| op == opcode::PING) && !before.is_empty());
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(8),
            "closed after {waited:?}"
        );
    });
}

#[test]
fn tls_subscribers_get_the_same_events_through_the_tls_driver() {
    run(async {
        let (server_config, client_config) = mem::tls_configs();
        let mut relay = start(Settings {
            tls: Some(server_config),
            ..settings()
        });
        let client = TlsClient::new(relay.connect(2000), client_config);
        client.handshake().await;
        client
            .write(&upgrade(&format!("access_token={TOKEN}")))
            .await;
        relay.publish(50);
        let mut stream = Vec::new();
        let frames = loop {
            let more = client.read_plain(1).await;
            assert!(!more.is_empty(), "EOF mid-stream");
            stream.extend(more);
            let Some(end) = stream.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            assert!(stream.starts_with(b"HTTP/1.1 101"));
            let (mut rest, mut seqs) = (&stream[end + 4..], Vec::new());
            while let Some((f, used)) = krux_testkit::parse_frame(rest) {
                seqs.push(f.json().unwrap()["seq"].as_u64().unwrap());
                rest = &rest[used..];
            }
            if seqs.len() == 50 {
                break seqs;
            }
        };
        assert_eq!(frames, (1..=50).collect::<Vec<_>>());
    });
}
