//! The baseline relay: what a competent engineer writes in a day with tokio and
//! tokio-tungstenite, with the same ports, auth, filters, ingest format and `seq` as
//! krux-relay. It is the reference the relay's numbers are compared with, so it is meant to
//! be good, not a straw man:
//!
//! - serde_json validation, `seq` inserted, serialized once into a shared `Utf8Bytes`;
//! - `tokio::sync::broadcast` to one task per subscriber (multi-threaded runtime);
//! - each task feeds every frame that is ready, then flushes once; TCP_NODELAY.
//!
//! What it leaves out (not on the measured path): durable `seq`, replay, keepalive pings,
//! the admin port, TLS.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use krux_relay::auth::LiveCredentials;
use krux_relay::event::{EventType, FilterKeys};
use krux_relay::filter::Filter;
use krux_relay::proto::handshake::{is_agent_token, parse_subscription, query_pairs};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    net: common::Listen,
    #[arg(long)]
    data_dir: PathBuf,
    /// Broadcast channel capacity (events a subscriber may lag before it is closed).
    #[arg(long, default_value_t = 65_536)]
    capacity: usize,
}

struct Event {
    keys: FilterKeys,
    text: Utf8Bytes,
}

struct Hub {
    /// Serializes seq assignment and send, so channel order is seq order.
    seq: Mutex<u64>,
    tx: broadcast::Sender<Arc<Event>>,
    credentials: Arc<LiveCredentials>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::block_on(args.net.threads, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let credentials = LiveCredentials::load(&args.data_dir)?;
    credentials
        .clone()
        .watch(std::time::Duration::from_millis(250), Arc::default());
    let (tx, _) = broadcast::channel(args.capacity);
    let hub = Arc::new(Hub {
        seq: Mutex::new(0),
        tx,
        credentials,
    });
    let (ws, ingest) = args.net.bind().await?;
    let h = hub.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = ingest.accept().await {
            tokio::spawn(publisher(s, h.clone()));
        }
    });
    while let Ok((s, _)) = ws.accept().await {
        tokio::spawn(subscriber(s, hub.clone()));
    }
    Ok(())
}

/// The keys of a valid event, or the reason it is not.
fn check(v: &Value) -> Result<FilterKeys, String> {
    let obj = v.as_object().ok_or("an event must be a JSON object")?;
    if obj.contains_key("seq") {
        return Err("field `seq` is assigned by the relay".into());
    }
    let name = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or("missing field `type`")?;
    let etype = EventType::from_name(name).ok_or_else(|| format!("unknown event type `{name}`"))?;
    let agent = match obj.get("agent") {
        Some(Value::String(a)) => Some(a.as_str().into()),
        Some(Value::Null) if etype == EventType::HealthAlert => None,
        _ => return Err("field `agent` must be a string".into()),
    };
    let data = obj
        .get("data")
        .and_then(Value::as_object)
        .ok_or("field `data` must be an object")?;
    let session = obj
        .get("session_id")
        .and_then(Value::as_str)
        .map(Into::into);
    if etype.requires_session() && session.is_none() {
        return Err("missing field `session_id`".into());
    }
    for (field, _) in etype.data_fields() {
        if !data.contains_key(*field) {
            return Err(format!("missing field `data.{field}`"));
        }
    }
    let data_session = data
        .get("session_id")
        .and_then(Value::as_str)
        .map(Into::into);
    Ok(FilterKeys {
        etype,
        agent,
        session,
        data_session,
    })
}

async fn publisher(stream: TcpStream, hub: Arc<Hub>) {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::with_capacity(64 * 1024, rd).lines();
    let (mut n, mut accepted, mut rejected, mut last_seq) = (0u64, 0u64, 0u64, None);
    while let Ok(Some(line)) = lines.next_line().await {
        n += 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(&line).map_err(|e| format!("invalid JSON: {e}"));
        match parsed.and_then(|mut v| check(&v).map(|k| (k, v.take()))) {
            Ok((keys, mut v)) => {
                if v.get("timestamp").is_none() {
                    v["timestamp"] = Value::String(krux_relay::event::now_rfc3339_millis());
                }
                let mut seq = hub.seq.lock().expect("seq lock");
                *seq += 1;
                v["seq"] = Value::from(*seq);
                let text = Utf8Bytes::from(v.to_string());
                let _ = hub.tx.send(Arc::new(Event { keys, text }));
                last_seq = Some(*seq);
                accepted += 1;
            }
            Err(e) => {
                rejected += 1;
                let reply = serde_json::json!({"line": n, "error": e});
                if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
    let summary =
        serde_json::json!({"accepted": accepted, "rejected": rejected, "last_seq": last_seq});
    let _ = wr.write_all(format!("{summary}\n").as_bytes()).await;
}

fn refuse(status: u16, body: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("{body}\n")));
    *r.status_mut() =
        tokio_tungstenite::tungstenite::http::StatusCode::from_u16(status).expect("valid status");
    if status == 401 {
        r.headers_mut()
            .insert("WWW-Authenticate", "Bearer".parse().expect("header"));
    }
    r
}

// The handshake callback's error type is tungstenite's `ErrorResponse`, large by design.
#[allow(clippy::result_large_err)]
async fn subscriber(stream: TcpStream, hub: Arc<Hub>) {
    let _ = stream.set_nodelay(true);
    let mut filter = None;
    let mut rx = None;
    let auth = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != "/events" {
            return Err(refuse(
                404,
                "No such endpoint; supervisors subscribe at /events.",
            ));
        }
        let params = query_pairs(req.uri().query().unwrap_or(""));
        let bearer = req
            .headers()
            .get("authorization")
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::to_string);
        let token = bearer.or_else(|| {
            params
                .iter()
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.to_string())
        });
        let Some(token) = token else {
            return Err(refuse(401, "A user token is required."));
        };
        if is_agent_token(&token) {
            return Err(refuse(403, "Agent tokens belong on port 7700."));
        }
        if hub.credentials.authenticate_token(&token).is_none() {
            return Err(refuse(
                401,
                "The credential is not valid or has been revoked.",
            ));
        }
        let (f, _since) = parse_subscription(&params).map_err(|m| refuse(400, &m))?;
        filter = Some(f);
        // Subscribe before the 101 goes out, as the relay registers: nothing published
        // after the client sees the upgrade may be missed.
        rx = Some(hub.tx.subscribe());
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, auth).await else {
        return;
    };
    let filter: Filter = filter.expect("set by the accepted handshake");
    let mut rx = rx.expect("set by the accepted handshake");
    let (mut sink, mut incoming) = ws.split();
    // Inbound: tungstenite answers pings itself when the sink flushes; data is ignored.
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = incoming.next().await {} });
    'outer: loop {
        let mut next = match rx.recv().await {
            Ok(ev) => Some(ev),
            Err(broadcast::error::RecvError::Lagged(_)) => break,
            Err(broadcast::error::RecvError::Closed) => return reader.abort(),
        };
        // Feed everything that is ready, then flush once.
        while let Some(ev) = next.take() {
            if filter.matches(&ev.keys) && sink.feed(Message::Text(ev.text.clone())).await.is_err()
            {
                return reader.abort();
            }
            next = match rx.try_recv() {
                Ok(ev) => Some(ev),
                Err(broadcast::error::TryRecvError::Lagged(_)) => break 'outer,
                Err(_) => None,
            };
        }
        if sink.flush().await.is_err() || reader.is_finished() {
            return reader.abort();
        }
    }
    // Lagged past the channel's capacity: events were lost, so say so and close.
    let frame = CloseFrame {
        code: CloseCode::Library(4001),
        reason: "slow consumer".into(),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
    reader.abort();
}
