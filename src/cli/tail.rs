//! `tail`: subscribe and print events, as readable lines or raw JSON.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use serde_json::Value;

use super::ws_client::{self, Message};

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Relay address; `/events` is implied.
    #[arg(long, default_value = "ws://127.0.0.1:7701")]
    pub url: String,
    /// User token (krx_user_…).
    #[arg(long, env = "KRUX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Only these agents (comma list).
    #[arg(long)]
    pub agent: Option<String>,
    /// Only these event types (comma list).
    #[arg(long = "type")]
    pub etype: Option<String>,
    /// Only these sessions (comma list).
    #[arg(long)]
    pub session: Option<String>,
    /// Replay retained events after this seq first.
    #[arg(long)]
    pub since: Option<u64>,
    /// Print each event's raw JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit (successfully) once no event has arrived for this long, e.g. `2s`: with
    /// `--since 0`, prints what the relay retains and stops.
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub until_idle: Option<Duration>,
    /// Colour lines by severity: `auto` (only when stdout is a terminal), `always`, `never`.
    /// Never with `--json`.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
    /// Exit when the connection ends instead of reconnecting and resuming.
    #[arg(long)]
    pub no_reconnect: bool,
    /// Trust this CA or self-signed certificate (PEM) for wss:// (e.g. the relay's
    /// <data-dir>/tls-self-signed.pem).
    #[arg(long)]
    pub ca_cert: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

fn events_url(args: &TailArgs, since: Option<u64>) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let mut params = Vec::new();
    for (k, v) in [
        ("agent", &args.agent),
        ("type", &args.etype),
        ("session", &args.session),
    ] {
        if let Some(v) = v {
            // Commas separate values: keep them literal.
            params.push(format!(
                "{k}={}",
                v.split(',').map(enc).collect::<Vec<_>>().join(",")
            ));
        }
    }
    if let Some(s) = since {
        params.push(format!("since={s}"));
    }
    let base = args.url.trim_end_matches('/');
    let base = base.strip_suffix("/events").unwrap_or(base);
    if params.is_empty() {
        format!("{base}/events")
    } else {
        format!("{base}/events?{}", params.join("&"))
    }
}

/// Refuses, before any connection, a `--url` that can never work.
fn check_url(url: &str) -> anyhow::Result<()> {
    let hint = |what: &str| {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        format!("--url {url}: {what}; use ws://{rest} (or wss://{rest} when the relay serves TLS)")
    };
    match url.split_once("://") {
        Some(("ws" | "wss", rest)) if !rest.is_empty() => Ok(()),
        Some(("http" | "https", _)) => bail!(hint("an http URL is not a WebSocket URL")),
        Some(_) => bail!(hint("the scheme must be ws or wss")),
        None => bail!(hint("the scheme is missing")),
    }
}

pub fn run(args: TailArgs) -> anyhow::Result<ExitCode> {
    check_url(&args.url)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(tail(args))
}

/// How one connection ended.
enum Ended {
    /// `--count` reached, or the relay closed normally.
    Done,
    /// Not worth retrying (refused, revoked, protocol error, misconfiguration): the
    /// message says why and what to do.
    Fatal(String),
    /// Worth reconnecting (refused connection, restart, 5xx, shutdown, slow-consumer close).
    Lost(String),
}

/// Consecutive connections that ended without a single new event before `tail` gives up:
/// a relay that keeps closing it at the same seq will not stop doing so.
const MAX_FRUITLESS: u32 = 6;

async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let Some(token) = args.token.clone() else {
        bail!("a user token is needed: pass --token or set KRUX_TOKEN (create one with `krux-relay user-token create --name NAME`)");
    };
    if token.bytes().any(|b| b.is_ascii_control()) {
        bail!("the token is not a valid header value (it holds a control character)");
    }
    let tls = args
        .ca_cert
        .as_deref()
        .map(crate::io::certs::client_config_trusting)
        .transpose()?;
    let mut since = args.since;
    let mut seen = 0u64;
    let mut backoff = Duration::from_millis(250);
    // Closes in a row at the same seq, with no event in between.
    let mut fruitless = 0u32;
    // With `--until-idle`, the quiet time counts across reconnections too.
    let mut last_event = tokio::time::Instant::now();
    loop {
        let before = seen;
        match stream_once(&args, &token, tls.clone(), &mut since, &mut seen).await? {
            Ended::Done => return Ok(ExitCode::SUCCESS),
            Ended::Fatal(msg) => {
                eprintln!("{msg}");
                return Ok(ExitCode::FAILURE);
            }
            Ended::Lost(why) if args.no_reconnect => {
                eprintln!("{why}");
                return Ok(ExitCode::FAILURE);
            }
            Ended::Lost(why) => {
                let resume = since.map_or("live".to_string(), |s| format!("after seq {s}"));
                if seen > before {
                    last_event = tokio::time::Instant::now();
                }
                if args
                    .until_idle
                    .is_some_and(|idle| last_event.elapsed() >= idle)
                {
                    eprintln!("{why}; no event for --until-idle, not reconnecting");
                    return Ok(ExitCode::FAILURE);
                }
                if seen > before {
                    (backoff, fruitless) = (Duration::from_millis(250), 0);
                } else if why.starts_with(CLOSED) {
                    fruitless += 1;
                    if fruitless >= MAX_FRUITLESS {
                        eprintln!("{why}; giving up: closed {fruitless} times in a row, resuming {resume}, without receiving an event (is --client-queue on the relay smaller than its events?)");
                        return Ok(ExitCode::FAILURE);
                    }
                }
                eprintln!("{why}; reconnecting in {backoff:?}, resuming {resume}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
        }
    }
}

/// How a `Lost` message starts when the relay itself closed the stream.
const CLOSED: &str = "relay closed the stream";

/// Sorts a failed connection attempt: what can heal by waiting is retried, the rest ends
/// `tail` with what to do about it.
fn connect_error(url: &str, e: ws_client::Error) -> Ended {
    use std::io::ErrorKind::*;
    match e {
        ws_client::Error::Http(status, reason, body) => {
            let msg = format!(
                "the relay refused the subscription: {status} {reason} {}",
                body.trim()
            );
            // Capacity, rate limits and server errors pass; the rest will not change by retrying.
            match status {
                429 | 500..=599 => Ended::Lost(msg),
                _ => Ended::Fatal(msg),
            }
        }
        ws_client::Error::Io(io)
            if matches!(
                io.kind(),
                ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut | NotConnected
            ) =>
        {
            Ended::Lost(format!("cannot connect to {url}: {io}"))
        }
        // rustls reports through the stream as an I/O error carrying its own.
        ws_client::Error::Io(io)
            if io
                .get_ref()
                .is_some_and(|e| e.downcast_ref::<rustls::Error>().is_some()) =>
        {
            tls_failed(url, &io)
        }
        ws_client::Error::Url(u) => Ended::Fatal(format!("--url {url}: {u}")),
        other => Ended::Fatal(format!(
            "{url} did not answer as a krux-relay WebSocket ({other}); if it serves TLS, use wss:// (with --ca-cert for a self-signed certificate)"
        )),
    }
}

fn tls_failed(url: &str, e: &dyn std::fmt::Display) -> Ended {
    Ended::Fatal(format!(
        "TLS with {url} failed: {e}; if the relay uses a self-signed certificate, pass --ca-cert <its data dir>/tls-self-signed.pem; if it serves plaintext, use ws://"
    ))
}

async fn stream_once(
    args: &TailArgs,
    token: &str,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    since: &mut Option<u64>,
    seen: &mut u64,
) -> anyhow::Result<Ended> {
    let url = events_url(args, *since);
    let bearer = format!("Bearer {token}");
    let (mut ws, position) =
        match ws_client::connect(&url, &[("Authorization", &bearer)], tls).await {
            Ok(x) => x,
            Err(e) => return Ok(connect_error(&url, e)),
        };
    if since.is_none() {
        // A live subscription is owed only what comes after the relay's position when it
        // began (`Krux-Seq`): resuming from there misses nothing, even if nothing matched.
        *since = Some(position.unwrap_or(0));
    }
    let mut out = std::io::stdout().lock();
    let colour = !args.json
        && match args.color {
            Color::Auto => std::io::IsTerminal::is_terminal(&out),
            Color::Always => true,
            Color::Never => false,
        };
    loop {
        let next = match args.until_idle {
            Some(idle) => match tokio::time::timeout(idle, ws.next()).await {
                Ok(next) => next,
                Err(_) => return Ok(Ended::Done),
            },
            None => ws.next().await,
        };
        let Some(msg) = next else { break };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => return Ok(Ended::Lost(format!("connection lost: {e}"))),
        };
        match msg {
            Message::Text(t) => {
                let v: Value = match serde_json::from_str(&t) {
                    Ok(v) => v,
                    Err(e) => {
                        // Skip it, but keep the position past it so a resume does not
                        // meet it again.
                        let seq = trailing_seq(&t);
                        let at = seq.map_or(String::new(), |s| format!(" (seq {s})"));
                        eprintln!("skipping an event{at} that cannot be parsed here: {e}");
                        if let Some(s) = seq {
                            *since = Some(s);
                        }
                        continue;
                    }
                };
                if args.json {
                    writeln!(out, "{t}")?;
                } else {
                    let line = escape_controls(&readable(&v));
                    match severity_colour(&v).filter(|_| colour) {
                        Some(c) => writeln!(out, "\x1b[{c}m{line}\x1b[0m")?,
                        None => writeln!(out, "{line}")?,
                    }
                }
                out.flush()?;
                // A replay_gap notice has no seq: the position stays where it was.
                if let Some(s) = v.get("seq").and_then(Value::as_u64) {
                    *since = Some(s);
                    *seen += 1;
                    if args.count.is_some_and(|c| *seen >= c) {
                        return Ok(Ended::Done);
                    }
                }
            }
            Message::Close(code, reason) => {
                let what = format!("{CLOSED}: {code} {reason}");
                return Ok(match code {
                    1000 => Ended::Done,
                    1001 | 1005 | 1006 | 1011 | 1012 | 1013 | 4001 => Ended::Lost(what),
                    _ => Ended::Fatal(what),
                });
            }
        }
    }
    Ok(Ended::Lost("the connection ended".into()))
}

/// The `"seq":N` the relay appends to every event frame, read without parsing the rest.
fn trailing_seq(text: &str) -> Option<u64> {
    let at = text.rfind("\"seq\":")? + 6;
    let digits = text[at..].trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Makes text safe for a terminal: control characters (newlines that would forge a line,
/// escape sequences that clear the screen or set the title) and bidirectional overrides are
/// shown escaped (`\n`, `\u{1b}`), never interpreted.
pub fn escape_controls(line: &str) -> String {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !line.contains(unsafe_char) {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The ANSI colour of an event that needs a supervisor: red for violations, errors and
/// critical alerts, yellow for what waits on someone (approvals, rate limits, warnings),
/// green for a granted approval, and none for the rest.
fn severity_colour(v: &Value) -> Option<&'static str> {
    const RED: &str = "31";
    const YELLOW: &str = "33";
    const GREEN: &str = "32";
    let data = &v["data"];
    match v["type"].as_str()? {
        "policy_violation" | "capability_error" | "replay_gap" => Some(RED),
        "capability_result" if data["success"] == Value::Bool(false) => Some(RED),
        "approval_requested" | "rate_limit_hit" => Some(YELLOW),
        "approval_resolved" => match data["decision"].as_str() {
            Some("approved") => Some(GREEN),
            _ => Some(YELLOW),
        },
        "health_alert" => match data["severity"].as_str().map(str::to_ascii_lowercase) {
            Some(s) if matches!(s.as_str(), "critical" | "error" | "high") => Some(RED),
            _ => Some(YELLOW),
        },
        _ => None,
    }
}

/// One readable line: time, type, agent, session, a short summary of `data`, and `#seq`.
pub fn readable(v: &Value) -> String {
    let s = |v: &Value| -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        }
    };
    let d = &v["data"];
    let f = |k: &str| s(&d[k]);
    let time = v["timestamp"]
        .as_str()
        .and_then(|t| t.get(11..23))
        .unwrap_or("");
    let etype = v["type"].as_str().unwrap_or("?");
    let session = v
        .get("session_id")
        .or_else(|| d.get("session_id"))
        .map(s)
        .unwrap_or_else(|| "-".into());
    let summary = match etype {
        "capability_invoked" => format!(
            "{} [{}] {}ms",
            f("capability"),
            f("permission_tier"),
            f("duration_ms")
        ),
        "capability_result" => format!(
            "{} {} {}ms",
            f("capability"),
            if d["success"] == Value::Bool(true) {
                "ok"
            } else {
                "failed"
            },
            f("duration_ms")
        ),
        "capability_error" => format!("{} {}: {}", f("capability"), f("error_type"), f("message")),
        "policy_violation" => format!("{} {}: {}", f("capability"), f("rule"), f("reason")),
        "approval_requested" => {
            format!("{} {}: {}", f("approval_id"), f("capability"), f("reason"))
        }
        "approval_resolved" => format!(
            "{} {} by {}",
            f("approval_id"),
            f("decision"),
            f("decided_by")
        ),
        "session_started" => f("agent_purpose"),
        "session_ended" => format!(
            "{}s, {} capabilities",
            f("duration_seconds"),
            f("capabilities_invoked")
        ),
        "rate_limit_hit" => format!(
            "{} limit {}/{}, retry in {}s",
            f("capability_pattern"),
            f("limit"),
            f("window"),
            f("retry_after_seconds")
        ),
        "write_buffered" => format!(
            "{} {} {} until {}",
            f("service"),
            f("operation"),
            f("write_id"),
            f("buffer_until")
        ),
        "health_alert" => format!(
            "{} {}: {} (threshold {})",
            f("severity"),
            f("component"),
            f("message"),
            f("threshold")
        ),
        "replay_gap" => format!(
            "events after {} are gone; resuming at {}",
            f("since"),
            f("oldest")
        ),
        _ => d.to_string(),
    };
    let seq = v.get("seq").map(|q| format!(" #{q}")).unwrap_or_default();
    format!(
        "{time:<12} {etype:<18} {:<16} {session:<14} {summary}{seq}",
        s(&v["agent"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_readable_line() {
        let args = TailArgs {
            url: "ws://127.0.0.1:1/".into(),
            token: None,
            agent: Some("a b,c".into()),
            etype: Some("health_alert".into()),
            session: None,
            since: Some(4),
            json: false,
            count: None,
            until_idle: None,
            color: Color::Never,
            no_reconnect: false,
            ca_cert: None,
        };
        assert_eq!(
            events_url(&args, args.since),
            "ws://127.0.0.1:1/events?agent=a%20b,c&type=health%5Falert&since=4"
        );
        let v: Value = serde_json::from_str(
            r#"{"type":"capability_result","timestamp":"2026-03-15T10:30:00.135Z","agent":"research-agent","session_id":"sess-1","data":{"capability":"filesystem.read","success":true,"duration_ms":12},"seq":9}"#,
        )
        .unwrap();
        let line = readable(&v);
        assert_eq!(trailing_seq(r#"{"a":"x\"seq\":1","seq":42}"#), Some(42));
        assert_eq!(trailing_seq("{[[[[[[[,\"seq\": 7}"), Some(7));
        assert_eq!(trailing_seq("{}"), None);
        assert_eq!(
            escape_controls("ok\nfake line \u{1b}[2J \u{1b}]0;title\u{7} \u{202e}rtl é"),
            "ok\\nfake line \\u{1b}[2J \\u{1b}]0;title\\u{7} \\u{202e}rtl é"
        );
        assert!(check_url("ws://127.0.0.1:7701").is_ok());
        assert!(check_url("wss://relay:7701/events").is_ok());
        for bad in [
            "http://127.0.0.1:7701",
            "127.0.0.1:7701",
            "ftp://x",
            "ws://",
        ] {
            let err = check_url(bad).unwrap_err().to_string();
            assert!(err.contains("ws://"), "{bad}: {err}");
        }
        for part in [
            "10:30:00.135",
            "capability_result",
            "research-agent",
            "sess-1",
            "filesystem.read ok 12ms",
            "#9",
        ] {
            assert!(line.contains(part), "{line}");
        }
    }

    #[test]
    fn colours_follow_what_needs_a_supervisor() {
        let colour = |t: &str, data: &str| {
            let v: Value =
                serde_json::from_str(&format!(r#"{{"type":"{t}","data":{data}}}"#)).unwrap();
            severity_colour(&v)
        };
        assert_eq!(colour("policy_violation", "{}"), Some("31"));
        assert_eq!(
            colour("health_alert", r#"{"severity":"CRITICAL"}"#),
            Some("31")
        );
        assert_eq!(
            colour("health_alert", r#"{"severity":"warning"}"#),
            Some("33")
        );
        assert_eq!(colour("approval_requested", "{}"), Some("33"));
        assert_eq!(
            colour("approval_resolved", r#"{"decision":"approved"}"#),
            Some("32")
        );
        assert_eq!(
            colour("capability_result", r#"{"success":false}"#),
            Some("31")
        );
        assert_eq!(colour("capability_result", r#"{"success":true}"#), None);
        assert_eq!(colour("capability_invoked", "{}"), None);
    }
}
