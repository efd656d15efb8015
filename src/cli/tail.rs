//! `tail`: subscribe and print events, as readable lines or raw JSON.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};

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
    /// Exit when the connection ends instead of reconnecting and resuming.
    #[arg(long)]
    pub no_reconnect: bool,
    /// Trust this CA or self-signed certificate (PEM) for wss:// (e.g. the relay's
    /// <data-dir>/tls-self-signed.pem).
    #[arg(long)]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// A connector trusting exactly the certificates in `pem`.
fn connector(pem: &std::path::Path) -> anyhow::Result<tokio_tungstenite::Connector> {
    Ok(tokio_tungstenite::Connector::Rustls(
        crate::io::tls::client_config_trusting(pem)?,
    ))
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

pub fn run(args: TailArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(tail(args))
}

/// How one connection ended.
enum Ended {
    /// `--count` reached, or the relay closed normally.
    Done,
    /// Not worth retrying (refused, revoked, protocol error): the message says why.
    Fatal(String),
    /// Worth reconnecting (network, restart, shutdown, slow-consumer close).
    Lost(String),
}

async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let Some(token) = args.token.clone() else {
        bail!("a user token is needed: pass --token or set KRUX_TOKEN (create one with `krux-relay user-token create --name NAME`)");
    };
    let mut since = args.since;
    let mut seen = 0u64;
    let mut backoff = Duration::from_millis(250);
    loop {
        let mut connected = false;
        match stream_once(&args, &token, &mut since, &mut seen, &mut connected).await? {
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
                if connected {
                    backoff = Duration::from_millis(250);
                }
                let resume = since.map_or("live".to_string(), |s| format!("after seq {s}"));
                eprintln!("{why}; reconnecting in {backoff:?}, resuming {resume}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
        }
    }
}

async fn stream_once(
    args: &TailArgs,
    token: &str,
    since: &mut Option<u64>,
    seen: &mut u64,
    connected: &mut bool,
) -> anyhow::Result<Ended> {
    let url = events_url(args, *since);
    let mut req = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("bad --url {}", args.url))?;
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}")
            .parse()
            .context("the token is not a valid header value")?,
    );
    let tls = args.ca_cert.as_deref().map(connector).transpose()?;
    let (mut ws, _) =
        match tokio_tungstenite::connect_async_tls_with_config(req, None, false, tls).await {
            Ok(x) => x,
            Err(tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                let msg = format!(
                    "the relay refused the subscription: {} {}",
                    resp.status(),
                    body.trim()
                );
                // 503 (capacity) and 429 (rate limit) pass; the rest will not change by retrying.
                return Ok(match resp.status().as_u16() {
                    429 | 503 => Ended::Lost(msg),
                    _ => Ended::Fatal(msg),
                });
            }
            Err(e) => return Ok(Ended::Lost(format!("cannot connect to {url}: {e}"))),
        };
    *connected = true;
    let mut out = std::io::stdout().lock();
    while let Some(msg) = ws.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => return Ok(Ended::Lost(format!("connection lost: {e}"))),
        };
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).context("the relay sent invalid JSON")?;
                if args.json {
                    writeln!(out, "{t}")?;
                } else {
                    writeln!(out, "{}", readable(&v))?;
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
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                let what = format!("relay closed the stream: {code} {reason}");
                return Ok(match code {
                    1000 => Ended::Done,
                    1001 | 1005 | 1006 | 1011 | 1012 | 1013 | 4001 => Ended::Lost(what),
                    _ => Ended::Fatal(what),
                });
            }
            _ => {}
        }
    }
    Ok(Ended::Lost("the connection ended".into()))
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
}
