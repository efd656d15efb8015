//! A reactor's decisions, sans-IO, in the shape of quinn-proto's `Connection`: a `Shard`
//! owns a reactor's subscribers — each one's phase, outbox and keepalive state — and the
//! filter index, and decides everything about them. Time comes in as a value; sockets,
//! tasks and timers stay in the drivers (`reactor/mod.rs`, `reactor/subscriber.rs`), which
//! move bytes, report what happened (`on_*`) and carry out what the shard asks (`poll_*`,
//! `drain_wakes`).
//!
//! A subscriber is in one phase at a time: resuming from the cluster's stream
//! (`FromStream`), replaying from the ring window (`Replaying`), indexed for live fan-out
//! (`Live`), or `Closing`. Replay and fan-out run on the same thread, so a subscriber is
//! indexed exactly at the fan-out position: nothing is missed or repeated at the hand-over.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::outbox::{OutState, Outbox, Push};
use crate::auth::Principal;
use crate::filter::{Filter, SubId, SubscriberIndex};
use crate::frame::{self, EventFrame, FrameArena, Span};
use crate::metrics::Metrics;
use crate::proto::deflate::{Compressor, Deflate, Policy};
use crate::proto::ws::{CloseReason, Inbound, Violation};
use crate::ring::{Entry, EntryRef, FrameRing, Slot};

/// How long a closing subscriber may take — to get its close frame out, then to answer
/// it — before its socket is shut.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The housekeeping period: keepalive, stall checks, stuck closes.
pub const TICK: Duration = Duration::from_millis(250);

/// Ticks a full subscriber's socket may take nothing before it is closed as a slow
/// consumer.
const STALL_TICKS: u32 = 4;

/// Ring entries one replay step looks at, so that a sparse filter yields too.
const SCAN: u64 = 65_536;

/// What a shard needs to know of the relay's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The bound on a subscriber's unsent bytes (`--client-queue`).
    pub client_queue: usize,
    pub ping_interval: Duration,
    pub read_timeout: Duration,
    /// A cluster node: resumes the window cannot serve go to the stream.
    pub cluster: bool,
    /// permessage-deflate, when on (`--compression`).
    pub compression: Option<Policy>,
}

/// Events after a history request's `after`, in seq order, from a cluster node's stream.
#[derive(Debug, Default)]
pub struct Fetched {
    /// The stream no longer holds every event after `after`: these start at this seq.
    pub gap_oldest: Option<u64>,
    pub entries: Vec<Arc<Entry>>,
    /// The fetch got to `until` or to the end of the stream.
    pub reached: bool,
    /// Every stored event after `after` up to this seq is in `entries` (the messages
    /// looked at hold no others: seqs have holes).
    pub covered: u64,
}

/// A request for stored events, to be sent to the cluster thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryAsk {
    pub sub: SubId,
    pub serial: u64,
    pub after: u64,
    /// Events from this seq on are in the ring (`u64::MAX`: the ring holds none yet).
    pub until: u64,
    pub max_bytes: usize,
}

/// What a subscriber's writer should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmit {
    /// Write the batch (non-empty); the oldest event in it was accepted at this time.
    Write(Option<Instant>),
    /// More to replay: come back soon (a sparse filter may have queued nothing).
    Scan,
    /// Nothing to do until woken.
    Idle,
    /// The close frame is out: half-close and let the peer answer.
    Finished,
}

#[derive(Debug)]
enum Phase {
    /// Resuming from the cluster's stream, before the ring takes over.
    FromStream {
        filter: Filter,
        backlog: Backlog,
    },
    /// Resuming (or fallen behind) from the ring window, at position `next`.
    Replaying {
        next: u64,
        filter: Filter,
    },
    /// In the index; fan-out owes it everything from position `from`.
    Live {
        from: u64,
    },
    Closing {
        reason: CloseReason,
        since: Instant,
    },
}

#[derive(Debug, Default)]
struct Backlog {
    /// The seq of the last event queued (at first, the resume's `since`).
    after: u64,
    queue: VecDeque<Arc<Entry>>,
    /// A fetch is under way.
    asked: bool,
    /// The last fetch got to the ring's start or the stream's end.
    reached: bool,
    /// Once the queue is empty, everything up to this seq has been queued.
    covered: u64,
}

struct Sub<H> {
    handle: H,
    out: Outbox,
    /// It negotiated permessage-deflate.
    deflate: Option<Deflate>,
    principal: Principal,
    phase: Phase,
    last_heard: Instant,
    /// Bytes written when last looked at, and for how many ticks since then the
    /// subscriber has been full without its socket taking a byte.
    stall: (u64, u32),
    /// Unique per shard (slab ids are reused): matches history replies to their asker.
    serial: u64,
    /// Already in `wakes`.
    woken: bool,
}

/// One reactor's subscribers and every decision about them. `H` is the driver's own
/// handle on each (its wake-up and socket); the shard never looks inside it.
pub struct Shard<H> {
    reactor: usize,
    settings: Settings,
    ring: Arc<FrameRing>,
    metrics: Arc<Metrics>,
    subs: Slab<Sub<H>>,
    index: SubscriberIndex,
    /// The ring position of the next event fan-out will dispatch.
    next_pos: u64,
    /// The `seq` of the last event dispatched (0 before the first).
    last_seq: u64,
    next_serial: u64,
    wakes: Vec<SubId>,
    asks: VecDeque<HistoryAsk>,
    /// Recent ping times: a subscriber is dropped once the first ping it has not answered
    /// (the first after it was last heard from) is `read_timeout` old.
    pings: VecDeque<Instant>,
    last_ping: Instant,
    next_tick: Instant,
    /// Compresses the events its subscribers with the extension need first (`--compression`).
    zip: Option<Zip>,
}

/// A reactor's compressor, and the arena its compressed frames are built in (frames of
/// consecutive events lie back to back there, so a subscriber's queue keeps them in runs).
struct Zip {
    policy: Policy,
    compressor: Compressor,
    arena: FrameArena,
}

impl Zip {
    /// The frame `e` goes out in to a subscriber that negotiated `deflate`: its compressed
    /// frame (made here if no reactor has made it yet) when compression is on, the event
    /// is large enough, and it fits the subscriber's window; else the plain frame.
    fn frame_for<'e>(
        zip: &mut Option<Zip>,
        e: &'e Entry,
        deflate: Option<Deflate>,
        ring: &FrameRing,
        metrics: &Metrics,
    ) -> &'e EventFrame {
        let (Some(d), Some(z)) = (deflate, zip.as_mut()) else {
            return &e.frame;
        };
        let len = e.frame.payload().len();
        if len < z.policy.min_size || !d.fits(len) {
            return &e.frame;
        }
        e.deflated(ring, |payload| {
            let small = z.compressor.compress(payload);
            // A frame that would not shrink goes out as it is.
            (small.len() < payload.len()).then(|| {
                metrics.deflate_frames.fetch_add(1, Relaxed);
                metrics
                    .deflate_bytes_in
                    .fetch_add(payload.len() as u64, Relaxed);
                metrics
                    .deflate_bytes_out
                    .fetch_add(small.len() as u64, Relaxed);
                z.arena.deflated_frame(small)
            })
        })
        .unwrap_or(&e.frame)
    }
}

impl<H> Shard<H> {
    pub fn new(
        reactor: usize,
        settings: Settings,
        ring: Arc<FrameRing>,
        next_pos: u64,
        metrics: Arc<Metrics>,
        now: Instant,
    ) -> Self {
        Shard {
            reactor,
            ring,
            metrics,
            subs: Slab::new(),
            index: SubscriberIndex::default(),
            next_pos,
            last_seq: 0,
            next_serial: 0,
            wakes: Vec::new(),
            asks: VecDeque::new(),
            pings: VecDeque::new(),
            last_ping: now,
            next_tick: now + TICK,
            zip: settings.compression.map(|policy| Zip {
                policy,
                compressor: Compressor::new(policy.level),
                arena: FrameArena::new(),
            }),
            settings,
        }
    }

    pub fn ring(&self) -> &FrameRing {
        &self.ring
    }

    pub fn next_pos(&self) -> u64 {
        self.next_pos
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    pub fn handle(&self, id: SubId) -> Option<&H> {
        self.subs.get(id).map(|s| &s.handle)
    }

    pub fn serial(&self, id: SubId) -> Option<u64> {
        self.subs.get(id).map(|s| s.serial)
    }

    /// Why a subscriber is closing, once it is.
    pub fn close_reason(&self, id: SubId) -> Option<&CloseReason> {
        match &self.subs.get(id)?.phase {
            Phase::Closing { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// The `seq` a subscriber registered now starts after (its `Krux-Seq`): the last event
    /// this reactor dispatched, or where the ring starts. `None` when there is nothing
    /// before it (or, in a cluster, when that is not known yet). `Some(0)` when events were
    /// published but this reactor has dispatched none yet: they are still owed to the new
    /// subscriber, and `since=0` is where a resume misses none of them.
    pub fn position_seq(&self) -> Option<u64> {
        let seq = match (self.last_seq, self.ring.complete_from()) {
            (0, u64::MAX) => return None,
            (0, from) => from.saturating_sub(1),
            (s, _) => s,
        };
        (seq > 0 || self.ring.has_published()).then_some(seq)
    }

    /// Registers a subscriber between two fan-out rounds: live from the fan-out position,
    /// or resuming after `since`. Returns its id and its `Krux-Seq`.
    pub fn register(
        &mut self,
        principal: Principal,
        filter: Filter,
        since: Option<u64>,
        deflate: Option<Deflate>,
        handle: H,
        now: Instant,
    ) -> (SubId, Option<u64>) {
        let position = self.position_seq();
        let mut out = Outbox::new(self.settings.client_queue, since.or(position).unwrap_or(0));
        let id = self.subs.vacant_key();
        let phase = match since {
            None => {
                self.index.insert(id, filter);
                Phase::Live {
                    from: self.next_pos,
                }
            }
            Some(since) => self.resume(&mut out, since, filter),
        };
        let serial = self.next_serial;
        self.next_serial += 1;
        if deflate.is_some() {
            self.metrics.deflate_subscribers.fetch_add(1, Relaxed);
        }
        self.subs.insert(Sub {
            handle,
            out,
            deflate,
            principal,
            phase,
            last_heard: now,
            stall: (0, 0),
            serial,
            woken: false,
        });
        self.metrics.subscriber_delta(self.reactor, 1);
        if !matches!(self.subs[id].phase, Phase::Live { .. }) {
            self.wake(id); // its writer replays
        }
        (id, position)
    }

    /// Where a resume from `since` starts. Standalone: from the window, after the
    /// `replay_gap` notice when it no longer reaches `since + 1`. In a cluster: from the
    /// window when it holds everything after `since`, else from the stream first.
    fn resume(&self, out: &mut Outbox, since: u64, filter: Filter) -> Phase {
        let ring = &self.ring;
        if self.settings.cluster {
            return match ring.find_after(since) {
                Some(next) => Phase::Replaying { next, filter },
                None => Phase::FromStream {
                    filter,
                    backlog: Backlog {
                        after: since,
                        ..Backlog::default()
                    },
                },
            };
        }
        let oldest = ring.oldest();
        if ring.lost_after(since) {
            out.push_control(gap_frame(since, oldest));
        }
        Phase::Replaying {
            next: since.saturating_add(1).max(oldest),
            filter,
        }
    }

    /// The connection is gone: forget the subscriber. Returns its handle.
    pub fn remove(&mut self, id: SubId) -> Option<H> {
        let sub = self.subs.try_remove(id)?;
        self.index.remove(id);
        self.metrics.subscriber_delta(self.reactor, -1);
        if sub.deflate.is_some() {
            self.metrics.deflate_subscribers.fetch_sub(1, Relaxed);
        }
        Some(sub.handle)
    }

    /// Bytes arrived from the subscriber (keepalive: it is alive).
    pub fn heard(&mut self, id: SubId, now: Instant) {
        if let Some(s) = self.subs.get_mut(id) {
            s.last_heard = now;
        }
    }

    /// A control frame from the subscriber.
    pub fn on_inbound(&mut self, id: SubId, inbound: Inbound, now: Instant) {
        match inbound {
            Inbound::Ping(payload) => {
                let Some(s) = self.subs.get_mut(id) else {
                    return;
                };
                if s.out.push_control(frame::pong_frame(&payload)) {
                    self.wake(id);
                }
            }
            Inbound::Pong => {}
            // Echo the peer's code, as RFC 6455 §5.5.1 suggests.
            Inbound::Close(code) => self.close(
                id,
                CloseReason::Peer(code.unwrap_or(crate::proto::ws::close_code::NORMAL)),
                now,
            ),
        }
    }

    /// The subscriber broke the protocol.
    pub fn on_violation(&mut self, id: SubId, v: Violation, now: Instant) {
        self.close(id, CloseReason::Protocol(v), now);
    }

    /// Every close a subscriber gets is decided here, and counted by its reason.
    pub fn close(&mut self, id: SubId, reason: CloseReason, now: Instant) {
        let Some(s) = self.subs.get_mut(id) else {
            return;
        };
        if matches!(s.phase, Phase::Closing { .. }) {
            return;
        }
        if matches!(s.phase, Phase::Live { .. }) {
            self.index.remove(id);
        }
        if s.out.close(reason.code(), &reason.text()) {
            self.metrics.closed(&reason);
        }
        s.phase = Phase::Closing { reason, since: now };
        self.wake(id);
    }

    /// Closes with 4001, naming the last event queued (it goes out before the close) as
    /// the resume point.
    fn close_slow(&mut self, id: SubId, lapped: bool, now: Instant) {
        let Some(s) = self.subs.get(id) else {
            return;
        };
        let since = s.out.last_seq();
        let reason = match lapped {
            false => CloseReason::SlowConsumer { since },
            true => CloseReason::Lapped { since },
        };
        self.close(id, reason, now);
    }

    /// Closes every subscriber (after what is queued).
    pub fn close_all(&mut self, reason: CloseReason, now: Instant) {
        let ids: Vec<SubId> = self.subs.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.close(id, reason.clone(), now);
        }
    }

    /// Credentials changed: closes the subscribers whose principal is no longer valid.
    pub fn revoke(&mut self, still_valid: impl Fn(&Principal) -> bool, now: Instant) {
        let gone: Vec<SubId> = self
            .subs
            .iter()
            .filter(|(_, s)| !still_valid(&s.principal))
            .map(|(id, _)| id)
            .collect();
        for id in gone {
            self.close(id, CloseReason::Revoked, now);
        }
    }

    fn wake(&mut self, id: SubId) {
        if let Some(s) = self.subs.get_mut(id) {
            if !std::mem::replace(&mut s.woken, true) {
                self.wakes.push(id);
            }
        }
    }

    /// The subscribers whose writers have something new to do; `f` wakes each.
    pub fn drain_wakes(&mut self, mut f: impl FnMut(SubId, &H)) {
        for id in std::mem::take(&mut self.wakes) {
            if let Some(s) = self.subs.get_mut(id) {
                s.woken = false;
                f(id, &s.handle);
            }
        }
    }

    /// One fan-out round: `round` are the ring's entries (in order) up to position
    /// `next_pos`; each goes to the outboxes of the subscribers it matches. Unfiltered
    /// subscribers take the whole round at once (their queue stays hot in cache and
    /// consecutive frames merge into one run); filtered ones are found event by event
    /// through the index. Each subscriber is in exactly one of the two groups, so it still
    /// gets its frames in seq order.
    pub fn on_entries(&mut self, round: &[EntryRef], next_pos: u64) {
        self.next_pos = next_pos;
        let Some(last) = round.last() else {
            return;
        };
        self.last_seq = last.seq;
        // Subscribers with no room for an event of this round, and that event's position.
        let mut behind: Vec<(SubId, u64)> = Vec::new();
        let (subs, wakes, zip) = (&mut self.subs, &mut self.wakes, &mut self.zip);
        let (ring, metrics) = (&*self.ring, &*self.metrics);
        let mut push = |id: SubId, entries: &mut dyn Iterator<Item = &Entry>| {
            let s = &mut subs[id];
            let mut wake = false;
            for e in entries {
                let frame = Zip::frame_for(zip, e, s.deflate, ring, metrics);
                match s.out.push_event(frame, e.seq, e.accepted_at) {
                    Push::Queued => wake = true,
                    Push::Skipped => {}
                    Push::Full => {
                        behind.push((id, e.pos));
                        wake = true; // its writer catches it up from the window
                        break;
                    }
                }
            }
            if wake && !std::mem::replace(&mut s.woken, true) {
                wakes.push(id);
            }
        };
        for &id in self.index.unfiltered() {
            push(id, &mut round.iter().map(|e| &**e));
        }
        for e in round {
            self.index
                .for_each_filtered_match(&e.keys, |id| push(id, &mut std::iter::once(&**e)));
        }
        // Those that had no room leave the index and catch up from the window as their
        // socket drains (the path of a resume): nothing is lost while they are behind and
        // the others never wait for them.
        for (id, pos) in behind {
            if let Some(filter) = self.index.remove(id) {
                self.subs[id].phase = Phase::Replaying { next: pos, filter };
            }
        }
    }

    /// Fan-out found the ring had lapped it: the ingest outran this reactor by a whole
    /// window, and it goes on from `oldest`. Whatever the live subscribers missed is gone,
    /// so each is told where to resume. Not those still resuming (they meet the gap
    /// themselves) nor those owed nothing before the window.
    pub fn on_lapped(&mut self, oldest: u64, now: Instant) {
        let owed: Vec<SubId> = self
            .subs
            .iter()
            .filter(|(_, s)| matches!(s.phase, Phase::Live { from } if from < oldest))
            .map(|(id, _)| id)
            .collect();
        for id in owed {
            self.close_slow(id, true, now);
        }
        self.next_pos = oldest;
    }

    /// What the subscriber's writer should do next: replays what its queue bound allows,
    /// then moves up to a writev's worth of queued frames into `batch`.
    pub fn poll_transmit(&mut self, id: SubId, batch: &mut Vec<Span>, now: Instant) -> Transmit {
        let scanning = self.replay(id, now);
        let Some(s) = self.subs.get_mut(id) else {
            return Transmit::Idle;
        };
        let taken_at = s.out.take_batch(batch);
        if !batch.is_empty() {
            Transmit::Write(taken_at)
        } else if s.out.state() == OutState::CloseTaken {
            Transmit::Finished
        } else if scanning {
            Transmit::Scan
        } else {
            Transmit::Idle
        }
    }

    /// The kernel took `n` more bytes of the subscriber's batch.
    pub fn on_written(&mut self, id: SubId, n: usize) {
        if let Some(s) = self.subs.get_mut(id) {
            s.out.wrote(n);
        }
    }

    /// Feeds a resuming (or fallen-behind) subscriber what it is owed, as far as its queue
    /// bound allows. Returns whether more is left to scan right away.
    fn replay(&mut self, id: SubId, now: Instant) -> bool {
        if self.stream_step(id) {
            return false;
        }
        let Some(s) = self.subs.get_mut(id) else {
            return false;
        };
        let Phase::Replaying { next, filter } = &mut s.phase else {
            return false;
        };
        let (end, mut pos) = (self.next_pos, *next);
        let stop = pos.saturating_add(SCAN).min(end);
        s.out.resume();
        while pos < stop {
            match self.ring.get(pos) {
                Slot::Ready(e) => {
                    if filter.matches(&e.keys) {
                        let frame =
                            Zip::frame_for(&mut self.zip, &e, s.deflate, &self.ring, &self.metrics);
                        if s.out.push_event(frame, e.seq, e.accepted_at) == Push::Full {
                            break; // the rest once the socket has taken some
                        }
                    }
                }
                // Overwritten before it could be replayed: never skip silently.
                Slot::Lapped => {
                    self.close_slow(id, false, now);
                    return false;
                }
                Slot::Pending => unreachable!("{pos} is below the fan-out position"),
            }
            pos += 1;
        }
        if pos < end {
            *next = pos;
            return true;
        }
        // Caught up with fan-out: indexed from exactly here.
        if let Phase::Replaying { filter, .. } =
            std::mem::replace(&mut s.phase, Phase::Live { from: pos })
        {
            self.index.insert(id, filter);
        }
        false
    }

    /// Feeds a subscriber resuming from the stream what the stream has given, and asks
    /// for more. Returns true while the stream still serves it (false once the ring
    /// takes over, or for any other phase).
    fn stream_step(&mut self, id: SubId) -> bool {
        let until = self.ring.complete_from();
        let Some(s) = self.subs.get_mut(id) else {
            return false;
        };
        let Phase::FromStream { filter, backlog: b } = &mut s.phase else {
            return false;
        };
        s.out.resume();
        while let Some(e) = b.queue.front() {
            if filter.matches(&e.keys) {
                let frame = Zip::frame_for(&mut self.zip, e, s.deflate, &self.ring, &self.metrics);
                if s.out.push_event(frame, e.seq, e.accepted_at) == Push::Full {
                    return true;
                }
            }
            b.after = e.seq;
            b.queue.pop_front();
        }
        if b.asked {
            return true;
        }
        b.after = b.after.max(b.covered);
        if b.reached {
            if let Some(next) = self.ring.find_after(b.after) {
                let filter = std::mem::take(filter);
                s.phase = Phase::Replaying { next, filter };
                return false;
            }
        }
        b.asked = true;
        self.asks.push_back(HistoryAsk {
            sub: id,
            serial: s.serial,
            after: b.after,
            until,
            max_bytes: self.settings.client_queue,
        });
        true
    }

    /// The next request for stored events to send to the cluster thread. If it cannot
    /// be sent, `close(id, CloseReason::HistoryUnavailable)`.
    pub fn poll_history(&mut self) -> Option<HistoryAsk> {
        self.asks.pop_front()
    }

    /// The cluster thread's answer to a `HistoryAsk`.
    pub fn on_history(&mut self, id: SubId, serial: u64, fetched: Result<Fetched, String>) {
        let Some(s) = self.subs.get_mut(id).filter(|s| s.serial == serial) else {
            return; // gone meanwhile
        };
        let Phase::FromStream { backlog: b, .. } = &mut s.phase else {
            return;
        };
        b.asked = false;
        match fetched {
            Ok(f) => {
                if let Some(oldest) = f.gap_oldest {
                    s.out.push_control(gap_frame(b.after, oldest));
                }
                b.queue.extend(f.entries);
                (b.reached, b.covered) = (f.reached, f.covered);
            }
            Err(e) => {
                tracing::warn!("resume from the stream: {e}; asking again");
                b.reached = false;
            }
        }
        self.wake(id);
    }

    /// When `on_timeout` is due next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    /// Housekeeping, every `TICK`: slow consumers whose socket took nothing while full,
    /// closes stuck past the grace, silent peers, keepalive pings. Returns the ids whose
    /// sockets the driver must shut now, and records the shard's queued bytes.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<SubId> {
        self.next_tick = now + TICK;
        let keep =
            self.settings.read_timeout + self.settings.ping_interval + Duration::from_secs(1);
        while self
            .pings
            .front()
            .is_some_and(|&p| now.duration_since(p) > keep)
        {
            self.pings.pop_front();
        }
        let (mut slow, mut silent, mut kill, mut queued) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for (id, s) in self.subs.iter_mut() {
            let (mark, ticks) = s.stall;
            let stalled = s.out.is_full() && s.out.written() == mark;
            let ticks = if stalled { ticks + 1 } else { 0 };
            s.stall = (s.out.written(), ticks);
            if ticks >= STALL_TICKS {
                slow.push(id);
            }
            queued += s.out.unsent();
            if let Phase::Closing { since, .. } = s.phase {
                // Even the close frame could not be written (or was never answered).
                if now.duration_since(since) > CLOSE_GRACE {
                    kill.push(id);
                }
                continue;
            }
            if let Some(&unanswered) = self.pings.iter().find(|&&p| p > s.last_heard) {
                if now.duration_since(unanswered) >= self.settings.read_timeout {
                    silent.push(id); // a half-open or hung peer
                }
            }
        }
        for id in slow {
            self.close_slow(id, false, now);
        }
        for id in silent {
            self.close(id, CloseReason::PingTimeout, now);
        }
        self.metrics.set_reactor_queued(self.reactor, queued);
        if now.duration_since(self.last_ping) >= self.settings.ping_interval {
            self.last_ping = now;
            self.pings.push_back(now);
            let ping = frame::ping_frame(b"");
            let ids: Vec<SubId> = self.subs.iter().map(|(id, _)| id).collect();
            for id in ids {
                if self.subs[id].out.push_control(ping.clone()) {
                    self.wake(id);
                }
            }
        }
        kill
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

/// The subscriber lifecycle on a simulated clock: no sockets, no sleeps. A test plays the
/// driver: it publishes to a ring, hands rounds to the shard, and "writes" what
/// `poll_transmit` gives, parsing the frames back.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, FilterKeys};
    use crate::proto::ws::{close_code, opcode};
    use crate::ring::{Cursor, Producer};

    const ALICE: Principal = Principal::User([1; 32]);
    const BOB: Principal = Principal::User([2; 32]);

    /// A frame as a subscriber would read it.
    #[derive(Debug, PartialEq)]
    enum Got {
        Event(u64),
        Gap { since: u64, oldest: u64 },
        Ping,
        Pong(Vec<u8>),
        Close(u16, String),
    }

    struct World {
        t0: Instant,
        producer: Producer,
        cursor: Cursor,
        arena: FrameArena,
        shard: Shard<()>,
        /// Per subscriber: the taken batch the kernel has not had yet, and bytes
        /// received that do not make a whole frame yet.
        unwritten: Vec<Vec<u8>>,
        received: Vec<Vec<u8>>,
    }

    fn settings(client_queue: usize) -> Settings {
        Settings {
            client_queue,
            ping_interval: Duration::from_secs(10),
            read_timeout: Duration::from_secs(5),
            cluster: false,
            compression: None,
        }
    }

    impl World {
        fn new(window: usize, settings: Settings) -> World {
            let t0 = Instant::now();
            let (producer, mut cursors) = FrameRing::with_readers(window, 1, 1);
            let cursor = cursors.remove(0);
            let ring = producer.ring().clone();
            let metrics = Arc::new(Metrics::new(1, false));
            let shard = Shard::new(0, settings, ring, 1, metrics, t0);
            World {
                t0,
                producer,
                cursor,
                arena: FrameArena::new(),
                shard,
                unwritten: vec![Vec::new(); 8],
                received: vec![Vec::new(); 8],
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// Publishes `n` events (agent `a0` or `a1` alternately, `pad` bytes of text each).
        fn publish(&mut self, n: usize, pad: usize) {
            for _ in 0..n {
                let pos = self.producer.ring().head();
                let agent = format!("a{}", pos % 2);
                let text = format!(
                    r#"{{"type":"health_alert","agent":"{agent}","data":{{"m":"{}"}}}}"#,
                    "x".repeat(pad)
                );
                self.producer.publish(Entry {
                    pos,
                    seq: pos,
                    frame: self.arena.event_frame(text.as_bytes(), None, pos),
                    keys: FilterKeys {
                        etype: EventType::HealthAlert,
                        agent: Some(agent.into()),
                        session: None,
                        data_session: None,
                    },
                    accepted_at: self.t0,
                    deflated: Default::default(),
                });
            }
        }

        /// Fan-out over everything published, in the driver's rounds: a lapped round
        /// resumes from the oldest retained event.
        fn fan_out(&mut self, now: Instant) {
            let mut round = Vec::new();
            while self.cursor.next < self.cursor.ring().head() {
                let lapped = self.cursor.read_round(u64::MAX, &mut round);
                self.shard.on_entries(&round, self.cursor.next);
                round.clear();
                if lapped {
                    let oldest = self.cursor.ring().oldest();
                    self.shard.on_lapped(oldest, now);
                    self.cursor.next = oldest;
                }
            }
        }

        fn register(&mut self, who: Principal, agent: Option<&str>, since: Option<u64>) -> SubId {
            self.register_with(who, agent, since, None)
        }

        fn register_with(
            &mut self,
            who: Principal,
            agent: Option<&str>,
            since: Option<u64>,
            deflate: Option<Deflate>,
        ) -> SubId {
            let filter = Filter {
                agents: agent.map(|a| vec![a.into()]),
                ..Filter::default()
            };
            let now = self.at(0);
            self.shard.register(who, filter, since, deflate, (), now).0
        }

        /// What the subscriber's writer sends until it would wait, the socket taking at
        /// most `max` bytes (usize::MAX: everything).
        fn write(&mut self, id: SubId, max: usize, now: Instant) -> Vec<Got> {
            let mut budget = max;
            loop {
                // The driver owns a taken batch until the kernel has all of it.
                if self.unwritten[id].is_empty() {
                    let mut batch = Vec::new();
                    match self.shard.poll_transmit(id, &mut batch, now) {
                        Transmit::Write(_) => {}
                        Transmit::Scan => continue,
                        Transmit::Idle | Transmit::Finished => break,
                    }
                    self.unwritten[id] = batch.iter().flat_map(|s| s.to_vec()).collect();
                }
                let n = self.unwritten[id].len().min(budget);
                self.received[id].extend(self.unwritten[id].drain(..n));
                self.shard.on_written(id, n);
                budget -= n;
                if budget == 0 {
                    break;
                }
            }
            let (got, used) = parse(&self.received[id]);
            self.received[id].drain(..used);
            got
        }
    }

    /// The whole frames in `b` (the rest may be cut by the socket's budget), and how many
    /// bytes they took.
    fn parse(mut b: &[u8]) -> (Vec<Got>, usize) {
        let (mut out, mut used) = (Vec::new(), 0);
        while let Some((frame, n)) = krux_testkit::parse_frame(b) {
            out.push(match frame.opcode {
                opcode::TEXT => {
                    let v: serde_json::Value = if b[0] & 0x40 != 0 {
                        serde_json::from_slice(&krux_testkit::inflate_message(frame.payload))
                            .unwrap()
                    } else {
                        frame.json().unwrap()
                    };
                    if v["type"] == "replay_gap" {
                        Got::Gap {
                            since: v["data"]["since"].as_u64().unwrap(),
                            oldest: v["data"]["oldest"].as_u64().unwrap(),
                        }
                    } else {
                        Got::Event(v["seq"].as_u64().unwrap())
                    }
                }
                opcode::CLOSE => {
                    let (code, reason) = frame.close().unwrap();
                    Got::Close(code, reason)
                }
                opcode::PING => Got::Ping,
                opcode::PONG => Got::Pong(frame.payload.to_vec()),
                other => panic!("opcode {other}"),
            });
            b = &b[n..];
            used += n;
        }
        (out, used)
    }

    fn events(range: std::ops::RangeInclusive<u64>) -> Vec<Got> {
        range.map(Got::Event).collect()
    }

    fn deflate(window_bits: u8) -> Option<Deflate> {
        let offer = format!("permessage-deflate; server_max_window_bits={window_bits}");
        crate::proto::deflate::negotiate([offer.as_str()])
    }

    /// Each event is compressed once for every subscriber that negotiated the extension,
    /// live or resuming; small events, and events larger than a subscriber's window, go
    /// out plain; subscribers without the extension get plain frames throughout.
    #[test]
    fn events_are_compressed_once_for_every_subscriber_with_the_extension() {
        let mut s = settings(1 << 20);
        s.compression = Some(Policy {
            min_size: 100,
            level: 6,
        });
        let mut w = World::new(1000, s);
        let (a, b) = (
            w.register_with(ALICE, None, None, deflate(15)),
            w.register_with(BOB, None, None, deflate(15)),
        );
        let small_window = w.register_with(ALICE, None, None, deflate(9));
        let plain = w.register(BOB, None, None);
        w.publish(3, 400); // compressed
        w.publish(1, 10); // below the minimum size
        w.publish(1, 600); // compressed, but longer than a 512-byte window
        w.fan_out(w.at(0));
        let metrics = w.shard.metrics.clone();
        assert_eq!(metrics.deflate_subscribers.load(Relaxed), 3);
        let bytes_of = |w: &mut World, id| {
            let before = w.shard.subs[id].out.written();
            let got = w.write(id, usize::MAX, w.at(1));
            (got, w.shard.subs[id].out.written() - before)
        };
        let (got_a, bytes_a) = bytes_of(&mut w, a);
        let (got_b, bytes_b) = bytes_of(&mut w, b);
        let (got_small, bytes_small) = bytes_of(&mut w, small_window);
        let (got_plain, bytes_plain) = bytes_of(&mut w, plain);
        for got in [&got_a, &got_b, &got_small, &got_plain] {
            assert_eq!(*got, events(1..=5));
        }
        assert_eq!(bytes_a, bytes_b);
        assert!(
            bytes_a < bytes_small && bytes_small < bytes_plain,
            "{bytes_a} {bytes_small} {bytes_plain}"
        );
        // Four events compressed, each once, whoever needed it.
        assert_eq!(metrics.deflate_frames.load(Relaxed), 4);
        let (inb, outb) = (
            metrics.deflate_bytes_in.load(Relaxed),
            metrics.deflate_bytes_out.load(Relaxed),
        );
        assert!(outb * 5 < inb, "{outb} of {inb}");
        // A resume with the extension replays the same compressed frames.
        let resumed = w.register_with(BOB, None, Some(0), deflate(15));
        let (got, bytes) = bytes_of(&mut w, resumed);
        assert_eq!((got, bytes), (events(1..=5), bytes_a));
        assert_eq!(metrics.deflate_frames.load(Relaxed), 4);
        w.shard.remove(resumed);
        assert_eq!(metrics.deflate_subscribers.load(Relaxed), 3);
    }

    #[test]
    fn a_resume_hands_over_to_live_with_no_hole_and_no_duplicate() {
        let mut w = World::new(1000, settings(1 << 20));
        w.publish(10, 10);
        w.fan_out(w.at(0));
        let live = w.register(ALICE, None, None);
        let resumed = w.register(BOB, None, Some(4));
        // Published while the resume has not replayed a thing yet.
        w.publish(5, 10);
        w.fan_out(w.at(1));
        assert_eq!(w.write(live, usize::MAX, w.at(2)), events(11..=15));
        assert_eq!(w.write(resumed, usize::MAX, w.at(2)), events(5..=15));
        w.publish(2, 10);
        w.fan_out(w.at(3));
        assert_eq!(w.write(resumed, usize::MAX, w.at(4)), events(16..=17));
        assert_eq!(w.shard.position_seq(), Some(17), "the next Krux-Seq");
    }

    /// A subscriber that registers before its reactor dispatched the first events is told
    /// `Krux-Seq: 0`, not nothing: a filtered one that receives none of them still has a
    /// resume point that misses nothing (`since=0`).
    #[test]
    fn krux_seq_is_0_not_absent_when_events_are_published_but_not_dispatched() {
        let mut w = World::new(1000, settings(1 << 20));
        assert_eq!(
            w.shard.position_seq(),
            None,
            "nothing published: no Krux-Seq"
        );
        w.publish(3, 10);
        assert_eq!(w.shard.position_seq(), Some(0), "published, not dispatched");
        let owed = w.register(ALICE, None, None);
        w.fan_out(w.at(0));
        assert_eq!(w.write(owed, usize::MAX, w.at(1)), events(1..=3));
        assert_eq!(w.shard.position_seq(), Some(3));
    }

    #[test]
    fn a_filtered_resume_replays_only_its_events() {
        let mut w = World::new(1000, settings(1 << 20));
        w.publish(10, 10);
        w.fan_out(w.at(0));
        let id = w.register(ALICE, Some("a1"), Some(0));
        w.publish(4, 10);
        w.fan_out(w.at(1));
        let odd: Vec<Got> = (1..=14).filter(|s| s % 2 == 1).map(Got::Event).collect();
        assert_eq!(w.write(id, usize::MAX, w.at(2)), odd);
    }

    #[test]
    fn a_resume_older_than_the_window_is_told_of_the_gap_first() {
        let mut w = World::new(8, settings(1 << 20));
        w.publish(20, 10);
        w.fan_out(w.at(0));
        let id = w.register(ALICE, None, Some(3));
        let mut want = vec![Got::Gap {
            since: 3,
            oldest: 13,
        }];
        want.extend(events(13..=20));
        assert_eq!(w.write(id, usize::MAX, w.at(1)), want);
    }

    #[test]
    fn a_full_subscriber_falls_behind_then_catches_up_from_the_window() {
        let mut w = World::new(1000, settings(1000));
        let slow = w.register(ALICE, None, None);
        let fast = w.register(BOB, None, None);
        w.publish(40, 100); // ~150 B frames: far past the 1,000 B bound
        w.fan_out(w.at(0));
        assert_eq!(w.write(fast, usize::MAX, w.at(1)), events(1..=40));
        // The slow one's socket takes a little at a time; it gets everything, in order.
        let mut got = Vec::new();
        for step in 0..100 {
            got.extend(w.write(slow, 400, w.at(2 + step)));
        }
        let seqs: Vec<u64> = got
            .iter()
            .filter_map(|g| match g {
                Got::Event(s) => Some(*s),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
        // Back in the index: live events reach it directly.
        w.publish(1, 100);
        w.fan_out(w.at(200));
        assert!(w
            .write(slow, usize::MAX, w.at(201))
            .ends_with(&[Got::Event(41)]));
    }

    #[test]
    fn an_empty_queue_takes_a_frame_larger_than_the_bound() {
        let mut w = World::new(1000, settings(100));
        let id = w.register(ALICE, None, None);
        w.publish(1, 1000);
        w.fan_out(w.at(0));
        assert_eq!(w.write(id, usize::MAX, w.at(1)), events(1..=1));
    }

    #[test]
    fn a_socket_that_takes_nothing_while_full_is_closed_naming_its_resume_point() {
        let mut w = World::new(1000, settings(1000));
        let id = w.register(ALICE, None, None);
        w.publish(40, 100);
        w.fan_out(w.at(0));
        // Its writer hands the kernel a batch, which takes only the first two frames.
        let first = w.write(id, 300, w.at(1));
        assert_eq!(first, events(1..=1), "one whole frame (the second is cut)");
        // The tick after that write notes how far the socket got; stalls count from it.
        w.shard.on_timeout(w.at(1));
        for tick in 1..=STALL_TICKS {
            assert!(w.shard.close_reason(id).is_none(), "tick {tick}");
            w.shard.on_timeout(w.at(u64::from(tick) * 250));
        }
        let queued_last = w.shard.subs[id].out.last_seq();
        assert_eq!(
            w.shard.close_reason(id),
            Some(&CloseReason::SlowConsumer { since: queued_last })
        );
        // What was queued goes out, then the close naming the last of it.
        let rest = w.write(id, usize::MAX, w.at(2000));
        assert_eq!(
            rest.last(),
            Some(&Got::Close(
                close_code::SLOW_CONSUMER,
                format!("slow consumer; resume with since={queued_last}")
            ))
        );
        assert!(rest.contains(&Got::Event(queued_last)));
    }

    #[test]
    fn a_lapped_reactor_closes_only_those_owed_what_is_gone() {
        let mut w = World::new(8, settings(1 << 20));
        w.publish(2, 10);
        w.fan_out(w.at(0));
        let owed = w.register(ALICE, None, None); // live from position 3
        w.publish(20, 10); // positions 3..=22: the window (15..=22) no longer holds 3
                           // A resume registered after the ingest ran on: its replay starts at the window.
        let fresh = w.register(BOB, None, Some(20));
        w.fan_out(w.at(1));
        assert_eq!(
            w.shard.close_reason(owed),
            Some(&CloseReason::Lapped { since: 2 })
        );
        assert_eq!(w.shard.close_reason(fresh), None);
        assert_eq!(
            w.write(owed, usize::MAX, w.at(2)),
            [Got::Close(
                close_code::SLOW_CONSUMER,
                "slow consumer; resume with since=2".into()
            )]
        );
        assert_eq!(w.write(fresh, usize::MAX, w.at(2)), events(21..=22));
    }

    #[test]
    fn keepalive_pings_and_a_silent_peer_is_closed_after_the_read_timeout() {
        let mut w = World::new(1000, settings(1 << 20));
        let silent = w.register(ALICE, None, None);
        let alive = w.register(BOB, None, None);
        w.shard.on_timeout(w.at(10_000)); // the ping interval: a ping to each
        assert_eq!(w.write(silent, usize::MAX, w.at(10_001)), [Got::Ping]);
        assert_eq!(w.write(alive, usize::MAX, w.at(10_001)), [Got::Ping]);
        w.shard.heard(alive, w.at(10_100)); // its pong
        w.shard.on_timeout(w.at(14_999));
        assert_eq!(w.shard.close_reason(silent), None, "not yet");
        w.shard.on_timeout(w.at(15_000));
        assert_eq!(
            w.shard.close_reason(silent),
            Some(&CloseReason::PingTimeout)
        );
        assert_eq!(w.shard.close_reason(alive), None);
        assert_eq!(
            w.write(silent, usize::MAX, w.at(15_001)),
            [Got::Close(
                close_code::GOING_AWAY,
                "no pong within the read timeout".into()
            )]
        );
    }

    #[test]
    fn pings_are_answered_and_a_peer_close_is_echoed() {
        let mut w = World::new(1000, settings(1 << 20));
        let id = w.register(ALICE, None, None);
        w.shard
            .on_inbound(id, Inbound::Ping(b"hi".to_vec()), w.at(1));
        w.shard.on_inbound(id, Inbound::Close(Some(4321)), w.at(2));
        w.publish(1, 10);
        w.fan_out(w.at(3));
        assert_eq!(
            w.write(id, usize::MAX, w.at(4)),
            [Got::Pong(b"hi".to_vec()), Got::Close(4321, String::new())],
            "nothing after the close"
        );
        let mut batch = Vec::new();
        assert_eq!(
            w.shard.poll_transmit(id, &mut batch, w.at(5)),
            Transmit::Finished
        );
    }

    #[test]
    fn a_close_that_cannot_get_out_is_cut_after_the_grace() {
        let mut w = World::new(1000, settings(1 << 20));
        let id = w.register(ALICE, None, None);
        w.shard.close_all(CloseReason::Shutdown, w.at(1_000));
        assert!(
            w.shard.on_timeout(w.at(3_000)).is_empty(),
            "within the grace"
        );
        assert_eq!(w.shard.on_timeout(w.at(3_001)), [id]);
    }

    #[test]
    fn revocation_closes_only_the_streams_of_that_credential() {
        let mut w = World::new(1000, settings(1 << 20));
        let alice = w.register(ALICE, None, None);
        let bob = w.register(BOB, None, None);
        w.shard.revoke(|p| *p != ALICE, w.at(1));
        assert_eq!(w.shard.close_reason(alice), Some(&CloseReason::Revoked));
        assert_eq!(w.shard.close_reason(bob), None);
        w.publish(1, 10);
        w.fan_out(w.at(2));
        assert_eq!(
            w.write(alice, usize::MAX, w.at(3)),
            [Got::Close(close_code::POLICY, "credential revoked".into())],
            "a closed subscriber leaves the index"
        );
        assert_eq!(w.write(bob, usize::MAX, w.at(3)), events(1..=1));
    }

    #[test]
    fn shutdown_closes_after_what_is_queued_and_removal_forgets() {
        let mut w = World::new(1000, settings(1 << 20));
        let id = w.register(ALICE, None, None);
        w.publish(3, 10);
        w.fan_out(w.at(0));
        w.shard.close_all(CloseReason::Shutdown, w.at(1));
        let mut want = events(1..=3);
        want.push(Got::Close(
            close_code::GOING_AWAY,
            "relay shutting down".into(),
        ));
        assert_eq!(w.write(id, usize::MAX, w.at(2)), want);
        assert_eq!(w.shard.len(), 1);
        w.shard.remove(id);
        assert!(w.shard.is_empty());
    }

    #[test]
    fn a_cluster_resume_beyond_the_window_asks_the_stream_then_the_ring() {
        let mut s = settings(1 << 20);
        s.cluster = true;
        let mut w = World::new(1000, s);
        w.publish(10, 10);
        w.fan_out(w.at(0));
        // The ring holds positions 1..; seqs below 1 are only in the stream (here: none
        // before the ring's start, so the ring is complete from 1).
        w.producer.ring().set_complete_from(5);
        let id = w.register(ALICE, None, Some(2));
        assert!(
            w.write(id, usize::MAX, w.at(1)).is_empty(),
            "waits for the stream"
        );
        let ask = w.shard.poll_history().expect("a history request");
        assert_eq!((ask.sub, ask.after, ask.until), (id, 2, 5));
        assert_eq!(w.shard.poll_history(), None, "one at a time");
        // The stream gives 3 and 4 and says it reached the ring's start.
        let stored: Vec<Arc<Entry>> = [3, 4]
            .iter()
            .map(|&seq| {
                let frame = w
                    .arena
                    .event_frame(br#"{"type":"health_alert"}"#, None, seq);
                Arc::new(Entry {
                    pos: 0,
                    seq,
                    frame,
                    keys: FilterKeys {
                        etype: EventType::HealthAlert,
                        agent: None,
                        session: None,
                        data_session: None,
                    },
                    accepted_at: w.t0,
                    deflated: Default::default(),
                })
            })
            .collect();
        let fetched = Fetched {
            gap_oldest: None,
            entries: stored,
            reached: true,
            covered: 4,
        };
        w.shard.on_history(id, ask.serial, Ok(fetched));
        assert_eq!(w.write(id, usize::MAX, w.at(2)), events(3..=10));
    }
}
