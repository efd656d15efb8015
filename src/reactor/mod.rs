//! A reactor: one thread, one single-threaded runtime, one listener on the shared port
//! (SO_REUSEPORT), and the subscribers it accepted — nobody else touches them.
//!
//! Every decision about its subscribers is made by its `Shard` (sans-IO, `shard.rs`);
//! this module and `subscriber.rs` are the drivers around it. Four kinds of task run on the
//! thread: the accept loop, the fan-out loop (ring cursor → shard), housekeeping (the
//! shard's timer) and, per subscriber, a reader (handshake, then control frames) and a
//! writer (one writev per round of whatever the shard hands it).

mod outbox;
pub mod shard;
mod subscriber;

pub use outbox::{OutState, Outbox, Push};
pub use shard::CLOSE_GRACE;

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::auth::LiveCredentials;
use crate::cluster::node::{HistoryReply, HistoryRequest};
use crate::io::tls::TlsConn;
use crate::io::Listener;
use crate::metrics::Metrics;
use crate::proto::ws::CloseReason;
use crate::ring::{Cursor, Entry};
use shard::Shard;

/// Settings and state shared by all reactors (read-mostly, thread-safe).
pub struct Shared {
    pub client_queue: usize,
    pub max_frame: u64,
    pub max_connections: usize,
    pub ping_interval: Duration,
    pub read_timeout: Duration,
    pub handshake_timeout: Duration,
    pub credentials: Arc<LiveCredentials>,
    pub metrics: Arc<Metrics>,
    /// Open subscriber WebSockets across all reactors (for `--max-connections`).
    pub connections: AtomicUsize,
    /// Accepted sockets on the WebSocket port, handshaking or open, across reactors.
    pub sockets: AtomicUsize,
    /// Past this many `sockets`, reactors stop accepting (the rest wait in the kernel's
    /// backlog), keeping open-file headroom for publishers and the admin port.
    pub socket_budget: usize,
    /// TLS for every subscriber connection, when configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Becomes true when the server shuts down.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub shutdown_grace: Duration,
    /// The ring head (a position) once the ingest has stopped (u64::MAX before): reactors
    /// deliver up to it, then close their subscribers.
    pub ingest_final_pos: AtomicU64,
    /// A cluster node's history fetches: resumes its window no longer reaches.
    pub history: Option<mpsc::UnboundedSender<HistoryRequest>>,
}

/// The driver's handle on one subscriber: how to wake its writer and end its socket.
pub struct Handle {
    pub wake: Notify,
    /// Shuts the socket down (both ways), ending its pending reads and writes.
    pub kill: Box<dyn Fn()>,
}

/// Per-thread reactor state: the shard and what its drivers share.
pub struct Reactor {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub shard: RefCell<Shard<Rc<Handle>>>,
    /// Where this reactor's history replies arrive.
    history_replies: mpsc::UnboundedSender<HistoryReply>,
}

/// How many ring entries one fan-out round dispatches before yielding to the writers.
const FANOUT_BATCH: u64 = 256;

/// Runs a reactor until the process stops.
pub async fn run<L: Listener>(id: usize, shared: Arc<Shared>, listener: L, cursor: Cursor) {
    let (history_replies, replies) = mpsc::unbounded_channel();
    let settings = shard::Settings {
        client_queue: shared.client_queue,
        ping_interval: shared.ping_interval,
        read_timeout: shared.read_timeout,
        cluster: shared.history.is_some(),
    };
    let shard = Shard::new(
        id,
        settings,
        cursor.ring().clone(),
        cursor.next,
        shared.metrics.clone(),
        Instant::now(),
    );
    let reactor = Rc::new(Reactor {
        id,
        shared,
        shard: RefCell::new(shard),
        history_replies,
    });
    tokio::task::spawn_local(fan_out(reactor.clone(), cursor));
    tokio::task::spawn_local(backlog_replies(reactor.clone(), replies));
    tokio::task::spawn_local(housekeeping(reactor.clone()));
    let mut shutdown = reactor.shared.shutdown.clone();
    tokio::select! {
        () = accept_loop(reactor.clone(), listener) => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
    // The listener is closed: drain and say goodbye.
    drain(&reactor).await;
}

/// Shutdown: deliver everything the ingest accepted, then close every subscriber with
/// 1001 after its queued frames, and wait for them to go — all within the grace period.
async fn drain(reactor: &Reactor) {
    let shared = &reactor.shared;
    let deadline = tokio::time::Instant::now() + shared.shutdown_grace;
    while tokio::time::Instant::now() < deadline {
        let last = shared.ingest_final_pos.load(Ordering::SeqCst);
        if last != u64::MAX && reactor.shard.borrow().next_pos() >= last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reactor.with_shard(|s| s.close_all(CloseReason::Shutdown, Instant::now()));
    while !reactor.shard.borrow().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One accepted socket counted in `Shared::sockets` until its connection task ends.
struct SocketSlot(Arc<Shared>);

impl SocketSlot {
    fn take(shared: &Arc<Shared>) -> SocketSlot {
        shared.sockets.fetch_add(1, Ordering::Relaxed);
        SocketSlot(shared.clone())
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop<L: Listener>(reactor: Rc<Reactor>, listener: L) {
    let shared = &reactor.shared;
    let mut paused = false;
    loop {
        if shared.sockets.load(Ordering::Relaxed) >= shared.socket_budget {
            if !paused {
                tracing::warn!(
                    reactor = reactor.id,
                    budget = shared.socket_budget,
                    "open-file budget of the WebSocket port reached; accepting paused"
                );
                paused = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if std::mem::take(&mut paused) {
            tracing::info!(reactor = reactor.id, "accepting again");
        }
        match listener.accept().await {
            Ok((conn, peer)) => {
                let (r, ip, slot) = (reactor.clone(), peer.ip(), SocketSlot::take(shared));
                // One task type per path, each sized for its own state: an idle plain
                // subscriber's task does not carry TLS's.
                drop(match r.shared.tls.clone() {
                    None => tokio::task::spawn_local(serve_plain(r, conn, ip, slot)),
                    Some(config) => tokio::task::spawn_local(serve_tls(r, conn, ip, config, slot)),
                });
            }
            Err(e) => crate::server::accept_backoff("reactor", e).await,
        }
    }
}

async fn serve_plain<C: crate::io::Conn>(r: Rc<Reactor>, conn: C, ip: IpAddr, _slot: SocketSlot) {
    subscriber::serve(r, conn, ip).await
}

async fn serve_tls<C: crate::io::Conn>(
    r: Rc<Reactor>,
    conn: C,
    ip: IpAddr,
    config: Arc<rustls::ServerConfig>,
    _slot: SocketSlot,
) {
    // Boxed, like the HTTP handshake: freed once it is done.
    let hs = Box::pin(tokio::time::timeout(
        r.shared.handshake_timeout,
        TlsConn::accept(conn, config),
    ));
    match hs.await {
        Ok(Ok(tls)) => subscriber::serve(r, tls, ip).await,
        Ok(Err(e)) => tracing::debug!(%ip, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(%ip, "TLS handshake timed out"),
    }
}

impl Reactor {
    /// Runs `f` on the shard, then wakes the writers it asked for and sends the history
    /// requests it made. Never held across an await.
    pub fn with_shard<T>(&self, f: impl FnOnce(&mut Shard<Rc<Handle>>) -> T) -> T {
        let mut shard = self.shard.borrow_mut();
        let out = f(&mut shard);
        while let Some(ask) = shard.poll_history() {
            let request = HistoryRequest {
                after: ask.after,
                until: ask.until,
                max_bytes: ask.max_bytes,
                sub: (ask.sub, ask.serial),
                reply: self.history_replies.clone(),
            };
            let sent = self.shared.history.as_ref().map(|h| h.send(request));
            if !matches!(sent, Some(Ok(()))) {
                // The cluster thread is gone: nothing can serve this resume.
                shard.close(ask.sub, CloseReason::HistoryUnavailable, Instant::now());
            }
        }
        shard.drain_wakes(|_, h| h.wake.notify_one());
        out
    }
}

/// Hands what the cluster thread fetched from the stream to the subscribers that asked.
async fn backlog_replies(reactor: Rc<Reactor>, mut replies: mpsc::UnboundedReceiver<HistoryReply>) {
    while let Some(reply) = replies.recv().await {
        let (id, serial) = reply.sub;
        let fetched = reply.fetched.map_err(|e| format!("{e:#}"));
        reactor.with_shard(|s| s.on_history(id, serial, fetched));
    }
}

/// Ring → shard (which queues each event to the subscribers it matches), then let the
/// writers run.
async fn fan_out(reactor: Rc<Reactor>, mut cursor: Cursor) {
    let mut round: Vec<Arc<Entry>> = Vec::with_capacity(FANOUT_BATCH as usize);
    loop {
        cursor.wait().await;
        let lapped = cursor.read_round(FANOUT_BATCH, &mut round);
        reactor.with_shard(|s| {
            s.on_entries(&round, cursor.next);
            if lapped {
                let oldest = cursor.ring().oldest();
                tracing::warn!(
                    reactor = reactor.id,
                    missed_from = cursor.next,
                    oldest,
                    "reactor fell behind the replay window"
                );
                s.on_lapped(oldest, Instant::now());
                cursor.next = oldest;
            }
        });
        round.clear();
        // Let the writers run (and, on io_uring, submit all their writes at once).
        tokio::task::yield_now().await;
    }
}

/// The shard's timer (keepalive, stalls, stuck closes) and token revocation.
async fn housekeeping(reactor: Rc<Reactor>) {
    let shared = reactor.shared.clone();
    let mut seen_generation = shared.credentials.generation();
    loop {
        let due = reactor.shard.borrow().poll_timeout();
        tokio::time::sleep_until(due.into()).await;
        let now = Instant::now();
        let generation = shared.credentials.generation();
        let kill = reactor.with_shard(|s| {
            if generation != seen_generation {
                s.revoke(|p| shared.credentials.still_valid(p), now);
            }
            s.on_timeout(now)
                .into_iter()
                .filter_map(|id| s.handle(id).cloned())
                .collect::<Vec<_>>()
        });
        seen_generation = generation;
        for h in kill {
            (h.kill)();
        }
    }
}
