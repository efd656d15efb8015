//! `serve` settings: flags, `KRUX_*` environment variables, a TOML config file (flags win
//! over the environment, which wins over the file), and the value syntaxes of the
//! contract (`500ms`, `10s`, `2m`; `512`, `64KiB`, `16MiB`).

pub mod cluster;

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

/// An address to listen on: `IP:PORT`, or `HOST:PORT` resolved now (`localhost:7702`).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.trim().parse() {
        return Ok(a);
    }
    let bad = |why: String| {
        format!("`{s}` is not an address like 127.0.0.1:7702 or localhost:7702 ({why})")
    };
    let mut all = s.trim().to_socket_addrs().map_err(|e| bad(e.to_string()))?;
    all.next()
        .ok_or_else(|| bad("the name resolves to no address".into()))
}

/// An origin as browsers send it: `http://host[:port]` or `https://…`, nothing after; or
/// `null`, what pages opened from disk send (and sandboxed frames of any site).
pub fn parse_origin(s: &str) -> Result<String, String> {
    let t = s.trim().trim_end_matches('/');
    if t == "null" {
        return Ok(t.to_string());
    }
    let ok = ["http://", "https://"].iter().any(|p| {
        t.strip_prefix(p)
            .is_some_and(|rest| !rest.is_empty() && !rest.contains(['/', '?', '#', '@']))
    });
    if !ok {
        return Err(format!(
            "`{s}` is not an origin like https://dashboards.example.com or http://localhost:8080"
        ));
    }
    Ok(t.to_string())
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

/// `check(env_name, value)`: `None` for an unknown setting, else whether the value parses.
pub type SettingCheck<'a> = dyn Fn(&str, &str) -> Option<Result<(), String>> + 'a;

/// Loads a TOML config file into the `KRUX_*` environment variables that are not set yet,
/// so that clap's usual precedence applies: flag, then environment, then file.
/// `check(env_name, value)` knows the settings (from the `serve` command's arguments):
/// `None` for an unknown one (an error, not silently ignored), else whether the value
/// parses; either error names the file and the key.
///
/// Keys are the flag names (`listen`, `ping-interval` or `ping_interval`, …); values are
/// strings, numbers or booleans. Returns the names of the variables it set, so `config`
/// can tell a value from the file from one in the environment.
pub fn load_config_file(
    path: &std::path::Path,
    check: &SettingCheck<'_>,
) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    // Where a byte offset is, as `line L, column C` (1-based).
    let at = |offset: usize| {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("{}: line {line}, column {column}", path.display())
    };
    // Errors name the place and the key, never the line's text: a value may be a secret
    // (a `nats` URL with a password).
    let table: std::collections::BTreeMap<toml::Spanned<String>, toml::Value> =
        toml::from_str(&text).map_err(|e| {
            let place = e.span().map_or(path.display().to_string(), |s| at(s.start));
            anyhow::anyhow!("{place}: not valid TOML: {}", e.message())
        })?;
    let mut from_file = Vec::new();
    for (key, value) in table {
        let place = at(key.span().start);
        let key = key.into_inner();
        let env = format!("KRUX_{}", key.to_ascii_uppercase().replace('-', "_"));
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!(
                "{place}: `{key}` must be a string, number or boolean, not {}",
                other.type_str()
            ),
        };
        match check(&env, &text) {
            None => anyhow::bail!(
                "{place}: unknown setting `{key}` (settings are serve's flag names, e.g. `listen`, `ping-interval`)"
            ),
            Some(Err(why)) => {
                // The parsers quote what they refuse; a file's value stays unsaid.
                let why = match text.len() {
                    0..3 => why,
                    _ => why.replace(&text, "…"),
                };
                anyhow::bail!("{place}: `{key}`: {why}")
            }
            Some(Ok(())) => {}
        }
        if std::env::var_os(&env).is_none() {
            std::env::set_var(&env, text);
            from_file.push(env);
        }
    }
    Ok(from_file)
}

/// Where a setting's effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env(String),
    File(PathBuf),
    Default,
    Unset,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag => write!(f, "flag"),
            Origin::Env(var) => write!(f, "env {var}"),
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Default => write!(f, "default"),
            Origin::Unset => write!(f, "unset"),
        }
    }
}

/// One line of `krux-relay config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    pub value: String,
    pub origin: Origin,
}

/// Settings whose values are never printed: credentials (a `…-file` setting names where
/// one is, which may be shown).
fn secret(name: &str) -> bool {
    !name.ends_with("-file")
        && ["token", "password", "passphrase", "secret"]
            .iter()
            .any(|w| name.contains(w))
}

/// The effective settings of `matches` (a parsed `serve`/`config` command), with where
/// each came from: a flag, a `KRUX_*` variable, the config file (`file`, which set the
/// variables in `from_file`), or the default. Secrets are elided, and credentials in URLs
/// redacted.
pub fn effective(
    cmd: &clap::Command,
    matches: &clap::ArgMatches,
    file: Option<&std::path::Path>,
    from_file: &[String],
) -> Vec<Setting> {
    use clap::parser::ValueSource;
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        if matches!(id, "help" | "version") || arg.is_hide_set() {
            continue;
        }
        let raw: Vec<String> = matches
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let origin = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => Origin::Flag,
            Some(ValueSource::EnvVariable) => {
                let var = arg
                    .get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match file {
                    Some(path) if from_file.contains(&var) => Origin::File(path.to_path_buf()),
                    _ => Origin::Env(var),
                }
            }
            Some(ValueSource::DefaultValue) => Origin::Default,
            _ => Origin::Unset,
        };
        let value = raw.join(",");
        let value = if raw.is_empty() {
            "-".to_string()
        } else if secret(long) {
            "<elided>".to_string()
        } else if value.contains("://") {
            cluster::redact(&value) // a URL may carry a user and password
        } else {
            value
        };
        out.push(Setting {
            name: long.to_string(),
            value,
            origin,
        });
    }
    out
}

/// `effective` as aligned text, one setting per line.
pub fn render_settings(settings: &[Setting]) -> String {
    let w = settings.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let v = settings
        .iter()
        .map(|s| s.value.chars().count())
        .max()
        .unwrap_or(0)
        .min(40);
    settings
        .iter()
        .map(|s| format!("{:<w$}  {:<v$}  {}\n", s.name, s.value, s.origin))
        .collect()
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
    #[arg(long, env = "KRUX_LISTEN", value_parser = parse_addr, default_value = "127.0.0.1:7701")]
    pub listen: SocketAddr,
    /// Publisher NDJSON address.
    #[arg(long, env = "KRUX_INGEST", value_parser = parse_addr, default_value = "127.0.0.1:7702")]
    pub ingest: SocketAddr,
    /// Also accept publishers on this Unix socket.
    #[arg(long, env = "KRUX_INGEST_UNIX")]
    pub ingest_unix: Option<PathBuf>,
    /// Admin address: /metrics, /healthz, /readyz.
    #[arg(long, env = "KRUX_ADMIN", value_parser = parse_addr, default_value = "127.0.0.1:7703")]
    pub admin: SocketAddr,
    /// Reactor threads (default: number of cores).
    #[arg(long, env = "KRUX_REACTORS")]
    pub reactors: Option<usize>,
    /// I/O backend: io_uring, epoll, or io_uring with epoll fallback.
    #[arg(long = "io", env = "KRUX_IO", value_enum, default_value = "auto")]
    pub io: IoMode,
    /// How often each subscriber is pinged (keepalive).
    #[arg(long, env = "KRUX_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// A subscriber silent this long after a ping (no pong, nothing) is dropped.
    #[arg(long, env = "KRUX_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub read_timeout: Duration,
    /// Time a client has to complete its TLS handshake and send its request head.
    #[arg(long, env = "KRUX_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Largest inbound frame, and largest published line.
    #[arg(long, env = "KRUX_MAX_FRAME", default_value = "16MiB", value_parser = parse_size)]
    pub max_frame: usize,
    /// Events retained for resume (`?since=`): the newest within this count and
    /// --replay-memory.
    #[arg(long, env = "KRUX_REPLAY", default_value_t = 1_000_000)]
    pub replay: usize,
    /// Bytes the retained events may hold (frames, filter keys, entries).
    #[arg(long, env = "KRUX_REPLAY_MEMORY", default_value = "256MiB", value_parser = parse_size)]
    pub replay_memory: usize,
    /// Per-subscriber bound on bytes its socket has not taken; a subscriber with no room
    /// catches up from the retained window, and is closed with 4001 if its socket stalls.
    #[arg(long, env = "KRUX_CLIENT_QUEUE", default_value = "8MiB", value_parser = parse_size)]
    pub client_queue: usize,
    /// Open subscriber WebSockets allowed; more get 503.
    #[arg(long, env = "KRUX_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Written (JSON) once every listener is up.
    #[arg(long, env = "KRUX_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// On SIGTERM/SIGINT: time to flush queued frames and answer publishers before exit.
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
    /// Offer TLS 1.3 alone (refuse TLS 1.2 clients).
    #[arg(long, env = "KRUX_TLS13_ONLY")]
    pub tls13_only: bool,
    /// Allow plaintext WebSocket on a non-loopback address.
    #[arg(long, env = "KRUX_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// Allow a non-loopback --ingest address (publishers are not authenticated).
    #[arg(long, env = "KRUX_INSECURE_INGEST")]
    pub insecure_ingest: bool,
    /// A browser origin (scheme://host[:port]) whose pages may subscribe besides the
    /// relay's own (its dashboard); several comma-separated; `null` admits pages opened
    /// from disk (and sandboxed frames of any site). Clients that send no Origin (CLIs,
    /// bridges) are never affected.
    #[arg(long, env = "KRUX_ALLOWED_ORIGIN", value_delimiter = ',', value_parser = parse_origin)]
    pub allowed_origin: Vec<String>,
    /// Allow a non-loopback --admin address (/metrics is not authenticated).
    #[arg(long, env = "KRUX_INSECURE_ADMIN")]
    pub insecure_admin: bool,
    /// permessage-deflate for subscribers that offer it (browsers do): each event is
    /// compressed at most once and the same frame goes to all of them.
    #[arg(long, env = "KRUX_COMPRESSION", value_enum, default_value = "on")]
    pub compression: OnOff,
    /// Events whose JSON is smaller than this go out uncompressed (compression would not
    /// pay for itself).
    #[arg(long, env = "KRUX_COMPRESSION_MIN_SIZE", default_value = "128B", value_parser = parse_size)]
    pub compression_min_size: usize,
    /// zlib level, 1 (fastest) to 9 (smallest); 2 shrinks small events far more than 1 for
    /// ~4 µs more per event, compressed once for all subscribers.
    #[arg(long, env = "KRUX_COMPRESSION_LEVEL", default_value_t = 2)]
    pub compression_level: u32,
    #[command(flatten)]
    pub nats: cluster::NatsArgs,
    #[command(flatten)]
    pub stream: cluster::StreamArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Largest `--replay`: its slots alone are 8 bytes each.
pub const MAX_REPLAY: usize = 100_000_000;

impl ServeConfig {
    /// permessage-deflate's settings, when it is on.
    pub fn compression(&self) -> Option<crate::proto::deflate::Policy> {
        (self.compression == OnOff::On).then_some(crate::proto::deflate::Policy {
            min_size: self.compression_min_size,
            level: self.compression_level,
        })
    }

    /// Refuses settings that cannot work, naming the flag and the range it allows.
    pub fn check(&self) -> Result<(), String> {
        let size = |flag: &str, v: usize, min: usize, max: usize, range: &str| {
            if (min..=max).contains(&v) {
                Ok(())
            } else {
                Err(format!("--{flag} {v}: must be between {range}"))
            }
        };
        size(
            "client-queue",
            self.client_queue,
            1 << 10,
            1 << 30,
            "1KiB and 1GiB",
        )?;
        size(
            "max-frame",
            self.max_frame,
            1 << 10,
            1 << 30,
            "1KiB and 1GiB",
        )?;
        size(
            "replay",
            self.replay,
            1,
            MAX_REPLAY,
            "1 and 100000000 events",
        )?;
        size(
            "replay-memory",
            self.replay_memory,
            1 << 10,
            usize::MAX,
            "1KiB and any size",
        )?;
        size(
            "max-connections",
            self.max_connections,
            1,
            usize::MAX,
            "1 and any number",
        )?;
        if let Some(n) = self.reactors {
            size(
                "reactors",
                n,
                1,
                1024,
                "1 and 1024 (omit it for one per core)",
            )?;
        }
        if !(1..=9).contains(&self.compression_level) {
            return Err(format!(
                "--compression-level {}: must be between 1 (fastest) and 9 (smallest)",
                self.compression_level
            ));
        }
        for (flag, d) in [
            ("ping-interval", self.ping_interval),
            ("read-timeout", self.read_timeout),
            ("handshake-timeout", self.handshake_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("--{flag} 0: must be longer than zero, e.g. 10s"));
            }
        }
        // No publisher or admin authentication: loopback unless the operator insists.
        for (flag, addr, insisted, what) in [
            (
                "ingest",
                self.ingest,
                self.insecure_ingest,
                "publishers are not authenticated",
            ),
            (
                "admin",
                self.admin,
                self.insecure_admin,
                "/metrics is not authenticated",
            ),
        ] {
            if !addr.ip().is_loopback() && !insisted {
                return Err(format!(
                    "--{flag} {addr}: refusing a non-loopback address ({what}, so anyone who can reach it could use it); bind it to 127.0.0.1, or pass --insecure-{flag}"
                ));
            }
        }
        if let Some(url) = &self.nats.url {
            cluster::parse_urls(url).map_err(|e| format!("{e:#}"))?;
            self.stream.check()?;
        }
        let tls = self.tls_self_signed || self.tls_cert.is_some();
        if !self.listen.ip().is_loopback() && !tls && !self.insecure_plaintext {
            return Err(format!(
                "--listen {}: refusing plaintext WebSocket on a non-loopback address (tokens would cross the network in the clear); use --tls-cert/--tls-key or --tls-self-signed, or pass --insecure-plaintext",
                self.listen
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: ServeConfig,
    }

    fn check(args: &[&str]) -> Result<(), String> {
        Cli::parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .cfg
            .check()
    }

    #[test]
    fn settings_that_cannot_work_are_refused_by_flag() {
        assert_eq!(check(&[]), Ok(()));
        for (args, names) in [
            (
                &["--client-queue", "0"][..],
                "--client-queue 0: must be between 1KiB",
            ),
            (&["--max-frame", "0"], "--max-frame 0: must be between"),
            (
                &["--replay", "18446744073709551615"],
                "--replay 18446744073709551615",
            ),
            (&["--replay", "0"], "--replay 0"),
            (
                &["--replay-memory", "0"],
                "--replay-memory 0: must be between 1KiB",
            ),
            (
                &["--reactors", "0"],
                "--reactors 0: must be between 1 and 1024",
            ),
            (&["--max-connections", "0"], "--max-connections 0"),
            (&["--read-timeout", "0s"], "--read-timeout 0"),
            (&["--nats", "no such url"], "--nats no such url: not a list"),
            (
                &["--nats", "nats://127.0.0.1:4222", "--nats-stream", "a.b"],
                "--nats-stream \"a.b\"",
            ),
        ] {
            let err = check(args).unwrap_err();
            assert!(err.starts_with(names), "{args:?}: {err}");
        }
    }

    #[test]
    fn only_loopback_unless_insisted() {
        assert!(check(&["--listen", "[::1]:7701"]).is_ok());
        for (args, flag) in [
            (&["--listen", "0.0.0.0:7701"][..], "--insecure-plaintext"),
            (&["--ingest", "0.0.0.0:7702"], "--insecure-ingest"),
            (&["--admin", "0.0.0.0:7703"], "--insecure-admin"),
        ] {
            let err = check(args).unwrap_err();
            assert!(err.contains(flag), "{err}");
            let mut insisted = args.to_vec();
            insisted.push(flag);
            assert_eq!(check(&insisted), Ok(()));
        }
        assert!(check(&["--listen", "0.0.0.0:7701", "--tls-self-signed"]).is_ok());
    }

    #[test]
    fn host_names_resolve() {
        let a = parse_addr("localhost:7702").unwrap();
        assert!(a.ip().is_loopback() && a.port() == 7702, "{a}");
        assert_eq!(parse_addr("127.0.0.1:1").unwrap().port(), 1);
        assert!(parse_addr("localhost")
            .unwrap_err()
            .contains("not an address"));
    }

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
