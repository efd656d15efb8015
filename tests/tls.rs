//! wss:// with the relay's self-signed certificate trusted by the client.

mod common;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Opens `wss://…/events?{query}` with the relay's token as a bearer and `config`'s
/// trust; the handshake must end within 10 s.
async fn connect_tls(
    relay: &Relay,
    query: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let url = format!("wss://127.0.0.1:{}/events?{query}", relay.ws.port());
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", relay.token).parse().unwrap(),
    );
    let connector = tokio_tungstenite::Connector::Rustls(config);
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector)),
    )
    .await
    .expect("the handshake ends")
    .map(|(ws, _)| ws)
}

#[tokio::test]
async fn wss_with_a_trusted_self_signed_certificate() {
    let relay = Relay::start_with(&["--tls-self-signed"]).await;
    let pem = relay.data_dir().join("tls-self-signed.pem");
    let trust = krux_relay::io::certs::client_config_trusting(&pem).unwrap();
    let mut ws = connect_tls(&relay, "type=health_alert,approval_requested", trust)
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

/// A fresh self-signed certificate and key for localhost/127.0.0.1, as PEM.
fn pair() -> (String, String) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    (ck.cert.pem(), ck.key_pair.serialize_pem())
}

/// Replaces `path`'s content the way a renewal tool does: a new file renamed over it.
fn replace(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn der(pem: &str) -> Vec<u8> {
    let first = rustls_pemfile::certs(&mut pem.as_bytes()).next();
    first.unwrap().unwrap().to_vec()
}

/// Subscribes over wss:// with `config`; returns the stream and the certificate the
/// relay presented (for a resumed session: the one of the session it resumed), and
/// whether the session was resumed.
async fn subscribe_tls(
    relay: &Relay,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> (Ws, Vec<u8>, bool) {
    let ws = connect_tls(relay, "", config)
        .await
        .expect("TLS handshake and upgrade");
    let tokio_tungstenite::MaybeTlsStream::Rustls(tls) = ws.get_ref() else {
        panic!("not TLS")
    };
    let tls = tls.get_ref().1;
    let cert = tls.peer_certificates().unwrap()[0].to_vec();
    let resumed = tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    (ws, cert, resumed)
}

async fn next_event(ws: &mut Ws) -> serde_json::Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            _ => continue,
        }
    }
}

/// Polls `f` every 100 ms for up to 10 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 10 s: {what}");
}

#[tokio::test]
async fn renewed_certificate_files_serve_new_handshakes_without_a_restart() {
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    let (a, b, c) = (pair(), pair(), pair());
    replace(&cert, &a.0);
    replace(&key, &a.1);
    let bundle = files.path().join("trust.pem");
    std::fs::write(&bundle, [&a.0, &b.0, &c.0].map(|s| s.as_str()).concat()).unwrap();
    let resuming = krux_relay::io::certs::client_config_trusting(&bundle).unwrap();
    // Probes that see the certificate: a resumed session would show the session's.
    let mut trust = (*resuming).clone();
    trust.resumption = rustls::client::Resumption::disabled();
    let trust = std::sync::Arc::new(trust);
    let relay = Relay::start_logged(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;

    let (mut old_stream, seen, _) = subscribe_tls(&relay, resuming.clone()).await;
    assert_eq!(seen, der(&a.0));
    // A second connection resumes the session with the ticket the first one got.
    let (_, _, resumed) = subscribe_tls(&relay, resuming.clone()).await;
    assert!(resumed, "the relay's ticket resumes the session");
    let scrape = metrics(&relay).await;
    let tls_handshakes = |kind: &str| {
        metric_value(
            &scrape,
            &format!("krux_tls_handshakes_total{{kind=\"{kind}\"}}"),
        )
    };
    assert_eq!(
        (tls_handshakes("full"), tls_handshakes("resumed")),
        (Some(1), Some(1))
    );

    // Renewal: the certificate first, its key a moment later (a mismatched pair between).
    replace(&cert, &b.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    replace(&key, &b.1);
    eventually(
        "a new handshake presents the renewed certificate",
        || async { subscribe_tls(&relay, trust.clone()).await.1 == der(&b.0) },
    )
    .await;
    assert!(
        relay.log().contains("TLS certificate not replaced"),
        "the half-renewed pair was refused: {}",
        relay.log()
    );
    // The stream from before the renewal still flows.
    relay.publish(SEED).await;
    assert!(next_event(&mut old_stream).await["seq"].as_u64().is_some());

    // A broken pair is refused, named, and the one in service stays.
    replace(
        &key,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    eventually("the broken key is refused and named", || async {
        relay
            .log()
            .lines()
            .any(|l| l.contains("not replaced") && l.contains("key.pem"))
    })
    .await;
    assert_eq!(subscribe_tls(&relay, trust.clone()).await.1, der(&b.0));

    // SIGHUP reloads at once (and does not end the relay).
    replace(&cert, &c.0);
    replace(&key, &c.1);
    let st = std::process::Command::new("kill")
        .args(["-HUP", &relay.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    eventually("SIGHUP puts the new pair into service", || async {
        subscribe_tls(&relay, trust.clone()).await.1 == der(&c.0)
    })
    .await;
    assert!(
        !relay.log().contains("not a key"),
        "no key material is logged"
    );
}

#[tokio::test]
async fn tls13_only_refuses_tls12_clients_that_the_default_accepts() {
    for only13 in [false, true] {
        let mut flags = vec!["--tls-self-signed"];
        if only13 {
            flags.push("--tls13-only");
        }
        let relay = Relay::start_with(&flags).await;
        let pem = std::fs::read(relay.data_dir().join("tls-self-signed.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &pem[..]) {
            roots.add(c.unwrap()).unwrap();
        }
        let tls12 = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let res = connect_tls(&relay, "", std::sync::Arc::new(tls12)).await;
        assert_eq!(res.is_ok(), !only13, "TLS 1.2 with --tls13-only={only13}");
        if let Ok(mut ws) = res {
            relay.publish(SEED).await;
            assert!(next_event(&mut ws).await["seq"].as_u64().is_some());
        }
    }
}
