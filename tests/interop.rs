//! Interoperability with an independent client implementation: Python's `websockets`
//! (install with `pip install websockets`; `.ci/run` does). Outside CI the test is skipped
//! without it.

mod common;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test]
async fn python_websockets_client_subscribes_pings_and_closes() {
    if !have_python_websockets() {
        return;
    }
    let relay = Relay::start().await;
    let url = format!(
        "ws://{}/events?type=health_alert,capability_result",
        relay.ws
    );
    let client = PythonClient::start("python_client.py", &[&url, &relay.token, "2"]);
    relay.publish(SEED).await;
    let v = client.result(Duration::from_secs(30)).await;
    assert_eq!(
        v["types"],
        serde_json::json!(["capability_result", "health_alert"])
    );
    assert!(v["seqs"][0].as_u64() < v["seqs"][1].as_u64());
    assert_eq!(v["pong"], true);
    assert_eq!(
        v["close_code"], 1000,
        "the relay echoes the client's close code"
    );
}

/// `examples/clients/krux_tail.py`, the Python client of docs/protocol.md: it resumes
/// after `since`, stops on a refusal, and stops (exit 1) when its token is revoked (1008)
/// instead of reconnecting.
#[tokio::test]
async fn the_python_example_client_resumes_and_honours_close_codes() {
    if !have_python_websockets() {
        return;
    }
    let relay = Relay::start().await;
    relay.publish(SEED).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/clients/krux_tail.py");
    let client = |token: &str, extra: &[&str]| {
        Command::new("python3")
            .args([
                script,
                "--url",
                &format!("ws://{}", relay.ws),
                "--token",
                token,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs")
    };
    let finish = |child| finish_within(child, Duration::from_secs(20), "the Python client");
    let out = finish(client(&relay.token, &["--since", "5", "--count", "6"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seqs: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (6..=11).collect::<Vec<_>>());

    let out = finish(client("krx_user_wrong", &[]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "{err}");

    let live = client(&relay.token, &[]);
    wait_metric(&relay, "krux_subscribers 1").await;
    let revoked = relay.cli(&["user-token", "revoke", "test"]);
    assert!(revoked.status.success());
    let out = finish(live);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1008") && !err.contains("reconnecting"),
        "{err}"
    );
}
