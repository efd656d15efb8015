//! Operator passphrase, failure rate limit, connection cap, keepalive, and secrets kept
//! out of logs — over real sockets.

mod common;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

const PASS: &str = "correct horse battery staple";

fn set_passphrase(relay: &Relay, pass: &str) {
    let mut child = Command::new(bin())
        .args(["passphrase", "set"])
        .env("KRUX_DATA_DIR", relay.data_dir())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{pass}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_success(&out);
}

fn passphrase_query(pass: &str) -> String {
    format!("/events?passphrase={}", pass.replace(' ', "+"))
}

async fn status_of(relay: &Relay, target: &str) -> (u16, String, String) {
    raw_http(relay.ws, &upgrade_request(target, "")).await
}

#[tokio::test]
async fn operator_passphrase_sessions_and_failure_limit() {
    let relay = Relay::start().await;
    // No passphrase set yet: refused.
    assert_eq!(status_of(&relay, &passphrase_query(PASS)).await.0, 401);
    set_passphrase(&relay, PASS);
    let stored = std::fs::read_to_string(relay.data_dir().join("passphrase")).unwrap();
    assert!(stored.starts_with("$argon2id$") && !stored.contains("horse"));

    // Accepted within 1 s, without a restart (the server polls its data dir every 250 ms;
    // polling here would itself count as failed attempts).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let url = format!("ws://{}{}", relay.ws, passphrase_query(PASS));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("passphrase accepted");
    relay.publish(SEED.lines().next().unwrap()).await;
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5)).await["type"],
        "capability_invoked"
    );

    // A storm of reconnects with the right passphrase stays cheap and succeeds.
    for _ in 0..20 {
        assert_eq!(status_of(&relay, &passphrase_query(PASS)).await.0, 101);
    }

    // Wrong ones: 401, then 429 with Retry-After for this address — even for the right one.
    // Five failures per minute are allowed; the attempt before the passphrase existed was one.
    for _ in 0..4 {
        let (status, _, body) = status_of(&relay, &passphrase_query("wrong guess here")).await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, head, body) = status_of(&relay, &passphrase_query("wrong guess here")).await;
    assert_eq!(status, 429, "{body}");
    assert!(head.contains("Retry-After: "), "{head}");
    assert_eq!(status_of(&relay, &passphrase_query(PASS)).await.0, 429);
    // User tokens are not affected by the passphrase limit.
    assert!(relay.try_subscribe("", Some(&relay.token)).await.is_ok());

    // Changing the passphrase ends the sessions opened with the old one (1008).
    set_passphrase(&relay, "a whole new passphrase");
    let (code, _) = close_code(&mut ws, Duration::from_secs(3)).await;
    assert_eq!(code, 1008);
}

#[tokio::test]
async fn connection_cap_answers_503_with_retry_after() {
    let relay = Relay::start_with(&["--max-connections", "2"]).await;
    let _a = relay.subscribe("").await;
    let _b = relay.subscribe("").await;
    let bearer = format!("Authorization: Bearer {}\r\n", relay.token);
    let (status, head, body) = raw_http(relay.ws, &upgrade_request("/events", &bearer)).await;
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("Retry-After: 1"), "{head}");
    drop(_a);
    // Once one leaves, there is room again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw_http(relay.ws, &upgrade_request("/events", &bearer))
        .await
        .0
        != 101
    {
        assert!(Instant::now() < deadline, "no room after a subscriber left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn keepalive_drops_silent_peers_and_keeps_answering_ones() {
    let relay = Relay::start_with(&["--ping-interval", "300ms", "--read-timeout", "1s"]).await;
    // A peer that reads but never answers pings (a hung tool, or a half-open connection).
    let mut silent = raw_subscribe(&relay, "", None).await;
    // A normal client: tungstenite answers pings as long as it keeps reading.
    let mut live = relay.subscribe("").await;
    let reader = tokio::spawn(async move { next_event(&mut live, Duration::from_secs(10)).await });
    let started = Instant::now();
    let (events, close) = tokio::time::timeout(
        Duration::from_secs(5),
        read_raw_frames(&mut silent, usize::MAX),
    )
    .await
    .expect("the silent peer is dropped");
    assert!(events.is_empty());
    assert_eq!(close.map(|c| c.0), Some(1001));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The answering client, connected as long as the silent one was, is still subscribed
    // after the read timeout and several ping intervals (the shard's tests cover pongs).
    relay.publish(SEED.lines().next().unwrap()).await;
    assert_eq!(reader.await.unwrap()["type"], "capability_invoked");
    let _ = silent.shutdown().await;
}

#[tokio::test]
async fn secrets_stay_out_of_logs_and_metrics() {
    let relay = Relay::start_logged(&[]).await;
    set_passphrase(&relay, PASS);
    let token = relay.token.clone();
    // Give the passphrase a moment to load, then use every credential form.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _ = status_of(
        &relay,
        &format!("/events?access_token={token}&type=health_alert"),
    )
    .await;
    let _ = status_of(&relay, &passphrase_query(PASS)).await;
    let _ = status_of(
        &relay,
        "/events?access_token=krx_user_notvalidbutsecret0123456789",
    )
    .await;
    // Names the parser decodes authenticate, so they are redacted too.
    for encoded in [
        format!("/events?access%5Ftoken={token}"),
        format!("/events?%61ccess_token={token}"),
        format!("/events?pass%70hrase={}", PASS.replace(' ', "+")),
    ] {
        assert_eq!(status_of(&relay, &encoded).await.0, 101, "{encoded}");
    }
    let m = metrics(&relay).await;
    let log = std::fs::read_to_string(relay.data_dir().join("relay.log")).unwrap();
    assert!(
        log.contains("access_token=<redacted>"),
        "requests are logged, redacted:\n{log}"
    );
    for secret in [token.as_str(), "horse", "notvalidbutsecret"] {
        assert!(!log.contains(secret), "log leaks {secret}");
        assert!(!m.contains(secret), "metrics leak {secret}");
    }
}

/// `--log-format json`: every log line is one JSON object; the start-up line names every
/// address, the backend, the reactors and the limits, and no line holds a credential.
#[tokio::test]
async fn json_logs_are_objects_with_a_complete_start_up_line_and_no_secret() {
    let relay = Relay::start_logged(&["--log-format", "json", "--client-queue", "2MiB"]).await;
    let token = relay.token.clone();
    let _ = status_of(&relay, &format!("/events?access_token={token}")).await;
    let _ = status_of(
        &relay,
        "/events?access_token=krx_user_notvalidbutsecret0123456789",
    )
    .await;
    let log = std::fs::read_to_string(relay.data_dir().join("relay.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let up = lines
        .iter()
        .find(|l| l["message"] == "krux-relay is up")
        .unwrap_or_else(|| panic!("no start-up line in {log}"));
    assert_eq!(up["level"], "INFO");
    assert_eq!(up["ws"], relay.ws.to_string());
    assert_eq!(up["ingest"], relay.ingest.to_string());
    assert_eq!(up["admin"], relay.admin.to_string());
    assert_eq!(up["client_queue"], 2 * 1024 * 1024);
    for field in [
        "io",
        "reactors",
        "tls",
        "max_connections",
        "max_frame",
        "replay",
        "replay_memory",
    ] {
        assert!(!up[field].is_null(), "start-up line lacks {field}: {up}");
    }
    for secret in [token.as_str(), "notvalidbutsecret"] {
        assert!(!log.contains(secret), "log leaks {secret}");
    }
}

#[tokio::test]
async fn slow_and_oversized_request_heads_are_cut_off() {
    let relay = Relay::start_with(&["--handshake-timeout", "500ms"]).await;
    // Slowloris: half a head, then nothing.
    let mut s = tokio::net::TcpStream::connect(relay.ws).await.unwrap();
    s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // A head over 8 KiB.
    let big = format!(
        "GET /events HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(9000)
    );
    let (status, _, body) = raw_http(relay.ws, &big).await;
    assert_eq!(status, 431, "{body}");
}

#[tokio::test]
async fn the_dashboards_files_carry_their_security_headers() {
    let relay = Relay::start().await;
    for path in ["/", "/dashboard.js", "/krux-client.js"] {
        let (status, head, body) =
            raw_http(relay.ws, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        assert_eq!(status, 200, "{path}");
        assert!(!body.is_empty());
        let head = head.to_ascii_lowercase();
        for h in [
            "content-security-policy: default-src 'none'; script-src 'self';",
            "frame-ancestors 'none'",
            "x-content-type-options: nosniff",
            "referrer-policy: no-referrer",
        ] {
            assert!(head.contains(h), "{path} lacks {h}:\n{head}");
        }
    }
}

/// A page of another site that the operator visits cannot open `/events` in their name:
/// its upgrades get 403 before any credential is checked, so its wrong passphrases never
/// count against the operator's address. The dashboard's own origin and
/// `--allowed-origin` are let in; clients without `Origin` are unaffected.
#[tokio::test]
async fn a_page_from_another_site_cannot_subscribe_or_lock_the_operator_out() {
    let relay = Relay::start_with(&["--allowed-origin", "https://dash.example"]).await;
    set_passphrase(&relay, PASS);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let port = relay.ws.port();
    let from = |origin: &str| format!("Host: 127.0.0.1:{port}\r\nOrigin: {origin}\r\n");
    for _ in 0..10 {
        let req = upgrade_request(
            &passphrase_query("wrong guess here"),
            &from("https://evil.example"),
        );
        let (status, _, body) = raw_http(relay.ws, &req).await;
        assert_eq!(status, 403, "{body}");
    }
    let bearer = format!("Authorization: Bearer {}\r\n", relay.token);
    let evil = upgrade_request("/events", &(from("https://evil.example") + &bearer));
    assert_eq!(
        raw_http(relay.ws, &evil).await.0,
        403,
        "even with a valid token"
    );
    // The operator, from the dashboard's own origin, is not locked out.
    let own = from(&format!("http://127.0.0.1:{port}"));
    let req = upgrade_request(&passphrase_query(PASS), &own);
    assert_eq!(raw_http(relay.ws, &req).await.0, 101);
    let req = upgrade_request("/events", &(from("https://dash.example") + &bearer));
    assert_eq!(raw_http(relay.ws, &req).await.0, 101);
    // No Origin: a CLI or a bridge.
    assert_eq!(status_of(&relay, &passphrase_query(PASS)).await.0, 101);
}

/// The admin port against slow and piled-up connections: a head dribbled a byte at a
/// time gets 408 at the 5 s deadline (it used to stay open for as long as bytes came),
/// and past 64 open connections the next is answered 503 at once; once they go, scrapes
/// work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_cuts_off_slow_requests_and_caps_its_connections() {
    use tokio::io::AsyncReadExt;
    let relay = Relay::start().await;
    let mut slow = tokio::net::TcpStream::connect(relay.admin).await.unwrap();
    let started = Instant::now();
    let dribble = async {
        for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
            .iter()
            .cycle()
            .take(40)
        {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let mut answer = String::new();
        let _ = slow.read_to_string(&mut answer).await;
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(20), dribble)
        .await
        .expect("the admin port ended the slow request");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(16),
        "{took:?}: 40 dribbled bytes kept it open"
    );

    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(relay.admin).await.unwrap());
    }
    // Let the relay accept all 64 before the next.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, head, _) = raw_http(relay.admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("Retry-After: 1"), "{head}");
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw_http(relay.admin, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "the admin port stayed full");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
