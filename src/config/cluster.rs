//! The cluster's settings (`--nats`, `--nats-stream` and the stream's limits), shared by
//! `serve` and the credential commands; `crate::cluster` runs what they describe.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

/// Where the cluster's NATS servers and bucket are, and how this node proves who it is
/// (shared by `serve` and the credential commands). Secrets come from files or the
/// environment (the URL, through `KRUX_NATS`), never from a flag's value.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// Join the cluster of nodes sharing a NATS JetStream stream: nats://HOST:PORT (or
    /// tls://), several comma-separated; nats://USER:PASSWORD@HOST or nats://TOKEN@HOST
    /// authenticate. Credentials then live in the cluster's key-value bucket.
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
    /// NATS user name, with --nats-password-file.
    #[arg(
        long = "nats-user",
        env = "KRUX_NATS_USER",
        global = true,
        requires = "nats_password_file"
    )]
    pub nats_user: Option<String>,
    /// File holding the NATS user's password.
    #[arg(
        long = "nats-password-file",
        env = "KRUX_NATS_PASSWORD_FILE",
        global = true,
        requires = "nats_user"
    )]
    pub nats_password_file: Option<PathBuf>,
    /// File holding a NATS token.
    #[arg(long = "nats-token-file", env = "KRUX_NATS_TOKEN_FILE", global = true)]
    pub nats_token_file: Option<PathBuf>,
    /// File holding the node's NATS nkey seed (SU…).
    #[arg(long = "nats-nkey", env = "KRUX_NATS_NKEY", global = true)]
    pub nats_nkey: Option<PathBuf>,
    /// A NATS .creds file (user JWT and nkey seed: operator mode).
    #[arg(long = "nats-creds", env = "KRUX_NATS_CREDS", global = true)]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate(s) (PEM) that NATS servers' certificates are checked against; TLS
    /// is then required.
    #[arg(long = "nats-ca", env = "KRUX_NATS_CA", global = true)]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for NATS servers that verify clients (mutual TLS).
    #[arg(
        long = "nats-cert",
        env = "KRUX_NATS_CERT",
        global = true,
        requires = "nats_key"
    )]
    pub nats_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long = "nats-key",
        env = "KRUX_NATS_KEY",
        global = true,
        requires = "nats_cert"
    )]
    pub nats_key: Option<PathBuf>,
    /// Replicas of the stream and the credentials bucket when a node or command creates
    /// them (3 on a 3-server NATS cluster).
    #[arg(
        long = "nats-replicas",
        env = "KRUX_NATS_REPLICAS",
        global = true,
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=5)
    )]
    pub replicas: u8,
}

/// How a node proves who it is to NATS (at most one way).
#[derive(Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    UserPassword(String, String),
    Token(String),
    /// An nkey seed.
    Nkey(String),
    /// A .creds file's text (user JWT and seed).
    Creds(String),
}

impl std::fmt::Debug for Identity {
    // Never the secret itself, whatever logs a value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Identity::Anonymous => "anonymous",
            Identity::UserPassword(..) => "user and password",
            Identity::Token(_) => "token",
            Identity::Nkey(_) => "nkey",
            Identity::Creds(_) => "creds file",
        })
    }
}

/// `--nats` and its credentials, read and checked: what connecting needs.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// The servers, without the credentials their URLs carried.
    pub servers: Vec<async_nats::ServerAddr>,
    /// The URLs as they may be shown (credentials replaced by `***`).
    pub shown: String,
    pub identity: Identity,
    /// TLS required, with these CA certificates (else the system's roots).
    pub ca: Option<PathBuf>,
    /// Mutual TLS: the client's certificate chain and key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub bucket: String,
    pub replicas: usize,
}

impl NatsArgs {
    /// The settings, with every file read and checked now: an unreadable or malformed one
    /// is an error naming the flag and the file. `None` without `--nats`.
    pub fn settings(&self) -> anyhow::Result<Option<NatsSettings>> {
        let Some(urls) = &self.url else {
            return Ok(None);
        };
        let (servers, in_url) = split_credentials(urls)?;
        let mut ways: Vec<(&str, Identity)> = Vec::new();
        if let Some(id) = in_url {
            ways.push(("the --nats URL", id));
        }
        if let (Some(user), Some(file)) = (&self.nats_user, &self.nats_password_file) {
            let password = read_secret("--nats-password-file", file)?;
            ways.push((
                "--nats-user",
                Identity::UserPassword(user.clone(), password),
            ));
        }
        if let Some(file) = &self.nats_token_file {
            ways.push((
                "--nats-token-file",
                Identity::Token(read_secret("--nats-token-file", file)?),
            ));
        }
        if let Some(file) = &self.nats_nkey {
            let seed = read_secret("--nats-nkey", file)?;
            nkeys::KeyPair::from_seed(&seed).map_err(|e| {
                anyhow::anyhow!("--nats-nkey {}: not an nkey seed ({e})", file.display())
            })?;
            if !seed.starts_with("SU") {
                anyhow::bail!(
                    "--nats-nkey {}: a user seed starts with SU; this one is another kind of key",
                    file.display()
                );
            }
            ways.push(("--nats-nkey", Identity::Nkey(seed)));
        }
        if let Some(file) = &self.nats_creds {
            // Whole: the client's parser wants each block's closing line ended.
            let text = read_secret("--nats-creds", file)? + "\n";
            // Checked as the client will read it: a JWT and a seed, each in its block.
            async_nats::ConnectOptions::with_credentials(&text).map_err(|e| {
                anyhow::anyhow!(
                    "--nats-creds {}: not a NATS .creds file ({e})",
                    file.display()
                )
            })?;
            ways.push(("--nats-creds", Identity::Creds(text)));
        }
        if ways.len() > 1 {
            let names: Vec<_> = ways.iter().map(|(n, _)| *n).collect();
            anyhow::bail!(
                "NATS credentials given {} ways ({}): give one",
                ways.len(),
                names.join(", ")
            );
        }
        for (flag, file) in [
            ("--nats-ca", &self.nats_ca),
            ("--nats-cert", &self.nats_cert),
        ] {
            if let Some(file) = file {
                check_pem(flag, file, "CERTIFICATE")?;
            }
        }
        if let Some(file) = &self.nats_key {
            check_pem("--nats-key", file, "PRIVATE KEY")?;
        }
        Ok(Some(NatsSettings {
            servers,
            shown: redact(urls),
            identity: ways.pop().map_or(Identity::Anonymous, |(_, id)| id),
            ca: self.nats_ca.clone(),
            client_cert: self.nats_cert.clone().zip(self.nats_key.clone()),
            bucket: self.bucket.clone(),
            replicas: usize::from(self.replicas),
        }))
    }
}

/// A secret file's text without its trailing newline.
fn read_secret(flag: &str, file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{flag} {}: cannot read it", file.display()))?;
    let text = text.trim().to_string();
    if text.is_empty() {
        anyhow::bail!("{flag} {}: the file is empty", file.display());
    }
    Ok(text)
}

/// Fails unless `file` holds a PEM block whose label ends with `label`.
fn check_pem(flag: &str, file: &Path, label: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{flag} {}: cannot read it", file.display()))?;
    let found = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .any(|l| l.trim_end_matches('-').ends_with(label));
    if !found {
        anyhow::bail!("{flag} {}: no PEM {label} in it", file.display());
    }
    Ok(())
}

/// The servers of `--nats` without credentials, and the identity their URLs carry
/// (`user:password@` or `token@`, percent-decoded; the same in every URL).
fn split_credentials(
    urls: &str,
) -> anyhow::Result<(Vec<async_nats::ServerAddr>, Option<Identity>)> {
    let mut found: Option<Identity> = None;
    let mut servers = Vec::new();
    for url in urls.split(',').map(str::trim) {
        let (bare, id) = match userinfo(url) {
            Some(span) => {
                let info = &url[span.clone()];
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(|s| s.into_owned())
                        .map_err(|_| {
                            anyhow::anyhow!("--nats {}: credentials are not UTF-8", redact(urls))
                        })
                };
                let id = match info.split_once(':') {
                    Some((user, pass)) => Identity::UserPassword(decode(user)?, decode(pass)?),
                    None => Identity::Token(decode(info)?),
                };
                (
                    format!("{}{}", &url[..span.start], &url[span.end + 1..]),
                    Some(id),
                )
            }
            _ => (url.to_string(), None),
        };
        if let Some(id) = id {
            if found.as_ref().is_some_and(|f| *f != id) {
                anyhow::bail!(
                    "--nats {}: the URLs carry different credentials; a node has one identity",
                    redact(urls)
                );
            }
            found = Some(id);
        }
        servers.push(
            bare.parse::<async_nats::ServerAddr>().with_context(|| {
                format!("--nats {}: not a list of nats://HOST:PORT", redact(urls))
            })?,
        );
    }
    Ok((servers, found))
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
    /// How long the node may be unable to consume the stream (JetStream unreachable, or
    /// electing a leader: 4-9 s after a server dies) before /readyz answers 503; its
    /// subscribers are served from its window meanwhile.
    #[arg(long = "nats-unready-after", env = "KRUX_NATS_UNREADY_AFTER", default_value = "10s", value_parser = super::parse_duration)]
    pub unready_after: Duration,
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

/// The servers of `--nats` (`nats://HOST:PORT`, or `tls://`, comma-separated), without
/// the credentials their URLs may carry.
pub fn parse_urls(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    split_credentials(urls).map(|(servers, _)| servers)
}

/// `--nats` as it may be shown: a URL's user and password (or token) replaced by `***`.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|u| match (userinfo(u), u.rfind('@')) {
            (Some(span), _) => format!("{}***{}", &u[..span.start], &u[span.end..]),
            (None, Some(at)) if !u.contains("://") => format!("***{}", &u[at..]),
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Where a URL's credentials (`user:password` or `token`) are: between `://` and the
/// last `@`.
fn userinfo(url: &str) -> Option<std::ops::Range<usize>> {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => Some(scheme + 3..at),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{split_credentials, Identity};

    #[test]
    fn credentials_come_out_of_urls_decoded_and_the_urls_go_on_without_them() {
        let (servers, id) =
            split_credentials("nats://ops:p%40ss@10.0.0.1:4222, nats://ops:p%40ss@10.0.0.2:4222")
                .unwrap();
        assert_eq!(
            id,
            Some(Identity::UserPassword("ops".into(), "p@ss".into()))
        );
        assert_eq!(servers.len(), 2);
        assert!(servers.iter().all(|s| !s.has_user_pass()), "{servers:?}");
        let (_, id) = split_credentials("tls://s3cret@h:4222,nats://h2:4222").unwrap();
        assert_eq!(id, Some(Identity::Token("s3cret".into())));
        assert_eq!(split_credentials("nats://h:1").unwrap().1, None);
        let err = split_credentials("nats://a:b@h:1,nats://a:c@h:2").unwrap_err();
        assert!(
            format!("{err:#}").contains("different credentials"),
            "{err:#}"
        );
        assert!(!format!("{err:#}").contains(":c@"), "{err:#}");
        // Whatever prints an identity never prints the secret.
        let shown = format!("{:?}", Identity::UserPassword("ops".into(), "p@ss".into()));
        assert!(!shown.contains("p@ss"), "{shown}");
    }

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
