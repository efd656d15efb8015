//! `--config FILE` (TOML): settings apply, flags win over the file, unknown keys fail.

mod common;
use std::process::Command;

use common::*;

#[tokio::test]
async fn config_file_settings_apply_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, "max-connections = 1\nmax_frame = \"1KiB\"\nping-interval = \"10s\"\ninsecure-plaintext = false\n").unwrap();
    // The file says 1 KiB; the flag says 4 KiB and wins.
    let relay =
        Relay::start_with(&["--config", file.to_str().unwrap(), "--max-frame", "4KiB"]).await;
    let line = format!(
        r#"{{"type":"health_alert","agent":null,"data":{{"component":"disk","severity":"warning","message":"{}","threshold":"80%"}}}}"#,
        "m".repeat(2000)
    );
    let summary = relay.publish(&line).await;
    assert_eq!(summary.last().unwrap()["accepted"], 1, "{summary:?}");
    // max-connections = 1 from the file.
    let _first = relay.subscribe("").await;
    let (status, _) = relay
        .try_subscribe("", Some(&relay.token))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status, 503);
}

#[test]
fn unknown_config_keys_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nlisten-harder = true\n").unwrap();
    let out = Command::new(bin())
        .args(["--config", file.to_str().unwrap(), "serve"])
        .env("KRUX_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown setting `listen-harder`"), "{err}");
}
