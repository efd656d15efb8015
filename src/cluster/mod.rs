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
use clap::Args;

/// Where the cluster's NATS servers and bucket are (shared by `serve` and the credential
/// commands).
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// Join the cluster of nodes sharing a NATS JetStream stream: nats://HOST:PORT, several
    /// comma-separated. Credentials then live in the cluster's key-value bucket.
    #[arg(long = "nats", env = "KRUX_NATS", global = true)]
    pub url: Option<String>,
    /// The key-value bucket of credentials (created if missing).
    #[arg(
        long = "nats-credentials",
        env = "KRUX_NATS_CREDENTIALS",
        default_value = "KRUX_CREDENTIALS",
        global = true
    )]
    pub bucket: String,
}

/// The stream of events and its limits (`serve` only).
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// The JetStream stream of events (created by the first node if missing).
    #[arg(
        long = "nats-stream",
        env = "KRUX_NATS_STREAM",
        default_value = "KRUX_EVENTS"
    )]
    pub name: String,
    /// Bytes the stream keeps (oldest messages go first); resumes older than it get
    /// replay_gap.
    #[arg(long = "nats-max-bytes", env = "KRUX_NATS_MAX_BYTES", default_value = "8GiB", value_parser = crate::config::parse_size)]
    pub max_bytes: usize,
    /// Age after which the stream drops a message.
    #[arg(long = "nats-max-age", env = "KRUX_NATS_MAX_AGE", default_value = "24h", value_parser = crate::config::parse_duration)]
    pub max_age: Duration,
}

impl StreamArgs {
    /// The subject events are published on.
    pub fn subject(&self) -> String {
        format!("{}.events", self.name)
    }

    pub fn check(&self) -> Result<(), String> {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if self.name.is_empty() || self.name.len() > 64 || !self.name.chars().all(ok) {
            return Err(format!(
                "--nats-stream {:?}: must be 1 to 64 of A-Z a-z 0-9 _ -",
                self.name
            ));
        }
        if self.max_bytes < 1 << 20 || self.max_age < Duration::from_secs(1) {
            return Err(
                "--nats-max-bytes must be at least 1MiB and --nats-max-age at least 1s".into(),
            );
        }
        Ok(())
    }
}

/// The servers of `--nats` (`nats://HOST:PORT`, or `tls://`, comma-separated).
pub fn parse_urls(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    urls.split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--nats {}: not a list of nats://HOST:PORT", redact(urls)))
}

/// `--nats` as it may be shown: a URL's user and password (or token) replaced by `***`.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &u[..scheme + 3], &u[at..])
            }
            (None, Some(at)) => format!("***{}", &u[at..]),
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_in_urls_are_never_shown() {
        assert_eq!(
            super::redact("nats://ops:s3cret@10.0.0.1:4222,tls://tok@h:4222,nats://h:1"),
            "nats://***@10.0.0.1:4222,tls://***@h:4222,nats://h:1"
        );
        let err = format!(
            "{:#}",
            super::parse_urls("nats://a:s3cret@bad host").unwrap_err()
        );
        assert!(!err.contains("s3cret"), "{err}");
    }
}
