//! A reactor: one thread, one single-threaded runtime, one listener on the shared port
//! (SO_REUSEPORT), and the subscribers it accepted — nobody else touches them.
//!
//! Three kinds of task run on it: the accept loop, the fan-out loop (ring cursor → index →
//! outboxes) and, per subscriber, a reader (handshake, then control frames) and a writer
//! (one writev per round of whatever its outbox holds).

mod outbox;
mod subscriber;

pub use outbox::{OutState, Outbox, Push};

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;
use tokio::sync::{mpsc, Notify};

use crate::auth::LiveCredentials;
use crate::cluster::node::{HistoryReply, HistoryRequest};
use crate::filter::{SubId, SubscriberIndex};
use crate::frame;
use crate::io::tls::TlsConn;
use crate::io::Listener;
use crate::metrics::Metrics;
use crate::proto::handshake::Principal;
use crate::proto::ws::close_code;
use crate::ring::{Cursor, Entry, Slot};

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

/// One subscriber as its reactor holds it.
pub struct Subscriber {
    pub out: RefCell<Outbox>,
    /// Wakes the subscriber's writer task.
    pub wake: Notify,
    pub principal: Principal,
    /// When the subscriber last sent anything (keepalive).
    pub last_heard: Cell<Instant>,
    /// The connection is finished; the writer must stop.
    pub gone: Cell<bool>,
    /// When housekeeping first saw this subscriber closing.
    pub closing_since: Cell<Option<Instant>>,
    /// Shuts the socket down (both ways), ending its pending reads and writes.
    pub kill: Box<dyn Fn()>,
    /// While resuming: the ring position to replay next (not yet in the index).
    pub replay_next: Cell<Option<u64>>,
    /// While resuming: the filter, moved into the index once replay catches up.
    pub pending_filter: RefCell<Option<crate::filter::Filter>>,
    /// Once indexed: the first position fan-out owes it. A resume can get ahead of a
    /// lagging fan-out (the window already starts past it), so this is not always
    /// `next_pos`.
    pub live_from: Cell<u64>,
    /// The stall check: bytes written when last looked at, and for how many housekeeping
    /// ticks since then the subscriber has been full without its socket taking a byte.
    pub stall: Cell<(u64, u32)>,
    /// Unique per reactor (slab ids are reused): matches history replies to their asker.
    pub serial: u64,
    /// While resuming from the cluster's stream, before the ring takes over.
    pub backlog: RefCell<Option<Backlog>>,
}

/// A resume served from the cluster's stream because the node's window no longer reaches
/// it; once the stream has given everything up to the ring's start, replay goes on from
/// the ring (`replay_next`), then live.
#[derive(Default)]
pub struct Backlog {
    /// The seq of the last event queued (at first, the resume's `since`).
    after: u64,
    queue: std::collections::VecDeque<Arc<Entry>>,
    /// A fetch is under way.
    asked: bool,
    /// The last fetch got to the ring's start or the stream's end.
    reached: bool,
    /// Once the queue is empty, everything up to this seq has been queued.
    covered: u64,
}

/// What a subscriber's replay needs from its writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Not replaying.
    Done,
    /// More to scan: come back soon (a sparse filter may have queued nothing).
    Scanning,
    /// Waiting for the socket to take what is queued, or for the stream to answer.
    Waiting,
}

/// Per-thread reactor state.
pub struct Reactor {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub subs: RefCell<Slab<Rc<Subscriber>>>,
    pub index: RefCell<SubscriberIndex>,
    /// The fan-out cursor's position: the ring position of the next event this reactor
    /// will dispatch. A new subscriber starts here (or replays up to here).
    pub next_pos: Cell<u64>,
    /// The `seq` of the last event dispatched (0 before the first).
    pub last_seq: Cell<u64>,
    cursor_ring: Arc<crate::ring::FrameRing>,
    pub next_serial: Cell<u64>,
    /// Where this reactor's history replies arrive.
    history_replies: mpsc::UnboundedSender<HistoryReply>,
}

/// How long a closing subscriber may take — to get its close frame out, then to answer
/// it — before its socket is shut.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How many ring entries one fan-out round dispatches before yielding to the writers.
const FANOUT_BATCH: u64 = 256;

/// Housekeeping ticks (250 ms each) a full subscriber's socket may take nothing before it
/// is closed as a slow consumer.
const STALL_TICKS: u32 = 4;

/// Runs a reactor until the process stops.
pub async fn run<L: Listener>(id: usize, shared: Arc<Shared>, listener: L, cursor: Cursor) {
    let (history_replies, replies) = mpsc::unbounded_channel();
    let reactor = Rc::new(Reactor {
        id,
        shared,
        subs: RefCell::new(Slab::new()),
        index: RefCell::new(SubscriberIndex::default()),
        next_pos: Cell::new(cursor.next),
        last_seq: Cell::new(0),
        cursor_ring: cursor.ring().clone(),
        next_serial: Cell::new(0),
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
        if last != u64::MAX && reactor.next_pos.get() >= last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (_, sub) in reactor.subs.borrow().iter() {
        reactor.close(sub, close_code::GOING_AWAY, "relay shutting down");
    }
    while !reactor.subs.borrow().is_empty() && tokio::time::Instant::now() < deadline {
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
    pub fn ring(&self) -> &crate::ring::FrameRing {
        &self.cursor_ring
    }

    /// Every close a subscriber gets is decided here, and counted by its code.
    pub fn close(&self, sub: &Subscriber, code: u16, reason: &str) {
        if sub.out.borrow_mut().close(code, reason) {
            self.shared.metrics.closed(code);
            sub.wake.notify_one();
        }
    }

    /// Closes a subscriber with 4001, naming the last event queued as its resume point.
    fn close_slow(&self, out: &mut Outbox, sub: &Subscriber) {
        if out.close_slow() {
            self.shared.metrics.closed(close_code::SLOW_CONSUMER);
            sub.wake.notify_one();
        }
    }

    /// A subscriber that had no room for the event at `pos` leaves the index and catches up
    /// from the retained window as its socket drains (the path of a resume), so nothing is
    /// lost while it is behind and the others never wait for it.
    fn fall_behind(&self, id: SubId, sub: &Subscriber, pos: u64) {
        if let Some(filter) = self.index.borrow_mut().remove(id) {
            *sub.pending_filter.borrow_mut() = Some(filter);
            sub.replay_next.set(Some(pos));
        }
    }

    /// The `seq` a subscriber registered now starts after (its `Krux-Seq`): the last event
    /// dispatched, or where the ring starts (0: unknown yet).
    pub fn position_seq(&self) -> u64 {
        match (self.last_seq.get(), self.ring().complete_from()) {
            (0, u64::MAX) => 0,
            (0, from) => from.saturating_sub(1),
            (s, _) => s,
        }
    }

    /// Starts a resume from `since`. Standalone: from the window, after the `replay_gap`
    /// notice when it no longer reaches `since + 1`. In a cluster: from the window when it
    /// holds everything after `since`, else from the stream first.
    pub fn start_replay(&self, sub: &Subscriber, since: u64) {
        let ring = self.ring();
        if self.shared.history.is_some() {
            match ring.find_after(since) {
                Some(pos) => sub.replay_next.set(Some(pos)),
                None => {
                    *sub.backlog.borrow_mut() = Some(Backlog {
                        after: since,
                        ..Backlog::default()
                    })
                }
            }
            return;
        }
        let oldest = ring.oldest();
        if ring.lost_after(since) {
            sub.out.borrow_mut().push_control(gap_frame(since, oldest));
        }
        sub.replay_next
            .set(Some(since.saturating_add(1).max(oldest)));
    }

    /// Feeds a subscriber resuming from the stream what the stream has given, and asks
    /// for more; `None` once the ring takes over.
    fn backlog_step(&self, id: SubId, sub: &Subscriber) -> Option<Replay> {
        let mut backlog = sub.backlog.borrow_mut();
        let b = backlog.as_mut()?;
        let mut out = sub.out.borrow_mut();
        if out.state() != OutState::Open {
            *backlog = None;
            return Some(Replay::Done);
        }
        out.resume();
        {
            let filter = sub.pending_filter.borrow();
            let filter = filter
                .as_ref()
                .expect("a replaying subscriber keeps its filter");
            while let Some(e) = b.queue.front() {
                if filter.matches(&e.keys)
                    && out.push_event(&e.frame, e.seq, e.accepted_at) == Push::Full
                {
                    return Some(Replay::Waiting);
                }
                b.after = e.seq;
                b.queue.pop_front();
            }
        }
        if b.asked {
            return Some(Replay::Waiting);
        }
        b.after = b.after.max(b.covered);
        if b.reached {
            if let Some(pos) = self.ring().find_after(b.after) {
                *backlog = None;
                sub.replay_next.set(Some(pos));
                return None;
            }
        }
        b.asked = true;
        let request = HistoryRequest {
            after: b.after,
            until: self.ring().complete_from(),
            max_bytes: self.shared.client_queue,
            sub: (id, sub.serial),
            reply: self.history_replies.clone(),
        };
        let sent = self.shared.history.as_ref().map(|h| h.send(request));
        if !matches!(sent, Some(Ok(()))) {
            // The cluster thread is gone: nothing can serve this resume.
            drop(out);
            self.close(sub, close_code::INTERNAL, "history unavailable");
        }
        Some(Replay::Waiting)
    }

    /// Feeds a resuming (or fallen-behind) subscriber the next retained events, as far as
    /// its queue bound allows. Once it reaches the fan-out position it is indexed, and
    /// fan-out takes over from exactly there: both run on this thread, so nothing is
    /// missed or repeated.
    pub fn replay_step(&self, id: SubId, sub: &Subscriber) -> Replay {
        if let Some(r) = self.backlog_step(id, sub) {
            return r;
        }
        const SCAN: u64 = 65_536; // entries looked at per step, so a sparse filter yields too
        let Some(mut pos) = sub.replay_next.get() else {
            return Replay::Done;
        };
        let ring = self.ring();
        let end = self.next_pos.get();
        let stop = pos.saturating_add(SCAN).min(end);
        {
            let filter = sub.pending_filter.borrow();
            let filter = filter
                .as_ref()
                .expect("a replaying subscriber keeps its filter");
            let mut out = sub.out.borrow_mut();
            if out.state() != OutState::Open {
                // Closing (revoked, shutting down, protocol error): nothing more to replay.
                sub.replay_next.set(None);
                return Replay::Done;
            }
            out.resume();
            while pos < stop {
                match ring.get(pos) {
                    Slot::Ready(e) => {
                        if filter.matches(&e.keys)
                            && out.push_event(&e.frame, e.seq, e.accepted_at) == Push::Full
                        {
                            break; // the rest once the socket has taken some
                        }
                    }
                    // Overwritten before it could be replayed: never skip silently.
                    Slot::Lapped => {
                        self.close_slow(&mut out, sub);
                        sub.replay_next.set(None);
                        return Replay::Done;
                    }
                    Slot::Pending => unreachable!("{pos} is below the fan-out position"),
                }
                pos += 1;
            }
        }
        if pos >= end {
            let filter = sub
                .pending_filter
                .take()
                .expect("a replaying subscriber keeps its filter");
            self.index.borrow_mut().insert(id, filter);
            sub.replay_next.set(None);
            sub.live_from.set(pos);
            Replay::Done
        } else {
            sub.replay_next.set(Some(pos));
            Replay::Scanning
        }
    }
}

/// The `replay_gap` notice: events after `since` are gone; replay goes on from `oldest`.
fn gap_frame(since: u64, oldest: u64) -> bytes::Bytes {
    let gap = format!(
        r#"{{"type":"replay_gap","timestamp":"{}","agent":null,"data":{{"since":{since},"oldest":{oldest}}}}}"#,
        crate::event::now_rfc3339_millis()
    );
    frame::text_frame(gap.as_bytes())
}

/// Hands what the cluster thread fetched from the stream to the subscribers that asked.
async fn backlog_replies(reactor: Rc<Reactor>, mut replies: mpsc::UnboundedReceiver<HistoryReply>) {
    while let Some(reply) = replies.recv().await {
        let subs = reactor.subs.borrow();
        let (id, serial) = reply.sub;
        let Some(sub) = subs.get(id).filter(|s| s.serial == serial) else {
            continue; // gone meanwhile
        };
        let mut backlog = sub.backlog.borrow_mut();
        let Some(b) = backlog.as_mut() else {
            continue;
        };
        b.asked = false;
        match reply.fetched {
            Ok(f) => {
                if let Some(oldest) = f.gap_oldest {
                    sub.out
                        .borrow_mut()
                        .push_control(gap_frame(b.after, oldest));
                }
                b.queue.extend(f.entries);
                (b.reached, b.covered) = (f.reached, f.covered);
            }
            Err(e) => {
                tracing::warn!("resume from the stream: {e:#}; asking again");
                b.reached = false;
            }
        }
        sub.wake.notify_one();
    }
}

/// Ring → index → outboxes, then wake the writers that got something.
async fn fan_out(reactor: Rc<Reactor>, mut cursor: Cursor) {
    let mut dirty: Vec<SubId> = Vec::new();
    let mut round: Vec<Arc<Entry>> = Vec::with_capacity(FANOUT_BATCH as usize);
    loop {
        cursor.wait().await;
        let end = cursor.ring().head().min(cursor.next + FANOUT_BATCH);
        let mut lapped = false;
        while cursor.next < end {
            match cursor.ring().get(cursor.next) {
                Slot::Ready(e) => {
                    round.push(e);
                    cursor.next += 1;
                }
                Slot::Lapped => {
                    lapped = true;
                    break;
                }
                Slot::Pending => break,
            }
        }
        {
            let subs = reactor.subs.borrow();
            dispatch(&reactor, &subs, &round, &mut dirty);
            if let Some(e) = round.last() {
                reactor.last_seq.set(e.seq);
            }
            round.clear();
            if lapped {
                // The ingest outran this reactor by a whole window: whatever its
                // subscribers missed is gone, so each is told where to resume. Not those
                // still replaying (they meet the gap themselves) nor those owed nothing
                // before the window (a resume that started at its oldest entry).
                let oldest = cursor.ring().oldest();
                tracing::warn!(
                    reactor = reactor.id,
                    missed_from = cursor.next,
                    oldest,
                    "reactor fell behind the replay window"
                );
                for (_, sub) in subs.iter() {
                    if sub.replay_next.get().is_some()
                        || sub.backlog.borrow().is_some()
                        || sub.live_from.get() >= oldest
                    {
                        continue;
                    }
                    reactor.close_slow(&mut sub.out.borrow_mut(), sub);
                }
                cursor.next = oldest;
            }
            reactor.next_pos.set(cursor.next);
            for id in dirty.drain(..) {
                let sub = &subs[id];
                sub.out.borrow_mut().dirty = false;
                sub.wake.notify_one();
            }
        }
        // Let the writers run (and, on io_uring, submit all their writes at once).
        tokio::task::yield_now().await;
    }
}

/// Queues one round of events (in seq order) to the subscribers they match. Unfiltered
/// subscribers take the whole round at once, subscriber by subscriber (their queue stays
/// hot in cache and consecutive frames merge into one run); filtered ones are found event
/// by event through the index. Each subscriber is in exactly one of the two groups, so it
/// still gets its frames in seq order.
fn dispatch(
    reactor: &Reactor,
    subs: &Slab<Rc<Subscriber>>,
    round: &[Arc<Entry>],
    dirty: &mut Vec<SubId>,
) {
    if round.is_empty() {
        return;
    }
    // Subscribers with no room for an event of this round, and that event's position.
    let mut behind: Vec<(SubId, u64)> = Vec::new();
    {
        let index = reactor.index.borrow();
        let mut push = |id: SubId, entries: &mut dyn Iterator<Item = &Arc<Entry>>| {
            let mut out = subs[id].out.borrow_mut();
            let mut wake = false;
            for e in entries {
                match out.push_event(&e.frame, e.seq, e.accepted_at) {
                    Push::Queued => wake = true,
                    Push::Skipped => {}
                    Push::Full => {
                        behind.push((id, e.pos));
                        wake = true; // its writer catches it up from the window
                        break;
                    }
                }
            }
            if wake && !out.dirty {
                out.dirty = true;
                dirty.push(id);
            }
        };
        for &id in index.unfiltered() {
            push(id, &mut round.iter());
        }
        for e in round {
            index.for_each_filtered_match(&e.keys, |id| push(id, &mut std::iter::once(e)));
        }
    }
    for (id, pos) in behind {
        reactor.fall_behind(id, &subs[id], pos);
    }
}

/// Keepalive pings, dead-peer detection, token revocation and stuck closes, checked every
/// 250 ms.
async fn housekeeping(reactor: Rc<Reactor>) {
    let shared = reactor.shared.clone();
    let tick = Duration::from_millis(250);
    let mut seen_generation = shared.credentials.generation();
    // Recent ping times: a subscriber is dropped once the first ping it has not answered
    // (the first after it was last heard from) is `read_timeout` old, however short the
    // ping interval.
    let mut pings: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    let mut last_ping = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        let subs = reactor.subs.borrow();

        let generation = shared.credentials.generation();
        if generation != seen_generation {
            seen_generation = generation;
            for (_, sub) in subs.iter() {
                if !shared.credentials.still_valid(&sub.principal) {
                    reactor.close(sub, close_code::POLICY, "credential revoked");
                }
            }
        }

        let keep = shared.read_timeout + shared.ping_interval + Duration::from_secs(1);
        while pings.front().is_some_and(|&p| now.duration_since(p) > keep) {
            pings.pop_front();
        }
        // One pass: queue depth, stalled sockets, stuck closes, silent peers.
        let mut queued = 0;
        for (_, sub) in subs.iter() {
            let (unsent, state) = {
                let mut out = sub.out.borrow_mut();
                // Full, and its socket took nothing for STALL_TICKS ticks: a slow consumer.
                let (mark, ticks) = sub.stall.get();
                let stalled = out.is_full() && out.written() == mark;
                sub.stall
                    .set((out.written(), if stalled { ticks + 1 } else { 0 }));
                if stalled && ticks + 1 >= STALL_TICKS {
                    reactor.close_slow(&mut out, sub);
                }
                (out.unsent(), out.state())
            };
            queued += unsent;
            if state != OutState::Open {
                let since = *sub.closing_since.get().get_or_insert(now);
                sub.closing_since.set(Some(since));
                // Even the close frame could not be written (or was never answered).
                if now.duration_since(since) > CLOSE_GRACE {
                    (sub.kill)();
                }
            }
            let heard = sub.last_heard.get();
            if let Some(&unanswered) = pings.iter().find(|&&p| p > heard) {
                if now.duration_since(unanswered) >= shared.read_timeout {
                    // Silent since a ping: a half-open or hung peer.
                    reactor.close(
                        sub,
                        close_code::GOING_AWAY,
                        "no pong within the read timeout",
                    );
                }
            }
        }
        shared.metrics.set_reactor_queued(reactor.id, queued);
        if now.duration_since(last_ping) >= shared.ping_interval {
            last_ping = now;
            pings.push_back(now);
            let ping = frame::ping_frame(b"");
            for (_, sub) in subs.iter() {
                if sub.out.borrow_mut().push_control(ping.clone()) {
                    sub.wake.notify_one();
                }
            }
        }
    }
}
