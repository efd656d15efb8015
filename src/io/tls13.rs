//! TLS 1.3 records made and opened by the relay itself, with the keys rustls negotiated.
//!
//! rustls runs the handshake; once a TLS 1.3 connection is established, this module frames,
//! seals and opens its records (RFC 8446 §5.2) and runs its key updates (§4.6.3, §7.2)
//! itself. The application traffic secrets come from rustls's key log (`LogSecrets`, which
//! keeps them for the handshake running on this thread), checked against the keys rustls
//! hands over. What it buys: an established subscriber holds two traffic secrets, keys and
//! sequence numbers (224 bytes) instead of a whole rustls connection (about 4.5 KiB)
//! or rustls's kernel connection (about 1 KiB), and a frame is copied once, straight into
//! its record, and sealed in place. TLS 1.2 connections stay with rustls (`io::tls`).

use std::cell::RefCell;
use std::io;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use rustls::server::UnbufferedServerConnection;
use rustls::{CipherSuite, ConnectionTrafficSecrets, ProtocolVersion};
use zeroize::Zeroize;

/// Largest plaintext one record carries.
pub const MAX_PLAIN: usize = 16 * 1024;
/// A record's bytes besides its plaintext: header, inner content type, AEAD tag.
pub const OVERHEAD: usize = 5 + 1 + 16;
const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const KEY_UPDATE: u8 = 24;
const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {what}"))
}

/// A traffic secret (up to SHA-384's 48 bytes), zeroed when dropped.
#[derive(Clone)]
struct Secret {
    bytes: [u8; 48],
    len: u8,
}

impl Secret {
    fn new(secret: &[u8]) -> Option<Secret> {
        let mut bytes = [0; 48];
        bytes.get_mut(..secret.len())?.copy_from_slice(secret);
        Some(Secret {
            bytes,
            len: secret.len() as u8,
        })
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

/// The two application traffic secrets of a handshake.
#[derive(Default)]
pub struct Logged {
    client: Option<Secret>,
    server: Option<Secret>,
}

thread_local! {
    /// What the key log got during the rustls call this thread is making: handshakes are
    /// stepped synchronously, so it is the connection's that made that call, which takes
    /// it (`Logged::collect`) before anything else runs on the thread.
    static LOGGED: RefCell<Logged> = RefCell::default();
}

impl Logged {
    /// Moves in what the key log got during the call this thread just made.
    pub fn collect(&mut self) {
        let got = LOGGED.with_borrow_mut(std::mem::take);
        if got.client.is_some() {
            self.client = got.client;
        }
        if got.server.is_some() {
            self.server = got.server;
        }
    }
}

/// rustls's key log, as the relay uses it: the application traffic secrets a handshake
/// derives, kept on this thread for the connection's own records (never written anywhere).
#[derive(Debug)]
pub struct LogSecrets;

impl rustls::KeyLog for LogSecrets {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_SECRET || label == SERVER_SECRET
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        LOGGED.with_borrow_mut(|logged| {
            let slot = match label {
                CLIENT_SECRET => &mut logged.client,
                SERVER_SECRET => &mut logged.server,
                _ => return,
            };
            *slot = Secret::new(secret);
        });
    }
}

/// The cipher suites the relay runs itself, and what their key schedule uses.
#[derive(Clone, Copy)]
enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    fn of(suite: CipherSuite) -> Option<Suite> {
        match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(Suite::Aes128Gcm),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(Suite::Aes256Gcm),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(Suite::Chacha20Poly1305),
            _ => None,
        }
    }

    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Suite::Aes256Gcm => hkdf::HKDF_SHA384,
            Suite::Aes128Gcm | Suite::Chacha20Poly1305 => hkdf::HKDF_SHA256,
        }
    }
}

/// HKDF-Expand-Label(secret, label, "", out.len()) of RFC 8446 §7.1.
fn expand_label(hkdf: hkdf::Algorithm, secret: &[u8], label: &[u8], out: &mut [u8]) {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [(b"tls13 ".len() + label.len()) as u8];
    let info = [&length[..], &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(hkdf, secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("an output far below HKDF's limit");
}

/// One direction's traffic secret, the key and IV expanded from it, and its record
/// sequence number. The AEAD's key schedule is made when records are sealed or opened,
/// not kept.
struct Direction {
    secret: Secret,
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new(suite: Suite, secret: Secret, seq: u64) -> Direction {
        let mut key = [0; 32];
        let key_len = suite.aead().key_len();
        expand_label(suite.hkdf(), secret.as_slice(), b"key", &mut key[..key_len]);
        let mut iv = [0; 12];
        expand_label(suite.hkdf(), secret.as_slice(), b"iv", &mut iv);
        Direction {
            secret,
            key,
            iv,
            seq,
        }
    }

    /// The next generation (§7.2), from sequence number 0.
    fn next(&self, suite: Suite) -> Direction {
        let mut next = self.secret.clone();
        let len = usize::from(next.len);
        expand_label(
            suite.hkdf(),
            self.secret.as_slice(),
            b"traffic upd",
            &mut next.bytes[..len],
        );
        Direction::new(suite, next, 0)
    }

    /// Whether these are the keys rustls negotiated for this direction.
    fn matches(&self, suite: Suite, theirs: &ConnectionTrafficSecrets) -> bool {
        let (key, iv) = match theirs {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
            _ => return false,
        };
        key.as_ref() == &self.key[..suite.aead().key_len()] && iv.as_ref() == self.iv
    }

    fn key(&self, suite: Suite) -> io::Result<LessSafeKey> {
        let key = UnboundKey::new(suite.aead(), &self.key[..suite.aead().key_len()])
            .map_err(|_| invalid("a malformed key"))?;
        Ok(LessSafeKey::new(key))
    }

    /// The next record's nonce (the IV XOR the sequence number, §5.3).
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
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

impl Drop for Direction {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

/// An established TLS 1.3 connection's record layer.
pub struct Records {
    suite: Suite,
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
        tls.protocol_version() == Some(ProtocolVersion::TLSv1_3)
            && tls
                .negotiated_cipher_suite()
                .and_then(|s| Suite::of(s.suite()))
                .is_some()
    }

    /// Takes over an established connection that `can_take_over`, with nothing left to send
    /// (its config allows secret extraction and logs secrets with `LogSecrets`), from the
    /// secrets `logged` during its handshake.
    pub fn take_over(tls: UnbufferedServerConnection, logged: Logged) -> io::Result<Records> {
        let negotiated = tls.negotiated_cipher_suite();
        let suite = negotiated
            .and_then(|s| Suite::of(s.suite()))
            .ok_or_else(|| invalid("a cipher the relay cannot run itself"))?;
        let limit = negotiated
            .and_then(|s| s.tls13())
            .map_or(0, |s| s.common.confidentiality_limit);
        let (Some(client), Some(server)) = (logged.client, logged.server) else {
            return Err(invalid("the handshake logged no traffic secrets"));
        };
        // rustls's kernel connection would run key updates; ours are run here, so it goes.
        let (theirs, _) = tls
            .dangerous_into_kernel_connection()
            .map_err(|e| invalid(&e.to_string()))?;
        let tx = Direction::new(suite, server, theirs.tx.0);
        let rx = Direction::new(suite, client, theirs.rx.0);
        if !tx.matches(suite, &theirs.tx.1) || !rx.matches(suite, &theirs.rx.1) {
            return Err(invalid("the logged secrets are not this connection's"));
        }
        Ok(Records {
            suite,
            tx,
            rx,
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
        let key = self.tx.key(self.suite)?;
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
            written += seal_record(&mut self.tx, &key, APPLICATION_DATA, n, &mut out[start..])?;
            taken += n;
        }
        Ok((taken, written))
    }

    /// Our key update at `out[at..]`: a KeyUpdate message under the current key, then the
    /// next key. Returns where it ends.
    fn update_ours(&mut self, out: &mut Vec<u8>, at: usize) -> io::Result<usize> {
        let key = self.tx.key(self.suite)?;
        grow(out, at + 5 + OVERHEAD);
        out[at + 5..at + 10].copy_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]); // update_not_requested
        let n = at + seal_record(&mut self.tx, &key, HANDSHAKE, 5, &mut out[at..])?;
        self.tx = self.tx.next(self.suite);
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
                    key = Some(self.rx.key(self.suite)?);
                }
                let k = key.as_ref().expect("just made");
                let nonce = self.rx.next_nonce()?;
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
                self.rx = self.rx.next(self.suite);
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
    content_type: u8,
    n: usize,
    rec: &mut [u8],
) -> io::Result<usize> {
    let len = n + 1 + 16;
    let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
    rec[..5].copy_from_slice(&header);
    rec[5 + n] = content_type;
    let nonce = dir.next_nonce()?;
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(header), &mut rec[5..5 + n + 1])
        .map_err(|_| invalid("sealing failed"))?;
    rec[5 + n + 1..5 + len].copy_from_slice(tag.as_ref());
    Ok(5 + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tls::Handshake;

    /// A completed handshake with a rustls client, stepped by hand.
    fn handshake() -> Handshake {
        let (server, client) = crate::io::mem::tls_configs();
        let name = "localhost".try_into().unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut hs = Handshake::new(server).unwrap();
        let (mut to_server, mut to_client, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..10 {
            while c.wants_write() {
                c.write_tls(&mut to_server).unwrap();
            }
            let done = hs
                .step(&mut to_server, &mut to_client, &mut plain, &mut false)
                .unwrap();
            let mut flight = &to_client[..];
            while !flight.is_empty() {
                c.read_tls(&mut flight).unwrap();
                c.process_new_packets().unwrap();
            }
            to_client.clear();
            if done {
                return hs;
            }
        }
        panic!("the handshake did not finish in 10 flights");
    }

    #[test]
    fn an_established_connection_holds_a_few_hundred_bytes_of_tls_state() {
        // What every idle TLS subscriber keeps (docs/benchmarks.md, *TLS, Memory*).
        let size = std::mem::size_of::<Records>();
        println!("Records: {size} B");
        assert!(size <= 256, "{size} B");
    }

    #[test]
    fn the_logged_secrets_are_taken_and_checked_against_the_negotiated_keys() {
        let hs = handshake();
        let nothing_left = LOGGED.with_borrow(|l| l.client.is_none() && l.server.is_none());
        assert!(nothing_left, "no secret stays behind on the thread");
        assert!(Records::can_take_over(&hs.tls));
        assert!(Records::take_over(hs.tls, hs.logged).is_ok());

        let hs = handshake();
        let err = Records::take_over(hs.tls, Logged::default()).err().unwrap();
        assert!(
            err.to_string().contains("logged no traffic secrets"),
            "{err}"
        );

        // Secrets that are not this connection's (here: each direction's the other's).
        let mut hs = handshake();
        let logged = &mut hs.logged;
        std::mem::swap(&mut logged.client, &mut logged.server);
        let err = Records::take_over(hs.tls, hs.logged).err().unwrap();
        assert!(err.to_string().contains("not this connection's"), "{err}");
    }
}
