//! Every refusal of port 7701 over real sockets, and live token create/revoke.

mod common;
use std::time::{Duration, Instant};

use common::*;

const AGENT_TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn http_answers_follow_the_contract() {
    let relay = Relay::start().await;
    let bearer = format!("Authorization: Bearer {}\r\n", relay.token);
    let cases: Vec<(String, u16, &str)> = vec![
        (upgrade_request("/elsewhere", &bearer), 404, "/events"),
        (
            "GET /events HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            426,
            "WebSocket",
        ),
        (upgrade_request("/events", ""), 401, "required"),
        (
            upgrade_request(
                "/events",
                "Authorization: Bearer krx_user_notarealtokennotarealtoken12345\r\n",
            ),
            401,
            "not valid",
        ),
        (
            upgrade_request("/events?passphrase=guess", ""),
            401,
            "not valid",
        ),
        (
            upgrade_request(
                "/events",
                &format!("Authorization: Bearer {AGENT_TOKEN}\r\n"),
            ),
            403,
            "port 7700",
        ),
        (
            upgrade_request(&format!("/events?access_token={AGENT_TOKEN}"), ""),
            403,
            "port 7700",
        ),
        (
            upgrade_request("/events?type=capability_invokd", &bearer),
            400,
            "valid types are: capability_invoked, capability_result",
        ),
        (
            upgrade_request("/events?agent=", &bearer),
            400,
            "empty value",
        ),
        (upgrade_request("/events?since=abc", &bearer), 400, "since"),
    ];
    for (req, status, needle) in cases {
        let (got, head, body) = raw_http(relay.ws, &req).await;
        assert_eq!(got, status, "{req}\n{head}\n{body}");
        assert!(body.contains(needle), "{status}: {body}");
        assert_eq!(body.trim_end().lines().count(), 1, "one sentence: {body}");
        if status == 401 {
            assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
        }
        assert!(!body.contains(&relay.token), "no secret in bodies");
    }
    // access_token in the query works like the header.
    let (got, _, _) = raw_http(
        relay.ws,
        &upgrade_request(&format!("/events?access_token={}", relay.token), ""),
    )
    .await;
    assert_eq!(got, 101);
}

#[tokio::test]
async fn tokens_created_and_revoked_while_running() {
    let relay = Relay::start().await;
    let new_token = create_token(relay.data_dir(), "late");
    let created = Instant::now();
    // Accepted within 1 s of creation (the contract's bound), without a restart.
    let mut ws = loop {
        match relay.try_subscribe("", Some(&new_token)).await {
            Ok(ws) => break ws,
            Err((401, _)) if created.elapsed() < Duration::from_secs(1) => {
                tokio::time::sleep(Duration::from_millis(25)).await
            }
            Err(e) => panic!("new token refused after {:?}: {e:?}", created.elapsed()),
        }
    };
    relay.publish(SEED.lines().next().unwrap()).await;
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5)).await["type"],
        "capability_invoked"
    );

    let out = relay.cli(&["user-token", "list"]);
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.contains("late") && listing.contains("test"),
        "{listing}"
    );
    assert!(!listing.contains("krx_user_"), "list never shows tokens");

    let out = relay.cli(&["user-token", "revoke", "late"]);
    assert!(out.status.success());
    let revoked = Instant::now();
    // The open stream is closed with 1008, and new connections are refused, within 1 s.
    let (code, _) = close_code(&mut ws, Duration::from_secs(2)).await;
    assert_eq!(code, 1008);
    loop {
        match relay.try_subscribe("", Some(&new_token)).await {
            Err((401, _)) => break,
            Ok(_) if revoked.elapsed() < Duration::from_secs(1) => {
                tokio::time::sleep(Duration::from_millis(25)).await
            }
            other => panic!(
                "revoked token still accepted after {:?}: {:?}",
                revoked.elapsed(),
                other.map(|_| ())
            ),
        }
    }
    assert!(
        revoked.elapsed() < Duration::from_millis(1500),
        "{:?}",
        revoked.elapsed()
    );
    // Other tokens are unaffected.
    assert!(relay.try_subscribe("", Some(&relay.token)).await.is_ok());
}
