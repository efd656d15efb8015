//! Inbound control frames, protocol violations, the admin port and the dashboard page.

mod common;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Reads one server frame: (opcode, payload).
async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut h))
        .await
        .expect("a frame in time")
        .unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
    let len = match h[1] & 0x7F {
        126 => u64::from(s.read_u16().await.unwrap()),
        127 => s.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await.unwrap();
    (h[0] & 0x0F, payload)
}

fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![first, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test]
async fn ping_gets_pong_and_data_frames_are_ignored() {
    let relay = Relay::start().await;
    let mut ws = relay.subscribe("").await;
    ws.send(Message::Text("hello relay".into())).await.unwrap();
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));
    // Still subscribed after the ignored data frame.
    relay.publish(SEED.lines().next().unwrap()).await;
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5)).await["type"],
        "capability_invoked"
    );
}

#[tokio::test]
async fn close_is_answered_with_the_same_code() {
    let relay = Relay::start().await;
    let mut s = raw_subscribe(&relay, "", None).await;
    s.write_all(&masked(0x88, &[0x03, 0xE8, b'b', b'y', b'e']))
        .await
        .unwrap();
    let (op, payload) = read_frame(&mut s).await;
    assert_eq!(op, 0x8);
    assert_eq!(&payload[..2], &1000u16.to_be_bytes());
    // Then the relay half-closes.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn protocol_violations_close_with_rfc_codes() {
    let relay = Relay::start_with(&["--max-frame", "1KiB"]).await;
    let oversized = {
        let mut f = vec![0x82, 0x80 | 126];
        f.extend_from_slice(&2048u16.to_be_bytes());
        f.extend_from_slice(&[0; 4]);
        f
    };
    let cases: [(Vec<u8>, u16); 7] = [
        (vec![0x89, 0x00], 1002),                        // unmasked
        (masked(0x89 | 0x40, b""), 1002),                // reserved bit
        (masked(0x09, b"x"), 1002),                      // fragmented control frame
        (masked(0x83, b""), 1002),                       // unknown opcode
        (masked(0x88, &[0x03, 0xED]), 1002),             // close code 1005 may not be sent
        (oversized, 1009),                               // over --max-frame
        (masked(0x88, &[0x03, 0xE8, 0xC3, 0x28]), 1007), // close reason not UTF-8
    ];
    for (bytes, code) in cases {
        let mut s = raw_subscribe(&relay, "", None).await;
        s.write_all(&bytes).await.unwrap();
        let (op, payload) = read_frame(&mut s).await;
        assert_eq!(op, 0x8, "{bytes:02x?}");
        assert_eq!(
            u16::from_be_bytes([payload[0], payload[1]]),
            code,
            "{bytes:02x?}"
        );
    }
}

#[tokio::test]
async fn admin_port_and_dashboard() {
    let relay = Relay::start().await;
    relay.publish(SEED).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, body) = raw_http(relay.admin, &get("/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("krux_events_in_total{type=\"health_alert\"} 1"),
        "{body}"
    );
    assert!(!body.contains(&relay.token));
    assert_eq!(raw_http(relay.admin, &get("/healthz")).await.0, 200);
    assert_eq!(raw_http(relay.admin, &get("/readyz")).await.0, 200);
    assert_eq!(raw_http(relay.admin, &get("/nope")).await.0, 404);

    let (status, head, body) = raw_http(relay.ws, &get("/")).await;
    assert_eq!(status, 200);
    assert!(head.contains("text/html"));
    assert!(body.contains(r#"<script src="/krux-client.js">"#));
    assert!(body.contains(r#"id="pending-approvals""#));
    // The client script the page runs on, from the binary too.
    let (status, head, body) = raw_http(relay.ws, &get("/krux-client.js")).await;
    assert_eq!(status, 200);
    assert!(head.contains("text/javascript"), "{head}");
    assert!(body.contains("new WebSocket") && body.contains("access_token"));
}

/// `/metrics` read by a Prometheus text-format parser: every series it documents is
/// parsed with its type, each sample belongs to a documented `krux_` family, and the
/// figures are the relay's (the seed's 11 events in, one per type).
#[tokio::test]
async fn metrics_parse_as_prometheus_exposition() {
    let relay = Relay::start().await;
    relay.publish(SEED).await;
    let body = metrics(&relay).await;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("the exposition parses");
    assert!(scrape.samples.len() > 30, "{body}");
    let family = |name: &str| {
        ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|base| scrape.docs.contains_key(*base))
            .unwrap_or(name)
            .to_string()
    };
    for s in &scrape.samples {
        assert!(s.metric.starts_with("krux_"), "{}", s.metric);
        assert!(
            scrape.docs.contains_key(&family(&s.metric)),
            "{} has no HELP line",
            s.metric
        );
    }
    let events_in: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "krux_events_in_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("krux_events_in_total is a counter, not {other:?}"),
        })
        .sum();
    assert_eq!(events_in, 11.0);
    let histogram = scrape
        .samples
        .iter()
        .find(|s| s.metric == "krux_ingest_to_write_seconds")
        .expect("the latency histogram");
    assert!(
        matches!(histogram.value, prometheus_parse::Value::Histogram(ref b) if !b.is_empty()),
        "{:?}",
        histogram.value
    );
}
