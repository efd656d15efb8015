//! A node joins a secured NATS: every way NATS authenticates (users, token, nkey, a
//! `.creds` file in operator mode, TLS with a private CA, mutual TLS), against a real
//! nats-server configured for it. With the right credentials the node becomes ready and
//! the credential commands work; with wrong ones `serve` exits non-zero at start naming
//! the cause; no secret shows in its logs or in `config`.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::nats::Nats;
use common::*;

/// How a test node is told its credentials: `--nats` URL and the other flags.
struct Creds {
    url: String,
    flags: Vec<String>,
}

impl Creds {
    fn args(&self) -> Vec<&str> {
        let mut a = vec!["--nats", self.url.as_str()];
        a.extend(self.flags.iter().map(String::as_str));
        a
    }
}

/// `serve` with `creds`, expected to fail at start: its output, within 15 s.
fn serve_fails(creds: &Creds) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(bin())
        .arg("serve")
        .args(ANY_PORTS)
        .args(creds.args())
        .env("KRUX_DATA_DIR", dir.path())
        .env("KRUX_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish_within(
        child,
        Duration::from_secs(15),
        "serve with wrong credentials",
    );
    assert!(
        !out.status.success(),
        "serve started with wrong credentials"
    );
    out
}

/// A node with `creds` (debug logs in its data dir), ready within 15 s.
async fn node_with(creds: &Creds) -> Relay {
    let relay = Relay::start_logged(&creds.args()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.readyz().await != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready: {}",
            std::fs::read_to_string(relay.data_dir().join("relay.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The whole check for one way of authenticating: `good` joins, `user-token create`
/// works with it, and publishing through the node reaches its subscriber; `bad` fails
/// `serve` and the command at start with a message holding `cause`; none of `secrets`
/// appears in the node's debug log, in any output, or in `config`.
async fn check(good: Creds, bad: Creds, cause: &str, secrets: &[&str]) {
    let hidden = |what: &str, s: &str| {
        for secret in secrets {
            assert!(
                !s.contains(secret),
                "{what} shows a secret ({secret}):\n{s}"
            );
        }
    };
    let failed = serve_fails(&bad);
    let err = text(&failed.stderr);
    assert!(err.contains(cause), "the cause ({cause}) is named:\n{err}");
    hidden("serve's error", &err);

    let command = |creds: &Creds, name: &str| {
        Command::new(bin())
            .args(["user-token", "create", "--name", name])
            .args(creds.args())
            .env("KRUX_DATA_DIR", tempfile::tempdir().unwrap().path())
            .output()
            .unwrap()
    };
    let refused = command(&bad, "nope");
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains(cause),
        "{}",
        text(&refused.stderr)
    );
    hidden("user-token's error", &text(&refused.stderr));

    // A name of its own on each call: a server may serve several checks.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "ops{}",
        CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let made = command(&good, &name);
    assert_success(&made);
    let token = text(&made.stdout).trim().to_string();
    let mut relay = node_with(&good).await;
    relay.token = token;
    let mut ws = {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match relay.try_subscribe("", Some(&relay.token)).await {
                Ok(ws) => break ws,
                Err((401, _)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("refused: {e:?}"),
            }
        }
    };
    wait_subscribers(&relay, 1).await;
    let replies = relay.publish(SEED).await;
    assert_eq!(replies.last().unwrap()["accepted"], 11, "{replies:?}");
    assert_eq!(take_events(&mut ws, 11).await.len(), 11);

    let config = Command::new(bin())
        .arg("config")
        .args(good.args())
        .output()
        .unwrap();
    assert_success(&config);
    hidden("config", &text(&config.stdout));
    let log = std::fs::read_to_string(relay.data_dir().join("relay.log")).unwrap();
    assert!(log.contains("NATS: connected"), "{log}");
    hidden("the node's debug log", &log);
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_with_passwords_in_the_url_or_from_a_file() {
    let conf = r#"authorization { users = [ { user: relay, password: "pw-s3cret-1" } ] }"#;
    let Some(nats) = Nats::start_with(conf, r#"{"user":"relay","pass":"pw-s3cret-1"}"#) else {
        return;
    };
    let at = |userinfo: &str| format!("nats://{userinfo}@127.0.0.1:{}", nats.port);
    check(
        Creds {
            url: at("relay:pw-s3cret-1"),
            flags: vec![],
        },
        Creds {
            url: at("relay:pw-wrong-9"),
            flags: vec![],
        },
        "authorization violation",
        &["pw-s3cret-1", "pw-wrong-9"],
    )
    .await;
    let files = tempfile::tempdir().unwrap();
    let good = write(files.path(), "good", "pw-s3cret-1\n");
    let bad = write(files.path(), "bad", "pw-wrong-9\n");
    let flags = |file: &str| {
        vec![
            "--nats-user".into(),
            "relay".into(),
            "--nats-password-file".into(),
            file.into(),
        ]
    };
    check(
        Creds {
            url: nats.url(),
            flags: flags(&good),
        },
        Creds {
            url: nats.url(),
            flags: flags(&bad),
        },
        "authorization violation",
        &["pw-s3cret-1", "pw-wrong-9"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_url_or_from_a_file() {
    let conf = r#"authorization { token: "tok-s3cret-2" }"#;
    let Some(nats) = Nats::start_with(conf, r#"{"auth_token":"tok-s3cret-2"}"#) else {
        return;
    };
    check(
        Creds {
            url: format!("nats://tok-s3cret-2@127.0.0.1:{}", nats.port),
            flags: vec![],
        },
        Creds {
            url: format!("nats://tok-wrong-8@127.0.0.1:{}", nats.port),
            flags: vec![],
        },
        "authorization violation",
        &["tok-s3cret-2", "tok-wrong-8"],
    )
    .await;
    let files = tempfile::tempdir().unwrap();
    let good = write(files.path(), "good", "tok-s3cret-2");
    let bad = write(files.path(), "bad", "tok-wrong-8");
    check(
        Creds {
            url: nats.url(),
            flags: vec!["--nats-token-file".into(), good],
        },
        Creds {
            url: nats.url(),
            flags: vec!["--nats-token-file".into(), bad],
        },
        "authorization violation",
        &["tok-s3cret-2", "tok-wrong-8"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_seed_from_a_file() {
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let conf = format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    );
    // `request` is never used here: the server wants a signed nonce.
    let Some(nats) = Nats::start_with(&conf, "{}") else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let (seed, other) = (user.seed().unwrap(), stranger.seed().unwrap());
    let good = write(files.path(), "user.nk", &seed);
    let bad = write(files.path(), "stranger.nk", &other);
    check(
        Creds {
            url: nats.url(),
            flags: vec!["--nats-nkey".into(), good],
        },
        Creds {
            url: nats.url(),
            flags: vec!["--nats-nkey".into(), bad],
        },
        "authorization violation",
        &[&seed, &other],
    )
    .await;
}

/// A JWT signed by `issuer` with `claims` (the `nats` part and the subject).
fn jwt(issuer: &nkeys::KeyPair, sub: &str, name: &str, nats: serde_json::Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{name}{iat}"),
        "iat": iat,
        "iss": issuer.public_key(),
        "sub": sub,
        "name": name,
        "nats": nats,
    });
    let body = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let sig = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", b64(&sig))
}

fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let system = nkeys::KeyPair::new_account();
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "krux-op",
        serde_json::json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let acc_jwt = jwt(
        &operator,
        &account.public_key(),
        "relays",
        serde_json::json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    let sys_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let user_jwt = |user: &nkeys::KeyPair, by: &nkeys::KeyPair| {
        jwt(
            by,
            &user.public_key(),
            "relay",
            serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
        )
    };
    let user = nkeys::KeyPair::new_user();
    // Signed by an account the operator never issued: refused.
    let rogue = nkeys::KeyPair::new_account();
    let conf = format!(
        "operator: {op_jwt}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{ {}: {acc_jwt}, {}: {sys_jwt} }}\n",
        system.public_key(),
        account.public_key(),
        system.public_key()
    );
    let Some(nats) = Nats::start_with(&conf, "{}") else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let seed = user.seed().unwrap();
    let good = write(
        files.path(),
        "good.creds",
        &creds_file(&user_jwt(&user, &account), &seed),
    );
    let bad = write(
        files.path(),
        "bad.creds",
        &creds_file(&user_jwt(&user, &rogue), &seed),
    );
    check(
        Creds {
            url: nats.url(),
            flags: vec!["--nats-creds".into(), good],
        },
        Creds {
            url: nats.url(),
            flags: vec!["--nats-creds".into(), bad],
        },
        "authorization violation",
        &[&seed],
    )
    .await;
}

/// A CA and a certificate it signed for `names` (server, or client with `client`):
/// (ca PEM, cert PEM, key PEM).
fn signed(
    ca: &(rcgen::Certificate, rcgen::KeyPair),
    names: &[&str],
    client: bool,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.extended_key_usages = vec![if client {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    }];
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_mutual_tls() {
    if !common::nats::available() {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let ca = new_ca("krux test CA");
    let other_ca = new_ca("someone else's CA");
    let (server_cert, server_key) = signed(&ca, &["127.0.0.1", "localhost"], false);
    let (client_cert, client_key) = signed(&ca, &["relay"], true);
    let ca_pem = write(files.path(), "ca.pem", &ca.0.pem());
    let other_pem = write(files.path(), "other.pem", &other_ca.0.pem());
    let server_cert = write(files.path(), "server.pem", &server_cert);
    let server_key = write(files.path(), "server.key", &server_key);
    let client_cert = write(files.path(), "client.pem", &client_cert);
    let client_key = write(files.path(), "client.key", &client_key);
    let tls = |verify: bool| {
        format!(
            "tls {{ cert_file: {server_cert:?}, key_file: {server_key:?}, ca_file: {ca_pem:?}, verify: {verify} }}"
        )
    };
    // TLS: the node checks the server against the private CA.
    {
        let Some(nats) = Nats::start_with(&tls(false), "{}") else {
            return;
        };
        check(
            Creds {
                url: nats.url(),
                flags: vec!["--nats-ca".into(), ca_pem.clone()],
            },
            Creds {
                url: nats.url(),
                flags: vec!["--nats-ca".into(), other_pem.clone()],
            },
            "TLS handshake failed",
            &[],
        )
        .await;
    }
    // Mutual TLS: the server checks the node's certificate too.
    let Some(nats) = Nats::start_with(&tls(true), "{}") else {
        return;
    };
    let key_text = std::fs::read_to_string(&client_key).unwrap();
    let secret_line = key_text.lines().nth(1).unwrap().to_string();
    check(
        Creds {
            url: nats.url(),
            flags: vec![
                "--nats-ca".into(),
                ca_pem.clone(),
                "--nats-cert".into(),
                client_cert,
                "--nats-key".into(),
                client_key,
            ],
        },
        Creds {
            url: nats.url(),
            flags: vec!["--nats-ca".into(), ca_pem],
        },
        "TLS handshake failed",
        &[&secret_line],
    )
    .await;
}

#[test]
fn credentials_given_two_ways_or_unreadable_are_refused_before_connecting() {
    let files = tempfile::tempdir().unwrap();
    let token = write(files.path(), "token", "t");
    let not_a_seed = write(files.path(), "seed", "SUNOTASEED");
    for (args, says) in [
        (
            vec![
                "--nats",
                "nats://u:p@127.0.0.1:1",
                "--nats-token-file",
                token.as_str(),
            ],
            "given 2 ways",
        ),
        (
            vec![
                "--nats",
                "nats://127.0.0.1:1",
                "--nats-nkey",
                not_a_seed.as_str(),
            ],
            "not an nkey seed",
        ),
        (
            vec![
                "--nats",
                "nats://127.0.0.1:1",
                "--nats-creds",
                "/no/such.creds",
            ],
            "--nats-creds /no/such.creds: cannot read it",
        ),
        (
            vec!["--nats", "nats://127.0.0.1:1", "--nats-ca", token.as_str()],
            "no PEM CERTIFICATE",
        ),
    ] {
        let out = Command::new(bin())
            .args(["user-token", "list"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// The credential settings come from `KRUX_*` variables and the config file too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_the_environment_and_the_config_file() {
    let conf = r#"authorization { token: "tok-s3cret-3" }"#;
    let Some(nats) = Nats::start_with(conf, r#"{"auth_token":"tok-s3cret-3"}"#) else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let token_file = write(files.path(), "token", "tok-s3cret-3");
    let list = |env: &[(&str, &str)]| {
        Command::new(bin())
            .args(["user-token", "list"])
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let url = nats.url();
    assert_success(&list(&[
        ("KRUX_NATS", url.as_str()),
        ("KRUX_NATS_TOKEN_FILE", token_file.as_str()),
    ]));
    let with_secret = format!("nats://tok-s3cret-3@127.0.0.1:{}", nats.port);
    assert_success(&list(&[("KRUX_NATS", with_secret.as_str())]));
    let config = write(
        files.path(),
        "relay.toml",
        &format!("nats = {url:?}\nnats-token-file = {token_file:?}\nnats-replicas = 1\n"),
    );
    assert_success(&list(&[("KRUX_CONFIG", config.as_str())]));
    // Without the token: refused, so the file's setting was what let it in.
    let bare = write(files.path(), "bare.toml", &format!("nats = {url:?}\n"));
    let refused = list(&[("KRUX_CONFIG", bare.as_str())]);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("authorization violation"));
}

/// Credentials that stop working under a running node: it keeps retrying with backoff,
/// logs the failure once per streak (not once per attempt), and is back once they work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_logs_a_failure_streak_once() {
    let users = |pass: &str| {
        format!(r#"authorization {{ users = [ {{ user: relay, password: "{pass}" }} ] }}"#)
    };
    let Some(mut nats) = Nats::start_with(&users("pw-1"), "{}") else {
        return;
    };
    let relay = node_with(&Creds {
        url: format!("nats://relay:pw-1@127.0.0.1:{}", nats.port),
        flags: vec![],
    })
    .await;
    let log = || std::fs::read_to_string(relay.data_dir().join("relay.log")).unwrap();
    nats.reconfigure(&users("pw-2"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = log();
    let attempts = during.matches("attempting connection").count();
    let streaks = during.matches("retrying with backoff").count();
    // Two clients (the consumer's and the ingest's), each one line for its streak.
    assert!(
        (1..=2).contains(&streaks),
        "{streaks} lines for {attempts} attempts:\n{during}"
    );
    assert!(
        attempts >= 4 * streaks,
        "{streaks} lines for {attempts} attempts"
    );
    nats.reconfigure(&users("pw-1"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log().contains("after_failures=true") {
        assert!(Instant::now() < deadline, "never back:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!log().contains("pw-1") && !log().contains("pw-2"));
}
