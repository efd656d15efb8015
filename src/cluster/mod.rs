//! Cluster mode (`serve --nats URL`): relay nodes share one NATS JetStream stream of events
//! and one key-value bucket of credentials, with no protocol of our own between them.
//!
//! ```text
//!  publishers ─▶ node A's ingest (validate, batch) ──one message per batch, acked──▶ stream
//!  stream ──one ordered consumer per node──▶ node's ring (frame once) ─▶ its reactors
//!  resume beyond the node's window ──▶ the stream's stored messages (history)
//! ```
//!
//! `batch` is the message format and the `seq` scheme; `ingest` stores publishers' lines;
//! `node` runs the consumer, the history fetches, the credentials watch and readiness;
//! `credentials` is the bucket's layout, shared with the `user-token`/`passphrase` commands.

pub mod batch;
pub mod credentials;
pub mod ingest;
pub mod node;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::{ConnectErrorKind, ConnectOptions};

use crate::config::cluster::{Identity, NatsSettings};

/// A client of the cluster's NATS servers, and how many times it has (re)connected: a
/// consumer started before the last reconnect may be silent and is started again.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub connects: Arc<AtomicU64>,
}

/// The client's options for `nats`: its identity and TLS.
fn options(nats: &NatsSettings) -> anyhow::Result<ConnectOptions> {
    let mut o = match &nats.identity {
        Identity::Anonymous => ConnectOptions::new(),
        Identity::UserPassword(user, pass) => {
            ConnectOptions::with_user_and_password(user.clone(), pass.clone())
        }
        Identity::Token(token) => ConnectOptions::with_token(token.clone()),
        Identity::Nkey(seed) => ConnectOptions::with_nkey(seed.clone()),
        Identity::Creds(text) => ConnectOptions::with_credentials(text)
            .map_err(|e| anyhow::anyhow!("--nats-creds: {e}"))?,
    };
    if let Some(ca) = &nats.ca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &nats.client_cert {
        o = o
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    Ok(o.connection_timeout(Duration::from_secs(2)))
}

/// Why a first connection failed, in words an operator can act on; `Err` when retrying
/// cannot help (credentials or TLS), `Ok` when the servers are only unreachable.
fn diagnose(nats: &NatsSettings, e: &async_nats::ConnectError) -> anyhow::Result<String> {
    let at = &nats.shown;
    let identity = format!("{:?}", nats.identity);
    match e.kind() {
        ConnectErrorKind::AuthorizationViolation => anyhow::bail!(
            "NATS at {at} refused this node's credentials (authorization violation; identity: {identity}): check --nats, --nats-user/--nats-password-file, --nats-token-file, --nats-nkey or --nats-creds"
        ),
        ConnectErrorKind::Authentication => anyhow::bail!(
            "NATS at {at}: the credentials could not sign the server's challenge ({identity}): {e}"
        ),
        ConnectErrorKind::Tls => {
            anyhow::bail!("NATS at {at}: TLS cannot be set up ({e}): check --nats-ca, --nats-cert and --nats-key")
        }
        _ if tls_failure(e) => anyhow::bail!(
            "NATS at {at}: the TLS handshake failed ({e}); give the CA that signed the servers' certificates with --nats-ca, and a client certificate with --nats-cert/--nats-key if they require one"
        ),
        _ => Ok(format!("NATS at {at} cannot be reached ({e})")),
    }
}

/// Whether a connection error was TLS's (an untrusted certificate, a refused client
/// certificate): async-nats reports those as I/O errors.
fn tls_failure(e: &async_nats::ConnectError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        if c.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// One connection attempt, as `serve` makes it before it starts anything: wrong
/// credentials or TLS that cannot work fail it with the cause; servers that cannot be
/// reached only warn (the node then starts unready and keeps trying).
pub fn check_at_start(nats: &NatsSettings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match options(nats)?
            .name("krux-relay start check")
            .connect(nats.servers.clone())
            .await
        {
            Ok(client) => {
                let _ = client.drain().await;
                Ok(())
            }
            Err(e) => {
                let why = diagnose(nats, &e)?;
                tracing::warn!("{why}; starting unready and retrying");
                Ok(())
            }
        }
    })
}

/// A client of the cluster's NATS servers that keeps reconnecting on its own (forever,
/// with backoff up to 1 s), and whose first connection may come after the call returns.
/// A failure is logged once per streak of failed attempts, not per attempt.
pub async fn connect(nats: &NatsSettings, name: &str) -> anyhow::Result<Nats> {
    let connects = Arc::new(AtomicU64::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    let (c, f) = (connects.clone(), failing.clone());
    let client = options(nats)?
        .name(name)
        .retry_on_initial_connect()
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50 * 2u64.saturating_pow(attempts as u32)).min(1000))
        })
        .event_callback(move |e| {
            let (connects, failing) = (c.clone(), f.clone());
            async move {
                use async_nats::Event;
                match e {
                    Event::Connected => {
                        connects.fetch_add(1, SeqCst);
                        let again = failing.swap(false, SeqCst);
                        tracing::info!(after_failures = again, "NATS: connected");
                    }
                    Event::Disconnected => tracing::warn!("NATS: disconnected; reconnecting"),
                    Event::ClientError(_) | Event::ServerError(_) => {
                        if !failing.swap(true, SeqCst) {
                            tracing::warn!(
                                "NATS: {e}; retrying with backoff (logged again once connected)"
                            );
                        }
                    }
                    other => tracing::info!("NATS: {other}"),
                }
            }
        })
        .connect(nats.servers.clone())
        .await
        .with_context(|| format!("connecting to {}", nats.shown))?;
    Ok(Nats { client, connects })
}

/// A JetStream context whose requests and acks give up after `timeout` (then retried by
/// their callers).
pub fn jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .ack_timeout(Duration::from_secs(2))
        .build(client)
}

/// Runs `f` with a JetStream context on a runtime of its own (the credential commands):
/// one connection attempt, failing with its cause.
pub fn block_on<F, Fut>(nats: &NatsSettings, f: F) -> anyhow::Result<()>
where
    F: FnOnce(async_nats::jetstream::Context) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = match options(nats)?
            .name("krux-relay command")
            .connection_timeout(Duration::from_secs(5))
            .connect(nats.servers.clone())
            .await
        {
            Ok(c) => c,
            Err(e) => anyhow::bail!("{}", diagnose(nats, &e)?),
        };
        // Long enough for a NATS cluster to elect a leader (4-9 s) on the way.
        let result = tokio::time::timeout(Duration::from_secs(25), f(jetstream(client.clone())))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "{}: JetStream did not answer within 25 s",
                    nats.shown
                ))
            });
        let _ = client.flush().await;
        result
    })
}
