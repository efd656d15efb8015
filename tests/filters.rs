//! Subscription filters over real sockets: agent, type, session (envelope or data), comma
//! lists, and their AND.

mod common;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn each_filter_and_their_combination() {
    let relay = Relay::start().await;
    let mut subs = Vec::new();
    for (q, _) in SEED_FILTERS {
        subs.push(relay.subscribe(q).await);
    }
    let replies = relay.publish(SEED).await;
    assert_eq!(replies[0]["accepted"], 11);
    assert_seed_filters(subs).await;
}

#[tokio::test]
async fn filters_apply_to_a_busy_stream() {
    let relay = Relay::start().await;
    let mut only_errors = relay.subscribe("type=capability_error").await;
    let mut all = relay.subscribe("").await;
    let mut fleet = krux_relay::fleet::Fleet::new(50, 9);
    let lines: Vec<String> = (0..3000).map(|_| fleet.next_line()).collect();
    let errors = lines
        .iter()
        .filter(|l| l.contains(r#""type":"capability_error""#))
        .count();
    assert!(errors > 0);
    let replies = relay.publish(&lines.join("\n")).await;
    assert_eq!(replies[0]["accepted"], 3000);
    let everything = take_events(&mut all, 3000).await;
    assert_eq!(everything.len(), 3000);
    let got = take_events(&mut only_errors, errors).await;
    assert!(got.iter().all(|e| e["type"] == "capability_error"));
    assert_silent(&mut only_errors, Duration::from_millis(300)).await;
}
