//! The admin port (loopback by default): `/metrics` (Prometheus text), `/healthz`,
//! `/readyz`. Runs on the ingest thread; tiny, and never on the fan-out path.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::Metrics;
use crate::proto::handshake::{parse_request, Parsed, Response};

pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => drop(tokio::task::spawn_local(answer(stream, metrics.clone()))),
            Err(e) => crate::io::accept::accept_backoff("admin", e).await,
        }
    }
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: Arc<Metrics>) {
    let mut buf = Vec::with_capacity(1024);
    let resp = loop {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_buf(&mut buf)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            return;
        }
        match parse_request(&buf) {
            Ok(Parsed::Partial) => continue,
            Ok(Parsed::Complete(req, _)) => break route(&req.method, &req.path, &metrics),
            Err(resp) => break resp,
        }
    };
    let _ = stream.write_all(&resp.to_bytes()).await;
    let _ = stream.shutdown().await;
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
