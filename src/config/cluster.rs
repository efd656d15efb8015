//! The cluster's settings (`--nats`, `--nats-stream` and the stream's limits), shared by
//! `serve` and the credential commands; `crate::cluster` runs what they describe.

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
    #[arg(long = "nats-max-bytes", env = "KRUX_NATS_MAX_BYTES", default_value = "8GiB", value_parser = super::parse_size)]
    pub max_bytes: usize,
    /// Age after which the stream drops a message.
    #[arg(long = "nats-max-age", env = "KRUX_NATS_MAX_AGE", default_value = "24h", value_parser = super::parse_duration)]
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
