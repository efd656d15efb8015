//! SIGTERM: publishers get their summary for every line they sent, subscribers get every
//! accepted event and then 1001, and the process exits 0.

mod common;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn sigterm_flushes_queued_frames_then_closes_with_1001() {
    let mut relay = Relay::start_with(&["--shutdown-grace", "5s"]).await;
    // A subscriber that does not read until after the signal: its frames wait in queues.
    let mut late_reader = raw_subscribe(&relay, "", None).await;
    // A publisher that never half-closes: shutdown must still answer it.
    let mut publisher = tokio::net::TcpStream::connect(relay.ingest).await.unwrap();
    let mut fleet = krux_relay::fleet::Fleet::new(100, 5);
    let mut input = String::new();
    for _ in 0..3000 {
        input.push_str(&fleet.next_line());
        input.push('\n');
    }
    input.push_str(r#"{"type":"health_alert","agent":null,"data":{"component":"disk""#); // unfinished
    publisher.write_all(input.as_bytes()).await.unwrap();
    // The relay has read everything once its metrics count the 3,000 events.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&relay).await;
        let n: u64 = m
            .lines()
            .filter(|l| l.starts_with("krux_events_in_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        if n == 3000 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "events not ingested: {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let status_fut = relay.terminate(Duration::from_secs(10));
    let reader = async {
        let (seqs, close) = read_raw_frames(&mut late_reader, usize::MAX).await;
        (seqs, close)
    };
    let summary = async {
        let mut out = String::new();
        publisher.read_to_string(&mut out).await.unwrap();
        out
    };
    let (status, (seqs, close), summary) = tokio::join!(status_fut, reader, summary);
    assert!(status.success(), "exit status {status}");
    let v: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    assert_eq!(
        v["accepted"], 3000,
        "the unfinished last line is neither accepted nor rejected: {summary}"
    );
    assert_eq!(v["rejected"], 0);
    assert_eq!(
        seqs.len(),
        3000,
        "every accepted event delivered before the close"
    );
    assert_eq!(seqs.last().copied(), v["last_seq"].as_u64());
    assert_eq!(close.map(|c| c.0), Some(1001));
}
