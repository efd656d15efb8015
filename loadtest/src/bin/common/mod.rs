//! What the two reference servers (baseline, limit) share: their listeners and ready file,
//! in the relay's format, so `krux-loadtest` starts them all the same way.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use tokio::net::TcpListener;

/// Runs a server on a multi-threaded tokio runtime (a tokio service's default shape).
pub fn block_on(
    server: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(server)
}

/// Binds the WebSocket and ingest listeners and, if asked, writes the ready file.
pub async fn bind(
    ws: SocketAddr,
    ingest: SocketAddr,
    ready_file: Option<&Path>,
) -> anyhow::Result<(TcpListener, TcpListener)> {
    let ws = TcpListener::bind(ws)
        .await
        .with_context(|| format!("binding {ws}"))?;
    let ingest = TcpListener::bind(ingest)
        .await
        .with_context(|| format!("binding {ingest}"))?;
    if let Some(path) = ready_file {
        let body = serde_json::json!({
            "ws": ws.local_addr()?.to_string(),
            "ingest": ingest.local_addr()?.to_string(),
            "pid": std::process::id(),
        });
        std::fs::write(path, body.to_string()).context("writing the ready file")?;
    }
    Ok((ws, ingest))
}
