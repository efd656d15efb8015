//! What one JetStream message holds, and how its events get their `seq`. No I/O here.
//!
//! A message carries a batch of validated events, one per line, in the order they were
//! read: `{…}` as the publisher sent it, or `STAMP {…}` when the publisher left out
//! `timestamp` and the receiving node stamped it (so every node frames the same text).
//! Event `i` of the message with stream sequence `m` gets `seq = m × 2^SEQ_BITS + i`:
//! the same on every node, strictly increasing, with holes after each message.

use bytes::{BufMut, Bytes, BytesMut};

/// Bits of `seq` that number an event within its message.
pub const SEQ_BITS: u32 = 12;
/// Events one message may carry.
pub const MAX_EVENTS: usize = 1 << SEQ_BITS;
/// Room kept in a message for its headers (the message id and the server's own).
const HEADER_ROOM: usize = 512;

/// The `seq` of event `index` of stream message `message`.
pub fn event_seq(message: u64, index: usize) -> u64 {
    debug_assert!(index < MAX_EVENTS);
    (message << SEQ_BITS) | index as u64
}

/// The stream message that holds the event `seq`, and its index there.
pub fn split_seq(seq: u64) -> (u64, usize) {
    (seq >> SEQ_BITS, (seq & (MAX_EVENTS as u64 - 1)) as usize)
}

/// A batch ready to be stored: its payload, and the publisher's line numbers of its events.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    pub payload: Bytes,
    pub lines: Vec<u64>,
}

/// Collects validated events into batches no larger than the server's message limit.
pub struct BatchBuilder {
    buf: BytesMut,
    lines: Vec<u64>,
    max_payload: usize,
}

/// An event that no message can carry.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub len: usize,
    pub max: usize,
}

impl BatchBuilder {
    /// `max_payload`: the largest message the NATS server takes (its `max_payload`).
    pub fn new(max_payload: usize) -> BatchBuilder {
        BatchBuilder {
            buf: BytesMut::new(),
            lines: Vec::new(),
            max_payload: max_payload.saturating_sub(HEADER_ROOM).max(1024),
        }
    }

    /// Adds event `text` (line `line`), stamped with `stamp` if given. Returns the batch it
    /// closed to make room, if any.
    pub fn push(
        &mut self,
        line: u64,
        text: &[u8],
        stamp: Option<&str>,
    ) -> Result<Option<Batch>, TooLarge> {
        let len = text.len() + stamp.map_or(0, |s| s.len() + 1) + 1;
        if len > self.max_payload {
            return Err(TooLarge {
                len: text.len(),
                max: self.max_payload,
            });
        }
        let closed = if self.buf.len() + len > self.max_payload || self.lines.len() == MAX_EVENTS {
            self.take()
        } else {
            None
        };
        if let Some(s) = stamp {
            self.buf.put_slice(s.as_bytes());
            self.buf.put_u8(b' ');
        }
        self.buf.put_slice(text);
        self.buf.put_u8(b'\n');
        self.lines.push(line);
        Ok(closed)
    }

    /// The batch collected so far, if it has any event.
    pub fn take(&mut self) -> Option<Batch> {
        if self.lines.is_empty() {
            return None;
        }
        Some(Batch {
            payload: self.buf.split().freeze(),
            lines: std::mem::take(&mut self.lines),
        })
    }
}

/// The events of a message payload: `(stamp, event text)` in order.
pub fn events(payload: &[u8]) -> impl Iterator<Item = (Option<&str>, &[u8])> {
    let mut start = 0;
    // Lines end at each `\n` (found with SIMD: a byte-by-byte split was a tenth of a
    // consuming node's time).
    memchr::memchr_iter(b'\n', payload)
        .map(move |end| {
            let line = &payload[start..end];
            start = end + 1;
            line
        })
        .filter(|l| !l.is_empty())
        .map(|l| {
            if l.first() == Some(&b'{') {
                return (None, l);
            }
            match l.iter().position(|&b| b == b' ') {
                Some(i) => (std::str::from_utf8(&l[..i]).ok(), &l[i + 1..]),
                None => (None, l), // not ours: validation refuses it
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_are_per_message_and_increase() {
        assert_eq!(event_seq(1, 0), 4096);
        assert_eq!(event_seq(1, 4095), 8191);
        assert_eq!(event_seq(2, 0), 8192);
        assert_eq!(split_seq(8193), (2, 1));
        assert_eq!(split_seq(event_seq(77, 12)), (77, 12));
    }

    #[test]
    fn batches_round_trip_and_respect_the_message_limit() {
        let mut b = BatchBuilder::new(HEADER_ROOM + 1024);
        let ev = br#"{"type":"health_alert","agent":null,"data":{}}"#;
        assert_eq!(b.push(1, ev, None), Ok(None));
        assert_eq!(b.push(2, ev, Some("2026-12-02T12:00:00.000Z")), Ok(None));
        let batch = b.take().unwrap();
        assert_eq!(batch.lines, [1, 2]);
        let got: Vec<_> = events(&batch.payload).collect();
        assert_eq!(
            got,
            [(None, &ev[..]), (Some("2026-12-02T12:00:00.000Z"), &ev[..])]
        );
        assert!(b.take().is_none());
        // Filling past the limit closes the batch before the event that does not fit.
        let mut closed = Vec::new();
        for line in 1..=30 {
            if let Some(c) = b.push(line, ev, None).unwrap() {
                assert!(c.payload.len() <= 1024);
                closed.push(c);
            }
        }
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].lines.len(), 1024 / (ev.len() + 1));
        let big = vec![b'x'; 2000];
        assert_eq!(
            b.push(31, &big, None),
            Err(TooLarge {
                len: 2000,
                max: 1024
            })
        );
    }

    #[test]
    fn a_batch_holds_at_most_max_events() {
        let mut b = BatchBuilder::new(usize::MAX);
        let mut closed = None;
        for line in 0..=MAX_EVENTS as u64 {
            closed = closed.or(b.push(line, b"{}", None).unwrap());
        }
        assert_eq!(closed.unwrap().lines.len(), MAX_EVENTS);
        assert_eq!(b.take().unwrap().lines, [MAX_EVENTS as u64]);
    }
}
