//! Subscription filters over real sockets: agent, type, session (envelope or data), comma
//! lists, and their AND.

mod common;
use std::time::Duration;

use common::*;

/// Subscribes with each query, publishes the seed, and returns `type:agent` of every
/// event each subscription received (a stream counts as done after 600 ms of silence).
async fn received(relay: &Relay, queries: &[&str]) -> Vec<Vec<String>> {
    let mut subs = Vec::new();
    for q in queries {
        subs.push(relay.subscribe(q).await);
    }
    let replies = relay.publish(SEED).await;
    assert_eq!(replies[0]["accepted"], 11);
    let mut out = Vec::new();
    for ws in &mut subs {
        let mut got = Vec::new();
        while let Ok(ev) = tokio::time::timeout(
            Duration::from_millis(600),
            next_event(ws, Duration::from_secs(5)),
        )
        .await
        {
            got.push(format!(
                "{}:{}",
                ev["type"].as_str().unwrap(),
                ev["agent"].as_str().unwrap_or("null")
            ));
        }
        out.push(got);
    }
    out
}

#[tokio::test]
async fn each_filter_and_their_combination() {
    let relay = Relay::start().await;
    let queries = [
        "agent=research-agent",
        "type=approval_requested,health_alert",
        "session=sess-a1b2c3d4",
        "session=sess-e5f6g7h8",
        "agent=deploy-agent&type=approval_requested",
        "agent=research-agent,scraper-agent&type=session_started,rate_limit_hit,capability_invoked&session=sess-a1b2c3d4",
        "agent=nobody",
        "agent=research-agent&type=health_alert",
    ];
    let got = received(&relay, &queries).await;
    let expect: [&[&str]; 8] = [
        &[
            "capability_invoked:research-agent",
            "capability_result:research-agent",
            "capability_error:research-agent",
            "policy_violation:research-agent",
            "session_started:research-agent",
            "session_ended:research-agent",
        ],
        &["approval_requested:deploy-agent", "health_alert:null"],
        // Envelope session_id, and data.session_id for session_started/ended.
        &[
            "capability_invoked:research-agent",
            "capability_result:research-agent",
            "capability_error:research-agent",
            "policy_violation:research-agent",
            "session_started:research-agent",
            "session_ended:research-agent",
        ],
        &["approval_requested:deploy-agent"],
        &["approval_requested:deploy-agent"],
        &[
            "capability_invoked:research-agent",
            "session_started:research-agent",
        ],
        &[],
        // An agent filter never matches health_alert (agent null).
        &[],
    ];
    for ((q, got), want) in queries.iter().zip(&got).zip(expect) {
        assert_eq!(got, want, "query {q}");
    }
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
