//! What the two reference servers (baseline, limit) share: their listeners and ready file,
//! in the relay's format, so `krux-loadtest` starts them all the same way.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;

/// Runs a server on a multi-threaded tokio runtime (a tokio service's default shape), with
/// `threads` workers (default: one per core).
pub fn block_on(
    threads: Option<usize>,
    server: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        rt.worker_threads(n.max(1));
    }
    rt.enable_all().build()?.block_on(server)
}

/// The listening flags both reference servers take, as the relay spells them.
#[derive(clap::Args)]
pub struct Listen {
    #[arg(long, default_value = "127.0.0.1:7701")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:7702")]
    pub ingest: SocketAddr,
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Listen {
    /// Binds the WebSocket and ingest listeners and, if asked, writes the ready file.
    pub async fn bind(&self) -> anyhow::Result<(TcpListener, TcpListener)> {
        let ws = TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("binding {}", self.listen))?;
        let ingest = TcpListener::bind(self.ingest)
            .await
            .with_context(|| format!("binding {}", self.ingest))?;
        if let Some(path) = &self.ready_file {
            let body = serde_json::json!({
                "ws": ws.local_addr()?.to_string(),
                "ingest": ingest.local_addr()?.to_string(),
                "pid": std::process::id(),
            });
            std::fs::write(path, body.to_string()).context("writing the ready file")?;
        }
        Ok((ws, ingest))
    }
}
