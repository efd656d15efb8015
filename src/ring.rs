//! `FrameRing`: the lock-free single-producer / multi-consumer ring that carries built
//! frames from the ingest thread to the reactors.
//!
//! Every reactor reads every entry through its own cursor (broadcast, not work sharing).
//! Entries have consecutive positions (`pos`), and slot `pos % capacity` holds the entry
//! at that position, so the ring's contents are also the replay window: the last
//! `capacity` events. Standalone, `pos` is the event's `seq`; in a cluster `seq` comes
//! from the stream and has holes, and a resume finds its position by `seq` (`find_after`).
//! Slots are `ArcSwapOption`s, so readers never lock and never see a torn entry; a reader
//! that finds a newer `pos` in its slot knows it was lapped.
//!
//! The window is bounded in bytes as well (`--replay-memory`): the producer counts what
//! the retained entries hold and, past the bound, empties the oldest slots first, so the
//! window is the newest events within both bounds (never fewer than the newest one).
//!
//! Wake-ups: a reactor with nothing to read marks itself parked and waits on its `Notify`;
//! the producer notifies only parked reactors, so a busy reactor costs it one atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

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
}

/// What a reader finds at a given `seq`.
#[derive(Debug)]
pub enum Slot {
    Ready(Arc<Entry>),
    /// Not published yet.
    Pending,
    /// Overwritten: the window no longer reaches this `seq`.
    Lapped,
}

#[derive(Default)]
pub struct ReaderWake {
    parked: AtomicBool,
    notify: Notify,
}

pub struct FrameRing {
    slots: Box<[ArcSwapOption<Entry>]>,
    /// The `seq` the next published entry will have.
    head: AtomicU64,
    /// The first `seq` published by this process (older ones are gone with a restart).
    first: u64,
    /// No event with a seq in `quiet_from..first` was ever published (the previous run
    /// stopped cleanly before them), so a resume from there has lost nothing.
    quiet_from: AtomicU64,
    /// Entries below this were evicted by the byte bound (their slots are empty).
    evicted_below: AtomicU64,
    /// Every event with a `seq` from this one on that reached the ring is still in it
    /// (the seq after the newest entry lapped or evicted, or where the ring started).
    complete_from: AtomicU64,
    readers: Vec<Arc<ReaderWake>>,
}

/// The ring's only writer. Not `Clone`: single-producer is enforced by ownership.
pub struct Producer {
    ring: Arc<FrameRing>,
    /// What the retained entries hold (`Entry::retained_bytes`), and its bound.
    bytes: usize,
    max_bytes: usize,
    /// The oldest position still counted in `bytes`.
    oldest_counted: u64,
}

impl Entry {
    /// What keeping this entry in the window costs: its frame, its keys and the entry.
    pub fn retained_bytes(&self) -> usize {
        let keys = &self.keys;
        let strings = [&keys.agent, &keys.session, &keys.data_session]
            .iter()
            .map(|k| k.as_ref().map_or(0, |s| s.len()))
            .sum::<usize>();
        self.frame.len() + strings + std::mem::size_of::<Entry>() + 16 // Arc counts
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
        let ring = Arc::new(FrameRing {
            slots: (0..capacity).map(|_| ArcSwapOption::empty()).collect(),
            head: AtomicU64::new(first_pos),
            first: first_pos,
            quiet_from: AtomicU64::new(first_pos),
            evicted_below: AtomicU64::new(first_pos),
            complete_from: AtomicU64::new(first_pos),
            readers: (0..readers).map(|_| Arc::default()).collect(),
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
            bytes: 0,
            max_bytes,
            oldest_counted: first_pos,
        };
        (producer, cursors)
    }

    pub fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The position the next published entry will get.
    pub fn head(&self) -> u64 {
        self.head.load(SeqCst)
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
        let by_count = self.head().saturating_sub(self.capacity()).max(self.first);
        by_count.max(self.evicted_below.load(SeqCst))
    }

    pub fn get(&self, pos: u64) -> Slot {
        if pos >= self.head() {
            return Slot::Pending;
        }
        if pos < self.first {
            return Slot::Lapped;
        }
        match self.slots[(pos % self.capacity()) as usize].load_full() {
            Some(e) if e.pos == pos => Slot::Ready(e),
            Some(e) if e.pos > pos => Slot::Lapped,
            // Below `head` every slot was stored, so an empty one was evicted.
            None => Slot::Lapped,
            // Unreachable while `pos < head`: the producer stores the slot before `head`.
            Some(_) => Slot::Pending,
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
        let ring = &*self.ring;
        let pos = entry.pos;
        assert_eq!(pos, ring.head(), "entries are published in position order");
        self.bytes += entry.retained_bytes();
        let slot = &ring.slots[(pos % ring.capacity()) as usize];
        if let Some(old) = slot.swap(Some(Arc::new(entry))) {
            // Lapped by count: no longer retained.
            if old.pos >= self.oldest_counted {
                self.bytes -= old.retained_bytes();
                self.oldest_counted = old.pos + 1;
            }
            ring.complete_from.fetch_max(old.seq + 1, SeqCst);
        }
        ring.head.store(pos + 1, SeqCst);
        if self.bytes > self.max_bytes {
            self.evict_to_bound(pos);
        }
    }

    /// Empties the oldest slots until the window fits its byte bound, keeping `newest`.
    /// Readers learn of it through `evicted_below` first, then find the slots empty.
    fn evict_to_bound(&mut self, newest: u64) {
        let ring = &*self.ring;
        let mut below = self.oldest_counted;
        let mut freed = Vec::new();
        let mut bytes = self.bytes;
        let mut complete_from = 0;
        while bytes > self.max_bytes && below < newest {
            let slot = &ring.slots[(below % ring.capacity()) as usize];
            if let Some(e) = slot.load_full().filter(|e| e.pos == below) {
                bytes -= e.retained_bytes();
                complete_from = e.seq + 1;
                freed.push(below);
            }
            below += 1;
        }
        ring.complete_from.fetch_max(complete_from, SeqCst);
        ring.evicted_below.store(below, SeqCst);
        for pos in freed {
            ring.slots[(pos % ring.capacity()) as usize].store(None);
        }
        (self.bytes, self.oldest_counted) = (bytes, below);
    }

    /// Bytes the window holds (`Entry::retained_bytes` of every retained entry).
    pub fn retained_bytes(&self) -> usize {
        self.bytes
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
    pub fn read_round(&mut self, max: u64, round: &mut Vec<Arc<Entry>>) -> bool {
        let end = self.ring.head().min(self.next.saturating_add(max));
        while self.next < end {
            match self.ring.get(self.next) {
                Slot::Ready(e) => {
                    round.push(e);
                    self.next += 1;
                }
                Slot::Lapped => return true,
                Slot::Pending => break,
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
        }
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
