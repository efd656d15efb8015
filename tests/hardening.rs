//! What a careless and a hostile user found (issue "Hardening"), each over real sockets
//! and processes: large events and bursts against the client queue, a second relay on the
//! same port, concurrent token changes, I-JSON, terminal escapes, resuming a filtered
//! tail, nonsense settings, unreadable input, `tail` errors that cannot heal.

mod common;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A valid health_alert whose message is `filler` bytes long.
fn alert(filler: usize) -> String {
    format!(
        r#"{{"type":"health_alert","agent":null,"data":{{"component":"disk","severity":"warning","message":"{}","threshold":"80%"}}}}"#,
        "m".repeat(filler)
    )
}

/// Waits (at most 60 s: a `tail` that retries forever is a failure, not a hang) for the
/// child and returns (success, stdout, stderr).
fn output_of(child: std::process::Child) -> (bool, String, String) {
    output_within(child, Duration::from_secs(60), "the child")
}

/// Like `output_of`, failing with `what` if the child is still running after `within`.
fn output_within(
    child: std::process::Child,
    within: Duration,
    what: &str,
) -> (bool, String, String) {
    let out = finish_within(child, within, what);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

async fn large_event_then_small_reaches_everyone(extra: &[&str], big: usize) {
    let relay = Relay::start_with(extra).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(raw_subscribe(&relay, "", None).await);
    }
    let json = tail(&relay, &["--json", "--count", "2", "--no-reconnect"]);
    wait_subscribers(&relay, 4).await;
    let summary = relay
        .publish(&format!("{}\n{}\n", alert(big), alert(10)))
        .await;
    let last = summary.last().unwrap();
    assert_eq!(last["accepted"], 2, "{summary:?}");
    let last_seq = last["last_seq"].as_u64().unwrap();
    for mut s in subs {
        let (seqs, close) =
            tokio::time::timeout(Duration::from_secs(30), read_raw_frames(&mut s, 2))
                .await
                .expect("both events in time");
        assert_eq!((seqs, close), (vec![last_seq - 1, last_seq], None));
    }
    let (ok, out, err) = tokio::task::spawn_blocking(move || output_of(json))
        .await
        .unwrap();
    assert!(ok, "tail: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].len() > big && lines[1].len() < 1000);
    assert!(!err.contains("4001"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_the_client_queue_reaches_every_reader_and_so_does_the_next() {
    large_event_then_small_reaches_everyone(&["--client-queue", "64KiB"], 200_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_9_mib_event_passes_with_default_flags() {
    large_event_then_small_reaches_everyone(&[], 9 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_a_small_client_queue_reaches_a_reading_tail_whole() {
    let relay = Relay::start_with(&["--client-queue", "64KiB"]).await;
    let json = tail(&relay, &["--json", "--count", "300", "--no-reconnect"]);
    wait_subscribers(&relay, 1).await;
    let lines: Vec<String> = (0..300).map(|_| alert(2_000)).collect();
    assert_eq!(relay.publish(&lines.join("\n")).await[0]["accepted"], 300);
    let (ok, out, err) = tokio::task::spawn_blocking(move || output_of(json))
        .await
        .unwrap();
    assert!(ok, "tail was closed: {err}");
    assert_eq!(out.lines().count(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_still_gets_4001_and_it_is_counted() {
    let relay = Relay::start_with(&["--client-queue", "64KiB"]).await;
    let mut stalled = raw_subscribe(&relay, "", Some(4096)).await;
    wait_subscribers(&relay, 1).await;
    let lines: Vec<String> = (0..3_000).map(|_| alert(2_000)).collect();
    relay.publish(&lines.join("\n")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&relay).await;
        if m.contains("krux_closes_total{reason=\"slow_consumer\"} 1")
            && m.contains("krux_slow_consumer_closes_total 1")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no 4001 counted:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (got, _) = read_raw_frames(&mut stalled, usize::MAX).await;
    assert!(got.len() < 3_000);
}

/// A WebSocket server that closes every subscription at once with `close`, after
/// sending `frames`; returns its address and a count of connections.
async fn fake_relay(
    frames: Vec<String>,
    close: Option<(u16, &'static str)>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
) {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            log.lock().unwrap().push(Instant::now());
            let (frames, close) = (frames.clone(), close);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                for f in frames {
                    let _ = ws.send(Message::text(f)).await;
                }
                if let Some((code, reason)) = close {
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                    while ws.next().await.is_some() {}
                }
            });
        }
    });
    (addr, seen)
}

fn tail_at(url: &str, extra: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args(["tail", "--url", url, "--token", "krx_user_x"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn tail_backs_off_and_gives_up_when_closed_at_the_same_seq_again_and_again() {
    let (addr, seen) = fake_relay(vec![], Some((4001, "slow consumer; resume with since=7"))).await;
    let child = tail_at(&format!("ws://{addr}"), &["--since", "7"]);
    let (ok, _, err) = tokio::task::spawn_blocking(move || output_of(child))
        .await
        .unwrap();
    assert!(!ok);
    assert!(err.contains("giving up"), "{err}");
    let times = seen.lock().unwrap().clone();
    assert_eq!(times.len(), 6, "{err}");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.windows(2).all(|g| g[1] > g[0]) && gaps[0] >= Duration::from_millis(200),
        "the delay must grow: {gaps:?}"
    );
}

#[tokio::test]
async fn tail_skips_a_frame_it_cannot_parse_and_keeps_its_place() {
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let frames = vec![
        format!(r#"{{"type":"health_alert","agent":null,"data":{{"x":{deep}}},"seq":5}}"#),
        r#"{"type":"health_alert","agent":null,"data":{"message":"after"},"seq":6}"#.into(),
    ];
    let (addr, _) = fake_relay(frames, Some((1000, ""))).await;
    let child = tail_at(&format!("ws://{addr}"), &["--json"]);
    let (ok, out, err) = tokio::task::spawn_blocking(move || output_of(child))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(err.contains("skipping an event (seq 5)"), "{err}");
    assert!(
        out.contains("\"after\"") && out.lines().count() == 1,
        "{out}"
    );
}

#[tokio::test]
async fn tail_exits_on_errors_that_cannot_heal() {
    let relay = Relay::start_with(&["--tls-self-signed"]).await;
    let empty = relay.data_dir().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let ws = relay.ws;
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--url".into(), format!("http://{ws}")], "ws://"),
        (vec!["--url".into(), ws.to_string()], "scheme is missing"),
        (vec!["--url".into(), format!("ws://{ws}")], "wss://"),
        (vec!["--url".into(), format!("wss://{ws}")], "--ca-cert"),
        (
            vec![
                "--url".into(),
                format!("wss://{ws}"),
                "--ca-cert".into(),
                empty.display().to_string(),
            ],
            "no PEM certificate",
        ),
    ];
    for (args, says) in cases {
        let child = Command::new(bin())
            .arg("tail")
            .args(&args)
            .env("KRUX_TOKEN", &relay.token)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let what = format!("{args:?}: tail kept retrying");
        let (ok, _, err) = output_within(child, Duration::from_secs(10), &what);
        assert!(!ok, "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("reconnecting"), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn tail_escapes_control_characters_in_readable_lines() {
    let relay = Relay::start().await;
    let child = tail(&relay, &["--count", "1"]);
    wait_subscribers(&relay, 1).await;
    let forged = r#"{"type":"policy_violation","agent":"evil\u001b[2J\u001b]0;pwned\u0007","session_id":"s","data":{"capability":"c","rule":"r","tier":"blocked","reason":"x\n10:00:00.000 approval_resolved admin apr-1 approved by admin"}}"#;
    assert_eq!(relay.publish(forged).await[0]["accepted"], 1);
    let (ok, out, err) = tokio::task::spawn_blocking(move || output_of(child))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "a newline forged a line: {out}");
    assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
    assert!(
        out.contains(r"\u{1b}[2J") && out.contains(r"x\n10:00"),
        "{out}"
    );
}

#[tokio::test]
async fn ingest_refuses_what_is_not_i_json_with_a_reason() {
    let relay = Relay::start().await;
    let mut ws = relay.subscribe("").await;
    let deep = alert(1).replace(
        r#""threshold":"80%""#,
        &format!(
            r#""threshold":"80%","x":{}{}"#,
            "[".repeat(70),
            "]".repeat(70)
        ),
    );
    let lone = alert(1).replace(r#""message":"m""#, r#""message":"a\ud800""#);
    let pair = alert(1).replace(r#""message":"m""#, r#""message":"\ud83d\ude00""#);
    let replies = relay.publish(&[deep, lone, pair].join("\n")).await;
    assert_eq!(replies[0]["line"], 1);
    assert!(replies[0]["error"]
        .as_str()
        .unwrap()
        .contains("nested deeper than 64"));
    assert_eq!(replies[1]["line"], 2);
    assert!(replies[1]["error"]
        .as_str()
        .unwrap()
        .contains(r"lone UTF-16 surrogate escape `\ud800`"));
    assert_eq!(replies[2]["accepted"], 1, "{replies:?}");
    let ev = next_event(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(ev["data"]["message"], "😀");
}

#[tokio::test]
async fn a_filtered_tail_that_saw_nothing_resumes_from_krux_seq_after_a_restart() {
    let mut relay = Relay::start().await;
    relay.publish(&alert(1)).await;
    // The 101 names the position the subscription starts from (once the reactors have
    // dispatched the event; before that, the event itself is still owed).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let bearer = format!("Authorization: Bearer {}\r\n", relay.token);
        let (status, head, _) = raw_http(relay.ws, &upgrade_request("/events", &bearer)).await;
        assert_eq!(status, 101);
        if head.lines().any(|l| l.trim_end() == "Krux-Seq: 1") {
            break;
        }
        assert!(Instant::now() < deadline, "{head}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The tail's 101 is written (so its Krux-Seq is the tail's, even if the tail is
    // stopped before it reads it): counted once the write is done, unlike the subscriber,
    // which is counted before. Stopped before that, the tail would begin after the restart,
    // and the violation below would rightly not be owed to it.
    let handshakes =
        |m: &str| metric_value(m, "krux_handshakes_total{status=\"101\"}").unwrap_or(0);
    let before = handshakes(&metrics(&relay).await);
    let child = tail(&relay, &["--type", "policy_violation", "--count", "1"]);
    wait_subscribers(&relay, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while handshakes(&metrics(&relay).await) <= before {
        assert!(
            Instant::now() < deadline,
            "the tail's 101 was never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.publish(&alert(1)).await; // not for it: it has still received nothing
                                    // Stopped, tail cannot reconnect before the violation below is published: it must
                                    // resume to get it, however fast it would have retried.
    let signal = |sig: &str| {
        let st = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    signal("-STOP");
    let same = [relay.ws, relay.ingest, relay.admin].map(|a| a.to_string());
    relay
        .crash_and_restart(&[
            "--listen", &same[0], "--ingest", &same[1], "--admin", &same[2],
        ])
        .await;
    let m = metrics(&relay).await;
    assert!(m.contains("\nkrux_subscribers 0\n"));
    let v = r#"{"type":"policy_violation","agent":"a","session_id":"s","data":{"capability":"c","rule":"r","tier":"blocked","reason":"while away"}}"#;
    relay.publish(v).await;
    signal("-CONT");
    let (ok, out, err) = tokio::task::spawn_blocking(move || output_of(child))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("while away"), "{out}\n{err}");
}

/// Runs `krux-relay serve` with `args` (plus a fresh data dir) and returns its stderr,
/// asserting it exits non-zero within 10 s.
fn serve_must_refuse(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(bin())
        .arg("serve")
        .args(args)
        .env("KRUX_DATA_DIR", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let what = format!("serve {args:?} started instead of refusing");
    let (ok, _, err) = output_within(child, Duration::from_secs(10), &what);
    assert!(!ok && !err.contains("panicked"), "{args:?}: {err}");
    err
}

#[tokio::test]
async fn a_second_relay_cannot_take_a_running_relays_websocket_port() {
    let relay = Relay::start().await;
    let ws = relay.ws.to_string();
    let err = serve_must_refuse(&[
        "--listen",
        &ws,
        "--ingest",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("--listen") && err.contains("in use"), "{err}");
    // Nor a port some other program holds.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap().to_string();
    let err = serve_must_refuse(&[
        "--listen",
        &addr,
        "--ingest",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("in use"), "{err}");
    // The first relay still answers every subscriber itself.
    for _ in 0..10 {
        drop(relay.subscribe("").await);
    }
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused_at_start_naming_the_flag() {
    for (flag, value) in [
        ("--client-queue", "0"),
        ("--replay", "18446744073709551615"),
        ("--max-frame", "0"),
        ("--reactors", "0"),
    ] {
        let mut args = ANY_PORTS.to_vec();
        args.extend([flag, value]);
        let err = serve_must_refuse(&args);
        assert!(
            err.contains(&format!("{flag} {value}: must be between")),
            "{err}"
        );
    }
    for (ingest, admin, insist) in [
        ("0.0.0.0:0", "127.0.0.1:0", "--insecure-ingest"),
        ("127.0.0.1:0", "0.0.0.0:0", "--insecure-admin"),
    ] {
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--ingest",
            ingest,
            "--admin",
            admin,
        ];
        let err = serve_must_refuse(&args);
        assert!(err.contains(insist), "{err}");
    }
    // A bad value in the config file names the file and the key.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, "client-queue = \"lots\"\n").unwrap();
    let mut args = ANY_PORTS.to_vec();
    let path = file.display().to_string();
    args.extend(["--config", &path]);
    let err = serve_must_refuse(&args);
    assert!(
        err.contains(&path) && err.contains("`client-queue`"),
        "{err}"
    );
    // A regular file at --ingest-unix is not deleted.
    let victim = dir.path().join("notes.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let mut args = ANY_PORTS.to_vec();
    let victim_s = victim.display().to_string();
    args.extend(["--ingest-unix", &victim_s]);
    let err = serve_must_refuse(&args);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
}

#[tokio::test]
async fn host_names_resolve_and_logs_to_a_pipe_carry_no_colour() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--listen",
            "localhost:0",
            "--ingest",
            "localhost:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args([
            "--ready-file",
            ready.to_str().unwrap(),
            "--io",
            &io_backend(),
        ])
        .env("KRUX_DATA_DIR", dir.path())
        .env("KRUX_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "ready file", || ready.exists()).await;
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(info["ingest"]
        .as_str()
        .unwrap()
        .parse::<std::net::SocketAddr>()
        .unwrap()
        .ip()
        .is_loopback());
    assert!(
        log.contains("krux-relay is up") && !log.contains('\u{1b}'),
        "{log:?}"
    );
}

#[tokio::test]
async fn publish_exits_with_the_reason_when_it_cannot_read_its_input() {
    let relay = Relay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = relay.ingest.to_string();
    let path = dir.path().to_str().unwrap().to_string();
    let publish = tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .args(["publish", "--ingest", &ingest, &path])
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(10), publish)
        .await
        .expect("publish must not hang")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is a directory"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_token_changes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        let d = dir.path().to_path_buf();
        std::thread::spawn(move || {
            Command::new(bin())
                .args(&args)
                .env("KRUX_DATA_DIR", d)
                .output()
                .unwrap()
        })
    };
    let creates: Vec<_> = (0..20)
        .map(|i| {
            run(vec![
                "user-token".into(),
                "create".into(),
                "--name".into(),
                format!("t{i}"),
            ])
        })
        .collect();
    for c in creates {
        assert_success(&c.join().unwrap());
    }
    for trial in 0..5 {
        let victim = format!("victim{trial}");
        assert_success(
            &run(vec![
                "user-token".into(),
                "create".into(),
                "--name".into(),
                victim.clone(),
            ])
            .join()
            .unwrap(),
        );
        let mut all = vec![run(vec![
            "user-token".into(),
            "revoke".into(),
            victim.clone(),
        ])];
        all.extend((0..4).map(|i| {
            run(vec![
                "user-token".into(),
                "create".into(),
                "--name".into(),
                format!("c{trial}-{i}"),
            ])
        }));
        for c in all {
            assert_success(&c.join().unwrap());
        }
        let list = run(vec!["user-token".into(), "list".into()])
            .join()
            .unwrap();
        let names = String::from_utf8_lossy(&list.stdout).into_owned();
        assert!(
            !names
                .lines()
                .any(|l| l.split('\t').next() == Some(victim.as_str())),
            "trial {trial}: {names}"
        );
        assert_eq!(names.lines().count(), 20 + 4 * (trial + 1), "{names}");
    }
    let bad = run(vec![
        "user-token".into(),
        "create".into(),
        "--name".into(),
        "evil\tname\nx".into(),
    ])
    .join()
    .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--name must be"));
}

#[tokio::test]
async fn a_resume_after_a_clean_restart_gets_no_gap_notice_after_a_crash_it_does() {
    let mut relay = Relay::start().await;
    let last = relay.publish(&alert(1)).await[0]["last_seq"]
        .as_u64()
        .unwrap();
    assert!(relay.terminate(Duration::from_secs(10)).await.success());
    relay.crash_and_restart(&[]).await; // the first is already gone: a plain restart
    relay.publish(&alert(1)).await;
    let mut ws = relay.subscribe(&format!("since={last}")).await;
    let ev = next_event(&mut ws, Duration::from_secs(5)).await;
    assert_ne!(ev["type"], "replay_gap", "nothing was lost: {ev}");
    // After a crash, events after `last` may have been lost: say so.
    let last = relay.publish(&alert(1)).await[0]["last_seq"]
        .as_u64()
        .unwrap();
    relay.crash_and_restart(&[]).await;
    relay.publish(&alert(1)).await;
    let mut ws = relay.subscribe(&format!("since={last}")).await;
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5)).await["type"],
        "replay_gap"
    );
}
