//! The harness itself, from outside: the baseline keeps the relay's contract (so the
//! ratios compare like with like), the limit server frames every line with its seq, and
//! `krux-loadtest run` / `compare` count every delivery and write their reports. Real
//! binaries on port 0 (ready files), real TCP and WebSocket.
//!
//! Needs the `krux-relay` binary next to `krux-loadtest`: `cargo test --workspace` (the
//! README's test command) builds both.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use futures_util::StreamExt;
use krux_testkit::{assert_success, ready_addr, upgrade_request, wait_ready_file};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const SEED: &str = include_str!("../../tests/data/seed_events.ndjson");

fn relay_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_krux-loadtest")).with_file_name("krux-relay");
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace`",
        p.display()
    );
    p
}

/// One server process (relay, baseline or limit) on port 0.
struct Server {
    child: Child,
    ws: SocketAddr,
    ingest: SocketAddr,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Relay,
    Baseline,
    Limit,
}

impl Server {
    async fn start(kind: Kind) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let token = krux_relay::auth::TokenStore::new(dir.path())
            .create("harness-test")
            .unwrap();
        let ready = dir.path().join("ready.json");
        let mut cmd = match kind {
            Kind::Relay => {
                let mut c = Command::new(relay_bin());
                c.args(["serve", "--admin", "127.0.0.1:0"])
                    .env("KRUX_DATA_DIR", dir.path())
                    .env("KRUX_LOG", "warn");
                c
            }
            Kind::Baseline => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_krux-baseline"));
                c.arg("--data-dir").arg(dir.path());
                c
            }
            Kind::Limit => Command::new(env!("CARGO_BIN_EXE_krux-limit")),
        };
        let child = cmd
            .args(["--listen", "127.0.0.1:0", "--ingest", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready)
            .spawn()
            .unwrap();
        let mut child = child;
        let info = wait_ready_file(
            &mut child,
            &ready,
            &format!("{kind:?}"),
            Duration::from_secs(10),
        )
        .unwrap();
        let addr = |k: &str| ready_addr(&info, k).unwrap();
        Server {
            child,
            ws: addr("ws"),
            ingest: addr("ingest"),
            token,
            _dir: dir,
        }
    }

    /// The status code of a WebSocket upgrade request for `path_and_query`.
    async fn upgrade_status(&self, path_and_query: &str) -> u16 {
        let mut s = TcpStream::connect(self.ws).await.unwrap();
        let req = upgrade_request(path_and_query, &self.ws.to_string(), "");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
    }

    async fn subscribe(&self, query: &str) -> Ws {
        let url = format!(
            "ws://{}/events?access_token={}&{query}",
            self.ws, self.token
        );
        tokio_tungstenite::connect_async(url).await.unwrap().0
    }

    /// Publishes NDJSON and returns every reply line (errors, then the summary).
    async fn publish(&self, ndjson: &str) -> Vec<Value> {
        let mut s = TcpStream::connect(self.ingest).await.unwrap();
        s.write_all(ndjson.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("the ingest answers")
            .unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Every event that arrives until the stream has been quiet for `quiet`.
async fn drain(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(quiet, ws.next()).await {
        match msg.unwrap() {
            Message::Text(t) => got.push(serde_json::from_str(&t).unwrap()),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

const FILTERS: [&str; 5] = [
    "",
    "type=policy_violation,health_alert",
    "agent=deploy-agent",
    "session=sess-a1b2c3d4",
    "type=capability_invoked&agent=research-agent",
];

/// What a server answers and delivers for the same handshakes and the same published
/// lines: statuses, the ingest's replies, and per filter each event's type, agent and seq
/// relative to the first.
async fn observe(kind: Kind) -> (Vec<u16>, Vec<Value>, Vec<Vec<(String, String, u64)>>) {
    let server = Server::start(kind).await;
    let statuses = vec![
        server.upgrade_status("/events").await,
        server
            .upgrade_status("/events?access_token=krx_user_not_a_real_one")
            .await,
        server
            .upgrade_status(&format!("/events?access_token={}", "ab".repeat(32)))
            .await,
        server
            .upgrade_status(&format!("/nope?access_token={}", server.token))
            .await,
        server
            .upgrade_status(&format!(
                "/events?access_token={}&type=no_such_type",
                server.token
            ))
            .await,
    ];
    let mut subs = Vec::new();
    for f in FILTERS {
        subs.push(server.subscribe(f).await);
    }
    // One bad line among the good ones: rejected alone, with its line number.
    let mut lines: Vec<&str> = SEED.lines().collect();
    lines.insert(4, r#"{"type":"capability_invoked","agent":"a"}"#);
    let replies = server.publish(&(lines.join("\n") + "\n")).await;
    let mut seen = Vec::new();
    for ws in &mut subs {
        seen.push(drain(ws, Duration::from_millis(500)).await);
    }
    let first = seen[0].iter().filter_map(|e| e["seq"].as_u64()).min();
    let first = first.expect("the unfiltered subscriber got events");
    let norm = seen
        .iter()
        .map(|evs| {
            evs.iter()
                .map(|e| {
                    let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
                    (s("type"), s("agent"), e["seq"].as_u64().unwrap() - first)
                })
                .collect()
        })
        .collect();
    (statuses, replies, norm)
}

#[tokio::test]
async fn baseline_keeps_the_relays_contract() {
    let (r_status, r_replies, r_seen) = observe(Kind::Relay).await;
    let (b_status, b_replies, b_seen) = observe(Kind::Baseline).await;

    assert_eq!(r_status, [401, 401, 403, 404, 400], "the relay's statuses");
    assert_eq!(b_status, r_status, "the baseline answers handshakes alike");

    // Relay: one error line for line 5, then the summary.
    assert_eq!(r_replies.len(), 2, "{r_replies:?}");
    assert_eq!(r_replies[0]["line"], 5);
    assert_eq!(r_replies[1]["accepted"], 11);
    assert_eq!(r_replies[1]["rejected"], 1);
    assert_eq!(b_replies.len(), 2, "{b_replies:?}");
    assert_eq!(b_replies[0]["line"], 5);
    for k in ["accepted", "rejected"] {
        assert_eq!(b_replies[1][k], r_replies[1][k], "{k}");
    }

    assert_eq!(
        r_seen[0].len(),
        11,
        "the unfiltered relay subscriber gets all"
    );
    let seqs: Vec<u64> = r_seen[0].iter().map(|e| e.2).collect();
    assert_eq!(seqs, (0..11).collect::<Vec<_>>(), "in seq order, no gaps");
    for (i, f) in FILTERS.iter().enumerate().skip(1) {
        assert!(
            !r_seen[i].is_empty() && r_seen[i].len() < 11,
            "relay filter `{f}` selects some: {:?}",
            r_seen[i]
        );
        assert_eq!(b_seen[i], r_seen[i], "filter `{f}`: same events on both");
    }
    assert_eq!(b_seen[0], r_seen[0]);
}

#[tokio::test]
async fn limit_server_frames_every_line_with_its_seq() {
    let server = Server::start(Kind::Limit).await;
    let mut ws = server.subscribe("").await;
    let lines: Vec<&str> = SEED.lines().take(3).collect();
    let replies = server.publish(&(lines.join("\n") + "\n")).await;
    assert_eq!(replies.last().unwrap()["accepted"], 3, "{replies:?}");
    let got = drain(&mut ws, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 3);
    for (i, (ev, line)) in got.iter().zip(&lines).enumerate() {
        let mut want: Value = serde_json::from_str(line).unwrap();
        want["seq"] = (i as u64 + 1).into();
        assert_eq!(ev, &want);
    }
}

fn loadtest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_krux-loadtest"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs the plan `text` from a temporary directory (returned: dropping it removes the
/// reports) with its reports in `<dir>/reports`.
fn run_plan_file(text: &str) -> (tempfile::TempDir, PathBuf, Output) {
    let out = tempfile::tempdir().unwrap();
    let plan = out.path().join("plan.toml");
    std::fs::write(&plan, text).unwrap();
    let dir = out.path().join("reports");
    let res = loadtest(&[
        "plan",
        plan.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    (out, dir, res)
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn run_counts_every_delivery_and_writes_its_report() {
    relay_bin();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let res = loadtest(&[
        "run",
        "--spawn",
        "relay",
        "--subscribers",
        "40",
        "--filters",
        "all=40,type=20,agent=20,session=20",
        "--rate",
        "500",
        "--warmup",
        "300ms",
        "--duration",
        "1s",
        "--fail-on-loss",
        "--out",
        dir,
    ]);
    assert_success(&res);
    let r = read_json(&out.path().join("run.json"));
    assert_eq!(r["target"], "relay");
    assert_eq!(r["subscribers_connected"], 40);
    let expected = r["expected_deliveries"].as_u64().unwrap();
    // At least the 16 unfiltered subscribers × ~500 events of the measured second.
    assert!(expected > 16 * 300, "expected deliveries: {expected}");
    assert_eq!(r["received_deliveries"], expected);
    assert_eq!(
        (r["lost"].as_u64(), r["warmup_lost"].as_u64()),
        (Some(0), Some(0))
    );
    // The counts cover the window the rates do, not the warm-up: the unfiltered
    // subscribers were owed the window's events (and at most a batch published as it
    // closed), not the ~150 of the warm-up.
    let in_window = r["events_in_per_s"].as_f64().unwrap() * r["measured_s"].as_f64().unwrap();
    let all = r["by_filter"]["all"].clone();
    let per_all = all["expected"].as_f64().unwrap() / all["subscribers"].as_f64().unwrap();
    assert!(
        per_all >= in_window.round() && per_all < in_window + 50.0,
        "owed {per_all} per unfiltered subscriber, {in_window} published in the window"
    );
    assert!(r["latency_samples"].as_u64().unwrap() > 0);
    let (p50, p99) = (r["latency_p50_us"].as_u64(), r["latency_p99_us"].as_u64());
    assert!(p50.unwrap() > 0 && p50 <= p99, "{p50:?} {p99:?}");
    assert!(r["server_cpu_s"].as_f64().unwrap() > 0.0);
    assert!(!r["timeline"].as_array().unwrap().is_empty());
    let svg = std::fs::read_to_string(out.path().join("run.svg")).unwrap();
    assert!(svg.contains("<svg"), "the plot is an SVG");
    // Where it ran, and the relay's version from its admin port.
    let info = &r["target_info"];
    assert!(
        info["ws"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{info}"
    );
    assert_eq!(info["tls"], false);
    assert_eq!(info["relay_version"], env!("CARGO_PKG_VERSION"));
    // Per filter class (the mix drawn 40/20/20/20), each class's figures adding up.
    let by = &r["by_filter"];
    let count = |k: &str| by[k]["subscribers"].as_u64().unwrap();
    let counts = [
        count("all"),
        count("type"),
        count("agent"),
        count("session"),
    ];
    assert!(
        counts.iter().sum::<u64>() == 40 && counts.iter().all(|&n| n >= 5),
        "{counts:?}"
    );
    let received: u64 = ["all", "type", "agent", "session"]
        .iter()
        .map(|k| by[*k]["received"].as_u64().unwrap())
        .sum();
    assert_eq!(received, expected);
    assert_eq!(r["by_health"]["healthy"]["subscribers"], 40);
}

/// A TLS reconnect storm: every subscriber comes back with `since`, nothing lost or seen
/// twice, and every reconnect resumes its session with a ticket — unless the client keeps
/// none (`--no-resume`), when every handshake is a full one.
#[test]
fn a_tls_storm_resumes_every_session_unless_told_not_to() {
    relay_bin();
    for resume in [true, false] {
        let out = tempfile::tempdir().unwrap();
        let mut args = vec![
            "run",
            "--spawn",
            "relay",
            "--tls",
            "--subscribers",
            "30",
            "--storm",
            "--rate",
            "200",
            "--warmup",
            "300ms",
            "--duration",
            "2s",
            "--fail-on-loss",
            "--out",
            out.path().to_str().unwrap(),
        ];
        if !resume {
            args.push("--no-resume");
        }
        let res = loadtest(&args);
        assert_success(&res);
        let r = read_json(&out.path().join("run.json"));
        assert_eq!(
            (r["reconnects"].as_u64(), r["lost"].as_u64()),
            (Some(30), Some(0))
        );
        assert_eq!(r["duplicates"], 0);
        let (full, resumed) = (
            r["tls_full_handshakes"].as_u64().unwrap(),
            r["tls_resumed_handshakes"].as_u64().unwrap(),
        );
        assert_eq!(full + resumed, 60, "30 connects and 30 reconnects");
        assert_eq!(r["target_info"]["tls"], true);
        assert_eq!(r["target_info"]["tls_resume"], resume);
        assert_eq!(
            r["by_health"]["churning"]["subscribers"], 30,
            "the storm moved them all"
        );
        assert_eq!(r["by_health"]["churning"]["lost"], 0);
        let marks: Vec<&str> = r["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["marks"].as_array().unwrap())
            .map(|m| m.as_str().unwrap())
            .collect();
        assert_eq!(marks, ["storm"], "the storm is marked on the timeline");
        let csv = std::fs::read_to_string(out.path().join("run.csv")).unwrap();
        assert!(csv.lines().any(|l| l.ends_with(",storm")), "{csv}");
        if resume {
            assert!(
                resumed >= 30,
                "every reconnect resumed: {full} full, {resumed} resumed"
            );
        } else {
            assert_eq!(resumed, 0);
        }
    }
}

#[test]
fn compare_runs_all_three_and_reports_medians_and_ratios() {
    relay_bin();
    let out = tempfile::tempdir().unwrap();
    let res = loadtest(&[
        "compare",
        "--subscribers",
        "20",
        "--rate",
        "max",
        "--warmup",
        "300ms",
        "--duration",
        "700ms",
        "--rounds",
        "1",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_success(&res);
    let c = read_json(&out.path().join("compare.json"));
    let rows = c["medians"].as_array().unwrap();
    let targets: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["relay", "baseline", "limit"]);
    let d: Vec<f64> = rows
        .iter()
        .map(|r| r["deliveries_per_s"].as_f64().unwrap())
        .collect();
    assert!(d.iter().all(|&x| x > 0.0), "{d:?}");
    let ratio = c["ratios"]["relay_over_baseline_deliveries"]
        .as_f64()
        .unwrap();
    assert!((ratio - d[0] / d[1]).abs() < 1e-6 * ratio.max(1.0));
    for r in rows {
        assert_eq!(r["lost"], 0, "{r}");
    }
    for t in ["relay-1", "baseline-1", "limit-1"] {
        assert!(out.path().join(format!("{t}.json")).exists(), "{t}.json");
    }
}

#[test]
fn ingest_counts_every_line_for_relay_and_baseline() {
    relay_bin();
    let out = tempfile::tempdir().unwrap();
    let res = loadtest(&[
        "ingest",
        "--events",
        "5000",
        "--publishers",
        "2",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_success(&res);
    let reports = read_json(&out.path().join("ingest.json"));
    let rows = reports.as_array().unwrap();
    let targets: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["relay", "baseline"]);
    for r in rows {
        assert_eq!(
            (r["accepted"].as_u64(), r["rejected"].as_u64()),
            (Some(5000), Some(0)),
            "{r}"
        );
        assert!(
            r["accepted_per_server_cpu_s"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        assert!(r["rss_after"].as_u64().unwrap() > 0, "{r}");
    }
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(text.contains("relay/baseline"), "{text}");
}

/// A run whose subscribers the relay drops (a client queue far below what `--rate max`
/// piles up, a window too short to resume from) lost what they were owed: `--fail-on-loss`
/// fails it, however the subscribers ended. Attached without `--pid`, the summary says the
/// server's CPU and RSS were not measured instead of showing the harness's own.
#[test]
fn a_run_whose_subscribers_were_dropped_fails_on_loss() {
    let dir = tempfile::tempdir().unwrap();
    let token = krux_relay::auth::TokenStore::new(dir.path())
        .create("harness-test")
        .unwrap();
    let ready = dir.path().join("ready.json");
    let mut child = Command::new(relay_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ingest",
            "127.0.0.1:0",
        ])
        .args([
            "--admin",
            "127.0.0.1:0",
            "--client-queue",
            "4KiB",
            "--replay",
            "50",
        ])
        .arg("--ready-file")
        .arg(&ready)
        .env("KRUX_DATA_DIR", dir.path())
        .env("KRUX_LOG", "error")
        .spawn()
        .unwrap();
    let info = wait_ready_file(&mut child, &ready, "relay", Duration::from_secs(10)).unwrap();
    let addr = |k: &str| ready_addr(&info, k).unwrap().to_string();
    let out = tempfile::tempdir().unwrap();
    let (ws, ingest) = (addr("ws"), addr("ingest"));
    let res = loadtest(&[
        "run",
        "--ws",
        &ws,
        "--ingest",
        &ingest,
        "--token",
        &token,
        "--subscribers",
        "50",
        "--rate",
        "max",
        "--window",
        "20000",
        "--warmup",
        "300ms",
        "--duration",
        "2s",
        "--fail-on-loss",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    // The same run as a plan: its `loss == 0` fails it with 99, and the report says so
    // with the value seen. The command line's attach flags win over the plan's spawn.
    let plan = out.path().join("broken.toml");
    let scenario = "[target]\nspawn = \"relay\"\n\n[[scenario]]\nname = \"broken\"\nsubscribers = 50\nrate = \"max\"\nwindow = 20000\nwarmup = \"300ms\"\nduration = \"2s\"\n";
    std::fs::write(
        &plan,
        format!("{scenario}thresholds = [\"loss == 0\", \"lost == 0\"]\n"),
    )
    .unwrap();
    let bad = loadtest(&["plan", plan.to_str().unwrap()]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "an unknown metric: the plan cannot run"
    );
    std::fs::write(
        &plan,
        format!("{scenario}thresholds = [\"loss == 0\", \"duplicates == 0\"]\n"),
    )
    .unwrap();
    let planned = loadtest(&[
        "plan",
        plan.to_str().unwrap(),
        "--ws",
        &ws,
        "--ingest",
        &ingest,
        "--token",
        &token,
        "--out",
        out.path().join("plan").to_str().unwrap(),
    ]);
    let _ = child.kill();
    let _ = child.wait();
    let said = String::from_utf8_lossy(&planned.stdout).into_owned();
    assert_eq!(
        planned.status.code(),
        Some(99),
        "{said}{}",
        String::from_utf8_lossy(&planned.stderr)
    );
    assert!(said.contains("FAIL loss == 0"), "{said}");
    let p = read_json(&out.path().join("plan/plan.json"));
    assert_eq!(p["passed"], false);
    let verdicts = &p["scenarios"][0]["thresholds"];
    assert_eq!(verdicts[0]["ok"], false);
    assert!(verdicts[0]["value"].as_f64().unwrap() > 0.0, "{verdicts}");
    assert_eq!(verdicts[1]["ok"], true);
    assert_eq!(
        p["target"]["ws"], ws,
        "the command line's target, not the plan's spawn"
    );

    let text =
        String::from_utf8_lossy(&res.stdout).into_owned() + &String::from_utf8_lossy(&res.stderr);
    let r = read_json(&out.path().join("run.json"));
    // Dropped in the warm-up or in the window: the report keeps the two apart.
    let count = |key: &str| -> u64 {
        r[key]
            .as_object()
            .unwrap()
            .values()
            .filter_map(Value::as_u64)
            .sum()
    };
    let closed = count("closes_by_code") + count("warmup_closes_by_code");
    assert!(closed > 0, "the relay dropped no subscriber: {text}");
    let lost = r["lost"].as_u64().unwrap() + r["warmup_lost"].as_u64().unwrap();
    assert!(lost > 0, "{text}");
    assert!(
        !res.status.success(),
        "a run that lost events passed: {text}"
    );
    assert_eq!(r["server_measured"], false);
    assert!(text.contains("not measured"), "{text}");
}

/// A plan that holds: exit 0, every threshold in the report with its value; run again
/// into the same directory, it writes beside the first report instead of over it.
#[test]
fn a_passing_plan_exits_0_and_never_overwrites_a_report() {
    relay_bin();
    let out = tempfile::tempdir().unwrap();
    let plan = out.path().join("ok.toml");
    std::fs::write(
        &plan,
        "[target]\nspawn = \"relay\"\n\n[[scenario]]\nname = \"steady\"\nsubscribers = 30\nrate = 500\nwarmup = \"300ms\"\nduration = \"1s\"\nthresholds = [\"loss == 0\", \"deliveries_per_s > 1000\", \"latency_p99_ms < 1000\", \"closes == 0\"]\n\n[[scenario]]\nname = \"filtered\"\nsubscribers = 20\nfilters = \"type=50,agent=50\"\nrate = 500\nwarmup = \"300ms\"\nduration = \"1s\"\nthresholds = [\"loss == 0\"]\n",
    )
    .unwrap();
    let dir = out.path().join("reports");
    for (i, expect) in [(1, "reports"), (2, "reports-2")] {
        let res = loadtest(&[
            "plan",
            plan.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert_success(&res);
        let p = read_json(&out.path().join(expect).join("plan.json"));
        assert_eq!(p["passed"], true, "run {i}");
        let names: Vec<&str> = p["scenarios"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["steady", "filtered"]);
        for v in p["scenarios"][0]["thresholds"].as_array().unwrap() {
            assert_eq!(v["ok"], true, "{v}");
            assert!(v["value"].is_number(), "{v}");
        }
        let steady = read_json(&out.path().join(expect).join("steady.json"));
        assert_eq!(steady["lost"], 0);
        assert_eq!(steady["server_measured"], true);
        let csv = std::fs::read_to_string(out.path().join(expect).join("steady.csv")).unwrap();
        assert!(
            csv.starts_with("t_s,subscribers,events_per_s,deliveries_per_s,p99_us,marks\n")
                && csv.lines().count() > 1
        );
    }
    // The two runs side by side.
    let a = out.path().join("reports/steady.json");
    let b = out.path().join("reports-2/steady.json");
    let diff = loadtest(&["diff", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_success(&diff);
    let table = String::from_utf8_lossy(&diff.stdout);
    assert!(
        table.contains("deliveries/s") && table.contains("B/A"),
        "{table}"
    );
}

/// A scenario may bring its own target (`spawn = "baseline"`) and run as `compare`,
/// judged on the relay's median round and the ratios.
#[test]
fn a_plan_compares_servers_and_gives_a_scenario_its_own_target() {
    relay_bin();
    let (_tmp, dir, res) = run_plan_file(
        "[target]\nspawn = \"relay\"\n\n[[scenario]]\nname = \"versus\"\ncompare = 1\nsubscribers = 20\nrate = 300\nwarmup = \"300ms\"\nduration = \"1s\"\nthresholds = [\"relay_over_limit_deliveries > 0.5\", \"loss == 0\"]\n\n[[scenario]]\nname = \"baseline-alone\"\nspawn = \"baseline\"\nsubscribers = 20\nrate = 300\nwarmup = \"300ms\"\nduration = \"1s\"\nthresholds = [\"loss == 0\"]\n",
    );
    assert_success(&res);
    let p = read_json(&dir.join("plan.json"));
    let versus = &p["scenarios"][0]["thresholds"];
    let ratio = versus[0]["value"].as_f64().unwrap();
    assert!(versus[0]["ok"] == true && ratio > 0.5, "{versus}");
    // One round of each server, and the medians beside them.
    for f in [
        "relay-1.json",
        "baseline-1.json",
        "limit-1.json",
        "compare.json",
    ] {
        assert!(dir.join("versus").join(f).exists(), "no {f}");
    }
    let judged = read_json(&dir.join("versus.json"));
    assert_eq!(judged["target"], "relay");
    assert_eq!(
        judged["ratios"]["relay_over_limit_deliveries"].as_f64(),
        Some(ratio)
    );
    let alone = read_json(&dir.join("baseline-alone.json"));
    assert_eq!(alone["target"], "baseline", "the scenario's own target");
    assert_eq!(alone["lost"], 0);
}

/// A plan with stages: subscribers and the rate ramp as written, the subscribers that
/// joined and left during the window are each owed what was published while they were
/// subscribed, and nothing is lost.
#[test]
fn a_plan_with_stages_ramps_subscribers_and_rate_as_written() {
    relay_bin();
    let (_tmp, dir, res) = run_plan_file(
        "[target]\nspawn = \"relay\"\n\n[[scenario]]\nname = \"ramp\"\nsubscribers = 10\nfilters = \"all=2,type=1,agent=1\"\nrate = 100\nwarmup = \"500ms\"\nstages = [\"2s:40:300\", \"1s:40\", \"2s:20:200\"]\nthresholds = [\"loss == 0\", \"duplicates == 0\", \"closes == 0\"]\n",
    );
    let text =
        String::from_utf8_lossy(&res.stdout).into_owned() + &String::from_utf8_lossy(&res.stderr);
    assert_success(&res);
    let r = read_json(&dir.join("ramp.json"));
    let points = r["timeline"].as_array().unwrap();
    let at = |i: usize, key: &str| points[i][key].as_f64().unwrap();
    assert_eq!(points.len(), 5, "{text}");
    // 10 → 40 over 2 s, 40 for 1 s, 40 → 20 over 2 s: read at the end of each second.
    let subs: Vec<f64> = (0..5).map(|i| at(i, "subscribers")).collect();
    assert!((20.0..=30.0).contains(&subs[0]), "{subs:?}");
    assert_eq!((subs[1], subs[2]), (40.0, 40.0), "{subs:?}");
    assert!((25.0..=35.0).contains(&subs[3]), "{subs:?}");
    assert_eq!(subs[4], 20.0, "{subs:?}");
    // Events/s: 100 → 300 over the first 2 s, 300 in the third second.
    let rate: Vec<f64> = (0..5).map(|i| at(i, "events_per_s")).collect();
    assert!(
        rate[0] < rate[2] && (240.0..=360.0).contains(&rate[2]),
        "{rate:?}"
    );
    assert!(
        points[0]["marks"][0]
            .as_str()
            .unwrap()
            .starts_with("stage 1: to 40 subscribers, 300 events/s"),
        "{points:?}"
    );
    // Who joined (and stayed) and who left was owed something, and got it.
    let health = r["by_health"].as_object().unwrap();
    for group in ["left", "joined"] {
        let g = &health
            .get(group)
            .unwrap_or_else(|| panic!("no {group}: {health:?}"));
        assert!(g["expected"].as_u64().unwrap() > 0, "{group}: {g}");
        assert_eq!(g["lost"], 0, "{group}: {g}");
    }
    assert_eq!(r["loss_unknown"], false);
    assert_eq!(r["lost"], 0);
}

/// Ctrl-C in the middle of a run: the load stops, the run drains, and the summary and the
/// report are still written (exit 130). While it ran, a progress line came every second
/// (stderr is not a terminal here).
#[test]
fn an_interrupted_run_still_reports_and_progress_came_while_it_ran() {
    relay_bin();
    let out = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_krux-loadtest"))
        .args([
            "run",
            "--spawn",
            "relay",
            "--subscribers",
            "20",
            "--rate",
            "300",
        ])
        .args(["--warmup", "300ms", "--duration", "60s", "--out"])
        .arg(out.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Past connecting and warm-up, and a few seconds into the window.
    std::thread::sleep(Duration::from_secs(4));
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    let res = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the run ended within 30 s of Ctrl-C, not at its 60 s");
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "{stdout}{stderr}");
    assert!(stdout.contains("deliveries/s out"), "the summary: {stdout}");
    let r = read_json(&out.path().join("run.json"));
    assert_eq!(r["interrupted"], true);
    assert_eq!(r["lost"], 0, "drained before reporting");
    let measured = r["measured_s"].as_f64().unwrap();
    assert!(measured > 1.0 && measured < 30.0, "{measured}");
    let progress = stderr
        .lines()
        .filter(|l| l.contains(" s, 20 subscribers, "))
        .count();
    assert!(progress >= 2, "progress lines:\n{stderr}");
}

/// The command line says what it needs: a worker's help, TLS to a running relay without a
/// certificate to trust, an unreachable address named, and `compare` refusing the attach
/// flags it would ignore.
#[test]
fn the_command_line_says_what_it_needs() {
    let help = loadtest(&["worker", "--help"]);
    assert_success(&help);
    assert!(String::from_utf8_lossy(&help.stdout).contains("internal"));
    let err = |args: &[&str]| {
        let out = loadtest(args);
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let tls = err(&["run", "--tls", "--token", "t", "--ws", "127.0.0.1:9"]);
    assert!(tls.contains("needs --ca-cert"), "{tls}");
    let refused = err(&[
        "run",
        "--token",
        "t",
        "--ws",
        "127.0.0.1:9",
        "--ingest",
        "127.0.0.1:9",
        "--subscribers",
        "1",
        "--warmup",
        "0s",
        "--duration",
        "1s",
    ]);
    assert!(refused.contains("127.0.0.1:9"), "{refused}");
    let compare = err(&["compare", "--ws", "127.0.0.1:9", "--rounds", "1"]);
    assert!(
        compare.contains("--ws are for `run` and `plan`"),
        "{compare}"
    );
}
