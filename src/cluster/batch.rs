//! What one JetStream message holds, and how its events get their `seq`. No I/O here.
//!
//! A node writes a batch of validated events in the order they were read, each with the
//! filter keys it computed, so that the other nodes need not parse the event again:
//!
//! ```text
//! payload := 0x02 record*
//! record  := type:u8 flags:u8 [stamp] [agent] [session] [data_session] text
//! field   := len:LEB128 bytes          (flags: 1 stamp, 2 agent, 4 session, 8 data_session)
//! ```
//!
//! `stamp` is there when the publisher left out `timestamp` and the storing node stamped
//! it (so every node frames the same text). A batch is stored LZ4-compressed when that is
//! smaller, `0x03 len:u32le lz4(record*)`: JSON events compress 4–20×, and the stream's
//! cost (nats-server's copies into its file and out to every node, the kernel's on each
//! socket) is mostly per byte.
//!
//! A node signs each message it stores: header `Krux-Mac` is the HMAC-SHA-256 of the
//! payload under the cluster's stream key (kept in the credentials bucket), so a message
//! in the node format that anyone else published is dropped, never trusted for its keys.
//! A payload starting with neither 0x02 nor 0x03 (no JSON line starts with a control
//! character) is a message not written by a node: one JSON event per line (the last may
//! lack its newline), which nodes validate in full.
//!
//! The `i`-th event delivered from the message with stream sequence `m` gets
//! `seq = m × 2^SEQ_BITS + i`: the same on every node, strictly increasing, with holes
//! after each message. Only valid events are counted in `i`, so a message of up to
//! 1 MiB (NATS' default `max_payload`) never holds more events than `i` can number.

use bytes::{BufMut, Bytes, BytesMut};

use crate::event::{EventType, FilterKeys};

/// The first byte of a payload a node wrote: records as they are, or compressed.
const FORMAT: u8 = 0x02;
const FORMAT_LZ4: u8 = 0x03;
/// The most a compressed payload may say it holds (NATS' own `max_payload` limit is
/// 64 MiB, and a batch is never larger than a message).
const MAX_UNPACKED: usize = 64 << 20;
const HAS_STAMP: u8 = 1;
const HAS_AGENT: u8 = 2;
const HAS_SESSION: u8 = 4;
const HAS_DATA_SESSION: u8 = 8;

/// Bits of `seq` that number an event within its message: 16,384 events, more than a
/// 1 MiB message can hold (a valid event is longer than 64 bytes), while `seq` stays
/// below 2^53 (exact in JavaScript) until the stream's 2^39th message.
pub const SEQ_BITS: u32 = 14;
/// Events one message may carry.
pub const MAX_EVENTS: usize = 1 << SEQ_BITS;
/// The header holding a node's MAC of the payload.
pub const MAC_HEADER: &str = "Krux-Mac";
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

    /// Adds event `text` (line `line`) with its filter keys, stamped with `stamp` if
    /// given. Returns the batch it closed to make room, if any.
    pub fn push(
        &mut self,
        line: u64,
        text: &[u8],
        keys: &FilterKeys,
        stamp: Option<&str>,
    ) -> Result<Option<Batch>, TooLarge> {
        let fields = [
            stamp,
            keys.agent.as_deref(),
            keys.session.as_deref(),
            keys.data_session.as_deref(),
        ];
        let len = 2
            + fields
                .iter()
                .flatten()
                .map(|f| field_len(f.len()))
                .sum::<usize>()
            + field_len(text.len());
        if len + 1 > self.max_payload {
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
        if self.buf.is_empty() {
            self.buf.put_u8(FORMAT);
        }
        let flags = [HAS_STAMP, HAS_AGENT, HAS_SESSION, HAS_DATA_SESSION]
            .iter()
            .zip(&fields)
            .filter(|(_, f)| f.is_some())
            .fold(0, |acc, (bit, _)| acc | bit);
        self.buf.put_u8(keys.etype as u8);
        self.buf.put_u8(flags);
        for f in fields.iter().flatten() {
            put_field(&mut self.buf, f.as_bytes());
        }
        put_field(&mut self.buf, text);
        self.lines.push(line);
        Ok(closed)
    }

    /// The batch collected so far, if it has any event.
    pub fn take(&mut self) -> Option<Batch> {
        let mut batch = self.take_uncompressed()?;
        let records = &batch.payload[1..];
        let mut packed = vec![0; 5 + lz4_flex::block::get_maximum_output_size(records.len())];
        packed[0] = FORMAT_LZ4;
        packed[1..5].copy_from_slice(&(records.len() as u32).to_le_bytes());
        if let Ok(n) = lz4_flex::block::compress_into(records, &mut packed[5..]) {
            if 5 + n < batch.payload.len() {
                packed.truncate(5 + n);
                batch.payload = packed.into();
            }
        }
        Some(batch)
    }

    fn take_uncompressed(&mut self) -> Option<Batch> {
        if self.lines.is_empty() {
            return None;
        }
        Some(Batch {
            payload: self.buf.split().freeze(),
            lines: std::mem::take(&mut self.lines),
        })
    }
}

fn field_len(len: usize) -> usize {
    let bits = usize::BITS - (len | 1).leading_zeros();
    bits.div_ceil(7) as usize + len
}

fn put_field(buf: &mut BytesMut, bytes: &[u8]) {
    let mut n = bytes.len();
    while n >= 0x80 {
        buf.put_u8(n as u8 | 0x80);
        n >>= 7;
    }
    buf.put_u8(n as u8);
    buf.put_slice(bytes);
}

/// One event of a stored message.
#[derive(Debug, PartialEq, Eq)]
pub struct Stored<'a> {
    /// The stamp the storing node gave an event without `timestamp`.
    pub stamp: Option<&'a str>,
    pub text: &'a [u8],
    /// The filter keys the storing node computed; `None` in a message not written by a
    /// node (then the event must be validated).
    pub keys: Option<StoredKeys<'a>>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct StoredKeys<'a> {
    pub etype: EventType,
    pub agent: Option<&'a str>,
    pub session: Option<&'a str>,
    pub data_session: Option<&'a str>,
}

impl StoredKeys<'_> {
    pub fn to_keys(&self) -> FilterKeys {
        FilterKeys {
            etype: self.etype,
            agent: self.agent.map(Into::into),
            session: self.session.map(Into::into),
            data_session: self.data_session.map(Into::into),
        }
    }
}

/// A record that cannot be read: the rest of its message is lost to this node.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// The events of a message payload, in order; `scratch` holds a compressed batch's
/// records while they are read. A malformed record ends the iteration with `Err`
/// (lengths are all there is to find the next one).
pub fn events<'a>(
    payload: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> impl Iterator<Item = Result<Stored<'a>, Malformed>> {
    match payload.split_first() {
        Some((&FORMAT, records)) => Events::Records(records),
        Some((&FORMAT_LZ4, packed)) => match unpack(packed, scratch) {
            Ok(records) => Events::Records(records),
            Err(Malformed) => Events::Failed,
        },
        _ => Events::Lines(memchr::memchr_iter(b'\n', payload), payload, 0),
    }
}

/// Whether `payload` is in the node format (and must then carry a node's MAC).
pub fn node_written(payload: &[u8]) -> bool {
    matches!(payload.first(), Some(&FORMAT | &FORMAT_LZ4))
}

/// The MAC a node puts in `MAC_HEADER` (hex).
pub fn mac(key: &ring::hmac::Key, payload: &[u8]) -> String {
    crate::auth::hex(ring::hmac::sign(key, payload).as_ref())
}

/// Whether `header` is the MAC of `payload` under `key` (compared in constant time).
pub fn verify(key: &ring::hmac::Key, payload: &[u8], header: &str) -> bool {
    crate::auth::unhex(header.trim())
        .is_some_and(|tag| ring::hmac::verify(key, payload, &tag).is_ok())
}

fn unpack<'a>(packed: &[u8], scratch: &'a mut Vec<u8>) -> Result<&'a [u8], Malformed> {
    let (len, compressed) = packed.split_first_chunk::<4>().ok_or(Malformed)?;
    let len = u32::from_le_bytes(*len) as usize;
    // LZ4 expands at most ~255 times: a larger claim is a lie, refused before any
    // buffer is sized by it.
    if len > MAX_UNPACKED || len > compressed.len().saturating_mul(255).saturating_add(64) {
        return Err(Malformed);
    }
    scratch.resize(len, 0);
    match lz4_flex::block::decompress_into(compressed, scratch) {
        Ok(n) if n == len => Ok(&scratch[..]),
        _ => Err(Malformed),
    }
}

enum Events<'a> {
    Records(&'a [u8]),
    Lines(memchr::Memchr<'a>, &'a [u8], usize),
    Failed,
    Done,
}

impl<'a> Iterator for Events<'a> {
    type Item = Result<Stored<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Events::Records([]) | Events::Done => None,
            Events::Records(rest) => {
                let got = record(rest);
                if got.is_err() {
                    *self = Events::Done;
                }
                Some(got)
            }
            Events::Failed => {
                *self = Events::Done;
                Some(Err(Malformed))
            }
            // Lines end at each `\n` (found with SIMD: a byte-by-byte split was a tenth
            // of a consuming node's time), the last one at the payload's end.
            Events::Lines(ends, payload, start) => loop {
                let end = match ends.next() {
                    Some(end) => end,
                    None if *start < payload.len() => payload.len(),
                    None => return None,
                };
                let line = &payload[*start..end];
                *start = end + 1;
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if !line.iter().all(u8::is_ascii_whitespace) {
                    return Some(Ok(Stored {
                        stamp: None,
                        text: line,
                        keys: None,
                    }));
                }
            },
        }
    }
}

/// Reads the record at the start of `rest` and moves past it.
fn record<'a>(rest: &mut &'a [u8]) -> Result<Stored<'a>, Malformed> {
    let &[etype, flags, ref tail @ ..] = *rest else {
        return Err(Malformed);
    };
    *rest = tail;
    let etype = *EventType::ALL.get(usize::from(etype)).ok_or(Malformed)?;
    let mut opt = |bit: u8| -> Result<Option<&'a str>, Malformed> {
        if flags & bit == 0 {
            return Ok(None);
        }
        std::str::from_utf8(field(rest)?)
            .map(Some)
            .map_err(|_| Malformed)
    };
    let stamp = opt(HAS_STAMP)?;
    let keys = StoredKeys {
        etype,
        agent: opt(HAS_AGENT)?,
        session: opt(HAS_SESSION)?,
        data_session: opt(HAS_DATA_SESSION)?,
    };
    let text = field(rest)?;
    // Framing relies on the text being an object (it writes `seq` before the last `}`).
    if text.len() < 3 || text[0] != b'{' || text[text.len() - 1] != b'}' {
        return Err(Malformed);
    }
    Ok(Stored {
        stamp,
        text,
        keys: Some(keys),
    })
}

fn field<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], Malformed> {
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let (&b, tail) = rest.split_first().ok_or(Malformed)?;
        *rest = tail;
        if shift > 28 {
            return Err(Malformed);
        }
        len |= usize::from(b & 0x7F) << shift;
        if b < 0x80 {
            break;
        }
        shift += 7;
    }
    if len > rest.len() {
        return Err(Malformed);
    }
    let (f, tail) = rest.split_at(len);
    *rest = tail;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_are_per_message_and_increase() {
        assert_eq!(event_seq(1, 0), 16_384);
        assert_eq!(event_seq(1, 16_383), 32_767);
        assert_eq!(event_seq(2, 0), 32_768);
        assert_eq!(split_seq(32_769), (2, 1));
        assert_eq!(split_seq(event_seq(77, 12)), (77, 12));
    }

    fn keys(etype: EventType, agent: Option<&str>) -> FilterKeys {
        FilterKeys {
            etype,
            agent: agent.map(Into::into),
            session: Some("s-1".into()),
            data_session: None,
        }
    }

    #[test]
    fn batches_round_trip_with_their_keys_and_respect_the_message_limit() {
        let mut b = BatchBuilder::new(HEADER_ROOM + 1024);
        let ev = br#"{"type":"health_alert","agent":null,"data":{}}"#;
        let alert = keys(EventType::HealthAlert, None);
        let long = "é".repeat(100); // a length that takes two LEB128 bytes
        let mut invoked = keys(EventType::CapabilityInvoked, Some(&long));
        invoked.data_session = Some("s-2".into());
        assert_eq!(b.push(1, ev, &alert, None), Ok(None));
        let stamp = "2026-12-02T12:00:00.000Z";
        assert_eq!(b.push(2, ev, &invoked, Some(stamp)), Ok(None));
        let batch = b.take().unwrap();
        assert_eq!(batch.lines, [1, 2]);
        let mut scratch = Vec::new();
        let got: Vec<_> = events(&batch.payload, &mut scratch)
            .map(Result::unwrap)
            .collect();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].stamp, got[0].text), (None, &ev[..]));
        assert_eq!(got[0].keys.as_ref().unwrap().to_keys(), alert);
        assert_eq!((got[1].stamp, got[1].text), (Some(stamp), &ev[..]));
        assert_eq!(got[1].keys.as_ref().unwrap().to_keys(), invoked);
        assert!(b.take().is_none());
        // Filling past the limit closes the batch before the event that does not fit.
        let mut closed = Vec::new();
        for line in 1..=30 {
            if let Some(c) = b.push(line, ev, &alert, None).unwrap() {
                assert!(c.payload.len() <= 1024);
                closed.push(c);
            }
        }
        assert_eq!(closed.len(), 1);
        let record = 2 + 1 + 3 + 1 + ev.len(); // type, flags, session, text
        assert_eq!(closed[0].lines.len(), (1024 - 1) / record);
        let big = vec![b'x'; 2000];
        assert_eq!(
            b.push(31, &big, &alert, None),
            Err(TooLarge {
                len: 2000,
                max: 1024
            })
        );
    }

    #[test]
    fn every_type_survives_the_trip() {
        let mut b = BatchBuilder::new(usize::MAX);
        for t in EventType::ALL {
            b.push(0, b"{\"a\":1}", &keys(t, Some("a")), None).unwrap();
        }
        let payload = b.take().unwrap().payload;
        let types: Vec<_> = events(&payload, &mut Vec::new())
            .map(|e| e.unwrap().keys.unwrap().etype)
            .collect();
        assert_eq!(types, EventType::ALL);
    }

    #[test]
    fn a_damaged_record_ends_its_message_and_foreign_lines_come_without_keys() {
        let mut b = BatchBuilder::new(usize::MAX);
        let k = keys(EventType::SessionEnded, Some("a"));
        b.push(1, b"{\"a\":1}", &k, None).unwrap();
        b.push(2, b"{\"a\":2}", &k, None).unwrap();
        let payload = b.take_uncompressed().unwrap().payload;
        let record = (payload.len() - 1) / 2;
        let mut scratch = Vec::new();
        for cut in 1..payload.len() {
            // Every whole record is read; a cut one is an error, and nothing follows it.
            let got: Vec<_> = events(&payload[..cut], &mut scratch).collect();
            let whole = (cut - 1) / record;
            assert_eq!(got.iter().filter(|e| e.is_ok()).count(), whole, "{cut}");
            let cut_record = (cut - 1) % record != 0;
            assert_eq!(got.len(), whole + usize::from(cut_record), "{cut}");
        }
        let mut bad = payload.to_vec();
        bad[1] = 200; // no such type
        assert_eq!(
            events(&bad, &mut scratch).collect::<Vec<_>>(),
            [Err(Malformed)]
        );
        let foreign = b"{\"a\":1}\n\n{\"b\":2}\n";
        let got: Vec<_> = events(foreign, &mut scratch).map(Result::unwrap).collect();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|e| e.keys.is_none() && e.stamp.is_none()));
        assert_eq!(got[1].text, br#"{"b":2}"#);
    }

    #[test]
    fn a_batch_is_stored_compressed_when_that_is_smaller() {
        let mut b = BatchBuilder::new(1 << 20);
        let k = keys(EventType::CapabilityInvoked, Some("agent-1"));
        let texts: Vec<String> = (0..200)
            .map(|i| format!(r#"{{"type":"capability_invoked","n":{i},"data":{{"path":"/workspace/data.csv"}}}}"#))
            .collect();
        for (i, t) in texts.iter().enumerate() {
            b.push(i as u64, t.as_bytes(), &k, None).unwrap();
        }
        let batch = b.take().unwrap();
        let raw: usize = texts.iter().map(|t| t.len()).sum();
        assert_eq!(batch.payload[0], FORMAT_LZ4);
        assert!(
            batch.payload.len() * 4 < raw,
            "{} of {raw}",
            batch.payload.len()
        );
        let mut scratch = Vec::new();
        let got: Vec<_> = events(&batch.payload, &mut scratch)
            .map(|e| String::from_utf8(e.unwrap().text.to_vec()).unwrap())
            .collect();
        assert_eq!(got, texts);
        // A cut or lying compressed payload is one error, never a panic or a huge buffer.
        let cut = &batch.payload[..batch.payload.len() - 3];
        assert_eq!(
            events(cut, &mut scratch).collect::<Vec<_>>(),
            [Err(Malformed)]
        );
        let mut lying = batch.payload.to_vec();
        lying[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            events(&lying, &mut scratch).collect::<Vec<_>>(),
            [Err(Malformed)]
        );
        // One small event does not compress: stored as it is.
        b.push(0, b"{\"a\":1}", &k, None).unwrap();
        assert_eq!(b.take().unwrap().payload[0], FORMAT);
    }

    #[test]
    fn a_batch_holds_at_most_max_events() {
        let mut b = BatchBuilder::new(usize::MAX);
        let mut closed = None;
        for line in 0..=MAX_EVENTS as u64 {
            closed = closed.or(b
                .push(line, b"{}", &keys(EventType::HealthAlert, None), None)
                .unwrap());
        }
        assert_eq!(closed.unwrap().lines.len(), MAX_EVENTS);
        assert_eq!(b.take().unwrap().lines, [MAX_EVENTS as u64]);
    }
}

#[cfg(test)]
mod signing_tests {
    use super::*;

    #[test]
    fn a_mac_verifies_only_its_payload_under_its_key() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k1");
        let other = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k2");
        let mac = mac(&key, b"\x02payload");
        assert_eq!(mac.len(), 64);
        assert!(verify(&key, b"\x02payload", &mac));
        assert!(verify(&key, b"\x02payload", &mac.to_uppercase()));
        assert!(!verify(&other, b"\x02payload", &mac));
        assert!(!verify(&key, b"\x02payloae", &mac));
        for bad in ["", "zz", &mac[..62], &format!("{mac}00"), &"g".repeat(64)] {
            assert!(!verify(&key, b"\x02payload", bad), "{bad}");
        }
        assert!(node_written(b"\x02") && node_written(b"\x03"));
        assert!(!node_written(b"{\"a\":1}") && !node_written(b""));
    }

    #[test]
    fn foreign_lines_end_at_the_payload_too_and_blank_ones_are_skipped() {
        let mut scratch = Vec::new();
        let texts = |p: &[u8]| -> Vec<Vec<u8>> {
            events(p, &mut Vec::new())
                .map(|e| e.unwrap().text.to_vec())
                .collect()
        };
        assert_eq!(
            texts(b"{\"a\":1}\n{\"b\":2}"),
            [b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]
        );
        assert_eq!(
            texts(b"{\"a\":1}\r\n \r\n\n{\"b\":2}\r"),
            [b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]
        );
        assert_eq!(texts(b"\n\n  "), Vec::<Vec<u8>>::new());
        assert_eq!(events(b"", &mut scratch).count(), 0);
    }

    #[test]
    fn a_compressed_payload_cannot_claim_more_than_lz4_can_expand_to() {
        let mut scratch = Vec::new();
        // 1 KiB of compressed bytes claiming 1 MiB: refused before the buffer is sized.
        let mut lying = vec![FORMAT_LZ4];
        lying.extend_from_slice(&(1u32 << 20).to_le_bytes());
        lying.extend(std::iter::repeat_n(0u8, 1024));
        assert_eq!(
            events(&lying, &mut scratch).collect::<Vec<_>>(),
            [Err(Malformed)]
        );
        assert_eq!(scratch.capacity(), 0);
    }
}
