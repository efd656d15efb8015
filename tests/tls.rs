//! wss:// with the relay's self-signed certificate trusted by the client.

mod common;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn client_trusting(pem: &std::path::Path) -> tokio_tungstenite::Connector {
    tokio_tungstenite::Connector::Rustls(
        krux_relay::io::certs::client_config_trusting(pem).unwrap(),
    )
}

#[tokio::test]
async fn wss_with_a_trusted_self_signed_certificate() {
    let relay = Relay::start_with(&["--tls-self-signed"]).await;
    let pem = relay.data_dir().join("tls-self-signed.pem");
    let url = format!(
        "wss://127.0.0.1:{}/events?type=health_alert,approval_requested",
        relay.ws.port()
    );
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", relay.token).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        false,
        Some(client_trusting(&pem)),
    )
    .await
    .expect("TLS handshake and upgrade");

    // A client that does not trust the certificate fails the handshake.
    let untrusted =
        tokio_tungstenite::connect_async(format!("wss://127.0.0.1:{}/events", relay.ws.port()))
            .await;
    assert!(untrusted.is_err());
    // Plain ws:// to a TLS port gets no upgrade.
    let plain = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_tungstenite::connect_async(format!(
            "ws://{}/events?access_token={}",
            relay.ws, relay.token
        )),
    )
    .await
    .expect("the relay gives up on a non-TLS client");
    assert!(plain.is_err());

    relay.publish(SEED).await;
    let mut types = Vec::new();
    while types.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => {
                types.push(serde_json::from_str::<serde_json::Value>(&t).unwrap()["type"].clone())
            }
            _ => continue,
        }
    }
    assert_eq!(types, ["approval_requested", "health_alert"]);

    // Large frames (many TLS records, partial writes) arrive intact.
    let big = format!(
        r#"{{"type":"health_alert","agent":null,"data":{{"component":"disk","severity":"warning","message":"{}","threshold":"80%"}}}}"#,
        "m".repeat(200_000)
    );
    relay.publish(&big).await;
    loop {
        if let Message::Text(t) = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            assert_eq!(v["data"]["message"].as_str().unwrap().len(), 200_000);
            break;
        }
    }

    // `tail` over wss:// with --ca-cert.
    let out = std::process::Command::new(bin())
        .args([
            "tail",
            "--url",
            &format!("wss://127.0.0.1:{}", relay.ws.port()),
            "--ca-cert",
            pem.to_str().unwrap(),
        ])
        .args(["--since", "0", "--count", "11", "--json"])
        .env("KRUX_TOKEN", &relay.token)
        .output()
        .unwrap();
    assert_success(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 11);
}
