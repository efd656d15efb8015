//! The built-in dashboard (`GET /`) in headless Chromium: it connects with the token from
//! its address, resumes with `since=0`, and shows every retained event and the agents.
//! Needs `chromium` (`.ci/run` installs it); outside CI the test is skipped without it.

mod common;
use std::process::Command;

use common::*;

#[tokio::test]
async fn dashboard_shows_the_stream_in_a_real_browser() {
    if !have_tool("chromium", &["--version"], "apt-get install chromium") {
        return;
    }
    let relay = Relay::start().await;
    assert_eq!(relay.publish(SEED).await[0]["accepted"], 11);
    let profile = relay.data_dir().join("chromium-profile");
    let url = format!("http://{}/?access_token={}&since=0", relay.ws, relay.token);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
            ])
            .args([
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--virtual-time-budget=5000", "--dump-dom", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains(r#"id="status">live<"#), "{dom}");
    for t in krux_relay::event::EventType::ALL {
        assert!(
            dom.contains(&format!(r#"<tr class="{}""#, t.name())),
            "{} missing from the page",
            t.name()
        );
    }
    assert!(dom.contains(r#"id="agents">4<"#), "agents seen");
    assert!(
        !dom.contains(&relay.token),
        "the token is not left in the page"
    );
}
