//! permessage-deflate (RFC 7692), sans-IO: which offer of a client the relay accepts, and
//! how one message is compressed. The relay always compresses each message on its own
//! (`server_no_context_takeover`), so one compressed frame is valid for every subscriber
//! that negotiated the extension, whatever that subscriber received before: an event is
//! compressed once, not once per subscriber.

use flate2::{Compress, Compression, FlushCompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const NAME: &str = "permessage-deflate";

/// The window the relay's compressor uses: 2^15 bytes, the largest (and the default).
pub const WINDOW_BITS: u8 = 15;

/// What a subscriber negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// `server_max_window_bits`: the client's decompressor keeps 2^bits bytes of history.
    pub window_bits: u8,
    /// The client asked for a window (`server_max_window_bits` in its offer): the answer
    /// must name it.
    window_asked: bool,
}

impl Deflate {
    /// Whether a message of `len` bytes compressed by the relay is valid for this
    /// subscriber. Each message is compressed on its own, so no back-reference reaches
    /// further than the message's own start: a message no longer than the client's window
    /// never refers past it, whatever window the compressor had. Longer ones go out
    /// uncompressed to a client that asked for a smaller window (the RFC lets any message
    /// be sent uncompressed).
    pub fn fits(&self, len: usize) -> bool {
        self.window_bits >= WINDOW_BITS || len <= 1 << self.window_bits
    }

    /// The `Sec-WebSocket-Extensions` value of the `101` answer.
    pub fn response(&self) -> String {
        let mut out = format!("{NAME}; server_no_context_takeover");
        if self.window_asked {
            out += &format!("; server_max_window_bits={}", self.window_bits);
        }
        out
    }
}

/// The first offer of `permessage-deflate` in the request's `Sec-WebSocket-Extensions`
/// values that the relay can meet, per RFC 7692 §7.1: an offer with an unknown, repeated
/// or malformed parameter is declined (the next one is considered); every valid offer can
/// be met, since the relay drops its context after each message anyway and never
/// decompresses what clients send (it ignores their data frames).
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Deflate> {
    headers
        .into_iter()
        .flat_map(|h| h.split(','))
        .find_map(accept_offer)
}

/// One offer (`name; param; param=value`), if it is a valid permessage-deflate one.
fn accept_offer(offer: &str) -> Option<Deflate> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut deflate = Deflate {
        window_bits: WINDOW_BITS,
        window_asked: false,
    };
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None; // §7.1: a parameter given twice
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(v)) => {
                deflate.window_bits = window_bits(v)?;
                deflate.window_asked = true;
            }
            // The client's own window: nothing the relay must meet, only a valid value.
            ("client_max_window_bits", v) => {
                if let Some(v) = v {
                    window_bits(v)?;
                }
            }
            _ => return None, // unknown, or a value where none belongs (or none where one must)
        }
        seen.push(name);
    }
    Some(deflate)
}

/// A parameter value, unquoted (§7.1: a quoted value must still be a valid token).
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(v),
    }
}

/// A window size: 8 to 15, decimal, no leading zero (§7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// When the relay compresses (`--compression on`): events whose payload is below
/// `min_size` go out uncompressed (the RFC allows it per message), and `level` is zlib's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub min_size: usize,
    pub level: u32,
}

/// A raw DEFLATE compressor for whole messages, reused from one to the next.
pub struct Compressor {
    z: Compress,
    out: Vec<u8>,
}

impl Compressor {
    /// `level`: 0 (stored) to 9 (smallest).
    pub fn new(level: u32) -> Compressor {
        Compressor {
            z: Compress::new(Compression::new(level.min(9)), false),
            out: Vec::new(),
        }
    }

    /// `message` compressed on its own, as a permessage-deflate payload: a raw DEFLATE
    /// stream flushed to a byte boundary, without the flush's final `00 00 ff ff`
    /// (§7.2.1), which the receiver appends back. Valid until the next call.
    pub fn compress(&mut self, message: &[u8]) -> &[u8] {
        self.z.reset();
        self.out.clear();
        self.out.reserve(message.len() / 2 + 64);
        loop {
            let read = self.z.total_in() as usize;
            let status = self
                .z
                .compress_vec(&message[read..], &mut self.out, FlushCompress::Sync)
                .expect("deflate takes any input");
            let done = self.z.total_in() as usize == message.len();
            // Done when all input is in and the flush fit (room left in the buffer).
            if done && self.out.len() < self.out.capacity() && status != Status::BufError {
                break;
            }
            self.out.reserve(self.out.capacity().max(64));
        }
        let n = self.out.len();
        if self.out.ends_with(&[0, 0, 0xff, 0xff]) {
            self.out.truncate(n - 4);
        }
        &self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use krux_testkit::inflate_message as inflate;

    #[test]
    fn messages_compress_on_their_own_and_come_back_whole() {
        let mut c = Compressor::new(6);
        let event = br#"{"type":"capability_invoked","agent":"agent-7","session_id":"s-1","data":{"capability":"fs.read","params":{"path":"/etc/hosts"}},"seq":42}"#;
        let small = c.compress(event).to_vec();
        assert!(
            small.len() < event.len(),
            "{} vs {}",
            small.len(),
            event.len()
        );
        assert!(!small.ends_with(&[0, 0, 0xff, 0xff]), "the tail is dropped");
        assert_eq!(inflate(&small), event);
        // Again, after a different message: the same bytes (no context carried over).
        let big: Vec<u8> = (0..3_000_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        assert_eq!(inflate(c.compress(&big)), big);
        assert_eq!(c.compress(event), small);
    }

    #[test]
    fn offers_per_rfc_7692() {
        let ok = |h: &[&str]| negotiate(h.iter().copied());
        let default = Deflate {
            window_bits: 15,
            window_asked: false,
        };
        let plain = Some(default);
        // What browsers send, and what Python's websockets sends.
        assert_eq!(ok(&["permessage-deflate; client_max_window_bits"]), plain);
        assert_eq!(
            default.response(),
            "permessage-deflate; server_no_context_takeover"
        );
        assert_eq!(ok(&["permessage-deflate"]), plain);
        assert_eq!(
            ok(&["Permessage-Deflate; SERVER_NO_CONTEXT_TAKEOVER; client_no_context_takeover"]),
            plain
        );
        // A smaller window asked: met, and named in the answer.
        let w10 = ok(&["permessage-deflate; server_max_window_bits=10"]).unwrap();
        assert_eq!(w10.window_bits, 10);
        assert_eq!(
            w10.response(),
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
        );
        assert!(w10.fits(1024) && !w10.fits(1025));
        assert!(
            default.fits(9 << 20),
            "the compressor's own window: any size"
        );
        assert_eq!(
            ok(&["permessage-deflate; server_max_window_bits=\"12\""]).map(|d| d.window_bits),
            Some(12)
        );
        // Declined offers: the next one is taken, if any.
        for bad in [
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=20",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; mystery",
            "permessage-deflate; server_max_window_bits=\"12",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(ok(&[bad]), None, "{bad}");
            assert_eq!(
                ok(&[bad, "permessage-deflate; server_max_window_bits=9"]).map(|d| d.window_bits),
                Some(9),
                "{bad}, then a good offer"
            );
        }
        // Several offers in one header, and over two headers.
        assert_eq!(
            ok(&["permessage-deflate; server_max_window_bits=99, permessage-deflate"]),
            plain
        );
        assert_eq!(
            ok(&["foo", "permessage-deflate; client_max_window_bits=8"]),
            plain
        );
        assert_eq!(ok(&[]), None);
    }
}
