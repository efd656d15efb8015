//! Publisher side: rejections name their line and reason, good lines around them are
//! delivered, and the final summary counts both.

mod common;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn seed(i: usize) -> &'static str {
    SEED.lines().nth(i).unwrap()
}

#[tokio::test]
async fn bad_lines_are_rejected_by_number_and_good_ones_delivered() {
    let relay = Relay::start_with(&["--max-frame", "4KiB"]).await;
    let mut ws = relay.subscribe("").await;
    let long = format!(
        r#"{{"type":"health_alert","agent":null,"data":{{"pad":"{}"}}}}"#,
        "x".repeat(5000)
    );
    let input = [
        seed(0),                                        // 1 ok
        "{not json",                                    // 2
        "",                                             // 3 blank: skipped, still counted
        seed(1),                                        // 4 ok
        r#"{"type":"capability_invoked","agent":"a"}"#, // 5 missing session_id
        &long,                                          // 6 too long
        r#"{"type":"teleport","agent":"a","data":{}}"#, // 7 unknown type
        seed(10),                                       // 8 ok, and no trailing newline
    ]
    .join("\n");
    let replies = relay.publish(&input).await;
    let rejections: Vec<(u64, String)> = replies
        .iter()
        .filter(|r| r.get("line").is_some())
        .map(|r| {
            (
                r["line"].as_u64().unwrap(),
                r["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let lines: Vec<u64> = rejections.iter().map(|r| r.0).collect();
    assert_eq!(lines, vec![2, 5, 6, 7], "{rejections:?}");
    assert!(
        rejections[0].1.starts_with("invalid JSON"),
        "{rejections:?}"
    );
    assert_eq!(rejections[1].1, "missing field `session_id`");
    assert!(
        rejections[2]
            .1
            .contains("longer than the maximum frame of 4096 bytes"),
        "{rejections:?}"
    );
    assert!(
        rejections[3].1.contains("unknown event type `teleport`"),
        "{rejections:?}"
    );
    let summary = replies.last().unwrap();
    assert_eq!(summary["accepted"], 3);
    assert_eq!(summary["rejected"], 4);

    let got = take_events(&mut ws, 3).await;
    let types: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["capability_invoked", "capability_result", "health_alert"]
    );
    assert_eq!(summary["last_seq"], got[2]["seq"]);
    assert_silent(&mut ws, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn summary_with_nothing_accepted_has_null_last_seq() {
    let relay = Relay::start().await;
    let replies = relay.publish("\n\n[]\n").await;
    assert_eq!(replies[0]["line"], 3);
    assert_eq!(
        replies[1],
        serde_json::json!({"accepted":0,"rejected":1,"last_seq":null})
    );
}

#[tokio::test]
async fn publish_command_reports_and_exits_1_on_rejection() {
    let relay = Relay::start().await;
    let ingest = relay.ingest.to_string();
    let run = |input: String| {
        let mut child = Command::new(bin())
            .args(["publish", "-", "--ingest", &ingest])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(format!("{}\n{{\"type\":1}}\n{}\n", seed(0), seed(1)));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "accepted 2, rejected 1"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2: field `type` must be a string"),
        "{err}"
    );

    let file = relay.data_dir().join("seed.ndjson");
    std::fs::write(&file, SEED).unwrap();
    let out = relay.cli(&["publish", file.to_str().unwrap(), "--ingest", &ingest]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "accepted 11, rejected 0"
    );
}

#[tokio::test]
async fn unix_socket_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ingest.sock");
    let relay = Relay::start_with(&["--ingest-unix", sock.to_str().unwrap()]).await;
    let mut ws = relay.subscribe("type=health_alert").await;
    let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(SEED.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    assert!(reply.contains(r#""accepted":11"#), "{reply}");
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5)).await["type"],
        "health_alert"
    );
}

/// A field the seed names keeps the seed's type in every event type: the event that froze
/// the dashboard (`data.session_id` an object, in a type whose schema does not list it) is
/// refused with its line number, and the lines around it go through.
#[tokio::test]
async fn a_seed_field_of_the_wrong_type_is_refused_in_any_event_type() {
    let relay = Relay::start().await;
    let poison = r#"{"type":"rate_limit_hit","agent":"poison-agent","data":{"capability_pattern":"x","limit":1,"window":"1s","retry_after_seconds":1,"session_id":{"toString":1}}}"#;
    let input = [seed(0), poison, seed(1)].join("\n");
    let replies = relay.publish(&input).await;
    assert_eq!(replies[0]["line"], 2, "{replies:?}");
    assert_eq!(
        replies[0]["error"], "field `data.session_id` must be a string",
        "{replies:?}"
    );
    let summary = replies.last().unwrap();
    assert_eq!(
        (summary["accepted"].as_u64(), summary["rejected"].as_u64()),
        (Some(2), Some(1))
    );
}
