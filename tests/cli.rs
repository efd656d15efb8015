//! `tail` and `demo` as a user runs them.

mod common;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test]
async fn tail_prints_readable_lines_and_json_with_filters() {
    let relay = Relay::start().await;
    let readable = tail(&relay, &["--count", "11"]);
    let json = tail(
        &relay,
        &[
            "--json",
            "--type",
            "health_alert,rate_limit_hit",
            "--count",
            "2",
        ],
    );
    let agent = tail(&relay, &["--agent", "deploy-agent", "--count", "2"]);
    wait_subscribers(&relay, 3).await;
    relay.publish(SEED).await;

    let out = readable.wait_with_output().unwrap();
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 11, "{text}");
    for (line, part) in lines.iter().zip([
        "filesystem.read [autonomous] 12ms",
        "filesystem.read ok 12ms",
        "PolicyDenied",
        "system.deny_dangerous_commands",
        "appr-x1y2z3 process.run",
        "approved by admin",
        "Research and analysis agent",
        "3600s, 47 capabilities",
        "network.* limit 100/1h",
        "gmail email.send wr-m1n2o3",
        "warning disk: Disk usage at 85%",
    ]) {
        assert!(line.contains(part), "{line:?} should contain {part:?}");
    }
    assert!(
        lines[0].starts_with("10:30:00.123 capability_invoked"),
        "{}",
        lines[0]
    );

    let out = json.wait_with_output().unwrap();
    let types: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(types, ["rate_limit_hit", "health_alert"]);

    let out = agent.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines().all(|l| l.contains("deploy-agent")) && text.lines().count() == 2,
        "{text}"
    );
}

/// For scripts: `--since 0 --until-idle` prints what the relay retains and exits 0 once
/// nothing more comes; `--color always` marks what needs a supervisor, and piped output
/// (the default `auto`) carries no escape codes.
#[tokio::test]
async fn tail_until_idle_prints_the_window_and_exits_with_colour_on_request() {
    let relay = Relay::start().await;
    relay.publish(SEED).await;
    let run = |extra: &[&str]| {
        let mut args = vec!["--since", "0", "--until-idle", "700ms"];
        args.extend_from_slice(extra);
        let out = finish_within(
            tail(&relay, &args),
            Duration::from_secs(15),
            "tail --until-idle",
        );
        assert_success(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    let plain = run(&[]);
    assert_eq!(plain.lines().count(), 11, "{plain}");
    assert!(!plain.contains('\x1b'), "no colour when piped: {plain:?}");
    let coloured = run(&["--color", "always"]);
    let line = |part: &str| {
        coloured
            .lines()
            .find(|l| l.contains(part))
            .unwrap_or_else(|| panic!("no {part} line in {coloured:?}"))
            .to_string()
    };
    assert!(line("policy_violation").starts_with("\x1b[31m"));
    assert!(line("approval_requested").starts_with("\x1b[33m"));
    assert!(line("approval_resolved").starts_with("\x1b[32m"));
    assert!(!line("capability_invoked").contains('\x1b'));
    let json = run(&["--json", "--color", "always"]);
    for l in json.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("--json lines are JSON");
    }
}

#[tokio::test]
async fn tail_reports_a_refusal() {
    let relay = Relay::start().await;
    let out = Command::new(bin())
        .args([
            "tail",
            "--url",
            &format!("ws://{}", relay.ws),
            "--token",
            "krx_user_wrong",
            "--count",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("not valid"), "{err}");
}

#[tokio::test]
async fn demo_prints_a_working_token_and_tail_command() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let mut demo = Command::new(bin())
        .arg("demo")
        .args(ANY_PORTS)
        .args([
            "--rate",
            "500",
            "--duration",
            "30s",
            "--io",
            &io_backend(),
            "--ready-file",
            ready.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(demo.stdout.take().unwrap());
    let mut tail_cmd = None;
    let mut line = String::new();
    while tail_cmd.is_none() {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "demo ended before printing a tail command"
        );
        if line.contains(" tail --url ") && !line.contains("--type") {
            tail_cmd = Some(line.trim().to_string());
        }
    }
    // Run exactly what the demo printed, plus a count so it ends.
    let words: Vec<&str> = tail_cmd.as_deref().unwrap().split_whitespace().collect();
    let out = Command::new(words[0])
        .args(&words[1..])
        .args(["--json", "--count", "200"])
        .output()
        .unwrap();
    let _ = demo.kill();
    let _ = demo.wait();
    assert_success(&out);
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 200);
    let agents: std::collections::HashSet<&str> =
        events.iter().filter_map(|e| e["agent"].as_str()).collect();
    assert!(
        agents.len() > 20,
        "a fleet, not one agent: {}",
        agents.len()
    );
    assert!(events
        .windows(2)
        .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
}

/// Starts `demo` with `extra`, waits until it is up, stops it with SIGTERM and returns
/// whether it exited successfully.
async fn demo_until_sigterm(tmp: &std::path::Path, extra: &[&str]) -> bool {
    let ready = tmp.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let mut demo = Command::new(bin())
        .arg("demo")
        .args(extra)
        .args(ANY_PORTS)
        .args([
            "--io",
            &io_backend(),
            "--ready-file",
            ready.to_str().unwrap(),
        ])
        .env("TMPDIR", tmp)
        .env_remove("KRUX_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(std::time::Duration::from_secs(20), "demo up", || {
        ready.exists()
    })
    .await;
    let st = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    demo.wait().unwrap().success()
}

#[tokio::test]
async fn demo_removes_its_throw_away_dir_on_sigterm_and_keeps_a_given_one() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(demo_until_sigterm(tmp.path(), &[]).await);
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("krux-demo-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    let data = tmp.path().join("mine");
    let data_s = data.display().to_string();
    assert!(demo_until_sigterm(tmp.path(), &["--data-dir", &data_s]).await);
    let list = Command::new(bin())
        .args(["user-token", "list", "--data-dir", &data_s])
        .output()
        .unwrap();
    assert_success(&list);
    assert!(String::from_utf8_lossy(&list.stdout).starts_with("demo-"));
}
