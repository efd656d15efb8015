//! TLS 1.3 records made and opened by the relay itself, with the keys rustls negotiated.
//!
//! rustls runs the handshake and keeps the key schedule; once a TLS 1.3 connection is
//! established, rustls's kernel-connection API (made for kTLS, which this kernel lacks)
//! hands over its traffic secrets, and this module only frames, seals and opens records
//! (RFC 8446 §5.2) and does key updates (§4.6.3). What it buys: an established subscriber
//! holds its secrets and key schedule (about 1 KiB) instead of a whole rustls connection
//! (about 4.5 KiB), and a frame is copied once, straight into its record, and sealed in
//! place. TLS 1.2 connections stay with rustls (`io::tls`).

use std::io;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

/// Largest plaintext one record carries.
pub const MAX_PLAIN: usize = 16 * 1024;
/// A record's bytes besides its plaintext: header, inner content type, AEAD tag.
pub const OVERHEAD: usize = 5 + 1 + 16;
const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const KEY_UPDATE: u8 = 24;

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {what}"))
}

/// One direction's traffic secret and record sequence number. The AEAD key is expanded
/// when records are made or opened, not kept: an idle subscriber holds 56 bytes a side.
struct Direction {
    secrets: ConnectionTrafficSecrets,
    seq: u64,
}

impl Direction {
    fn key(&self) -> io::Result<(LessSafeKey, [u8; 12])> {
        let (alg, key, iv) = match &self.secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("a cipher the relay cannot run itself")),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| invalid("a malformed key"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("a malformed IV"))?;
        Ok((LessSafeKey::new(key), iv))
    }

    /// The next record's nonce (the IV XOR the sequence number, §5.3).
    fn next_nonce(&mut self, iv: &[u8; 12]) -> io::Result<Nonce> {
        let mut nonce = *iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("sequence numbers exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// An established TLS 1.3 connection's record layer.
pub struct Records {
    kernel: KernelConnection<ServerConnectionData>,
    tx: Direction,
    rx: Direction,
    /// Records one key may seal (the suite's confidentiality limit): ours is updated first.
    pub(crate) limit: u64,
    /// The peer asked for a key update: ours goes out before the next data (§4.6.3).
    owe_update: bool,
}

impl Records {
    /// Whether `take_over` can have `tls`: TLS 1.3 with one of the suites it runs.
    pub fn can_take_over(tls: &UnbufferedServerConnection) -> bool {
        use rustls::CipherSuite::*;
        tls.protocol_version() == Some(ProtocolVersion::TLSv1_3)
            && tls.negotiated_cipher_suite().is_some_and(|s| {
                matches!(
                    s.suite(),
                    TLS13_AES_128_GCM_SHA256
                        | TLS13_AES_256_GCM_SHA384
                        | TLS13_CHACHA20_POLY1305_SHA256
                )
            })
    }

    /// Takes over an established connection that `can_take_over`, with nothing left to send
    /// (its config allows secret extraction).
    pub fn take_over(tls: UnbufferedServerConnection) -> io::Result<Records> {
        let limit = tls
            .negotiated_cipher_suite()
            .and_then(|s| s.tls13())
            .map_or(0, |s| s.common.confidentiality_limit);
        let (secrets, kernel) = tls
            .dangerous_into_kernel_connection()
            .map_err(|e| invalid(&e.to_string()))?;
        Ok(Records {
            kernel,
            tx: Direction {
                seq: secrets.tx.0,
                secrets: secrets.tx.1,
            },
            rx: Direction {
                seq: secrets.rx.0,
                secrets: secrets.rx.1,
            },
            limit,
            owe_update: false,
        })
    }

    /// Seals up to `max` bytes of `plain` (taken across its slices in order) into records
    /// written to `out` from `at` (grown as needed; its length only grows, see
    /// `tls::Buffers`). Returns the bytes taken and where the records end.
    pub fn seal<'a>(
        &mut self,
        plain: impl IntoIterator<Item = &'a [u8]>,
        max: usize,
        out: &mut Vec<u8>,
        at: usize,
    ) -> io::Result<(usize, usize)> {
        let mut parts = plain.into_iter();
        let mut part: &[u8] = &[];
        let mut written = at;
        let records = max.div_ceil(MAX_PLAIN) as u64;
        if self.owe_update || self.tx.seq.saturating_add(records + 1) >= self.limit {
            written = self.update_ours(out, written)?;
        }
        let (key, iv) = self.tx.key()?;
        let mut taken = 0;
        while taken < max {
            // Fill one record's plaintext straight from the parts.
            let start = written;
            let room = (max - taken).min(MAX_PLAIN);
            grow(out, start + room + OVERHEAD);
            let body = &mut out[start + 5..start + 5 + room];
            let mut n = 0;
            while n < room {
                if part.is_empty() {
                    match parts.next() {
                        Some(p) => part = p,
                        None => break,
                    }
                    continue;
                }
                let k = part.len().min(room - n);
                body[n..n + k].copy_from_slice(&part[..k]);
                (part, n) = (&part[k..], n + k);
            }
            if n == 0 {
                break;
            }
            written += seal_record(
                &mut self.tx,
                &key,
                &iv,
                APPLICATION_DATA,
                n,
                &mut out[start..],
            )?;
            taken += n;
        }
        Ok((taken, written))
    }

    /// Our key update at `out[at..]`: a KeyUpdate message under the current key, then the
    /// next key. Returns where it ends.
    fn update_ours(&mut self, out: &mut Vec<u8>, at: usize) -> io::Result<usize> {
        let (key, iv) = self.tx.key()?;
        grow(out, at + 5 + OVERHEAD);
        out[at + 5..at + 10].copy_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]); // update_not_requested
        let n = at + seal_record(&mut self.tx, &key, &iv, HANDSHAKE, 5, &mut out[at..])?;
        let (seq, secrets) = self
            .kernel
            .update_tx_secret()
            .map_err(|e| invalid(&e.to_string()))?;
        self.tx = Direction { secrets, seq };
        self.owe_update = false;
        Ok(n)
    }

    /// Opens the complete records at the start of `buf` in place: application data is
    /// appended to `plain`, the peer's close_notify sets `closed`. Returns the bytes
    /// consumed (an incomplete record stays for the caller to complete).
    pub fn open(
        &mut self,
        buf: &mut [u8],
        plain: &mut Vec<u8>,
        closed: &mut bool,
    ) -> (usize, io::Result<()>) {
        let mut at = 0;
        let mut key = None;
        while !*closed && buf.len() - at >= 5 {
            let header: [u8; 5] = buf[at..at + 5].try_into().expect("five bytes");
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != APPLICATION_DATA {
                return (at, Err(invalid("a record of an unexpected type")));
            }
            if len > MAX_PLAIN + 256 {
                return (at, Err(invalid("a record over the size limit")));
            }
            if buf.len() - at < 5 + len {
                break;
            }
            let mut open_one = || {
                if key.is_none() {
                    key = Some(self.rx.key()?);
                }
                let (k, iv) = key.as_ref().expect("just made");
                let nonce = self.rx.next_nonce(iv)?;
                let body = &mut buf[at + 5..at + 5 + len];
                let inner = k
                    .open_in_place(nonce, Aad::from(header), body)
                    .map_err(|_| invalid("a record that does not decrypt"))?;
                // The content type is the last byte that is not padding.
                let end = inner
                    .iter()
                    .rposition(|&b| b != 0)
                    .ok_or_else(|| invalid("a record with no content type"))?;
                match inner[end] {
                    APPLICATION_DATA => plain.extend_from_slice(&inner[..end]),
                    ALERT if inner[..end] == [1, 0] || inner[..end] == [2, 0] => *closed = true,
                    ALERT => return Err(invalid("the client sent an alert")),
                    HANDSHAKE => {
                        if self.on_handshake(&inner[..end])? {
                            key = None; // the client's next records use its next key
                        }
                    }
                    _ => return Err(invalid("a record of an unexpected content type")),
                }
                Ok(())
            };
            if let Err(e) = open_one() {
                return (at, Err(e));
            }
            at += 5 + len;
        }
        (at, Ok(()))
    }

    /// A handshake message after the handshake: only KeyUpdate is allowed from a client.
    /// Returns whether the client's key changed.
    fn on_handshake(&mut self, msg: &[u8]) -> io::Result<bool> {
        match msg {
            [KEY_UPDATE, 0, 0, 1, request @ (0 | 1)] => {
                let (seq, secrets) = self
                    .kernel
                    .update_rx_secret()
                    .map_err(|e| invalid(&e.to_string()))?;
                self.rx = Direction { secrets, seq };
                self.owe_update |= *request == 1;
                Ok(true)
            }
            _ => Err(invalid("a handshake message after the handshake")),
        }
    }
}

/// Makes `out` at least `len` long (its length only grows: see `tls::Buffers`).
fn grow(out: &mut Vec<u8>, len: usize) {
    if out.len() < len {
        out.resize(len, 0);
    }
}

/// Seals the `n` plaintext bytes at `rec[5..]` into one record of `content_type` at the
/// start of `rec`. Returns the record's length.
fn seal_record(
    dir: &mut Direction,
    key: &LessSafeKey,
    iv: &[u8; 12],
    content_type: u8,
    n: usize,
    rec: &mut [u8],
) -> io::Result<usize> {
    let len = n + 1 + 16;
    let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
    rec[..5].copy_from_slice(&header);
    rec[5 + n] = content_type;
    let nonce = dir.next_nonce(iv)?;
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(header), &mut rec[5..5 + n + 1])
        .map_err(|_| invalid("sealing failed"))?;
    rec[5 + n + 1..5 + len].copy_from_slice(tag.as_ref());
    Ok(5 + len)
}
