//! Inbound WebSocket frames from a supervisor, sans-IO.
//!
//! Supervisors only ever need to send control frames (ping, pong, close); data frames are
//! skipped without being buffered, whatever their size. Protocol violations end the
//! stream with the RFC 6455 close code.

/// RFC 6455 §7.4.1 close codes the relay sends.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    /// Application code: the subscriber fell behind (see CONTRACT.md).
    pub const SLOW_CONSUMER: u16 = 4001;
}

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Why the relay closes a subscriber: every close is one of these, and its code and text
/// are decided here only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed: its code echoed (RFC 6455 §5.5.1).
    Peer(u16),
    /// Its unsent bytes stayed over the bound: resume after `since`.
    SlowConsumer { since: u64 },
    /// Its reactor fell a whole window behind: resume after `since`.
    Lapped { since: u64 },
    /// The token or passphrase it used is no longer valid.
    Revoked,
    /// No pong within the read timeout after a ping.
    PingTimeout,
    /// The relay is shutting down.
    Shutdown,
    /// It broke the protocol.
    Protocol(Violation),
    /// A cluster node's stream cannot serve its resume.
    HistoryUnavailable,
}

impl CloseReason {
    /// Every kind, in the order metrics list them.
    pub const KINDS: [&'static str; 8] = [
        "peer",
        "slow_consumer",
        "lapped",
        "revoked",
        "ping_timeout",
        "shutdown",
        "protocol_violation",
        "history_unavailable",
    ];

    pub fn code(&self) -> u16 {
        match self {
            CloseReason::Peer(code) => *code,
            CloseReason::SlowConsumer { .. } | CloseReason::Lapped { .. } => {
                close_code::SLOW_CONSUMER
            }
            CloseReason::Revoked => close_code::POLICY,
            CloseReason::PingTimeout | CloseReason::Shutdown => close_code::GOING_AWAY,
            CloseReason::Protocol(v) => v.code,
            CloseReason::HistoryUnavailable => close_code::INTERNAL,
        }
    }

    /// The close frame's reason text (the contract fixes the 4001 one).
    pub fn text(&self) -> std::borrow::Cow<'static, str> {
        match self {
            CloseReason::Peer(_) => "".into(),
            CloseReason::SlowConsumer { since } | CloseReason::Lapped { since } => {
                format!("slow consumer; resume with since={since}").into()
            }
            CloseReason::Revoked => "credential revoked".into(),
            CloseReason::PingTimeout => "no pong within the read timeout".into(),
            CloseReason::Shutdown => "relay shutting down".into(),
            CloseReason::Protocol(v) => v.reason.into(),
            CloseReason::HistoryUnavailable => "history unavailable".into(),
        }
    }

    /// Its index in `KINDS`.
    pub fn kind(&self) -> usize {
        match self {
            CloseReason::Peer(_) => 0,
            CloseReason::SlowConsumer { .. } => 1,
            CloseReason::Lapped { .. } => 2,
            CloseReason::Revoked => 3,
            CloseReason::PingTimeout => 4,
            CloseReason::Shutdown => 5,
            CloseReason::Protocol(_) => 6,
            CloseReason::HistoryUnavailable => 7,
        }
    }
}

/// A control frame the reactor must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Ping(Vec<u8>),
    Pong,
    /// The peer's close frame: its code, if it sent one.
    Close(Option<u16>),
}

/// The stream is broken: close with this code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a frame header in `head`.
    Header,
    /// Skipping this many payload bytes of a data frame.
    Skip(u64),
    /// Collecting a control frame's payload.
    Control {
        opcode: u8,
        len: usize,
        mask: [u8; 4],
    },
    /// A close frame was received or a violation found; further bytes are ignored.
    Done,
}

pub struct InboundDecoder {
    state: State,
    head: [u8; 14],
    head_len: usize,
    control: Vec<u8>,
    max_frame: u64,
    /// Inside a fragmented data message (expecting continuation frames).
    fragmented: bool,
    /// permessage-deflate was negotiated: a data message's first frame may carry RSV1
    /// (compressed). The relay ignores data from subscribers, so it never inflates one.
    deflate: bool,
}

impl InboundDecoder {
    pub fn new(max_frame: u64) -> Self {
        InboundDecoder {
            state: State::Header,
            head: [0; 14],
            head_len: 0,
            control: Vec::new(),
            max_frame,
            fragmented: false,
            deflate: false,
        }
    }

    /// A decoder for a subscriber that negotiated permessage-deflate (RFC 7692 §6: RSV1
    /// marks a compressed message, on its first frame only, never on a control frame).
    pub fn with_deflate(mut self) -> Self {
        self.deflate = true;
        self
    }

    /// Feeds bytes read from the socket; `on` receives each control frame in order.
    pub fn feed(&mut self, mut data: &[u8], on: &mut impl FnMut(Inbound)) -> Result<(), Violation> {
        loop {
            if let State::Control { opcode, len, mask } = self.state {
                if self.control.len() == len {
                    for (i, b) in self.control.iter_mut().enumerate() {
                        *b ^= mask[i % 4];
                    }
                    self.state = State::Header;
                    let payload = std::mem::take(&mut self.control);
                    if let Err(v) = self.control_frame(opcode, payload, on) {
                        self.state = State::Done;
                        return Err(v);
                    }
                    continue;
                }
            }
            if data.is_empty() {
                return Ok(());
            }
            match self.state {
                State::Done => return Ok(()),
                State::Skip(n) => {
                    let k = n.min(data.len() as u64);
                    data = &data[k as usize..];
                    self.state = if n == k {
                        State::Header
                    } else {
                        State::Skip(n - k)
                    };
                }
                State::Header => {
                    let before = self.head_len;
                    let k = (self.head.len() - before).min(data.len());
                    self.head[before..before + k].copy_from_slice(&data[..k]);
                    self.head_len += k;
                    match self.parse_head() {
                        Ok(None) => data = &data[k..],
                        Ok(Some(used)) => {
                            data = &data[used - before..];
                            self.head_len = 0;
                        }
                        Err(v) => {
                            self.state = State::Done;
                            return Err(v);
                        }
                    }
                }
                State::Control { len, .. } => {
                    let k = (len - self.control.len()).min(data.len());
                    self.control.extend_from_slice(&data[..k]);
                    data = &data[k..];
                }
            }
        }
    }

    fn control_frame(
        &mut self,
        opcode: u8,
        payload: Vec<u8>,
        on: &mut impl FnMut(Inbound),
    ) -> Result<(), Violation> {
        match opcode {
            opcode::PING => on(Inbound::Ping(payload)),
            opcode::PONG => on(Inbound::Pong),
            _ => {
                let code = match payload.len() {
                    0 => None,
                    1 => {
                        return Err(violation(
                            close_code::PROTOCOL_ERROR,
                            "close frame with a 1-byte payload",
                        ))
                    }
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !valid_close_code(code) {
                            return Err(violation(
                                close_code::PROTOCOL_ERROR,
                                "invalid close code",
                            ));
                        }
                        if std::str::from_utf8(&payload[2..]).is_err() {
                            return Err(violation(
                                close_code::INVALID_PAYLOAD,
                                "close reason is not valid UTF-8",
                            ));
                        }
                        Some(code)
                    }
                };
                self.state = State::Done;
                on(Inbound::Close(code));
            }
        }
        Ok(())
    }

    /// Parses `head[..head_len]`: `None` if incomplete, else the header's length, having
    /// set the next state.
    fn parse_head(&mut self) -> Result<Option<usize>, Violation> {
        let h = &self.head[..self.head_len];
        if h.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv, opcode) = (h[0] & 0x80 != 0, h[0] & 0x70, h[0] & 0x0F);
        let masked = h[1] & 0x80 != 0;
        let len7 = h[1] & 0x7F;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        // Decidable from the first two bytes: refuse before waiting for more.
        let compressed_start =
            rsv == 0x40 && self.deflate && (opcode == opcode::TEXT || opcode == opcode::BINARY);
        if rsv != 0 && !compressed_start {
            return Err(violation(
                close_code::PROTOCOL_ERROR,
                if self.deflate {
                    "RSV1 only on the first frame of a data message; RSV2 and RSV3 are never set"
                } else {
                    "reserved bits set without a negotiated extension"
                },
            ));
        }
        if !masked {
            return Err(violation(
                close_code::PROTOCOL_ERROR,
                "client frames must be masked",
            ));
        }
        let need = 2 + ext + 4;
        if h.len() < need {
            return Ok(None);
        }
        let len = match ext {
            0 => u64::from(len7),
            2 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            _ => u64::from_be_bytes(h[2..10].try_into().expect("8 length bytes")),
        };
        let mask: [u8; 4] = h[need - 4..need].try_into().expect("4 mask bytes");
        match opcode {
            opcode::CLOSE..=opcode::PONG => {
                if !fin {
                    return Err(violation(
                        close_code::PROTOCOL_ERROR,
                        "control frames must not be fragmented",
                    ));
                }
                if len > 125 {
                    return Err(violation(
                        close_code::PROTOCOL_ERROR,
                        "control frame payload over 125 bytes",
                    ));
                }
                self.state = State::Control {
                    opcode,
                    len: len as usize,
                    mask,
                };
            }
            opcode::CONTINUATION..=opcode::BINARY => {
                if len > self.max_frame {
                    return Err(violation(
                        close_code::TOO_BIG,
                        "frame larger than the maximum frame size",
                    ));
                }
                match (opcode, self.fragmented) {
                    (opcode::CONTINUATION, false) => {
                        return Err(violation(
                            close_code::PROTOCOL_ERROR,
                            "continuation frame without a message",
                        ))
                    }
                    (opcode::TEXT | opcode::BINARY, true) => {
                        return Err(violation(
                            close_code::PROTOCOL_ERROR,
                            "new message inside a fragmented one",
                        ))
                    }
                    _ => self.fragmented = !fin,
                }
                self.state = if len == 0 {
                    State::Header
                } else {
                    State::Skip(len)
                };
            }
            _ => return Err(violation(close_code::PROTOCOL_ERROR, "unknown opcode")),
        }
        Ok(Some(need))
    }
}

/// Codes a peer may send in a close frame (RFC 6455 §7.4).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode(bytes: &[u8], chunk: usize) -> (Vec<Inbound>, Result<(), Violation>) {
        let mut d = InboundDecoder::new(1 << 20);
        let mut got = Vec::new();
        for c in bytes.chunks(chunk.max(1)) {
            if let Err(v) = d.feed(c, &mut |i| got.push(i)) {
                return (got, Err(v));
            }
        }
        (got, Ok(()))
    }

    #[test]
    fn control_frames_in_any_chunking() {
        let mut s = frame(0x89, b"hi");
        s.extend(frame(0x81, &vec![b'x'; 70_000])); // ignored data frame, 64-bit length
        s.extend(frame(0x89, b""));
        s.extend(frame(0x02, b"part")); // fragmented binary message
        s.extend(frame(0x8A, b""));
        s.extend(frame(0x80, b"end"));
        s.extend(frame(0x88, &[0x03, 0xE8, b'o', b'k']));
        s.extend(frame(0x89, b"after close is ignored"));
        for chunk in [1, 2, 3, 7, 100, s.len()] {
            let (got, res) = decode(&s, chunk);
            assert_eq!(res, Ok(()), "chunk {chunk}");
            assert_eq!(
                got,
                vec![
                    Inbound::Ping(b"hi".to_vec()),
                    Inbound::Ping(vec![]),
                    Inbound::Pong,
                    Inbound::Close(Some(1000))
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn violations_get_rfc_codes() {
        let unmasked = vec![0x89, 0x00];
        let cases: &[(Vec<u8>, u16)] = &[
            (unmasked, 1002),
            (frame(0x81 | 0x40, b"x"), 1002),
            (frame(0x09, b"x"), 1002),
            (frame(0x89, &[0; 126]), 1002),
            (frame(0x83, b""), 1002),
            (frame(0x80, b"x"), 1002),
            ([frame(0x01, b"a"), frame(0x81, b"b")].concat(), 1002),
            (frame(0x88, &[0x03]), 1002),
            (frame(0x88, &[0x03, 0xED]), 1002), // 1005 may not be sent
            (frame(0x88, &[0x03, 0xE8, 0xFF, 0xFE]), 1007),
        ];
        for (bytes, code) in cases {
            let (_, res) = decode(bytes, 1);
            assert_eq!(res.map_err(|v| v.code), Err(*code), "{bytes:02x?}");
        }
    }

    /// With permessage-deflate negotiated, a compressed data message (RSV1 on its first
    /// frame) is read past like any other; RSV1 anywhere else, or RSV2/RSV3, is not.
    #[test]
    fn rsv1_marks_compressed_data_only_where_rfc_7692_allows() {
        let feed = |bytes: &[u8]| {
            let mut d = InboundDecoder::new(1 << 20).with_deflate();
            let mut got = Vec::new();
            d.feed(bytes, &mut |i| got.push(i))
                .map(|()| got)
                .map_err(|v| v.code)
        };
        let ok = [
            frame(0xC1, b"\x4a\x04\x00"), // a whole compressed text message
            frame(0x42, b"\x4a"),         // a compressed binary message's first frame…
            frame(0x80, b"\x04\x00"),     // …and its last, RSV1 clear
            frame(0x89, b"p"),
        ]
        .concat();
        assert_eq!(feed(&ok), Ok(vec![Inbound::Ping(b"p".to_vec())]));
        for bad in [
            frame(0xC9, b""),                                // a control frame
            [frame(0x01, b"a"), frame(0xC0, b"b")].concat(), // a continuation
            frame(0xA1, b"x"),                               // RSV2
            frame(0x91, b"x"),                               // RSV3
        ] {
            assert_eq!(feed(&bad), Err(1002), "{bad:02x?}");
        }
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut d = InboundDecoder::new(1024);
        // Header announcing 1 GiB: refused before any payload arrives.
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&(1u64 << 30).to_be_bytes());
        h.extend_from_slice(&[0; 4]);
        assert_eq!(d.feed(&h, &mut |_| {}).map_err(|v| v.code), Err(1009));
    }
}
