//! One subscriber's outbound queue, sans-IO: runs of shared frames waiting to be written,
//! the byte bound on what the socket has not taken yet, and the close sequence.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use crate::frame::{close_frame, EventFrame, Span};

/// Largest number of buffers one batch hands to a writev (Linux's IOV_MAX).
pub const MAX_IOV: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    Open,
    /// A close frame is queued (last); nothing else will be.
    Closing,
    /// The close frame has been handed to the writer.
    CloseTaken,
}

/// What became of an event offered to an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued: the writer has something new to do.
    Queued,
    /// Not for this subscriber (at or below its resume point, closing, or already full).
    Skipped,
    /// It does not fit beside what the socket has not taken yet: nothing is queued from
    /// here on until the subscriber catches up from the retained window (see `is_full`).
    Full,
}

#[derive(Debug)]
pub struct Outbox {
    /// Consecutive event frames of one arena chunk share one entry.
    frames: VecDeque<Span>,
    /// Bytes queued or in flight and not yet acknowledged by the kernel.
    unsent: usize,
    limit: usize,
    /// The seq of the last event frame queued (or, before any, the last one this
    /// subscriber is considered to have: its resume point).
    last_seq: u64,
    state: OutState,
    /// An event did not fit: later ones are refused until `resume` (no hole can form).
    full: bool,
    /// Bytes the kernel has taken over the outbox's life (progress, for the stall check).
    written: u64,
    /// When the ingest accepted the oldest queued event frame (an upper bound once part of
    /// the queue has been taken), for the ingest→write latency metric.
    oldest_at: Option<Instant>,
}

impl Outbox {
    /// An outbox bounded to `limit` unsent bytes, whose subscriber has seen everything up
    /// to and including `last_seq`.
    pub fn new(limit: usize, last_seq: u64) -> Outbox {
        Outbox {
            frames: VecDeque::new(),
            unsent: 0,
            limit,
            last_seq,
            state: OutState::Open,
            full: false,
            written: 0,
            oldest_at: None,
        }
    }

    pub fn state(&self) -> OutState {
        self.state
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn unsent(&self) -> usize {
        self.unsent
    }

    /// Queues an event frame: usually it extends the last run (an addition, no refcount,
    /// no copy). Frames at or below the resume point are skipped. An empty outbox takes
    /// any frame, however large; otherwise a frame that would take the unsent bytes past
    /// the bound is refused (`Push::Full`), and so is every later one until `resume`: the
    /// subscriber then catches up from the retained window as its socket drains, and is
    /// judged slow only if the socket stops taking bytes (the reactor's stall check).
    pub fn push_event(&mut self, frame: &EventFrame, seq: u64, accepted_at: Instant) -> Push {
        if self.state != OutState::Open || self.full || seq <= self.last_seq {
            return Push::Skipped;
        }
        if self.unsent > 0 && self.unsent + frame.len() > self.limit {
            self.full = true;
            return Push::Full;
        }
        self.unsent += frame.len();
        if !self.frames.back_mut().is_some_and(|run| run.extend(frame)) {
            self.frames.push_back(Span::event(frame));
        }
        self.last_seq = seq;
        self.oldest_at.get_or_insert(accepted_at);
        Push::Queued
    }

    /// An event was refused since the last `resume`, and nothing was queued after it.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Whoever feeds the subscriber from the window next takes over from the refused event.
    pub fn resume(&mut self) {
        self.full = false;
    }

    /// Bytes the kernel has taken so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Queues a control frame (pong, ping); they are tiny and exempt from the bound.
    pub fn push_control(&mut self, frame: Bytes) -> bool {
        if self.state != OutState::Open {
            return false;
        }
        self.unsent += frame.len();
        self.frames.push_back(frame.into());
        true
    }

    /// Queues the close frame after everything already queued. Returns false if closing
    /// had already begun.
    pub fn close(&mut self, code: u16, reason: &str) -> bool {
        if self.state != OutState::Open {
            return false;
        }
        let f = close_frame(code, reason);
        self.unsent += f.len();
        self.frames.push_back(f.into());
        self.state = OutState::Closing;
        true
    }

    /// Moves up to `MAX_IOV - batch.len()` queued runs into `batch` for one writev.
    /// Returns when the oldest event frame taken was accepted by the ingest, if any was.
    /// `batch` holds what the driver took before and has not written yet (it tops that
    /// up); bytes a driver dropped instead would stay counted as unsent forever, and the
    /// subscriber would look busy for good.
    pub fn take_batch(&mut self, batch: &mut Vec<Span>) -> Option<Instant> {
        debug_assert_eq!(
            self.unsent,
            self.frames
                .iter()
                .chain(batch.iter())
                .map(|f| f.len())
                .sum::<usize>(),
            "the unwritten rest of a batch was not handed back"
        );
        let n = self.frames.len().min(MAX_IOV.saturating_sub(batch.len()));
        batch.extend(self.frames.drain(..n));
        if self.frames.is_empty() && self.state == OutState::Closing {
            self.state = OutState::CloseTaken;
        }
        if self.frames.is_empty() {
            self.oldest_at.take()
        } else {
            self.oldest_at
        }
    }

    /// The kernel accepted `n` more bytes.
    pub fn wrote(&mut self, n: usize) {
        self.unsent = self.unsent.saturating_sub(n);
        self.written += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameArena;

    fn now() -> Instant {
        Instant::now()
    }

    fn ev(arena: &mut FrameArena, seq: u64) -> EventFrame {
        arena.event_frame(br#"{"type":"health_alert","data":{}}"#, None, seq)
    }

    #[test]
    fn consecutive_frames_share_one_run_without_copies() {
        let mut arena = FrameArena::new();
        let (a, b, c) = (ev(&mut arena, 1), ev(&mut arena, 2), ev(&mut arena, 3));
        let mut o = Outbox::new(1000, 0);
        assert_eq!(o.push_event(&a, 1, now()), Push::Queued);
        assert_eq!(o.push_event(&b, 2, now()), Push::Queued);
        assert_eq!(
            o.push_event(&b, 2, now()),
            Push::Skipped,
            "duplicates below the resume point are skipped"
        );
        assert!(o.push_control(Bytes::from_static(b"\x8a\x00")));
        assert_eq!(o.push_event(&c, 3, now()), Push::Queued);
        let mut batch = Vec::new();
        assert!(
            o.take_batch(&mut batch).is_some(),
            "event frames carry their ingest time"
        );
        assert_eq!(batch.len(), 3, "a+b, the pong, c");
        assert_eq!(batch[0].as_ptr(), a.as_ptr(), "the same bytes, not a copy");
        assert_eq!(&batch[0][..], [&a[..], &b[..]].concat());
        assert_eq!(batch[0].frames(), 2);
        assert_eq!(&batch[2][..], &c[..]);
        let total = a.len() + b.len() + 2 + c.len();
        assert_eq!(o.unsent(), total);
        o.wrote(total - 5);
        assert_eq!(o.unsent(), 5);
    }

    #[test]
    fn an_empty_queue_takes_any_frame_and_a_full_one_refuses_until_resumed() {
        let mut arena = FrameArena::new();
        let (a, b, c) = (ev(&mut arena, 42), ev(&mut arena, 43), ev(&mut arena, 44));
        // A bound smaller than one frame: an empty outbox still takes it.
        let mut o = Outbox::new(a.len() - 1, 41);
        assert_eq!(o.push_event(&a, 42, now()), Push::Queued);
        assert_eq!(o.push_event(&b, 43, now()), Push::Full);
        assert!(o.is_full());
        assert_eq!(
            o.push_event(&c, 44, now()),
            Push::Skipped,
            "nothing after a refused frame is queued (no hole)"
        );
        let mut batch = Vec::new();
        o.take_batch(&mut batch);
        assert_eq!(batch.len(), 1);
        o.wrote(a.len());
        assert_eq!((o.unsent(), o.written()), (0, a.len() as u64));
        o.resume();
        assert_eq!(
            o.push_event(&b, 43, now()),
            Push::Queued,
            "the socket took it all"
        );
        assert_eq!(o.state(), OutState::Open);
    }

    #[test]
    fn slow_close_names_the_last_queued_event_and_goes_after_it() {
        let mut arena = FrameArena::new();
        let (a, b) = (ev(&mut arena, 42), ev(&mut arena, 43));
        let mut o = Outbox::new(a.len() + b.len() - 1, 41);
        assert_eq!(o.push_event(&a, 42, now()), Push::Queued);
        assert_eq!(o.push_event(&b, 43, now()), Push::Full);
        assert!(o.close(4001, "slow consumer; resume with since=42"));
        assert_eq!(o.state(), OutState::Closing);
        assert_eq!(o.push_event(&ev(&mut arena, 44), 44, now()), Push::Skipped);
        assert!(!o.push_control(Bytes::from_static(b"x")));
        let mut batch = Vec::new();
        o.take_batch(&mut batch);
        assert_eq!(o.state(), OutState::CloseTaken);
        assert_eq!(batch.len(), 2, "a, then the close");
        let close = batch.last().unwrap();
        assert_eq!(close[0], 0x88);
        assert_eq!(&close[2..4], &4001u16.to_be_bytes());
        assert_eq!(&close[4..], b"slow consumer; resume with since=42");
    }

    #[test]
    fn batches_respect_iov_max_and_top_up_an_unwritten_rest() {
        let mut o = Outbox::new(usize::MAX, 0);
        // Control frames never merge, so each is one buffer.
        for _ in 0..MAX_IOV + 5 {
            o.push_control(Bytes::from_static(b"x"));
        }
        let mut batch = Vec::new();
        o.take_batch(&mut batch);
        assert_eq!(batch.len(), MAX_IOV);
        // The kernel took all but the last buffer: its rest goes back with the next take.
        o.wrote(MAX_IOV - 1);
        batch.drain(..MAX_IOV - 1);
        o.take_batch(&mut batch);
        assert_eq!(batch.len(), 6);
    }
}
