//! `serve` settings: flags, `KRUX_*` environment variables, a TOML config file (flags win
//! over the environment, which wins over the file), and the value syntaxes of the
//! contract (`500ms`, `10s`, `2m`; `512`, `64KiB`, `16MiB`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::io::IoMode;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like 500ms, 10s or 2m ({e})"))
}

pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512, 64KiB or 16MiB"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown size unit; use B, KiB, MiB or GiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// The data dir: `--data-dir`, else `KRUX_DATA_DIR`, else the user's data dir.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("krux-relay");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/krux-relay"),
        None => PathBuf::from(".krux-relay"),
    }
}

/// Loads a TOML config file into the `KRUX_*` environment variables that are not set yet,
/// so that clap's usual precedence applies: flag, then environment, then file. `known`
/// lists the environment names of the settings (from the `serve` command's arguments);
/// a key outside it is an error, not silently ignored.
///
/// Keys are the flag names (`listen`, `ping-interval` or `ping_interval`, …); values are
/// strings, numbers or booleans.
pub fn load_config_file(path: &std::path::Path, known: &[String]) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing config file {}", path.display()))?;
    for (key, value) in table {
        let env = format!("KRUX_{}", key.to_ascii_uppercase().replace('-', "_"));
        anyhow::ensure!(
            known.contains(&env),
            "{}: unknown setting `{key}` (settings are serve's flag names, e.g. `listen`, `ping-interval`)",
            path.display()
        );
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!(
                "{}: `{key}` must be a string, number or boolean, not {}",
                path.display(),
                other.type_str()
            ),
        };
        if std::env::var_os(&env).is_none() {
            std::env::set_var(&env, text);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct DataDirArg {
    /// Where tokens, the passphrase hash and sequence reservations live.
    #[arg(long, env = "KRUX_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
}

impl DataDirArg {
    pub fn resolve(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Supervisor WebSocket address (port 0: any free port).
    #[arg(long, env = "KRUX_LISTEN", default_value = "127.0.0.1:7701")]
    pub listen: SocketAddr,
    /// Publisher NDJSON address.
    #[arg(long, env = "KRUX_INGEST", default_value = "127.0.0.1:7702")]
    pub ingest: SocketAddr,
    /// Also accept publishers on this Unix socket.
    #[arg(long, env = "KRUX_INGEST_UNIX")]
    pub ingest_unix: Option<PathBuf>,
    /// Admin address: /metrics, /healthz, /readyz.
    #[arg(long, env = "KRUX_ADMIN", default_value = "127.0.0.1:7703")]
    pub admin: SocketAddr,
    /// Reactor threads (default: number of cores).
    #[arg(long, env = "KRUX_REACTORS")]
    pub reactors: Option<usize>,
    /// I/O backend: io_uring, epoll, or io_uring with epoll fallback.
    #[arg(long = "io", env = "KRUX_IO", value_enum, default_value = "auto")]
    pub io: IoMode,
    #[arg(long, env = "KRUX_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    #[arg(long, env = "KRUX_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub read_timeout: Duration,
    /// Time a client has to complete its TLS handshake and send its request head.
    #[arg(long, env = "KRUX_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Largest inbound frame, and largest published line.
    #[arg(long, env = "KRUX_MAX_FRAME", default_value = "16MiB", value_parser = parse_size)]
    pub max_frame: usize,
    /// Events retained for resume (`?since=`).
    #[arg(long, env = "KRUX_REPLAY", default_value_t = 1_000_000)]
    pub replay: usize,
    /// Per-subscriber bound on unsent bytes; past it the subscriber is closed with 4001.
    #[arg(long, env = "KRUX_CLIENT_QUEUE", default_value = "8MiB", value_parser = parse_size)]
    pub client_queue: usize,
    /// Open subscriber WebSockets allowed; more get 503.
    #[arg(long, env = "KRUX_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Written (JSON) once every listener is up.
    #[arg(long, env = "KRUX_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    #[arg(long, env = "KRUX_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// TLS certificate chain (PEM); the endpoint becomes wss://.
    #[arg(
        long,
        env = "KRUX_TLS_CERT",
        requires = "tls_key",
        conflicts_with = "tls_self_signed"
    )]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "KRUX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS with a fresh self-signed certificate (written to <data-dir>/tls-self-signed.pem;
    /// its fingerprint is printed at start).
    #[arg(long, env = "KRUX_TLS_SELF_SIGNED")]
    pub tls_self_signed: bool,
    /// Allow plaintext WebSocket on a non-loopback address.
    #[arg(long, env = "KRUX_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert!(parse_size("16 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
    }
}
