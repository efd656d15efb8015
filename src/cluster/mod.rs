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

use std::time::Duration;

use anyhow::Context;

use crate::config::cluster::{parse_urls, redact};

/// A client of the cluster's NATS servers that keeps reconnecting on its own (forever,
/// with backoff), and whose first connection may come after the call returns.
pub async fn connect(urls: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    let addrs = parse_urls(urls)?;
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50 * 2u64.saturating_pow(attempts as u32)).min(1000))
        })
        .event_callback(|e| async move { tracing::info!("NATS: {e}") })
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to {}", redact(urls)))
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
/// waits at most 5 s for the first connection.
pub fn block_on<F, Fut>(urls: &str, f: F) -> anyhow::Result<()>
where
    F: FnOnce(async_nats::jetstream::Context) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addrs = parse_urls(urls)?;
        let client = async_nats::ConnectOptions::new()
            .name("krux-relay command")
            .connection_timeout(Duration::from_secs(5))
            .connect(addrs)
            .await
            .with_context(|| format!("connecting to {}", redact(urls)))?;
        let result = tokio::time::timeout(Duration::from_secs(10), f(jetstream(client.clone())))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "{}: JetStream did not answer within 10 s",
                    redact(urls)
                ))
            });
        let _ = client.flush().await;
        result
    })
}
