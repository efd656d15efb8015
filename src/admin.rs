//! The admin port (loopback by default): `/metrics` (Prometheus text), `/healthz`,
//! `/readyz`. Runs on the ingest thread; tiny, and never on the fan-out path. A request
//! has 5 s from connection to answer and at most 64 are served at once, so slow or idle
//! connections cannot pile up.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::Metrics;
use crate::proto::handshake::{parse_request, Parsed, Response};

/// The whole of a request, from the connection to the last byte of its head; and the
/// whole of the answer's write. Past it: 408, as on port 7701.
const DEADLINE: Duration = Duration::from_secs(5);
/// Connections answered at once; more get 503 (a scraper needs one).
const MAX_CONNECTIONS: usize = 64;

pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (metrics, open) = (metrics.clone(), open.clone());
                drop(tokio::task::spawn_local(async move {
                    open.set(open.get() + 1);
                    let busy = open.get() > MAX_CONNECTIONS;
                    answer(stream, &metrics, busy).await;
                    open.set(open.get() - 1);
                }));
            }
            Err(e) => crate::io::accept::accept_backoff("admin", e).await,
        }
    }
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics, busy: bool) {
    let resp = if busy {
        Response::text(503, "Too many admin connections at once; retry shortly.")
            .header("Retry-After", "1".into())
    } else {
        match tokio::time::timeout(DEADLINE, read_request(&mut stream, metrics)).await {
            Ok(Some(resp)) => resp,
            Ok(None) => return, // closed before a whole request
            Err(_) => Response::text(408, "The request head took too long to arrive."),
        }
    };
    let write = async {
        let _ = stream.write_all(&resp.to_bytes()).await;
        let _ = stream.shutdown().await;
    };
    let _ = tokio::time::timeout(DEADLINE, write).await;
}

/// Reads one request head and answers it; `None` if the peer closed first.
async fn read_request(stream: &mut tokio::net::TcpStream, metrics: &Metrics) -> Option<Response> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if !matches!(stream.read_buf(&mut buf).await, Ok(n) if n > 0) {
            return None;
        }
        match parse_request(&buf) {
            Ok(Parsed::Partial) => continue,
            Ok(Parsed::Complete(req, _)) => return Some(route(&req.method, &req.path, metrics)),
            Err(resp) => return Some(resp),
        }
    }
}

fn route(method: &str, path: &str, metrics: &Metrics) -> Response {
    if method != "GET" {
        return Response::text(405, "The admin port only answers GET.");
    }
    match path {
        "/metrics" => {
            let mut r = Response::text(200, "");
            r.content_type = "text/plain; version=0.0.4; charset=utf-8";
            r.body = metrics.render().into();
            r
        }
        "/healthz" => Response::text(200, "ok"),
        // Listeners are bound and threads running before this port answers at all; a
        // cluster node also needs JetStream.
        "/readyz" => match &metrics.cluster {
            Some(c) if !c.ready.load(std::sync::atomic::Ordering::SeqCst) => Response::text(
                503,
                "not ready: JetStream is unreachable, or the node's consumer or credentials are not loaded yet",
            ),
            _ => Response::text(200, "ready"),
        },
        _ => Response::text(
            404,
            "Unknown admin path; try /metrics, /healthz or /readyz.",
        ),
    }
}
