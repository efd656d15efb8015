//! Server frames (unmasked) read from a byte stream: `parse_frame` takes one whole frame
//! from a buffer (tests); `FrameCounter` counts frames as bytes stream by, keeping only
//! sampled payload prefixes (the load client, at millions of frames a second). A frame
//! compressed with permessage-deflate (RSV1) is counted from its header too, and inflated
//! only when its payload is looked at (sampled, or its `seq` tracked).

/// Opcodes of RFC 6455.
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// A frame header: 2 bytes, then 0, 2 or 8 bytes of length (server frames are unmasked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    /// RSV1: compressed (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub len: u64,
    /// Bytes the header takes.
    pub size: usize,
}

impl Head {
    /// How many header bytes `h` (the start of a header) needs to be whole.
    pub fn needed(h: &[u8]) -> usize {
        match h.get(1).map(|b| b & 0x7F) {
            None => 2,
            Some(126) => 4,
            Some(127) => 10,
            Some(_) => 2,
        }
    }

    /// The header at the start of `b`, if all of it is there.
    pub fn parse(b: &[u8]) -> Option<Head> {
        let size = Head::needed(b);
        if b.len() < size {
            return None;
        }
        let len = match b[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([b[2], b[3]])),
            127 => u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        };
        Some(Head {
            fin: b[0] & 0x80 != 0,
            rsv1: b[0] & 0x40 != 0,
            opcode: b[0] & 0x0F,
            len,
            size,
        })
    }
}

/// One whole server frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub opcode: u8,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// A close frame's code (1005 if it has none) and reason.
    pub fn close(&self) -> Option<(u16, String)> {
        (self.opcode == CLOSE).then(|| match self.payload {
            [a, b, reason @ ..] => (
                u16::from_be_bytes([*a, *b]),
                String::from_utf8_lossy(reason).into_owned(),
            ),
            _ => (1005, String::new()),
        })
    }

    /// A text frame's payload as JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        (self.opcode == TEXT)
            .then(|| serde_json::from_slice(self.payload).ok())
            .flatten()
    }
}

/// The whole frame at the start of `b` and the bytes it takes, or `None` if `b` holds
/// only part of one.
pub fn parse_frame(b: &[u8]) -> Option<(Frame<'_>, usize)> {
    let head = Head::parse(b)?;
    let end = head.size.checked_add(usize::try_from(head.len).ok()?)?;
    let payload = b.get(head.size..end)?;
    Some((
        Frame {
            opcode: head.opcode,
            payload,
        },
        end,
    ))
}

/// A permessage-deflate message's payload inflated: the sync flush's `00 00 ff ff`, which
/// the sender drops (RFC 7692 §7.2.2), appended back. Panics on a broken stream.
pub fn inflate_message(payload: &[u8]) -> Vec<u8> {
    let mut d = flate2::Decompress::new(false);
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(payload.len() * 4 + 64);
    loop {
        let at = d.total_in() as usize;
        d.decompress_vec(&input[at..], &mut out, flate2::FlushDecompress::Sync)
            .expect("a valid compressed message");
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// Incremental frame counting over a byte stream.
pub struct FrameCounter {
    head: [u8; 10],
    head_len: usize,
    /// Payload bytes left in the current frame.
    remaining: u64,
    opcode: u8,
    /// Whether the current frame is sampled, and the start of its payload (up to
    /// `SAMPLE_BYTES`); the buffer is reused, so sampling never allocates.
    sampled: bool,
    sample: Vec<u8>,
    pub frames: u64,
    sample_every: u64,
    /// Churn runs: read every frame's `seq` (from the payload's tail) to resume from it
    /// and to count duplicates.
    track_seq: bool,
    tail: Vec<u8>,
    pub last_seq: u64,
    pub duplicates: u64,
    /// The current frame is compressed and its payload is looked at: it goes through
    /// `inflater`, and what comes out is sampled and tracked instead.
    inflating: bool,
    inflater: flate2::Decompress,
    inflated: Vec<u8>,
}

const SAMPLE_BYTES: usize = 1024;

pub enum Seen<'a> {
    /// A text frame completed: its payload prefix if it was sampled, and its `seq` when
    /// the counter tracks them.
    Text {
        sample: Option<&'a [u8]>,
        seq: Option<u64>,
    },
    /// A close frame: its code (1005 if it has none) and reason bytes.
    Close(u16, &'a [u8]),
}

impl FrameCounter {
    pub fn new(sample_every: u64, track_seq: bool) -> Self {
        FrameCounter {
            head: [0; 10],
            head_len: 0,
            remaining: 0,
            opcode: 0,
            sampled: false,
            sample: Vec::with_capacity(SAMPLE_BYTES),
            frames: 0,
            sample_every: sample_every.max(1),
            track_seq,
            tail: Vec::new(),
            last_seq: 0,
            duplicates: 0,
            inflating: false,
            inflater: flate2::Decompress::new(false),
            inflated: Vec::new(),
        }
    }

    /// A new connection starts at a frame boundary.
    pub fn new_stream(&mut self) {
        self.head_len = 0;
        self.remaining = 0;
        self.sampled = false;
        self.tail.clear();
    }

    /// Payload bytes (inflated, if the frame was compressed): the sample's prefix and the
    /// tail where `seq` is.
    fn look_at(&mut self, chunk: &[u8]) {
        if self.sampled {
            let room = SAMPLE_BYTES.saturating_sub(self.sample.len());
            self.sample
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        self.keep_tail(chunk);
    }

    /// Compressed payload bytes in, what they inflate to looked at.
    fn inflate(&mut self, mut input: &[u8]) {
        let mut out = std::mem::take(&mut self.inflated);
        loop {
            out.clear();
            out.reserve(64 * 1024);
            let before = self.inflater.total_in();
            let status =
                self.inflater
                    .decompress_vec(input, &mut out, flate2::FlushDecompress::Sync);
            let used = (self.inflater.total_in() - before) as usize;
            input = &input[used..];
            self.look_at(&out);
            // Done when the input is in and the output did not fill up (nothing pending);
            // a broken stream gives what came out, and no more.
            let full = out.len() == out.capacity();
            if status.is_err() || (input.is_empty() && !full) || (used == 0 && out.is_empty()) {
                break;
            }
        }
        self.inflated = out;
    }

    fn keep_tail(&mut self, chunk: &[u8]) {
        if self.track_seq {
            self.tail
                .extend_from_slice(&chunk[chunk.len().saturating_sub(32)..]);
            if self.tail.len() > 64 {
                self.tail.drain(..self.tail.len() - 32);
            }
        }
    }

    pub fn feed(&mut self, mut data: &[u8], on: &mut impl FnMut(Seen)) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let k = (self.remaining as usize).min(data.len());
                self.remaining -= k as u64;
                if self.inflating {
                    self.inflate(&data[..k]);
                    if self.remaining == 0 {
                        // The sync flush's tail the sender dropped (RFC 7692 §7.2.2).
                        self.inflate(&[0, 0, 0xff, 0xff]);
                    }
                    // With no seq to read, only the sample's prefix is wanted: the rest of
                    // a large frame need not be inflated.
                    if !self.track_seq && self.sample.len() >= SAMPLE_BYTES {
                        self.inflating = false;
                    }
                } else {
                    self.look_at(&data[..k]);
                }
                data = &data[k..];
                if self.remaining == 0 {
                    self.finish(on);
                }
                continue;
            }
            // Fast path: whole unsampled short text frames, counted from their headers alone.
            if self.head_len == 0 && !self.track_seq {
                // Compressed ones (RSV1) too: counting needs no inflating.
                while data.len() >= 4 && data[0] | 0x40 == 0xC0 | TEXT && data[1] <= 126 {
                    let end = match data[1] {
                        126 => 4 + usize::from(u16::from_be_bytes([data[2], data[3]])),
                        n => 2 + usize::from(n),
                    };
                    if end > data.len() || self.frames.is_multiple_of(self.sample_every) {
                        break;
                    }
                    self.frames += 1;
                    data = &data[end..];
                }
                if data.is_empty() {
                    return;
                }
            }
            // Collect a header: 2 bytes, then 0, 2 or 8 length bytes (server frames are unmasked).
            while self.head_len < Head::needed(&self.head[..self.head_len]) && !data.is_empty() {
                self.head[self.head_len] = data[0];
                self.head_len += 1;
                data = &data[1..];
            }
            let Some(head) = Head::parse(&self.head[..self.head_len]) else {
                return; // the rest of the header comes with the next bytes
            };
            self.head_len = 0;
            self.start_frame(head.opcode, head.rsv1, head.len, on);
        }
    }

    fn start_frame(&mut self, opcode: u8, rsv1: bool, len: u64, on: &mut impl FnMut(Seen)) {
        self.opcode = opcode;
        self.remaining = len;
        self.sampled =
            opcode == CLOSE || (opcode == TEXT && self.frames.is_multiple_of(self.sample_every));
        self.sample.clear();
        self.inflating = rsv1 && (self.sampled || self.track_seq);
        if self.inflating {
            self.inflater.reset(false); // each message compressed on its own
        }
        if len == 0 {
            self.finish(on);
        }
    }

    fn finish(&mut self, on: &mut impl FnMut(Seen)) {
        let sample = self.sampled.then_some(&self.sample[..]);
        self.sampled = false;
        let tail = std::mem::take(&mut self.tail);
        match self.opcode {
            TEXT => {
                if self.track_seq {
                    // The relay appends `"seq":N}` last; the baseline puts `seq` before
                    // `session_id`/`timestamp`/`type`, so search the tail's last occurrence.
                    let seq = memchr::memmem::rfind(&tail, b"\"seq\":").and_then(|i| {
                        let digits: Vec<u8> = tail[i + 6..]
                            .iter()
                            .copied()
                            .take_while(u8::is_ascii_digit)
                            .collect();
                        std::str::from_utf8(&digits).ok()?.parse::<u64>().ok()
                    });
                    if let Some(seq) = seq {
                        if seq <= self.last_seq {
                            self.duplicates += 1;
                            return;
                        }
                        self.last_seq = seq;
                    }
                    self.frames += 1;
                    on(Seen::Text { sample, seq });
                    return;
                }
                self.frames += 1;
                on(Seen::Text { sample, seq: None });
            }
            CLOSE => {
                let p = sample.unwrap_or_default();
                match p {
                    [a, b, reason @ ..] => on(Seen::Close(u16::from_be_bytes([*a, *b]), reason)),
                    _ => on(Seen::Close(1005, &[])),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8], opcode: u8) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=0xFFFF => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// 20 text frames of 7-bit, 16-bit and 64-bit lengths carrying `"lt":N`, then a close.
    fn stream() -> Vec<u8> {
        let mut stream = Vec::new();
        for i in 0..20u64 {
            let pad = "x".repeat([70_000, 200, 50][i as usize % 3]);
            stream.extend(frame(
                format!(
                    "{{\"lt\":{},\"pad\":\"{pad}\",\"seq\":{}}}",
                    1000 + i,
                    i + 1
                )
                .as_bytes(),
                TEXT,
            ));
        }
        stream.extend(frame(&[0x0F, 0xA1, b'b'], CLOSE));
        stream
    }

    fn lt(p: &[u8]) -> u64 {
        let text = std::str::from_utf8(&p[6..]).unwrap();
        text[..text.find(',').unwrap()].parse().unwrap()
    }

    #[test]
    fn counts_frames_and_samples_prefixes_in_any_chunking() {
        let stream = stream();
        for (chunk, track_seq) in [1, 5, 4096, stream.len()]
            .into_iter()
            .flat_map(|c| [(c, true), (c, false)])
        {
            let mut c = FrameCounter::new(4, track_seq);
            let mut samples = Vec::new();
            let mut close = None;
            for part in stream.chunks(chunk) {
                c.feed(part, &mut |s| match s {
                    Seen::Text {
                        sample: Some(p), ..
                    } => samples.push(lt(p)),
                    Seen::Text { .. } => {}
                    Seen::Close(code, reason) => close = Some((code, reason.to_vec())),
                });
            }
            assert_eq!(c.frames, 20, "chunk {chunk}");
            assert_eq!(samples, vec![1000, 1004, 1008, 1012, 1016], "chunk {chunk}");
            assert_eq!(close, Some((4001, b"b".to_vec())));
            if track_seq {
                assert_eq!((c.last_seq, c.duplicates), (20, 0));
            }
        }
    }

    /// The same stream with every text frame compressed (permessage-deflate): counted the
    /// same, samples and seqs read from the inflated payloads, in any chunking.
    #[test]
    fn compressed_frames_are_sampled_and_tracked_inflated() {
        let mut compressed = Vec::new();
        let mut at = 0;
        let plain = stream();
        while let Some((f, used)) = parse_frame(&plain[at..]) {
            at += used;
            if f.opcode != TEXT {
                compressed.extend(frame(f.payload, f.opcode));
                continue;
            }
            let mut z = flate2::Compress::new(flate2::Compression::fast(), false);
            let mut out = Vec::with_capacity(f.payload.len() + 64);
            z.compress_vec(f.payload, &mut out, flate2::FlushCompress::Sync)
                .unwrap();
            assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
            out.truncate(out.len() - 4);
            let mut fr = frame(&out, TEXT);
            fr[0] |= 0x40; // RSV1
            compressed.extend(fr);
        }
        for chunk in [1, 3, 4096, compressed.len()] {
            let mut c = FrameCounter::new(4, true);
            let mut samples = Vec::new();
            for part in compressed.chunks(chunk) {
                c.feed(part, &mut |s| {
                    if let Seen::Text {
                        sample: Some(p), ..
                    } = s
                    {
                        samples.push(lt(p));
                    }
                });
            }
            assert_eq!(c.frames, 20, "chunk {chunk}");
            assert_eq!(samples, vec![1000, 1004, 1008, 1012, 1016], "chunk {chunk}");
            assert_eq!((c.last_seq, c.duplicates), (20, 0), "chunk {chunk}");
        }
    }

    #[test]
    fn parses_whole_frames_and_waits_for_cut_ones() {
        let stream = stream();
        let (mut at, mut texts) = (0, 0);
        while let Some((f, used)) = parse_frame(&stream[at..]) {
            assert!(
                parse_frame(&stream[at..at + used - 1]).is_none(),
                "a cut frame is not whole"
            );
            if let Some(v) = f.json() {
                texts += 1;
                assert_eq!(v["seq"], texts);
            } else {
                assert_eq!(f.close(), Some((4001, "b".into())));
            }
            at += used;
        }
        assert_eq!((texts, at), (20, stream.len()));
        assert_eq!(Head::needed(&[0x81]), 2);
        assert_eq!(Head::needed(&[0x81, 127]), 10);
    }
}
