//! What every server thread shares while the server runs: credentials, metrics, the
//! WebSocket port's connection counts, and the shutdown protocol. A neutral module: the
//! ingest, the reactors and the cluster side import it, and it imports none of them.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::LiveCredentials;
use crate::io::accept::SocketBudget;
use crate::metrics::Metrics;

pub struct Live {
    pub credentials: Arc<LiveCredentials>,
    pub metrics: Arc<Metrics>,
    /// Open subscriber WebSockets across all reactors (for `--max-connections`).
    pub connections: AtomicUsize,
    /// Sockets accepted on the WebSocket port (handshaking or open), across reactors.
    pub sockets: Arc<SocketBudget>,
    /// Becomes true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    pub shutdown_grace: Duration,
    /// The ring head (a position) once the ingest has stopped (`u64::MAX` before):
    /// reactors deliver up to it, then close their subscribers.
    pub ingest_final_pos: AtomicU64,
}

impl Live {
    pub fn new(
        credentials: Arc<LiveCredentials>,
        metrics: Arc<Metrics>,
        sockets: Arc<SocketBudget>,
        shutdown: watch::Receiver<bool>,
        shutdown_grace: Duration,
    ) -> Live {
        Live {
            credentials,
            metrics,
            connections: AtomicUsize::new(0),
            sockets,
            shutdown,
            shutdown_grace,
            ingest_final_pos: AtomicU64::new(u64::MAX),
        }
    }
}
