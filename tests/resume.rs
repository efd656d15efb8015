//! `?since=` resume from the replay window, the `replay_gap` notice, and `seq` that never
//! goes backwards across a crash.

mod common;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn since_replays_matching_retained_events_then_continues_live() {
    let relay = Relay::start().await;
    let summary = relay.publish(SEED).await;
    let last = summary[0]["last_seq"].as_u64().unwrap();
    let first = last - 10;

    // Everything after the 3rd event, then live.
    let mut ws = relay.subscribe(&format!("since={}", first + 2)).await;
    let got = take_events(&mut ws, 8).await;
    let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, ((first + 3)..=last).collect::<Vec<_>>());
    relay.publish(SEED.lines().last().unwrap()).await;
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5)).await["seq"],
        last + 1
    );
    assert_silent(&mut ws, Duration::from_millis(300)).await;

    // With a filter: only matching retained events.
    let mut ws = relay.subscribe("since=0&agent=deploy-agent").await;
    let got = take_events(&mut ws, 2).await;
    assert!(got.iter().all(|e| e["agent"] == "deploy-agent"));
    assert_silent(&mut ws, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_window_that_no_longer_reaches_since_starts_with_a_gap_notice() {
    let relay = Relay::start_with(&["--replay", "4"]).await;
    let summary = relay.publish(SEED).await;
    let last = summary[0]["last_seq"].as_u64().unwrap();
    let mut ws = relay.subscribe("since=0").await;
    let gap = next_event(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(gap["type"], "replay_gap");
    assert_eq!(gap["agent"], serde_json::Value::Null);
    assert_eq!(gap["data"]["since"], 0);
    assert_eq!(gap["data"]["oldest"], last - 3);
    assert!(gap.get("seq").is_none());
    let got = take_events(&mut ws, 4).await;
    assert_eq!(got[0]["seq"], last - 3);
    assert_eq!(got[3]["seq"], last);
}

#[tokio::test]
async fn seq_never_goes_backwards_across_kill_9() {
    let mut relay = Relay::start().await;
    let before = relay.publish(SEED).await[0]["last_seq"].as_u64().unwrap();
    relay.crash_and_restart(&[]).await;
    let after = relay.publish(SEED).await[0]["last_seq"].as_u64().unwrap();
    assert!(
        after - 10 > before,
        "first seq after restart ({}) must exceed {before}",
        after - 10
    );

    // Resuming across the restart: the old seq is not retained, so the client is told.
    let mut ws = relay.subscribe(&format!("since={before}")).await;
    let gap = next_event(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(gap["type"], "replay_gap");
    assert_eq!(gap["data"]["oldest"], after - 10);
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5)).await["seq"],
        after - 10
    );
}

#[tokio::test]
async fn the_window_is_bounded_in_bytes_and_a_resume_before_it_gets_the_gap() {
    let relay = Relay::start_with(&["--replay-memory", "2MiB"]).await;
    let big = |i: usize| {
        format!(
            r#"{{"type":"health_alert","agent":null,"data":{{"component":"c{i}","severity":"warning","message":"{}","threshold":"t"}}}}"#,
            "m".repeat(100_000)
        )
    };
    let lines: Vec<String> = (0..60).map(big).collect();
    let last = relay.publish(&lines.join("\n")).await[0]["last_seq"]
        .as_u64()
        .unwrap();
    let mut ws = relay.subscribe("since=0").await;
    let gap = next_event(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(gap["type"], "replay_gap", "{gap}");
    let oldest = gap["data"]["oldest"].as_u64().unwrap();
    let kept = last - oldest + 1;
    // 2 MiB holds 20 of these ~100 KB events (and not fewer than the bound allows).
    assert!((15..=21).contains(&kept), "kept {kept}");
    let got = take_events(&mut ws, kept as usize).await;
    let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (oldest..=last).collect::<Vec<_>>());
    let m = metrics(&relay).await;
    let held = metric_value(&m, "krux_replay_retained_bytes").unwrap();
    assert!(held <= 2 << 20 && held > 1 << 20, "{held}");
}
