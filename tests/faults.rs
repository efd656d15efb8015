//! One bad client never hurts the others: a stalled subscriber, broken and hostile
//! publishers, connection floods.

mod common;
use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EVENTS: usize = 60_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_is_closed_and_resumes_without_loss_while_others_get_everything() {
    let relay = Relay::start_with(&["--client-queue", "4MiB"]).await;
    // Never reads (tiny receive buffer), until the fast ones are done.
    let mut stalled = raw_subscribe(&relay, "", Some(4096)).await;
    let mut fast = Vec::new();
    // Their queue bound (4 MiB) leaves room for a debug-build reader on a busy machine;
    // the stalled one still overflows: 60,000 events are ~18 MB.
    for _ in 0..10 {
        let mut s = raw_subscribe(&relay, "", None).await;
        fast.push(tokio::spawn(async move {
            read_raw_frames(&mut s, EVENTS).await
        }));
    }
    let mut fleet = krux_relay::fleet::Fleet::new(100, 6);
    let lines: Vec<String> = (0..EVENTS).map(|_| fleet.next_line()).collect();
    let summary = relay.publish(&lines.join("\n")).await;
    let last = summary.last().unwrap()["last_seq"].as_u64().unwrap();
    let first = last - EVENTS as u64 + 1;
    for f in fast {
        let (seqs, close) = tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("fast subscribers finish")
            .unwrap();
        assert_eq!(
            (seqs.len(), close),
            (EVENTS, None),
            "a fast subscriber lost events"
        );
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }
    // Once the relay has closed the stalled one (the shard's tests cover when and with
    // which `since`), it reads what reached its socket, then the 4001 close if it could be
    // written, else the end of the stream.
    wait_metric(&relay, "krux_closes_total{reason=\"slow_consumer\"} 1\n").await;
    let (got, close) = tokio::time::timeout(
        Duration::from_secs(30),
        read_raw_frames(&mut stalled, usize::MAX),
    )
    .await
    .unwrap();
    assert!(
        got.len() < EVENTS,
        "the stalled subscriber should have been cut off"
    );
    let resume_at = *got.last().unwrap_or(&(first - 1));
    let close_seen = close.clone();
    if let Some((code, reason)) = close {
        assert_eq!(code, 4001);
        assert_eq!(
            reason,
            format!("slow consumer; resume with since={resume_at}")
        );
    }
    // Resuming from the last event it saw misses nothing and repeats nothing.
    let mut again = raw_subscribe(&relay, &format!("since={resume_at}"), None).await;
    let (rest, _) = read_raw_frames(&mut again, (last - resume_at) as usize).await;
    let all: Vec<u64> = got.iter().chain(&rest).copied().collect();
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "no duplicates");
    let missing: Vec<u64> = (first..=last).filter(|s| !unique.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "{} missing (first {:?}); stalled got {} up to {resume_at}, close {close_seen:?}, resume got {}",
        missing.len(),
        missing.first(),
        got.len(),
        rest.len()
    );
}

#[tokio::test]
async fn hostile_publishers_leave_the_relay_serving_everyone_else() {
    let relay = Relay::start_with(&["--max-frame", "1MiB"]).await;
    let mut ws = relay.subscribe("").await;

    // Disconnect mid-line.
    let mut s = tokio::net::TcpStream::connect(relay.ingest).await.unwrap();
    s.write_all(br#"{"type":"health_alert","agent":nu"#)
        .await
        .unwrap();
    drop(s);

    // Garbage bytes, then a good line: rejected by number, good one accepted.
    let mut garbage: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    garbage.push(b'\n');
    garbage.extend_from_slice(SEED.lines().last().unwrap().as_bytes());
    let mut s = tokio::net::TcpStream::connect(relay.ingest).await.unwrap();
    s.write_all(&garbage).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["accepted"], 1, "{out}");
    assert!(last["rejected"].as_u64().unwrap() >= 1);

    // A 100 MB line: rejected as too long, never buffered; the next line still counts.
    let mut s = tokio::net::TcpStream::connect(relay.ingest).await.unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let writer = async {
        s.write_all(b"{\"pad\":\"").await.unwrap();
        for _ in 0..100 {
            s.write_all(&chunk).await.unwrap();
        }
        s.write_all(b"\"}\n").await.unwrap();
        s.write_all(SEED.lines().next().unwrap().as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let out = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("100 MB line handled in time");
    let replies: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies[0]["line"], 1);
    assert!(
        replies[0]["error"]
            .as_str()
            .unwrap()
            .contains("longer than the maximum frame"),
        "{out}"
    );
    assert_eq!(replies[1]["accepted"], 1);

    // A flood of ingest connections opened and dropped.
    for _ in 0..300 {
        let _ = tokio::net::TcpStream::connect(relay.ingest).await.unwrap();
    }

    // The subscriber saw exactly the two good events, and the relay still works.
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(10)).await["type"],
        "health_alert"
    );
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(10)).await["type"],
        "capability_invoked"
    );
    let summary = relay.publish(SEED).await;
    assert_eq!(summary[0]["accepted"], 11);
    assert_eq!(take_events(&mut ws, 11).await.len(), 11);
    let m = metrics(&relay).await;
    let rss_line = m
        .lines()
        .find(|l| l.starts_with("krux_subscribers "))
        .unwrap();
    assert_eq!(rss_line, "krux_subscribers 1");
}

#[tokio::test]
async fn idle_connections_on_7701_cannot_starve_publishers_of_files() {
    // 300 open files for the whole process; the flood below alone would take them all.
    let relay = Relay::start_with_open_files(300, &["--handshake-timeout", "60s"]).await;
    let mut ws = relay.subscribe("").await;
    let mut flood = Vec::new();
    for _ in 0..320 {
        flood.push(tokio::net::TcpStream::connect(relay.ws).await.unwrap());
    }
    // Accepting stops short of the limit, so publishers, the admin port and the existing
    // subscriber are served long before any of those handshakes times out.
    let summary = tokio::time::timeout(Duration::from_secs(5), relay.publish(SEED))
        .await
        .expect("a publisher is accepted during the flood");
    assert_eq!(summary[0]["accepted"], 11, "{summary:?}");
    assert_eq!(take_events(&mut ws, 11).await.len(), 11);
    let (status, _, body) = raw_http(relay.admin, "GET /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 200, "{body}");
    // Once the flood goes, new subscribers get in again.
    drop(flood);
    let mut late = tokio::time::timeout(Duration::from_secs(5), relay.subscribe(""))
        .await
        .expect("accepting resumes");
    relay.publish(SEED).await;
    assert_eq!(take_events(&mut late, 11).await.len(), 11);
}
