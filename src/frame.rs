//! Outbound WebSocket frames. An event's frame — header and payload, the published
//! envelope with `"seq"` appended — is built here exactly once, at ingest, into one
//! `Bytes` that every matching subscriber then shares.
//!
//! Server frames are never masked (RFC 6455 §5.1), so the same bytes are valid on every
//! connection.

use bytes::{BufMut, Bytes, BytesMut};

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Header length of an unmasked frame carrying `len` payload bytes.
fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

fn put_header(out: &mut BytesMut, opcode: u8, len: usize) {
    out.put_u8(0x80 | opcode); // FIN + opcode
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

/// Builds the text frame of one accepted event.
///
/// `envelope` is the validated line, trimmed, ending in its closing `}`; the frame's
/// payload is that object with `"timestamp"` (when `stamp` is given) and `"seq"` appended
/// as its last members, so every field the publisher sent passes through byte for byte.
pub fn event_frame(envelope: &[u8], stamp: Option<&str>, seq: u64) -> Bytes {
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
    let mut out = BytesMut::with_capacity(header_len(len) + len);
    put_header(&mut out, OP_TEXT, len);
    out.put_slice(body);
    if let Some(s) = stamp {
        out.put_slice(b",\"timestamp\":\"");
        out.put_slice(s.as_bytes());
        out.put_u8(b'"');
    }
    out.put_slice(b",\"seq\":");
    out.put_slice(seq_txt.as_bytes());
    out.put_u8(b'}');
    debug_assert_eq!(out.len(), header_len(len) + len);
    out.freeze()
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
