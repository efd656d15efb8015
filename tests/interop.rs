//! Interoperability with an independent client implementation: Python's `websockets`
//! (install with `pip install websockets`; `.ci/run` does). Outside CI the test is skipped
//! without it.

mod common;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

#[tokio::test]
async fn python_websockets_client_subscribes_pings_and_closes() {
    if !have_tool(
        "python3",
        &["-c", "import websockets"],
        "pip install websockets",
    ) {
        return;
    }
    let relay = Relay::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/python_client.py"
    );
    let mut child = Command::new("python3")
        .args([
            script,
            &format!(
                "ws://{}/events?type=health_alert,capability_result",
                relay.ws
            ),
            &relay.token,
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    if line.trim() != "ready" {
        let err = child.wait_with_output().unwrap();
        panic!(
            "the Python client did not subscribe (is `websockets` installed? pip install websockets): {line}{}",
            String::from_utf8_lossy(&err.stderr)
        );
    }
    relay.publish(SEED).await;
    line.clear();
    out.read_line(&mut line).unwrap();
    let done = child.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{line}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
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
