//! The server under test: attached to by address, or spawned on port 0 (relay, baseline or
//! limit server) with a fresh data dir and token. Also its CPU time and RSS from /proc.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use krux_testkit::wait_ready_file;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Relay,
    Baseline,
    Limit,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Kind::Relay => "krux-relay",
            Kind::Baseline => "krux-baseline",
            Kind::Limit => "krux-limit",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Spawn this server on port 0 (default: the relay) instead of attaching to --ws.
    #[arg(long, value_enum)]
    pub spawn: Option<Kind>,
    /// Directory holding krux-relay, krux-baseline and krux-limit (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Server threads when spawning: the relay's reactors, the baseline's and the limit
    /// server's runtime workers (default: one per core).
    #[arg(long, alias = "reactors")]
    pub threads: Option<usize>,
    /// Relay I/O backend when spawning the relay (auto, uring, epoll).
    #[arg(long, default_value = "auto")]
    pub io: String,
    /// WebSocket address of a running server.
    #[arg(long, default_value = "127.0.0.1:7701")]
    pub ws: SocketAddr,
    /// Ingest address of a running server.
    #[arg(long, default_value = "127.0.0.1:7702")]
    pub ingest: SocketAddr,
    /// User token for a running server (or KRUX_TOKEN).
    #[arg(long, env = "KRUX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PID of a running server, for its CPU and RSS.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Subscribe over TLS: a spawned relay runs with --tls-self-signed.
    #[arg(long)]
    pub tls: bool,
    /// Trust this certificate (PEM) for TLS to a running relay (implies --tls).
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Admin address of a running relay, for its version in the report.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// TLS: keep no session tickets, so every handshake is a full one (by default a
    /// subscriber that reconnects resumes its session with a ticket, as browsers do).
    #[arg(long)]
    pub no_resume: bool,
}

/// A TLS connector trusting exactly the certificates in `pem`; with `resume`, reconnects
/// resume sessions with the tickets earlier connections received.
pub fn tls_connector(
    pem: &std::path::Path,
    resume: bool,
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut config = (*krux_relay::io::certs::client_config_trusting(pem)?).clone();
    config.resumption = if resume {
        rustls::client::Resumption::store(Arc::new(TicketPool::new()))
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Session tickets for every subscriber of a run: rustls's own cache keeps a handful per
/// server, too few for thousands of subscribers reconnecting at once.
#[derive(Debug)]
struct TicketPool {
    tls13: Mutex<HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>>,
    /// Key-exchange hints and TLS 1.2 sessions: rustls's cache does these well.
    rest: rustls::client::ClientSessionMemoryCache,
}

/// Tickets kept per server: two per subscriber of the largest runs.
const TICKETS: usize = 200_000;

impl TicketPool {
    fn new() -> TicketPool {
        TicketPool {
            tls13: Mutex::default(),
            rest: rustls::client::ClientSessionMemoryCache::new(TICKETS),
        }
    }
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, server: ServerName<'static>, group: rustls::NamedGroup) {
        self.rest.set_kx_hint(server, group);
    }

    fn kx_hint(&self, server: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.rest.kx_hint(server)
    }

    fn set_tls12_session(&self, server: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.rest.set_tls12_session(server, value);
    }

    fn tls12_session(&self, server: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.rest.tls12_session(server)
    }

    fn remove_tls12_session(&self, server: &ServerName<'static>) {
        self.rest.remove_tls12_session(server);
    }

    fn insert_tls13_ticket(&self, server: ServerName<'static>, value: Tls13ClientSessionValue) {
        let mut all = self.tls13.lock().expect("ticket pool lock");
        let tickets = all.entry(server).or_default();
        if tickets.len() == TICKETS {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(&self, server: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        // The newest: the likeliest to be under the server's current ticket key.
        self.tls13
            .lock()
            .expect("ticket pool lock")
            .get_mut(server)?
            .pop_back()
    }
}

/// `GET path` on an admin port: the whole response, or `None` if it cannot be had.
pub fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Where a run went, for its report.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TargetInfo {
    pub ws: String,
    pub ingest: String,
    pub admin: Option<String>,
    pub tls: bool,
    /// TLS sessions resumed on reconnect (false with `--no-resume`).
    pub tls_resume: bool,
    /// From the relay's `krux_build_info` (needs its admin port).
    pub relay_version: Option<String>,
}

/// A server ready for traffic.
pub struct Target {
    pub kind: Option<Kind>,
    pub ws: SocketAddr,
    pub ingest: SocketAddr,
    pub token: String,
    pub pid: Option<u32>,
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// The certificate `tls` trusts (worker processes build their own connector from it).
    pub ca_pem: Option<std::path::PathBuf>,
    /// Whether TLS sessions resume (`--no-resume` says no).
    pub resume: bool,
    /// The relay's admin port, when known (spawned, or `--admin`).
    pub admin: Option<SocketAddr>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
            SPAWNED
                .lock()
                .expect("spawned lock")
                .retain(|&p| p != c.id());
        }
    }
}

/// Servers spawned and not yet stopped: a second Ctrl-C exits at once, without the
/// destructors that would stop them, so it stops these first.
static SPAWNED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Kills every server still spawned (the exit path that skips destructors).
pub fn kill_spawned() {
    for pid in SPAWNED.lock().expect("spawned lock").drain(..) {
        // SAFETY: kill(2) only sends a signal; the PID is a child this process started
        // and has not reaped (reaping removes it from the list first).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

fn bin_dir(args: &TargetArgs) -> anyhow::Result<PathBuf> {
    match &args.bin_dir {
        Some(d) => Ok(d.clone()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("binary has a directory")?
            .to_path_buf()),
    }
}

impl Target {
    /// Where this target is, and the relay's version when its admin port answers.
    pub fn info(&self) -> TargetInfo {
        let relay_version = self
            .admin
            .and_then(|a| admin_get(a, "/metrics"))
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("krux_build_info{"))?;
                let v = line.split("version=\"").nth(1)?.split('"').next()?;
                Some(v.to_string())
            });
        TargetInfo {
            ws: self.ws.to_string(),
            ingest: self.ingest.to_string(),
            admin: self.admin.map(|a| a.to_string()),
            tls: self.tls.is_some(),
            tls_resume: self.tls.is_some() && self.resume,
            relay_version,
        }
    }

    pub fn open(args: &TargetArgs, kind: Option<Kind>) -> anyhow::Result<Target> {
        let Some(kind) = kind.or(args.spawn) else {
            if args.tls && args.ca_cert.is_none() {
                bail!(
                    "--tls against a running relay needs --ca-cert PEM: the certificate it serves, or the CA that signed it (a relay run with --tls-self-signed writes it to <its data dir>/tls-self-signed.pem)"
                );
            }
            let token = args
                .token
                .clone()
                .context("--token (or KRUX_TOKEN) is needed to attach to a running relay")?;
            return Ok(Target {
                kind: None,
                ws: args.ws,
                ingest: args.ingest,
                token,
                pid: args.pid,
                tls: args
                    .ca_cert
                    .as_deref()
                    .map(|pem| tls_connector(pem, !args.no_resume))
                    .transpose()?,
                ca_pem: args.ca_cert.clone(),
                resume: !args.no_resume,
                admin: args.admin,
                child: None,
                _dir: None,
            });
        };
        let bins = bin_dir(args)?;
        let exe = bins.join(kind.binary());
        let relay = bins.join("krux-relay");
        if !exe.exists() {
            bail!(
                "{} not found; build with `cargo build --release --workspace`",
                exe.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let token = if kind == Kind::Limit {
            "krx_user_limit_server_checks_no_tokens".to_string()
        } else {
            let out = Command::new(&relay)
                .args(["user-token", "create", "--name", "loadtest"])
                .env("KRUX_DATA_DIR", dir.path())
                .output()
                .context("creating a token with krux-relay")?;
            if !out.status.success() {
                bail!(
                    "user-token create failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            String::from_utf8(out.stdout)?.trim().to_string()
        };
        let ready = dir.path().join("ready.json");
        let mut cmd = Command::new(&exe);
        match kind {
            Kind::Relay => {
                cmd.args(["serve", "--admin", "127.0.0.1:0", "--io", &args.io]);
                cmd.env("KRUX_DATA_DIR", dir.path()).env("KRUX_LOG", "warn");
                if let Some(r) = args.threads {
                    cmd.args(["--reactors", &r.to_string()]);
                }
                if args.tls {
                    cmd.arg("--tls-self-signed");
                }
            }
            Kind::Baseline => {
                cmd.arg("--data-dir").arg(dir.path());
            }
            Kind::Limit => {}
        }
        if let (Some(n), Kind::Baseline | Kind::Limit) = (args.threads, kind) {
            cmd.args(["--threads", &n.to_string()]);
        }
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--ingest",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready);
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        SPAWNED.lock().expect("spawned lock").push(child.id());
        let info = wait_ready_file(&mut child, &ready, kind.binary(), READY_WITHIN)?;
        let ca_pem = match (args.tls, kind) {
            (false, _) => None,
            (true, Kind::Relay) => Some(dir.path().join("tls-self-signed.pem")),
            (true, other) => bail!("--tls: the {} has no TLS", other.binary()),
        };
        let tls = ca_pem
            .as_deref()
            .map(|pem| tls_connector(pem, !args.no_resume))
            .transpose()?;
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            info[k]
                .as_str()
                .context("ready file has addresses")?
                .parse()
                .context("ready file address")
        };
        Ok(Target {
            kind: Some(kind),
            ws: addr("ws")?,
            ingest: addr("ingest")?,
            token,
            pid: Some(child.id()),
            tls,
            ca_pem,
            resume: !args.no_resume,
            admin: info["admin"].as_str().and_then(|a| a.parse().ok()),
            child: Some(child),
            _dir: Some(dir),
        })
    }
}

/// How long a spawned server may take to write its ready file.
pub const READY_WITHIN: Duration = Duration::from_secs(20);

/// CPU seconds (user + system) and RSS bytes of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss: u64,
}

pub fn proc_sample(pid: Option<u32>) -> Option<ProcSample> {
    let path = |f: &str| match pid {
        Some(p) => format!("/proc/{p}/{f}"),
        None => format!("/proc/self/{f}"),
    };
    let stat = std::fs::read_to_string(path("stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at state (field 3).
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(path("status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()?;
    Some(ProcSample {
        cpu_s: ticks / hz,
        rss: rss_kib * 1024,
    })
}
