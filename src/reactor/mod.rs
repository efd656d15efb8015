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
#[cfg(test)]
mod tests;

pub use outbox::{OutState, Outbox, Push};
pub use shard::{Fetched, CLOSE_GRACE};

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::io::accept::{accept_backoff, SocketSlot};
use crate::io::tls::TlsConn;
use crate::io::Listener;
use crate::live::Live;
use crate::proto::ws::CloseReason;
use crate::ring::{Cursor, EntryRef};
use shard::Shard;

/// A reactor's settings: fixed when the server starts, the same for every reactor.
pub struct Settings {
    pub client_queue: usize,
    pub max_frame: u64,
    pub max_connections: usize,
    pub ping_interval: Duration,
    pub read_timeout: Duration,
    pub handshake_timeout: Duration,
    /// TLS for every subscriber connection, when configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where a cluster node's history fetches go: resumes its window no longer reaches.
    pub history: Option<mpsc::UnboundedSender<HistoryRequest>>,
    /// Browser origins besides the relay's own that may subscribe.
    pub allowed_origins: Vec<String>,
    /// permessage-deflate, when on (`--compression`).
    pub compression: Option<crate::proto::deflate::Policy>,
}

/// A reactor asks for the events after `after` that its ring may no longer hold (served
/// by the cluster side from the stream).
pub struct HistoryRequest {
    pub after: u64,
    /// Events from this seq on are in the ring (`u64::MAX`: the ring holds none yet).
    pub until: u64,
    /// Stop once the frames fetched hold this many bytes (the subscriber's queue bound).
    pub max_bytes: usize,
    /// The subscriber asking (its slab id and serial), echoed in the reply.
    pub sub: (usize, u64),
    pub reply: mpsc::UnboundedSender<HistoryReply>,
}

pub struct HistoryReply {
    pub sub: (usize, u64),
    pub fetched: anyhow::Result<Fetched>,
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
    pub settings: Arc<Settings>,
    pub live: Arc<Live>,
    pub shard: RefCell<Shard<Rc<Handle>>>,
    /// Where this reactor's history replies arrive.
    history_replies: mpsc::UnboundedSender<HistoryReply>,
    /// What subscribers' reads land in, one at a time (see `Conn::read_ready`).
    pub scratch: RefCell<Vec<u8>>,
    /// Where TLS subscribers' records are made, one write at a time.
    tls_buffers: Rc<crate::io::tls::Buffers>,
}

/// The scratch buffer's size: a whole TLS record fits.
const SCRATCH: usize = 17 * 1024;

/// The drivers' clock, handed to the shard: the runtime's, so that its timers and the
/// shard agree (the real clock, or a test's paused one).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// How many ring entries one fan-out round dispatches before yielding to the writers.
const FANOUT_BATCH: u64 = 256;

/// Runs a reactor until the process stops.
pub async fn run<L: Listener>(
    id: usize,
    settings: Arc<Settings>,
    live: Arc<Live>,
    listener: L,
    cursor: Cursor,
) {
    let (history_replies, replies) = mpsc::unbounded_channel();
    let shard_settings = shard::Settings {
        client_queue: settings.client_queue,
        ping_interval: settings.ping_interval,
        read_timeout: settings.read_timeout,
        cluster: settings.history.is_some(),
        compression: settings.compression,
    };
    let shard = Shard::new(
        id,
        shard_settings,
        cursor.ring().clone(),
        cursor.next,
        live.metrics.clone(),
        now(),
    );
    let reactor = Rc::new(Reactor {
        id,
        settings,
        live,
        shard: RefCell::new(shard),
        history_replies,
        scratch: RefCell::new(vec![0; SCRATCH]),
        tls_buffers: Rc::default(),
    });
    tokio::task::spawn_local(fan_out(reactor.clone(), cursor));
    tokio::task::spawn_local(backlog_replies(reactor.clone(), replies));
    tokio::task::spawn_local(housekeeping(reactor.clone()));
    let mut shutdown = reactor.live.shutdown.clone();
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
    let live = &reactor.live;
    let deadline = tokio::time::Instant::now() + live.shutdown_grace;
    while tokio::time::Instant::now() < deadline {
        let last = live.ingest_final_pos.load(Ordering::SeqCst);
        if last != u64::MAX && reactor.shard.borrow().next_pos() >= last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reactor.with_shard(|s| s.close_all(CloseReason::Shutdown, now()));
    while !reactor.shard.borrow().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn accept_loop<L: Listener>(reactor: Rc<Reactor>, listener: L) {
    let sockets = &reactor.live.sockets;
    let mut paused = false;
    loop {
        if sockets.exhausted() {
            if !paused {
                tracing::warn!(
                    reactor = reactor.id,
                    budget = sockets.limit,
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
                let (r, ip, slot) = (reactor.clone(), peer.ip(), sockets.take());
                // One task type per path, each sized for its own state: an idle plain
                // subscriber's task does not carry TLS's.
                drop(match r.settings.tls.clone() {
                    None => tokio::task::spawn_local(serve_plain(r, Rc::new(conn), ip, slot)),
                    Some(config) => tokio::task::spawn_local(serve_tls(r, conn, ip, config, slot)),
                });
            }
            Err(e) => accept_backoff("reactor", e).await,
        }
    }
}

async fn serve_plain<C: crate::io::Conn>(
    r: Rc<Reactor>,
    conn: Rc<C>,
    ip: IpAddr,
    _slot: SocketSlot,
) {
    subscriber::serve(r, conn, ip).await
}

async fn serve_tls<C: crate::io::Conn>(
    r: Rc<Reactor>,
    conn: C,
    ip: IpAddr,
    config: Arc<rustls::ServerConfig>,
    _slot: SocketSlot,
) {
    // In a block, boxed like the HTTP handshake: neither the handshake nor its result
    // stays part of this task's state for the connection's life.
    let tls = {
        let hs = Box::pin(tokio::time::timeout(
            r.settings.handshake_timeout,
            TlsConn::accept(conn, config, r.tls_buffers.clone()),
        ));
        let tls = match hs.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return tracing::debug!(%ip, "TLS handshake failed: {e}"),
            Err(_) => return tracing::debug!(%ip, "TLS handshake timed out"),
        };
        let metrics = &r.live.metrics;
        let kind = match tls.resumed() {
            true => &metrics.tls_resumed,
            false => &metrics.tls_full,
        };
        kind.fetch_add(1, Ordering::Relaxed);
        Rc::new(tls)
    };
    subscriber::serve(r, tls, ip).await
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
            let sent = self.settings.history.as_ref().map(|h| h.send(request));
            if !matches!(sent, Some(Ok(()))) {
                // The cluster thread is gone: nothing can serve this resume.
                shard.close(ask.sub, CloseReason::HistoryUnavailable, now());
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
    let mut round: Vec<EntryRef> = Vec::with_capacity(FANOUT_BATCH as usize);
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
                s.on_lapped(oldest, now());
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
    let credentials = reactor.live.credentials.clone();
    let mut seen_generation = credentials.generation();
    loop {
        let due = reactor.shard.borrow().poll_timeout();
        tokio::time::sleep_until(due.into()).await;
        let now = now();
        let generation = credentials.generation();
        let kill = reactor.with_shard(|s| {
            if generation != seen_generation {
                s.revoke(|p| credentials.still_valid(p), now);
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
