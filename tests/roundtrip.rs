//! All 11 seed events go publisher → relay → subscriber unchanged, plus an increasing seq.

mod common;
use common::*;
use serde_json::Value;

#[tokio::test]
async fn seed_events_round_trip_with_increasing_seq() {
    let relay = Relay::start_with(&["--reactors", "2"]).await;
    // Several subscribers, so both reactors are likely to serve some.
    let mut subs = Vec::new();
    for _ in 0..6 {
        subs.push(relay.subscribe("").await);
    }
    let replies = relay.publish(SEED).await;
    assert_eq!(replies.len(), 1, "no rejections: {replies:?}");
    assert_eq!(replies[0]["accepted"], 11);
    assert_eq!(replies[0]["rejected"], 0);

    let published: Vec<Value> = SEED
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for ws in &mut subs {
        let got = take_events(ws, 11).await;
        let mut last = 0u64;
        for (want, got) in published.iter().zip(&got) {
            let seq = got["seq"].as_u64().expect("seq is a u64");
            assert!(seq > last, "seq increases: {seq} after {last}");
            last = seq;
            let mut without_seq = got.clone();
            without_seq.as_object_mut().unwrap().remove("seq");
            assert_eq!(&without_seq, want, "same keys and values");
        }
        assert_eq!(replies[0]["last_seq"], last);
    }
}

#[tokio::test]
async fn missing_timestamp_is_stamped_and_extra_fields_pass_through() {
    let relay = Relay::start().await;
    let mut ws = relay.subscribe("").await;
    let line = r#"{"type":"health_alert","agent":null,"x-trace":{"id":[1,2,3]},"data":{"component":"disk","severity":"warning","message":"m","threshold":"80%","extra":true}}"#;
    relay.publish(line).await;
    let ev = next_event(&mut ws, std::time::Duration::from_secs(10)).await;
    let ts = ev["timestamp"].as_str().expect("stamped");
    assert_eq!(ts.len(), "2026-03-15T10:30:00.123Z".len(), "{ts}");
    assert!(ts.ends_with('Z'));
    assert_eq!(ev["x-trace"]["id"][2], 3);
    assert_eq!(ev["data"]["extra"], true);
}
