//! Fan-out quick check: 2 reactors, 1,000 subscribers, demo-style traffic; every
//! subscriber receives every event, in seq order. (The real load test is krux-loadtest.)

mod common;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

const SUBSCRIBERS: usize = 1000;
const EVENTS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_subscribers_on_two_reactors_get_everything() {
    let relay = Relay::start_with(&["--reactors", "2"]).await;
    let mut subs = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        subs.push(relay.subscribe("").await);
    }
    let mut fleet = krux_relay::fleet::Fleet::new(300, 42);
    let lines: Vec<String> = (0..EVENTS).map(|_| fleet.next_line()).collect();

    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut last = 0u64;
                let mut n = 0usize;
                while n < EVENTS {
                    let msg = tokio::time::timeout(Duration::from_secs(30), ws.next()).await;
                    let Ok(Some(Ok(Message::Text(t)))) = msg else {
                        break;
                    };
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    let seq = v["seq"].as_u64().unwrap();
                    assert!(seq > last, "in order");
                    last = seq;
                    n += 1;
                }
                n
            })
        })
        .collect();

    // Both reactors took part: SO_REUSEPORT spreads 1,000 connections over both.
    let m = metrics(&relay).await;
    let per_reactor: Vec<i64> = m
        .lines()
        .filter(|l| l.starts_with("krux_reactor_subscribers{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(per_reactor.len(), 2, "{m}");
    assert_eq!(per_reactor.iter().sum::<i64>(), SUBSCRIBERS as i64);
    assert!(per_reactor.iter().all(|&n| n > 100), "{per_reactor:?}");

    let replies = relay.publish(&lines.join("\n")).await;
    assert_eq!(replies.last().unwrap()["accepted"], EVENTS);
    let mut counts = Vec::new();
    for r in readers {
        counts.push(r.await.unwrap());
    }
    let complete = counts.iter().filter(|&&n| n == EVENTS).count();
    assert_eq!(
        complete,
        SUBSCRIBERS,
        "subscribers with all {EVENTS} events (min got {:?})",
        counts.iter().min()
    );
    let m = metrics(&relay).await;
    assert!(
        m.contains(&format!("krux_frames_out_total {}", SUBSCRIBERS * EVENTS)),
        "{m}"
    );
}
