//! The built-in dashboard (`GET /`) in headless Chromium: it connects with the token from
//! its address, resumes with `since=0`, and shows every retained event and the agents.
//! Needs `chromium` (`.ci/run` installs it); outside CI the test is skipped without it.

mod common;
use std::process::Command;

use common::*;

/// The DOM of `url` after headless Chromium ran it for 5 s of virtual time.
async fn page_dom(relay: &Relay, url: String) -> String {
    let profile = relay.data_dir().join("chromium-profile");
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn dashboard_shows_the_stream_in_a_real_browser() {
    if !have_tool("chromium", &["--version"], "apt-get install chromium") {
        return;
    }
    let relay = Relay::start().await;
    assert_eq!(relay.publish(SEED).await[0]["accepted"], 11);
    let url = format!("http://{}/?access_token={}&since=0", relay.ws, relay.token);
    let dom = page_dom(&relay, url).await;
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

/// `examples/clients/browser.html` on `krux-client.js`, opened from disk: it subscribes
/// with the filters and `since` from its address, shows each event once, stops after
/// `count`, and leaves no token in the page.
#[tokio::test]
async fn the_browser_example_client_replays_filtered_events_and_stops() {
    if !have_tool("chromium", &["--version"], "apt-get install chromium") {
        return;
    }
    let relay = Relay::start().await;
    assert_eq!(relay.publish(SEED).await[0]["accepted"], 11);
    let page = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/clients/browser.html");
    let url = format!(
        "file://{page}?url=ws://{}&token={}&type=policy_violation,health_alert&since=0&count=2",
        relay.ws, relay.token
    );
    let dom = page_dom(&relay, url).await;
    assert!(dom.contains(r#"id="status">done<"#), "{dom}");
    assert!(dom.contains(r#"id="count">2<"#), "{dom}");
    assert!(
        dom.contains("<li>#4 policy_violation research-agent</li>"),
        "{dom}"
    );
    assert!(dom.contains("<li>#11 health_alert -</li>"), "{dom}");
    assert!(
        !dom.contains(&relay.token),
        "the token is not left in the page"
    );
}
