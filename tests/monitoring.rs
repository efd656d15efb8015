//! The monitoring files in docs/monitoring against Prometheus' own tool and a running
//! relay: the alert rules load and their unit tests pass (`promtool test rules`), the
//! relay's exposition passes `promtool check metrics`, and every series the rules and the
//! Grafana dashboard query is one the relay exposes (cluster series: tests/cluster.rs).
//! Needs `promtool` (Debian's `prometheus` package; `.ci/run` installs it); outside CI the
//! tests are skipped without it.

mod common;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn promtool() -> bool {
    have_tool("promtool", &["--version"], "apt-get install prometheus")
}

fn run_promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/monitoring"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_alert_rules_load_and_their_unit_tests_pass() {
    if !promtool() {
        return;
    }
    let (ok, out) = run_promtool(&["check", "rules", "krux-relay.rules.yml"], None);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 12 rules found"), "{out}");
    let (ok, out) = run_promtool(&["test", "rules", "krux-relay.rules.test.yml"], None);
    assert!(ok, "{out}");
}

#[tokio::test]
async fn the_exposition_passes_promtool_and_has_every_series_the_monitoring_files_use() {
    let relay = Relay::start().await;
    relay.publish(SEED).await;
    // A subscriber that receives something, so the latency histogram has samples.
    let mut ws = relay.subscribe("since=0").await;
    take_events(&mut ws, 11).await;
    let scrape = metrics(&relay).await;

    let exposed = exposed_families(&scrape);
    let monitored = monitored_families();
    for f in [
        "krux_ingest_to_write_seconds",
        "krux_slow_consumer_closes_total",
        "krux_cluster_ready",
    ] {
        assert!(
            monitored.contains(f),
            "{f} not found in the monitoring files: {monitored:?}"
        );
    }
    let missing: Vec<_> = monitored
        .into_iter()
        .filter(|f| !f.starts_with("krux_cluster_") && !exposed.contains(f))
        .collect();
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}");

    if promtool() {
        let (ok, out) = run_promtool(&["check", "metrics"], Some(&scrape));
        assert!(ok && out.trim().is_empty(), "{out}");
    }
}
