//! `FrameRing`: the lock-free single-producer / multi-consumer ring that carries built
//! frames from the ingest thread to the reactors.
//!
//! Every reactor reads every entry through its own cursor (broadcast, not work sharing).
//! Entries have consecutive positions (`pos`) and are stored in chunks of `CHUNK`
//! consecutive positions, so the ring's contents are also the replay window: the last
//! `capacity` events. Standalone, `pos` is the event's `seq`; in a cluster `seq` comes
//! from the stream and has holes, and a resume finds its position by `seq` (`find_after`).
//! Chunk slots are `ArcSwapOption`s and an entry is set once before `head` passes it, so
//! readers never lock and never see a torn entry; a reader that finds its chunk gone or
//! replaced knows it was lapped.
//!
//! The window is bounded in bytes as well (`--replay-memory`): the producer counts what
//! the retained entries hold and, past the bound, evicts the oldest first, so the window
//! is the newest events within both bounds (never fewer than the newest one). Memory is
//! released a chunk at a time: at most `CHUNK - 1` evicted entries stay resident.
//!
//! An entry's compressed frame (permessage-deflate) is made once, by the first reactor
//! that has a subscriber wanting it (`Entry::deflated`), and shared by all; from then on it
//! counts in the byte bound too, until the entry leaves the window.
//!
//! Wake-ups: a reactor with nothing to read marks itself parked and waits on its `Notify`;
//! the producer notifies only parked reactors, so a busy reactor costs it one atomic load.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use crate::event::FilterKeys;
use crate::frame::EventFrame;

/// One accepted event, as the reactors see it.
#[derive(Debug)]
pub struct Entry {
    /// Its place in this ring (consecutive; equal to `seq` on a standalone node).
    pub pos: u64,
    pub seq: u64,
    /// The complete WebSocket text frame, shared by every subscriber that gets it.
    pub frame: EventFrame,
    pub keys: FilterKeys,
    /// When the ingest accepted the event (for the ingest→write latency metric).
    pub accepted_at: std::time::Instant,
    /// Its frame compressed, once a subscriber that negotiated compression needed it.
    pub deflated: Deflated,
}

/// An entry's compressed frame: made at most once, by whichever reactor needs it first.
#[derive(Debug, Default)]
pub struct Deflated {
    /// Boxed: every entry carries this, and few events are ever compressed (none while
    /// no subscriber negotiated the extension), so it costs a pointer, not a frame.
    frame: OnceLock<Option<Box<EventFrame>>>,
    /// Whether its bytes are counted in the window's bound: `FREE` not (yet), `CHARGED`,
    /// or `GONE` (the entry left the window, or was never in one).
    charge: AtomicU8,
}

/// What a compressed frame holds: its bytes and its box.
fn boxed_size(f: &EventFrame) -> usize {
    f.len() + std::mem::size_of::<EventFrame>()
}

const FREE: u8 = 0;
const CHARGED: u8 = 1;
const GONE: u8 = 2;

impl Deflated {
    /// For an entry that is never in a ring (a cluster node's history fetch): its
    /// compressed frame is never charged to a window.
    pub fn outside_window() -> Deflated {
        Deflated {
            frame: OnceLock::new(),
            charge: AtomicU8::new(GONE),
        }
    }
}

impl Entry {
    /// The frame compressed: made by the first caller with `make` (given the payload;
    /// `None` when compressing does not pay, and the plain frame goes out), the same for
    /// every later caller on any reactor. While the entry is in `ring`'s window, the
    /// compressed frame counts in its byte bound.
    pub fn deflated(
        &self,
        ring: &FrameRing,
        make: impl FnOnce(&[u8]) -> Option<EventFrame>,
    ) -> Option<&EventFrame> {
        self.deflated
            .frame
            .get_or_init(|| {
                let made = make(self.frame.payload()).map(Box::new);
                if let Some(f) = &made {
                    // Counted before it is marked, so that the producer, which uncounts
                    // only what it finds marked, never takes away what is not there.
                    // The producer marks what it forgets (`GONE`) whenever it sees a
                    // count; if it saw none, it forgot this entry before the count above,
                    // and `forgotten_below` (stored before its look) says so here.
                    let n = boxed_size(f);
                    ring.deflated_bytes.fetch_add(n, SeqCst);
                    let c = &self.deflated.charge;
                    let out = if c.compare_exchange(FREE, CHARGED, SeqCst, SeqCst).is_err() {
                        true // marked `GONE` already
                    } else {
                        self.pos < ring.forgotten_below.load(SeqCst)
                            && c.compare_exchange(CHARGED, GONE, SeqCst, SeqCst).is_ok()
                    };
                    if out {
                        ring.deflated_bytes.fetch_sub(n, SeqCst);
                    }
                }
                made
            })
            .as_deref()
    }

    /// The entry leaves the window: its compressed frame, if counted, no longer is.
    fn uncharge(&self, ring: &FrameRing) {
        if self.deflated.charge.swap(GONE, SeqCst) == CHARGED {
            if let Some(Some(f)) = self.deflated.frame.get() {
                ring.deflated_bytes.fetch_sub(boxed_size(f), SeqCst);
            }
        }
    }
}

/// What a reader finds at a given `seq`.
#[derive(Debug)]
pub enum Slot {
    Ready(EntryRef),
    /// Not published yet.
    Pending,
    /// Overwritten: the window no longer reaches this `seq`.
    Lapped,
}

/// Positions per chunk: the producer allocates and swaps in one chunk per `CHUNK`
/// entries, and a reader loads one per `CHUNK` entries it reads, instead of one
/// `ArcSwap` store and load per entry (those were a tenth of the ingest's time).
const CHUNK: u64 = 32;

/// `CHUNK` consecutive positions from `base` (a multiple of `CHUNK`). Each entry is set
/// once, before `head` passes it, and never changes; the chunk lives as long as the ring
/// retains one of its entries or a reader still holds one.
struct Chunk {
    base: u64,
    entries: [OnceLock<Entry>; CHUNK as usize],
}

impl Chunk {
    fn new(base: u64) -> Arc<Chunk> {
        Arc::new(Chunk {
            base,
            entries: [const { OnceLock::new() }; CHUNK as usize],
        })
    }

    /// The entry at `pos`, when this chunk holds it and it is published.
    fn ready(self: &Arc<Chunk>, pos: u64) -> Option<EntryRef> {
        let idx = pos.checked_sub(self.base).filter(|&i| i < CHUNK)? as u32;
        self.entries[idx as usize].get()?;
        Some(EntryRef {
            chunk: self.clone(),
            idx,
        })
    }
}

/// A published entry, shared with the ring: holding it keeps its chunk alive.
#[derive(Clone)]
pub struct EntryRef {
    chunk: Arc<Chunk>,
    idx: u32,
}

impl std::ops::Deref for EntryRef {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        self.chunk.entries[self.idx as usize]
            .get()
            .expect("an EntryRef points at a published entry")
    }
}

impl std::fmt::Debug for EntryRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[derive(Default)]
pub struct ReaderWake {
    parked: AtomicBool,
    notify: Notify,
}

pub struct FrameRing {
    /// Chunk `n` (positions `n * CHUNK..`) is in slot `n % slots.len()`. One more slot
    /// than the window needs, so a chunk is out of the window before its slot is reused.
    chunks: Box<[ArcSwapOption<Chunk>]>,
    capacity: u64,
    /// The `seq` the next published entry will have.
    head: AtomicU64,
    /// The first `seq` published by this process (older ones are gone with a restart).
    first: u64,
    /// No event with a seq in `quiet_from..first` was ever published (the previous run
    /// stopped cleanly before them), so a resume from there has lost nothing.
    quiet_from: AtomicU64,
    /// Entries below this were evicted by the byte bound.
    evicted_below: AtomicU64,
    /// Every event with a `seq` from this one on that reached the ring is still in it
    /// (the seq after the newest entry lapped or evicted, or where the ring started).
    complete_from: AtomicU64,
    readers: Vec<Arc<ReaderWake>>,
    /// What the compressed frames of retained entries hold (`Entry::deflated`).
    deflated_bytes: AtomicUsize,
    /// Entries below this position left the window (what the producer has forgotten).
    forgotten_below: AtomicU64,
}

/// The ring's only writer. Not `Clone`: single-producer is enforced by ownership.
pub struct Producer {
    ring: Arc<FrameRing>,
    /// The chunks holding retained entries, oldest first; the last one is being filled.
    chunks: VecDeque<Arc<Chunk>>,
    /// The seq and `retained_bytes` of each retained entry, oldest first: evicting reads
    /// this (sequential) rather than each old entry (cold, a cache miss per event).
    retained: VecDeque<(u64, usize)>,
    /// What the retained entries hold (`Entry::retained_bytes`), and its bound.
    bytes: usize,
    max_bytes: usize,
    /// The oldest position still retained (counted in `bytes`).
    oldest_counted: u64,
}

impl Entry {
    /// What keeping this entry in the window costs: its frame, its keys, its place in a
    /// chunk and its line in the producer's ledger.
    pub fn retained_bytes(&self) -> usize {
        let keys = &self.keys;
        let strings = [&keys.agent, &keys.session, &keys.data_session]
            .iter()
            .map(|k| k.as_ref().map_or(0, |s| s.len()))
            .sum::<usize>();
        self.frame.len()
            + strings
            + std::mem::size_of::<OnceLock<Entry>>()
            + std::mem::size_of::<(u64, usize)>()
    }
}

/// One reactor's read position and wake-up handle.
pub struct Cursor {
    ring: Arc<FrameRing>,
    wake: Arc<ReaderWake>,
    pub next: u64,
}

impl FrameRing {
    /// A ring retaining `capacity` entries, whose first entry will be at `first_pos`, read
    /// by `readers` cursors.
    pub fn with_readers(
        capacity: usize,
        first_pos: u64,
        readers: usize,
    ) -> (Producer, Vec<Cursor>) {
        Self::bounded(capacity, usize::MAX, first_pos, readers)
    }

    /// Like `with_readers`, retaining also at most `max_bytes` (`Entry::retained_bytes`).
    pub fn bounded(
        capacity: usize,
        max_bytes: usize,
        first_pos: u64,
        readers: usize,
    ) -> (Producer, Vec<Cursor>) {
        assert!(capacity > 0, "ring capacity must be positive");
        let slots = (capacity as u64).div_ceil(CHUNK) + 1;
        let ring = Arc::new(FrameRing {
            chunks: (0..slots).map(|_| ArcSwapOption::empty()).collect(),
            capacity: capacity as u64,
            head: AtomicU64::new(first_pos),
            first: first_pos,
            quiet_from: AtomicU64::new(first_pos),
            evicted_below: AtomicU64::new(first_pos),
            complete_from: AtomicU64::new(first_pos),
            readers: (0..readers).map(|_| Arc::default()).collect(),
            deflated_bytes: AtomicUsize::new(0),
            forgotten_below: AtomicU64::new(first_pos),
        });
        let cursors = ring
            .readers
            .iter()
            .map(|w| Cursor {
                ring: ring.clone(),
                wake: w.clone(),
                next: first_pos,
            })
            .collect();
        let producer = Producer {
            ring,
            chunks: VecDeque::new(),
            retained: VecDeque::new(),
            bytes: 0,
            max_bytes,
            oldest_counted: first_pos,
        };
        (producer, cursors)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn slot(&self, pos: u64) -> &ArcSwapOption<Chunk> {
        &self.chunks[((pos / CHUNK) % self.chunks.len() as u64) as usize]
    }

    /// The position the next published entry will get.
    pub fn head(&self) -> u64 {
        self.head.load(SeqCst)
    }

    /// Whether this process has published anything into the ring yet.
    pub fn has_published(&self) -> bool {
        self.head() > self.first
    }

    /// Every event with a `seq` from this one on that reached the ring is still in it.
    pub fn complete_from(&self) -> u64 {
        self.complete_from.load(SeqCst)
    }

    /// Declares that the ring is complete from `seq` on only: resumes from before it are
    /// not served from here (a cluster node's starting point in the stream, and the first
    /// seq of a recreated stream).
    pub fn set_complete_from(&self, seq: u64) {
        self.complete_from.store(seq, SeqCst);
    }

    /// Where a resume after `since` starts: the position of the first retained entry with
    /// a `seq` above it (`head()` if there is none yet), or `None` when the ring may no
    /// longer hold every event after `since`. For rings whose seqs have holes.
    pub fn find_after(&self, since: u64) -> Option<u64> {
        let complete = |r: &FrameRing| since.saturating_add(1) >= r.complete_from();
        if !complete(self) {
            return None;
        }
        // Binary search over the retained positions; an entry lapped meanwhile sends the
        // resume elsewhere (checked again below).
        let (mut lo, mut hi) = (self.oldest(), self.head());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(mid) {
                Slot::Ready(e) if e.seq <= since => lo = mid + 1,
                Slot::Ready(_) => hi = mid,
                _ => return None,
            }
        }
        complete(self).then_some(lo)
    }

    /// Records that the previous run published nothing after `last`: seqs from `last + 1`
    /// up to this run's first were never used.
    pub fn set_previous_last(&self, last: u64) {
        self.quiet_from
            .store(last.saturating_add(1).min(self.first), SeqCst);
    }

    /// Whether events after `since` may be gone: the window starts past `since + 1`, and
    /// not merely because the seqs in between were never used.
    pub fn lost_after(&self, since: u64) -> bool {
        let (next, oldest) = (since.saturating_add(1), self.oldest());
        next < oldest && !(oldest == self.first && next >= self.quiet_from.load(SeqCst))
    }

    /// The oldest position still retained (equal to `head()` when nothing is).
    pub fn oldest(&self) -> u64 {
        let by_count = self.head().saturating_sub(self.capacity).max(self.first);
        by_count.max(self.evicted_below.load(SeqCst))
    }

    pub fn get(&self, pos: u64) -> Slot {
        if pos >= self.head() {
            return Slot::Pending;
        }
        if pos < self.oldest() {
            return Slot::Lapped;
        }
        // The chunk may have left the window since: then its slot is empty or holds a
        // newer chunk.
        match self.slot(pos).load_full().and_then(|c| c.ready(pos)) {
            Some(e) => Slot::Ready(e),
            // Emptied or reused since the check above: it left the window.
            None => Slot::Lapped,
        }
    }
}

impl Producer {
    pub fn ring(&self) -> &Arc<FrameRing> {
        &self.ring
    }

    /// Publishes the entry whose `pos` must be `ring.head()`, and whose `seq` is above every
    /// earlier one. Readers are not woken here: call `wake_parked` once per batch.
    pub fn publish(&mut self, entry: Entry) {
        let pos = entry.pos;
        assert_eq!(
            pos,
            self.ring.head(),
            "entries are published in position order"
        );
        let size = entry.retained_bytes();
        self.bytes += size;
        self.retained.push_back((entry.seq, size));
        if pos.is_multiple_of(CHUNK) || self.chunks.is_empty() {
            let chunk = Chunk::new(pos - pos % CHUNK);
            // The slot's previous chunk, if any, left the window (see `chunks`).
            self.ring.slot(pos).store(Some(chunk.clone()));
            self.chunks.push_back(chunk);
        }
        let chunk = self.chunks.back().expect("a chunk is being filled");
        if chunk.entries[(pos % CHUNK) as usize].set(entry).is_err() {
            unreachable!("each position is published once");
        }
        // Lapped by count: the entry `capacity` back leaves the window (unless the byte
        // bound evicted it already).
        if self.retained.len() as u64 > self.ring.capacity {
            let seq = self.forget_oldest();
            self.ring.complete_from.fetch_max(seq + 1, SeqCst);
        }
        self.ring.head.store(pos + 1, SeqCst);
        if self.retained_bytes() > self.max_bytes {
            self.evict_to_bound(pos);
        }
        self.release_chunks();
    }

    /// Uncounts the oldest retained entry; returns its seq.
    fn forget_oldest(&mut self) -> u64 {
        let (seq, size) = self.retained.pop_front().expect("an entry is retained");
        self.bytes -= size;
        self.ring
            .forgotten_below
            .store(self.oldest_counted + 1, SeqCst);
        // Only while some compressed frame is counted: reading the old entry is a cache
        // miss the plain path does not pay (see `Entry::deflated` for why that is enough).
        if self.ring.deflated_bytes.load(SeqCst) > 0 {
            // Chunks hold consecutive positions; those already forgotten may still be
            // at the front (released after the eviction).
            let pos = self.oldest_counted;
            let front = self.chunks.front().map_or(pos, |c| c.base);
            let entry = self
                .chunks
                .get(((pos - front) / CHUNK) as usize)
                .and_then(|c| c.entries[(pos % CHUNK) as usize].get());
            if let Some(e) = entry {
                e.uncharge(&self.ring);
            }
        }
        self.oldest_counted += 1;
        seq
    }

    /// Drops the chunks none of whose entries is retained any more (readers that still
    /// hold one of their entries keep them alive until they let go).
    fn release_chunks(&mut self) {
        while let Some(front) = self.chunks.front() {
            if front.base + CHUNK > self.oldest_counted {
                break;
            }
            let slot = self.ring.slot(front.base);
            if slot.load().as_ref().is_some_and(|c| Arc::ptr_eq(c, front)) {
                slot.store(None);
            }
            self.chunks.pop_front();
        }
    }

    /// Evicts the oldest entries until the window fits its byte bound, keeping `newest`.
    /// Readers learn of it through `evicted_below`; the memory goes with the entries'
    /// chunk, once none of its `CHUNK` entries is retained.
    fn evict_to_bound(&mut self, newest: u64) {
        let mut complete_from = 0;
        while self.retained_bytes() > self.max_bytes && self.oldest_counted < newest {
            complete_from = self.forget_oldest() + 1;
        }
        let ring = &*self.ring;
        ring.complete_from.fetch_max(complete_from, SeqCst);
        ring.evicted_below.store(self.oldest_counted, SeqCst);
    }

    /// Bytes the window holds: `Entry::retained_bytes` of every retained entry, and the
    /// compressed frames made of them.
    pub fn retained_bytes(&self) -> usize {
        self.bytes + self.ring.deflated_bytes.load(SeqCst)
    }

    /// Wakes the readers that parked because they had caught up.
    pub fn wake_parked(&self) {
        for w in &self.ring.readers {
            if w.parked.load(SeqCst) && w.parked.swap(false, SeqCst) {
                w.notify.notify_one();
            }
        }
    }
}

impl Cursor {
    pub fn ring(&self) -> &Arc<FrameRing> {
        &self.ring
    }

    /// Moves the ready entries from `self.next` (at most `max`) into `round`, in order,
    /// advancing `self.next` past them. Returns true if the reader was lapped at
    /// `self.next`: the caller must close those owed what is gone and resume from
    /// `ring().oldest()`.
    pub fn read_round(&mut self, max: u64, round: &mut Vec<EntryRef>) -> bool {
        let ring = &*self.ring;
        let end = ring.head().min(self.next.saturating_add(max));
        while self.next < end {
            if self.next < ring.oldest() {
                return true;
            }
            // One chunk load for up to `CHUNK` entries; entries lapped while they are
            // read are still whole (the chunk is held), and the next round sees the lap.
            let Some(chunk) = ring.slot(self.next).load_full() else {
                return true;
            };
            let stop = end.min(chunk.base + CHUNK);
            while self.next < stop {
                match chunk.ready(self.next) {
                    Some(e) => round.push(e),
                    None => return true, // a newer chunk: lapped
                }
                self.next += 1;
            }
        }
        false
    }

    /// Waits until an entry at or past `self.next` is published.
    pub async fn wait(&self) {
        loop {
            if self.ring.head() > self.next {
                return;
            }
            self.wake.parked.store(true, SeqCst);
            // Re-check after parking: the producer may have published in between and seen
            // `parked == false`. SeqCst on both sides means one of us sees the other.
            if self.ring.head() > self.next {
                self.wake.parked.store(false, SeqCst);
                return;
            }
            self.wake.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;

    fn entry(seq: u64) -> Entry {
        sparse(seq, seq)
    }

    fn sparse(pos: u64, seq: u64) -> Entry {
        thread_local!(static ARENA: std::cell::RefCell<crate::frame::FrameArena> = Default::default());
        Entry {
            pos,
            seq,
            accepted_at: std::time::Instant::now(),
            frame: ARENA.with_borrow_mut(|a| a.event_frame(b"{}", None, seq)),
            keys: FilterKeys {
                etype: EventType::HealthAlert,
                agent: None,
                session: None,
                data_session: None,
            },
            deflated: Deflated::default(),
        }
    }

    /// A compressed frame counts in the byte bound from when a reactor makes it until its
    /// entry leaves the window, and one made after that is never counted.
    #[test]
    fn compressed_frames_count_in_the_window_while_their_entry_is_in_it() {
        let size = entry(100).retained_bytes();
        let (mut p, _cursors) = FrameRing::bounded(1000, 3 * size + size / 2, 100, 1);
        for seq in 100..103 {
            p.publish(entry(seq));
        }
        let ring = p.ring().clone();
        assert_eq!(p.retained_bytes(), 3 * size);
        let read = |seq: u64| match ring.get(seq) {
            Slot::Ready(e) => e,
            other => panic!("{seq}: {other:?}"),
        };
        let big = |_: &[u8]| Some(crate::frame::FrameArena::new().deflated_frame(&[7; 40]));
        let e100 = read(100);
        let made = e100.deflated(&ring, big).unwrap().len() + std::mem::size_of::<EventFrame>();
        assert_eq!(p.retained_bytes(), 3 * size + made);
        // Made once: a second caller gets the same frame, and nothing more is counted.
        let again = e100.deflated(&ring, |_| panic!("made twice")).unwrap();
        assert_eq!(again.len() + std::mem::size_of::<EventFrame>(), made);
        assert_eq!(p.retained_bytes(), 3 * size + made);
        // 103 does not fit beside it: 100 leaves, and its compressed frame with it.
        p.publish(entry(103));
        assert_eq!(p.retained_bytes(), 3 * size);
        // Compressed after it left (a reader still holding it): never counted.
        let e101 = read(101);
        p.publish(entry(104));
        assert!(matches!(ring.get(101), Slot::Lapped));
        e101.deflated(&ring, big).unwrap();
        assert_eq!(p.retained_bytes(), 3 * size);
        // Not worth it: nothing made, nothing counted, and the plain frame goes out.
        assert!(read(103).deflated(&ring, |_| None).is_none());
        assert_eq!(p.retained_bytes(), 3 * size);
    }

    #[test]
    fn window_and_lapping() {
        let (mut p, _c) = FrameRing::with_readers(4, 100, 1);
        let ring = p.ring().clone();
        assert!(matches!(ring.get(100), Slot::Pending));
        assert_eq!(ring.oldest(), 100);
        for s in 100..106 {
            p.publish(entry(s));
        }
        assert_eq!(ring.head(), 106);
        assert_eq!(ring.oldest(), 102);
        assert!(matches!(ring.get(99), Slot::Lapped));
        assert!(matches!(ring.get(101), Slot::Lapped));
        for s in 102..106 {
            match ring.get(s) {
                Slot::Ready(e) => assert_eq!(e.seq, s),
                other => panic!("{s}: {other:?}"),
            }
        }
        assert!(matches!(ring.get(106), Slot::Pending));
    }

    #[test]
    fn the_window_keeps_the_newest_events_within_its_byte_bound() {
        // Three-digit seqs: every entry has the same size.
        let size = entry(100).retained_bytes();
        // Room for three entries by bytes, eight by count.
        let (mut p, _c) = FrameRing::bounded(8, 3 * size + size / 2, 100, 1);
        let ring = p.ring().clone();
        for s in 100..=109 {
            p.publish(entry(s));
            assert!(p.retained_bytes() <= 3 * size + size / 2);
        }
        assert_eq!(ring.oldest(), 107);
        assert!(
            matches!(ring.get(106), Slot::Lapped),
            "evicted, not pending"
        );
        for s in 107..=109 {
            assert!(matches!(ring.get(s), Slot::Ready(e) if e.seq == s));
        }
        assert_eq!(p.retained_bytes(), 3 * size);
        // One entry larger than the bound stays: the newest is always retained.
        let (mut p, _c) = FrameRing::bounded(8, 1, 1, 1);
        let ring = p.ring().clone();
        p.publish(entry(1));
        p.publish(entry(2));
        assert_eq!(ring.oldest(), 2);
        assert!(matches!(ring.get(2), Slot::Ready(_)));
        // By count, bytes are released as slots are overwritten.
        let (mut p, _c) = FrameRing::bounded(2, usize::MAX, 100, 1);
        for s in 100..=104 {
            p.publish(entry(s));
        }
        assert_eq!(p.retained_bytes(), 2 * size);
    }

    /// A cluster ring: seqs with holes, found by `find_after` while the ring still holds
    /// everything after them.
    #[test]
    fn resumes_find_their_position_by_seq() {
        let (mut p, _c) = FrameRing::with_readers(4, 1, 1);
        let ring = p.ring().clone();
        ring.set_complete_from(4096);
        assert_eq!(ring.find_after(4095), Some(1), "nothing yet: from the head");
        assert_eq!(ring.find_after(10), None, "before the ring's start");
        for (pos, seq) in [(1, 4096), (2, 4097), (3, 8192), (4, 12288)] {
            p.publish(sparse(pos, seq));
        }
        assert_eq!(ring.find_after(4095), Some(1));
        assert_eq!(ring.find_after(4097), Some(3));
        assert_eq!(ring.find_after(5000), Some(3), "a seq in a hole");
        assert_eq!(ring.find_after(12288), Some(5), "caught up: the head");
        p.publish(sparse(5, 12289)); // laps (1, 4096)
        assert_eq!(ring.complete_from(), 4097);
        assert_eq!(ring.find_after(4095), None, "4096 is gone");
        assert_eq!(ring.find_after(4096), Some(2));
    }

    /// Rounds run across chunk boundaries in order; a reader lapped by more than the
    /// window is told so, and goes on from the oldest entry.
    #[test]
    fn rounds_cross_chunks_and_report_laps() {
        let (mut p, mut cursors) = FrameRing::with_readers(50, 1, 1);
        let mut c = cursors.pop().unwrap();
        let mut round = Vec::new();
        for s in 1..=30 {
            p.publish(entry(s));
        }
        assert!(!c.read_round(1000, &mut round));
        assert_eq!(c.next, 31);
        for s in 31..=100 {
            p.publish(entry(s));
        }
        assert!(c.read_round(1000, &mut round), "31..=50 are gone");
        assert_eq!(c.ring().oldest(), 51);
        c.next = c.ring().oldest();
        assert!(!c.read_round(1000, &mut round));
        let seqs: Vec<u64> = round.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=30).chain(51..=100).collect::<Vec<_>>());
    }

    /// Entries leave memory with their chunk, whichever bound retires them; a reader
    /// still holding an entry keeps it whole.
    #[test]
    fn memory_goes_a_chunk_at_a_time() {
        let (mut p, _c) = FrameRing::with_readers(40, 1, 1);
        let ring = p.ring().clone();
        p.publish(entry(1));
        let Slot::Ready(held) = ring.get(1) else {
            panic!("1 is published")
        };
        for s in 2..=1000 {
            p.publish(entry(s));
            assert!(p.chunks.len() <= 40 / CHUNK as usize + 2, "at {s}");
        }
        assert_eq!(held.seq, 1, "still readable after it left the window");
        let size = entry(100).retained_bytes();
        let (mut p, _c) = FrameRing::bounded(1000, 3 * size, 100, 1);
        for s in 100..=999 {
            p.publish(entry(s));
            assert!(p.chunks.len() <= 2, "three entries span at most two chunks");
        }
    }

    #[test]
    #[should_panic(expected = "position order")]
    fn out_of_order_publish_is_a_bug() {
        let (mut p, _c) = FrameRing::with_readers(4, 1, 1);
        p.publish(entry(2));
    }

    /// Concurrent readers on their own threads each see every entry exactly once, in
    /// order, with no lock, parking when they catch up.
    #[test]
    fn concurrent_readers_see_everything_in_order() {
        const N: u64 = 200_000;
        let (mut p, cursors) = FrameRing::with_readers(1 << 20, 1, 3);
        let readers: Vec<_> = cursors
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let mut sum = 0u64;
                        while c.next <= N {
                            c.wait().await;
                            while let Slot::Ready(e) = c.ring().get(c.next) {
                                assert_eq!(e.seq, c.next);
                                sum += e.seq;
                                c.next += 1;
                            }
                        }
                        sum
                    })
                })
            })
            .collect();
        for s in 1..=N {
            p.publish(entry(s));
            if s.is_multiple_of(64) || s == N {
                p.wake_parked();
            }
        }
        for r in readers {
            assert_eq!(r.join().unwrap(), N * (N + 1) / 2);
        }
    }
}
