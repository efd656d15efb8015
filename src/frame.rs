//! Outbound WebSocket frames. An event's frame — header and payload, the published
//! envelope with `"seq"` appended — is built here exactly once, at ingest, into one
//! `Bytes` that every matching subscriber then shares. Event frames are built back to
//! back in arena chunks, so a subscriber's queue holds runs of them (`Span`), not one
//! handle per frame.
//!
//! Server frames are never masked (RFC 6455 §5.1), so the same bytes are valid on every
//! connection.

use bytes::{BufMut, Bytes, BytesMut};

use crate::proto::ws::opcode::{
    CLOSE as OP_CLOSE, PING as OP_PING, PONG as OP_PONG, TEXT as OP_TEXT,
};

/// Header length of an unmasked frame carrying `len` payload bytes.
fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// RSV1: the frame's payload is compressed (permessage-deflate, RFC 7692).
const RSV1: u8 = 0x40;

fn put_header(out: &mut BytesMut, opcode: u8, len: usize) {
    put_header_flags(out, opcode, 0, len);
}

fn put_header_flags(out: &mut BytesMut, opcode: u8, flags: u8, len: usize) {
    out.put_u8(0x80 | flags | opcode); // FIN + opcode
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
}

/// Where the ingest builds event frames: back to back in large shared chunks. Each frame
/// is still its own `Bytes` (split off the chunk), but consecutive frames are adjacent in
/// memory, so a subscriber's queue can hand a run of them to the kernel as one buffer
/// (`Span`): fewer, larger copies into socket buffers and no per-frame refcount per
/// subscriber.
#[derive(Default)]
pub struct FrameArena {
    buf: BytesMut,
    chunk: u64,
}

/// Chunk size: room for ~800 typical frames; a larger frame gets a chunk of its own size.
const CHUNK: usize = 256 * 1024;

/// Chunk ids are unique in the process, so frames of different arenas never look adjacent.
static NEXT_CHUNK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One event's frame and the chunk it was built in. Only `FrameArena` makes these, which
/// is what `Span` relies on: frames with the same `chunk` are consecutive slices of one
/// allocation, in the order they were built.
#[derive(Debug, Clone)]
pub struct EventFrame {
    bytes: Bytes,
    chunk: u64,
}

impl std::ops::Deref for EventFrame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl EventFrame {
    /// The frame's payload (its bytes after the header).
    pub fn payload(&self) -> &[u8] {
        payload(&self.bytes)
    }
}

impl FrameArena {
    pub fn new() -> FrameArena {
        FrameArena::default()
    }

    /// Room for a frame of `total` bytes: a fresh chunk when it does not fit. `BytesMut`
    /// must never grow (it would reallocate), so frames already handed out stay where
    /// they are.
    fn reserve(&mut self, total: usize) {
        if self.buf.capacity() < total {
            self.buf = BytesMut::with_capacity(total.max(CHUNK));
            self.chunk = NEXT_CHUNK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Builds the text frame of one accepted event.
    ///
    /// `envelope` is the validated line, trimmed, ending in its closing `}`; the frame's
    /// payload is that object with `"timestamp"` (when `stamp` is given) and `"seq"`
    /// appended as its last members, so every field the publisher sent passes through
    /// byte for byte.
    pub fn event_frame(&mut self, envelope: &[u8], stamp: Option<&str>, seq: u64) -> EventFrame {
        debug_assert_eq!(
            envelope.last(),
            Some(&b'}'),
            "envelope is a validated JSON object"
        );
        let body = &envelope[..envelope.len() - 1];
        let mut seq_buf = itoa_buf(seq);
        let seq_txt = seq_buf.format();
        let stamp_len = stamp.map_or(0, |s| ",\"timestamp\":\"\"".len() + s.len());
        let len = body.len() + stamp_len + ",\"seq\":}".len() + seq_txt.len();
        let total = header_len(len) + len;
        self.reserve(total);
        let out = &mut self.buf;
        put_header(out, OP_TEXT, len);
        out.put_slice(body);
        if let Some(s) = stamp {
            out.put_slice(b",\"timestamp\":\"");
            out.put_slice(s.as_bytes());
            out.put_u8(b'"');
        }
        out.put_slice(b",\"seq\":");
        out.put_slice(seq_txt.as_bytes());
        out.put_u8(b'}');
        debug_assert_eq!(out.len(), total);
        EventFrame {
            bytes: out.split().freeze(),
            chunk: self.chunk,
        }
    }

    /// Builds the frame of an event whose payload was compressed (permessage-deflate):
    /// a text frame with RSV1 set.
    pub fn deflated_frame(&mut self, compressed: &[u8]) -> EventFrame {
        self.reserve(header_len(compressed.len()) + compressed.len());
        put_header_flags(&mut self.buf, OP_TEXT, RSV1, compressed.len());
        self.buf.put_slice(compressed);
        EventFrame {
            bytes: self.buf.split().freeze(),
            chunk: self.chunk,
        }
    }
}

/// Bytes queued for one subscriber: a control frame, or a run of event frames that lie
/// back to back in one arena chunk, written as one buffer.
#[derive(Debug)]
pub struct Span {
    /// The run's first frame: holding it keeps the whole chunk alive.
    first: Bytes,
    /// The arena chunk of the run (None: a lone frame that never grows).
    chunk: Option<u64>,
    /// Bytes already written, counted from the start of `first`.
    start: usize,
    /// The run's end, counted from the start of `first` (past `first.len()` once grown).
    end: usize,
    /// Frames in the run (for the frames-out metric).
    frames: u32,
}

impl Span {
    pub fn event(frame: &EventFrame) -> Span {
        Span {
            first: frame.bytes.clone(),
            chunk: Some(frame.chunk),
            start: 0,
            end: frame.bytes.len(),
            frames: 1,
        }
    }

    /// Appends `frame` if it is the next frame of this run's chunk, right where the run
    /// ends (no refcount, no new buffer). Returns false otherwise.
    pub fn extend(&mut self, frame: &EventFrame) -> bool {
        if self.chunk != Some(frame.chunk)
            || self.first.as_ptr().wrapping_add(self.end) != frame.bytes.as_ptr()
        {
            return false;
        }
        self.end += frame.bytes.len();
        self.frames += 1;
        true
    }

    pub fn frames(&self) -> u32 {
        self.frames
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Drops the first `n` bytes (written by a partial write).
    pub fn advance(&mut self, n: usize) {
        assert!(n <= self.len(), "advancing past the end of a span");
        self.start += n;
    }
}

impl From<Bytes> for Span {
    fn from(b: Bytes) -> Span {
        Span {
            end: b.len(),
            first: b,
            chunk: None,
            start: 0,
            frames: 1,
        }
    }
}

impl std::ops::Deref for Span {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `end` only grows in `extend`, by the length of a frame of the same arena
        // chunk that starts exactly at the run's end. Frames of one chunk are consecutive
        // slices of one `BytesMut` allocation that is never reallocated (`FrameArena`
        // starts a new chunk instead) and never written behind its split point, so
        // `first.as_ptr()..+end` lies in that allocation, is initialized, and is immutable.
        // `first` holds a reference to the allocation, so it outlives `self`; and
        // `start <= end`.
        unsafe { std::slice::from_raw_parts(self.first.as_ptr().add(self.start), self.len()) }
    }
}

/// The payload of an event frame (its bytes after the header).
pub fn payload(frame: &[u8]) -> &[u8] {
    let len_byte = frame[1] & 0x7F;
    let skip = match len_byte {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    &frame[skip..]
}

/// A text frame from any payload (used for the `replay_gap` notice and by tests).
pub fn text_frame(payload: &[u8]) -> Bytes {
    control_like(OP_TEXT, payload)
}

pub fn pong_frame(payload: &[u8]) -> Bytes {
    control_like(OP_PONG, payload)
}

pub fn ping_frame(payload: &[u8]) -> Bytes {
    control_like(OP_PING, payload)
}

/// A close frame; the reason is cut at a character boundary to fit the 125-byte limit of
/// control frames.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    control_like(OP_CLOSE, &payload)
}

fn control_like(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// Decimal formatting of a u64 on the stack (the hot path must not allocate for it).
struct ItoaBuf {
    buf: [u8; 20],
    start: usize,
}

fn itoa_buf(mut v: u64) -> ItoaBuf {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    ItoaBuf { buf, start: i }
}

impl ItoaBuf {
    fn format(&mut self) -> &str {
        std::str::from_utf8(&self.buf[self.start..]).expect("ASCII digits")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_frame(envelope: &[u8], stamp: Option<&str>, seq: u64) -> EventFrame {
        FrameArena::new().event_frame(envelope, stamp, seq)
    }

    #[test]
    fn small_event_frame() {
        let f = event_frame(br#"{"a":1}"#, None, 42);
        assert_eq!(&f[..2], &[0x81, 16]);
        assert_eq!(payload(&f), br#"{"a":1,"seq":42}"#);
    }

    #[test]
    fn stamped_frame_is_valid_json() {
        let f = event_frame(br#"{"type":"x"}"#, Some("2026-03-15T10:30:00.123Z"), 7);
        let v: serde_json::Value = serde_json::from_slice(payload(&f)).unwrap();
        assert_eq!(v["timestamp"], "2026-03-15T10:30:00.123Z");
        assert_eq!(v["seq"], 7);
    }

    #[test]
    fn length_forms() {
        for (n, hdr) in [
            (100usize, 2usize),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
            (200_000, 10),
        ] {
            // payload = `{"k":"…"` + `,"seq":1}`
            let filler = "x".repeat(n - r#"{"k":""#.len() - r#"","seq":1}"#.len());
            let env = format!(r#"{{"k":"{filler}"}}"#);
            let f = event_frame(env.as_bytes(), None, 1);
            assert_eq!(f.len(), hdr + n, "payload {n}");
            assert_eq!(payload(&f).len(), n);
            let mut c = std::io::Cursor::new(&f[..]);
            let (h, len) = tungstenite::protocol::frame::FrameHeader::parse(&mut c)
                .unwrap()
                .unwrap();
            assert_eq!(len as usize, n);
            assert!(h.is_final && h.mask.is_none());
        }
    }

    #[test]
    fn consecutive_frames_form_one_run() {
        let mut arena = FrameArena::new();
        let frames: Vec<EventFrame> = (1..=100)
            .map(|seq| arena.event_frame(br#"{"k":"v"}"#, None, seq))
            .collect();
        let mut run = Span::event(&frames[0]);
        for f in &frames[1..] {
            assert!(run.extend(f), "adjacent frames of one chunk merge");
        }
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        assert_eq!(&run[..], &expected[..]);
        run.advance(5);
        assert_eq!(&run[..], &expected[5..]);
        drop(frames); // the run keeps the chunk alive on its own
        assert_eq!(&run[..], &expected[5..]);
    }

    #[test]
    fn runs_break_at_gaps_chunks_and_other_arenas() {
        let mut arena = FrameArena::new();
        let a = arena.event_frame(br#"{"k":1}"#, None, 1);
        let b = arena.event_frame(br#"{"k":2}"#, None, 2);
        let c = arena.event_frame(br#"{"k":3}"#, None, 3);
        let mut skip = Span::event(&a);
        assert!(
            !skip.extend(&c),
            "a filtered-out frame in between breaks the run"
        );
        assert!(!Span::event(&b).extend(&a), "order matters");
        let big = "x".repeat(CHUNK);
        let huge = arena.event_frame(format!(r#"{{"k":"{big}"}}"#).as_bytes(), None, 4);
        assert!(
            !Span::event(&c).extend(&huge),
            "a new chunk starts a new run"
        );
        let other = FrameArena::new().event_frame(br#"{"k":5}"#, None, 5);
        assert!(!Span::event(&huge).extend(&other));
        let mut lone = Span::from(Bytes::from_static(b"abc"));
        assert!(!lone.extend(&a), "control frames never grow");
        lone.advance(1);
        assert_eq!(&lone[..], b"bc");
    }

    #[test]
    fn seq_digits() {
        for v in [0u64, 9, 10, 12345, u64::MAX] {
            assert_eq!(itoa_buf(v).format(), v.to_string());
        }
    }

    #[test]
    fn close_reason_is_bounded_at_char_boundary() {
        let f = close_frame(4001, &"é".repeat(100));
        assert!(f.len() <= 127);
        assert_eq!(&f[2..4], &4001u16.to_be_bytes());
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
