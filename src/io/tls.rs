//! TLS for port 7701, over any `Conn`, so it works the same on both backends. The reactor
//! owns the socket; rustls's unbuffered (sans-IO, caller-buffered) server connection runs
//! the handshake. Once a TLS 1.3 handshake is done, the records are the relay's own over
//! the keys rustls negotiated (`io::tls13`); TLS 1.2 stays with rustls. Either way an idle
//! TLS subscriber holds its session keys and state, and no buffer. The certificates and
//! configs come from `io::certs`.
//!
//! Writing: a gathered write's frames (shared, as for plaintext) are sealed, up to
//! `WRITE_MAX`, into as few records as the 16 KiB record limit allows, in the reactor's
//! ciphertext buffer, reused by every subscriber of the reactor, so a write allocates
//! nothing. The records go out with one write that does not wait; only what the socket did
//! not take is copied into a buffer of the connection's own, written before the call
//! returns (a backed-up socket).
//!
//! Reading: ciphertext lands in the reactor's shared read buffer and is decrypted there;
//! only an incomplete record is kept (copied) by the connection until the rest arrives.
//! TLS messages the read side produces (rustls's answer to a key update, an alert) are
//! queued on the connection and go out first with the writer's next write, so records are
//! only ever written by one task, in order.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
};

use super::tls13::{Logged, Records};
use super::{write_all, Conn};
use crate::frame::Span;

/// Plaintext sealed per gathered write (16 full records). Large writes are what keep the
/// kernel's per-packet costs as low as plaintext's (measured: 64 KiB wrote ~125 frames a
/// call against plaintext's ~340, and cost 25% more CPU per delivery); it bounds the
/// reactor's buffers and what a backed-up subscriber's connection holds.
pub const WRITE_MAX: usize = 256 * 1024;

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A reactor's TLS buffers, shared by its connections; borrowed only between awaits.
#[derive(Default)]
pub struct Buffers {
    plain: RefCell<Vec<u8>>,
    /// Its length only grows: the space rustls seals into is initialized once.
    cipher: RefCell<Vec<u8>>,
}

/// Where rustls writes: the free space of `buf` after `used`, grown (never shrunk) when
/// rustls says it needs more.
struct Out<'a> {
    buf: &'a mut Vec<u8>,
    used: usize,
}

impl Out<'_> {
    /// Runs `f` on the free space until it fits; `f` returns the bytes it wrote, or the
    /// space it needs (`Err(Some)`), or that it cannot (`Err(None)`).
    fn put(
        &mut self,
        mut f: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
    ) -> io::Result<()> {
        loop {
            match f(&mut self.buf[self.used..]) {
                Ok(n) => {
                    self.used += n;
                    return Ok(());
                }
                Err(Some(required)) => {
                    let need = self.used + required;
                    if self.buf.len() >= need {
                        return Err(io::Error::other("TLS: rustls asked for space it had"));
                    }
                    self.buf.resize(need, 0);
                }
                Err(None) => {
                    return Err(io::Error::other("TLS: the connection's keys are exhausted"))
                }
            }
        }
    }

    fn encode(
        &mut self,
        s: &mut EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    ) -> io::Result<()> {
        self.put(|b| match s.encode(b) {
            Ok(n) => Ok(n),
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                Err(Some(required_size))
            }
            Err(_) => Err(None),
        })
    }
}

fn sized(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        _ => None,
    }
}

/// What rustls needs next, once the records at hand are processed.
enum Next {
    /// More bytes from the peer (or the handshake is still going).
    Read,
    /// Nothing: the connection can carry application data.
    Ready,
}

/// Processes the complete records at the start of `buf`: plaintext is appended to `plain`,
/// records to send (handshake flights, answers) to `out`, and the peer's close_notify sets
/// `closed`. Returns how many bytes of `buf` were consumed, and what rustls needs next.
fn step(
    tls: &mut UnbufferedServerConnection,
    buf: &mut [u8],
    plain: &mut Vec<u8>,
    out: &mut Out<'_>,
    closed: &mut bool,
) -> (usize, io::Result<Next>) {
    let mut at = 0;
    loop {
        let status = tls.process_tls_records(&mut buf[at..]);
        let mut discard = status.discard;
        let next = match status.state {
            Err(e) => Some(Err(tls_err(e))),
            Ok(ConnectionState::ReadTraffic(mut r)) => loop {
                match r.next_record() {
                    Some(Ok(record)) => {
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    Some(Err(e)) => break Some(Err(tls_err(e))),
                    None => break None,
                }
            },
            Ok(ConnectionState::EncodeTlsData(mut s)) => out.encode(&mut s).err().map(Err),
            // Sent by the caller with whatever else `out` gathers, before it waits.
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                None
            }
            Ok(ConnectionState::PeerClosed) => {
                *closed = true;
                None
            }
            Ok(ConnectionState::Closed) => {
                *closed = true;
                Some(Ok(Next::Ready))
            }
            Ok(ConnectionState::WriteTraffic(_)) => Some(Ok(Next::Ready)),
            Ok(ConnectionState::BlockedHandshake) => Some(Ok(Next::Read)),
            Ok(_) => Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS: early data is not accepted",
            ))),
        };
        at += discard;
        if let Some(next) = next {
            return (at, next);
        }
    }
}

/// A server handshake under way: rustls's connection, and the traffic secrets it logged
/// (which the relay's own records start from, `io::tls13`).
pub struct Handshake {
    pub tls: UnbufferedServerConnection,
    pub(crate) logged: Logged,
}

impl Handshake {
    pub fn new(config: Arc<rustls::ServerConfig>) -> io::Result<Handshake> {
        Ok(Handshake {
            tls: UnbufferedServerConnection::new(config).map_err(tls_err)?,
            logged: Logged::default(),
        })
    }

    /// Feeds the handshake the records at the start of `incoming` (consumed from it): what
    /// to send is appended to `outgoing` (on a failure, the alert saying why), plaintext
    /// that came with the client's last flight to `plain`. Returns whether it is done.
    pub fn step(
        &mut self,
        incoming: &mut Vec<u8>,
        outgoing: &mut Vec<u8>,
        plain: &mut Vec<u8>,
        closed: &mut bool,
    ) -> io::Result<bool> {
        let tls = &mut self.tls;
        let mut out = Out {
            used: outgoing.len(),
            buf: outgoing,
        };
        let (consumed, next) = step(tls, incoming, plain, &mut out, closed);
        // Nothing else has run on this thread since rustls logged them.
        self.logged.collect();
        incoming.drain(..consumed);
        if next.is_err() {
            alert(tls, &mut out);
        }
        let used = out.used;
        outgoing.truncate(used);
        Ok(matches!(next?, Next::Ready) && !tls.is_handshaking())
    }
}

/// After a failure: the alert rustls queued saying why.
fn alert(tls: &mut UnbufferedServerConnection, out: &mut Out<'_>) {
    while let Ok(ConnectionState::EncodeTlsData(mut s)) = tls.process_tls_records(&mut []).state {
        if out.encode(&mut s).is_err() {
            return;
        }
    }
}

/// Seals `plain` into records at the end of `out`, after any record rustls has queued
/// (a key update it owes).
fn seal(tls: &mut UnbufferedServerConnection, plain: &[u8], out: &mut Out<'_>) -> io::Result<()> {
    loop {
        match tls.process_tls_records(&mut []).state.map_err(tls_err)? {
            ConnectionState::WriteTraffic(mut w) => {
                return out.put(|b| w.encrypt(plain, b).map_err(sized));
            }
            ConnectionState::EncodeTlsData(mut s) => out.encode(&mut s)?,
            ConnectionState::TransmitTlsData(t) => t.done(),
            // The reader's to report; writing may go on.
            ConnectionState::PeerClosed => {}
            _ => return Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

/// A connection's TLS state: rustls's connection (for the handshake, and for TLS 1.2 for
/// the connection's life) or, once a TLS 1.3 handshake is done, the relay's own record
/// layer over the keys rustls negotiated (`io::tls13`).
pub enum Session {
    Rustls(Box<UnbufferedServerConnection>),
    Own(Box<Records>),
}

impl Session {
    /// What an established connection runs on: its records taken over when it can.
    pub fn established(hs: Handshake) -> io::Result<Session> {
        Ok(if Records::can_take_over(&hs.tls) {
            Session::Own(Box::new(Records::take_over(hs.tls, hs.logged)?))
        } else {
            Session::Rustls(Box::new(hs.tls))
        })
    }
}

pub struct TlsConn<C> {
    inner: C,
    tls: RefCell<Session>,
    buffers: Rc<Buffers>,
    /// The start of a record whose end has not arrived (empty and unallocated otherwise).
    partial: RefCell<Vec<u8>>,
    /// Plaintext decrypted and not yet read (the request that came with the handshake's
    /// last flight, or more than a read could take).
    plain: RefCell<Vec<u8>>,
    /// Records the read side produced, for the writer to send before its next ones.
    queued: RefCell<Vec<u8>>,
    /// The peer's close_notify arrived.
    closed: Cell<bool>,
    /// The handshake resumed a session (with a ticket).
    resumed: bool,
}

impl<C: Conn> TlsConn<C> {
    /// Runs the TLS handshake to completion (the caller bounds it in time).
    pub async fn accept(
        inner: C,
        config: Arc<rustls::ServerConfig>,
        buffers: Rc<Buffers>,
    ) -> io::Result<TlsConn<C>> {
        let mut hs = Handshake::new(config)?;
        let (mut incoming, mut outgoing) = (Vec::with_capacity(4096), Vec::new());
        let (mut plain, mut closed) = (Vec::new(), false);
        loop {
            let done = hs.step(&mut incoming, &mut outgoing, &mut plain, &mut closed);
            if !outgoing.is_empty() {
                write_all(&inner, Bytes::from(std::mem::take(&mut outgoing))).await?;
            }
            if done? {
                break;
            }
            let (res, buf) = inner.read(incoming).await;
            incoming = buf;
            if res? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let resumed = hs.tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        Ok(TlsConn {
            inner,
            resumed,
            tls: RefCell::new(Session::established(hs)?),
            buffers,
            partial: RefCell::new(incoming.as_slice().to_vec()),
            plain: RefCell::new(plain),
            queued: RefCell::new(Vec::new()),
            closed: Cell::new(closed),
        })
    }

    /// Whether the handshake resumed a session with a ticket.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Decrypts what `fresh` completes (after the connection's partial record, if any).
    fn absorb(&self, fresh: &mut [u8]) -> io::Result<()> {
        let (mut session, mut partial) = (self.tls.borrow_mut(), self.partial.borrow_mut());
        let (mut plain, mut queued) = (self.plain.borrow_mut(), self.queued.borrow_mut());
        let mut closed = self.closed.get();
        let mut out = Out {
            used: queued.len(),
            buf: &mut queued,
        };
        let mut process = |buf: &mut [u8]| match &mut *session {
            Session::Rustls(tls) => {
                let (consumed, next) = step(tls, buf, &mut plain, &mut out, &mut closed);
                (consumed, next.map(drop))
            }
            Session::Own(records) => records.open(buf, &mut plain, &mut closed),
        };
        let res = if partial.is_empty() {
            let (consumed, res) = process(fresh);
            if consumed < fresh.len() {
                *partial = fresh[consumed..].to_vec();
            }
            res
        } else {
            partial.extend_from_slice(fresh);
            let (consumed, res) = process(&mut partial);
            partial.drain(..consumed);
            if partial.is_empty() {
                *partial = Vec::new(); // an idle connection keeps no buffer
            }
            res
        };
        let used = out.used;
        queued.truncate(used);
        self.closed.set(closed);
        res
    }

    /// Waits until there is plaintext to read, or the end (false).
    async fn fill(&self, scratch: &RefCell<Vec<u8>>) -> io::Result<bool> {
        while self.plain.borrow().is_empty() {
            if self.closed.get() {
                return Ok(false);
            }
            let n = self.inner.read_ready(scratch).await?;
            if n == 0 {
                return Ok(false);
            }
            self.absorb(&mut scratch.borrow_mut()[..n])?;
        }
        Ok(true)
    }

    /// Moves up to `room` bytes of decrypted plaintext out through `take`.
    fn take_plain(&self, room: usize, take: impl FnOnce(&[u8])) -> usize {
        let mut plain = self.plain.borrow_mut();
        let n = plain.len().min(room);
        take(&plain[..n]);
        plain.drain(..n);
        if plain.is_empty() {
            *plain = Vec::new();
        }
        n
    }

    /// Seals up to `WRITE_MAX` bytes of `bufs` (after anything the read side queued) and
    /// writes them without waiting. Returns the plaintext bytes taken, and the ciphertext
    /// the socket did not take (copied out of the reactor's buffer).
    fn seal_and_send(&self, bufs: &[Span]) -> io::Result<(usize, Option<Vec<u8>>)> {
        let queued = std::mem::take(&mut *self.queued.borrow_mut());
        let (taken, len) = self
            .buffers
            .seal(&mut self.tls.borrow_mut(), &queued, bufs)?;
        let sealed = self.buffers.sealed(len);
        let sent = self.inner.try_write(&sealed)?;
        Ok((taken, (sent < len).then(|| sealed[sent..].to_vec())))
    }
}

impl Buffers {
    /// Seals up to `WRITE_MAX` bytes of `bufs` for `tls` into the ciphertext buffer, after
    /// `queued` (records already made). Returns the plaintext bytes taken and the length of
    /// the ciphertext. No I/O: the instruction-count gate measures it.
    pub fn seal(
        &self,
        session: &mut Session,
        queued: &[u8],
        bufs: &[Span],
    ) -> io::Result<(usize, usize)> {
        let mut cipher = self.cipher.borrow_mut();
        let mut out = Out {
            buf: &mut cipher,
            used: 0,
        };
        if !queued.is_empty() {
            out.put(|b| match b.get_mut(..queued.len()) {
                Some(b) => {
                    b.copy_from_slice(queued);
                    Ok(queued.len())
                }
                None => Err(Some(queued.len())),
            })?;
        }
        let tls = match session {
            // Frames go straight into their records.
            Session::Own(records) => {
                let plain = bufs.iter().map(|b| &b[..]);
                let at = out.used;
                return records.seal(plain, WRITE_MAX, out.buf, at);
            }
            Session::Rustls(tls) => tls,
        };
        let mut staged = self.plain.borrow_mut();
        // One run (the common case: consecutive frames of one chunk) needs no gathering.
        let plain: &[u8] = if bufs.len() == 1 || bufs[0].len() >= WRITE_MAX {
            &bufs[0][..bufs[0].len().min(WRITE_MAX)]
        } else {
            staged.clear();
            for b in bufs {
                let k = b.len().min(WRITE_MAX - staged.len());
                staged.extend_from_slice(&b[..k]);
                if staged.len() == WRITE_MAX {
                    break;
                }
            }
            &staged
        };
        seal(tls, plain, &mut out)?;
        Ok((plain.len(), out.used))
    }

    /// The ciphertext `seal` made.
    pub fn sealed(&self, len: usize) -> std::cell::Ref<'_, [u8]> {
        std::cell::Ref::map(self.cipher.borrow(), |c| &c[..len])
    }
}

impl<C: Conn> Conn for TlsConn<C> {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if self.plain.borrow().is_empty() {
            let scratch = RefCell::new(vec![0; 17 * 1024]);
            match self.fill(&scratch).await {
                Ok(true) => {}
                Ok(false) => return (Ok(0), buf),
                Err(e) => return (Err(e), buf),
            }
        }
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        let room = buf.capacity() - buf.len();
        let n = self.take_plain(room, |p| buf.extend_from_slice(p));
        (Ok(n), buf)
    }

    async fn read_ready(&self, scratch: &RefCell<Vec<u8>>) -> io::Result<usize> {
        // Not through `fill`: a subscriber's reader waits here for its whole life, and each
        // nested future would be part of its task.
        loop {
            if !self.plain.borrow().is_empty() {
                let mut buf = scratch.borrow_mut();
                let room = buf.len();
                return Ok(self.take_plain(room, |p| buf[..p.len()].copy_from_slice(p)));
            }
            if self.closed.get() {
                return Ok(0);
            }
            let n = self.inner.read_ready(scratch).await?;
            if n == 0 {
                return Ok(0);
            }
            self.absorb(&mut scratch.borrow_mut()[..n])?;
        }
    }

    async fn writev(&self, bufs: Vec<Span>) -> (io::Result<usize>, Vec<Span>) {
        let (taken, rest) = match self.seal_and_send(&bufs) {
            Ok(x) => x,
            Err(e) => return (Err(e), bufs),
        };
        // A backed-up socket: the rest goes out before the next records are made. Boxed:
        // the writer task holds this future for its life, and this path is rare.
        if let Some(rest) = rest {
            if let Err(e) = Box::pin(write_all(&self.inner, Bytes::from(rest))).await {
                return (Err(e), bufs);
            }
        }
        (Ok(taken), bufs)
    }

    fn shutdown(&self, how: Shutdown) {
        self.inner.shutdown(how);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::certs::{self, ServerTls};
    use crate::io::mem::{self, MemConn, TlsClient};

    /// Runs a test on a single-threaded runtime, failing it if it takes over 20 s.
    fn run(test: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let deadline =
            async { tokio::time::timeout(std::time::Duration::from_secs(20), test).await };
        tokio::task::LocalSet::new()
            .block_on(&rt, deadline)
            .expect("the test finishes within 20 s");
    }

    /// A handshake over a pipe holding at most `capacity` bytes each way.
    async fn connect(
        server: &Arc<rustls::ServerConfig>,
        client: &Arc<rustls::ClientConfig>,
        capacity: usize,
    ) -> (TlsClient, io::Result<TlsConn<MemConn>>) {
        let (c, s) = mem::pair(capacity);
        let client = TlsClient::new(c, client.clone());
        let accept = tokio::task::spawn_local(TlsConn::accept(s, server.clone(), Rc::default()));
        client.handshake().await;
        (client, accept.await.unwrap())
    }

    /// Writes `spans` through `server` the way the reactor's writer does: partial writes
    /// keep the rest for the next call.
    async fn write_spans(server: &TlsConn<MemConn>, mut spans: Vec<Span>) -> usize {
        let mut calls = 0;
        while !spans.is_empty() {
            let (n, mut left) = server.writev(spans).await;
            super::super::advance(&mut left, n.unwrap());
            spans = left;
            calls += 1;
        }
        calls
    }

    /// 1,000 frames of 1 to 600 bytes, each its own span, through 1,000-byte partial writes,
    /// read by a client in pieces of `read_sizes`: they arrive whole and in order, sealed
    /// into full records, not one record per frame.
    fn thousand_frames_through_partial_writes(read_sizes: Vec<usize>) {
        run(async {
            let (server_config, client_config) = mem::tls_configs();
            let (client, server) = connect(&server_config, &client_config, 1000).await;
            let server = Rc::new(server.unwrap());
            assert!(
                matches!(*server.tls.borrow(), Session::Own(_)),
                "TLS 1.3: the relay's records"
            );
            client.read_in(read_sizes);
            let frames: Vec<Vec<u8>> = (0..1000u32)
                .map(|i| vec![b'a' + (i % 26) as u8; 1 + (i as usize * 7919) % 600])
                .collect();
            let expected = frames.concat();
            let spans = frames
                .into_iter()
                .map(|f| Span::from(Bytes::from(f)))
                .collect();
            let writer = tokio::task::spawn_local({
                let server = server.clone();
                async move { write_spans(&server, spans).await }
            });
            assert_eq!(client.read_plain(expected.len()).await, expected);
            let calls = writer.await.unwrap();
            assert_eq!(
                calls,
                expected.len().div_ceil(WRITE_MAX),
                "one call per 64 KiB"
            );
            // Application-data records (TLS 1.3 seals the tickets as such too).
            let sealed: Vec<usize> = client
                .records()
                .into_iter()
                .filter(|&(kind, _)| kind == 23)
                .map(|(_, len)| len)
                .collect();
            let full = sealed.iter().filter(|&&len| len == 16 * 1024 + 17).count();
            assert!(
                sealed.len() <= expected.len().div_ceil(16 * 1024) + calls + 2
                    && full >= expected.len() / (16 * 1024) - calls,
                "{} bytes in records of {sealed:?}",
                expected.len()
            );

            // And the other way, then the client's close_notify reads as the end.
            client.write(b"ping").await;
            let (n, got) = server.read(Vec::with_capacity(64)).await;
            assert_eq!((n.unwrap(), &got[..]), (4, &b"ping"[..]));
            client.close_notify().await;
            let (n, _) = server.read(Vec::with_capacity(64)).await;
            assert_eq!(n.unwrap(), 0);
        });
    }

    #[test]
    fn frames_are_sealed_into_full_records_and_survive_partial_writes() {
        thousand_frames_through_partial_writes(vec![16 * 1024]);
    }

    #[test]
    fn a_client_reading_in_pieces_of_any_size_gets_the_same_bytes() {
        thousand_frames_through_partial_writes(vec![1, 7, 100, 999, 5000, 17 * 1024, 3]);
    }

    #[test]
    fn a_record_split_across_reads_is_kept_until_whole_then_nothing_is_held() {
        run(async {
            let (server_config, client_config) = mem::tls_configs();
            let (client, server) = connect(&server_config, &client_config, 64 * 1024).await;
            let server = Rc::new(server.unwrap());
            let reader = tokio::task::spawn_local({
                let server = server.clone();
                async move {
                    let scratch = RefCell::new(vec![0; 17 * 1024]);
                    let n = server.read_ready(&scratch).await.unwrap();
                    let got = scratch.borrow()[..n].to_vec();
                    got
                }
            });
            let record = client.seal(b"half and half");
            write_all(client.conn(), Bytes::copy_from_slice(&record[..9]))
                .await
                .unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                server.partial.borrow().len(),
                9,
                "the start, waiting for the rest"
            );
            write_all(client.conn(), Bytes::copy_from_slice(&record[9..]))
                .await
                .unwrap();
            assert_eq!(reader.await.unwrap(), b"half and half");
            for cell in [&server.partial, &server.plain, &server.queued] {
                assert_eq!(
                    cell.borrow().capacity(),
                    0,
                    "an idle connection holds no buffer"
                );
            }
        });
    }

    /// A client trusting `pem`, limited to these protocol versions and cipher suites.
    fn client_with(
        pem: &std::path::Path,
        versions: &[&'static rustls::SupportedProtocolVersion],
        suites: Option<Vec<rustls::SupportedCipherSuite>>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &std::fs::read(pem).unwrap()[..]) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(suites) = suites {
            provider.cipher_suites = suites;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }

    #[test]
    fn key_updates_either_way_keep_the_stream_whole_in_every_suite() {
        use rustls::crypto::ring::cipher_suite as cs;
        run(async {
            let dir = tempfile::tempdir().unwrap();
            let pem = dir.path().join("cert.pem");
            let server_config = ServerTls::new(certs::self_signed(&pem).unwrap().0, false)
                .unwrap()
                .config;
            for suite in [
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_AES_128_GCM_SHA256,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
            ] {
                let client_config =
                    client_with(&pem, &[&rustls::version::TLS13], Some(vec![suite]));
                let (client, server) = connect(&server_config, &client_config, 64 * 1024).await;
                let server = Rc::new(server.unwrap());
                assert_eq!(client.negotiated_cipher_suite(), Some(suite.suite()));
                // Our side updates its key before every write (a tiny confidentiality limit).
                match &mut *server.tls.borrow_mut() {
                    Session::Own(records) => records.limit = 3,
                    Session::Rustls(_) => panic!("{suite:?}: the relay's own records"),
                }
                let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
                for round in 0..3 {
                    // The client asks for an update of both keys, then writes under its new one.
                    client.refresh_traffic_keys().await;
                    client.write(format!("ping {round}").as_bytes()).await;
                    let (n, got) = server.read(Vec::with_capacity(64)).await;
                    assert_eq!(&got[..n.unwrap()], format!("ping {round}").as_bytes());
                    let span = Span::from(Bytes::from(payload.clone()));
                    let (_, got) = tokio::join!(
                        write_spans(&server, vec![span]),
                        client.read_plain(payload.len())
                    );
                    assert_eq!(got, payload, "{suite:?}, round {round}");
                }
            }
        });
    }

    #[test]
    fn records_that_do_not_decrypt_or_break_the_rules_end_the_connection() {
        run(async {
            let (server_config, client_config) = mem::tls_configs();
            for (what, at, flip) in [
                ("a flipped bit", 9, 0x40),
                ("a wrong record type", 0, 0x40),
                ("a length over 16 KiB + 256", 3, 0xff),
            ] {
                let (client, server) = connect(&server_config, &client_config, 64 * 1024).await;
                let server = server.unwrap();
                let mut record = client.seal(b"hello");
                record[at] ^= flip;
                write_all(client.conn(), Bytes::from(record)).await.unwrap();
                let scratch = RefCell::new(vec![0; 17 * 1024]);
                let err = server.read_ready(&scratch).await.expect_err(what);
                assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
            }
        });
    }

    #[test]
    fn sessions_resume_with_a_ticket_until_its_key_has_rotated_out() {
        run(async {
            let dir = tempfile::tempdir().unwrap();
            let pem = dir.path().join("cert.pem");
            let tls = ServerTls::new(certs::self_signed(&pem).unwrap().0, false).unwrap();
            let client_config = certs::client_config_trusting(&pem).unwrap();

            let (first, server) = connect(&tls.config, &client_config, 64 * 1024).await;
            assert_eq!(first.handshake_kind(), Some(rustls::HandshakeKind::Full));
            // Reading brings the client the tickets sent after the handshake.
            write_all(&server.unwrap(), Bytes::from_static(b"hi"))
                .await
                .unwrap();
            assert_eq!(first.read_plain(2).await, b"hi");

            tls.tickets.rotate(); // the ticket's key is now the previous one: still opens
            let (second, server) = connect(&tls.config, &client_config, 64 * 1024).await;
            assert_eq!(
                second.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed)
            );
            server.unwrap();

            tls.tickets.rotate(); // and now gone
            let (third, server) = connect(&tls.config, &client_config, 64 * 1024).await;
            assert_eq!(third.handshake_kind(), Some(rustls::HandshakeKind::Full));
            server.unwrap();
        });
    }

    #[test]
    fn tls12_clients_work_unless_the_relay_takes_tls13_only() {
        run(async {
            let dir = tempfile::tempdir().unwrap();
            let pem = dir.path().join("cert.pem");
            let (cert, _) = certs::self_signed(&pem).unwrap();
            let tls12 = client_with(&pem, &[&rustls::version::TLS12], None);
            let both = ServerTls::new(cert.clone(), false).unwrap();
            let (client, server) = connect(&both.config, &tls12, 1000).await;
            let server = server.unwrap();
            assert!(
                matches!(*server.tls.borrow(), Session::Rustls(_)),
                "TLS 1.2 stays with rustls"
            );
            let payload = vec![b'z'; 50_000];
            let span = Span::from(Bytes::from(payload.clone()));
            let (_, got) = tokio::join!(
                write_spans(&server, vec![span]),
                client.read_plain(payload.len())
            );
            assert_eq!(got, payload);

            let only13 = ServerTls::new(cert, true).unwrap();
            let (c, s) = mem::pair(64 * 1024);
            let client = TlsClient::new(c, tls12);
            let accept = TlsConn::accept(s, only13.config.clone(), Rc::default());
            let (refused, ()) = tokio::join!(accept, async {
                client.write(b"").await;
            });
            assert_eq!(refused.err().unwrap().kind(), io::ErrorKind::InvalidData);
        });
    }

    #[test]
    fn a_new_certificate_serves_new_handshakes_and_established_streams_keep_flowing() {
        run(async {
            let dir = tempfile::tempdir().unwrap();
            let (old_pem, new_pem) = (dir.path().join("old.pem"), dir.path().join("new.pem"));
            let tls = ServerTls::new(certs::self_signed(&old_pem).unwrap().0, false).unwrap();
            let (new_cert, _) = certs::self_signed(&new_pem).unwrap();
            let both = dir.path().join("both.pem");
            let pems = [
                std::fs::read(&old_pem).unwrap(),
                std::fs::read(&new_pem).unwrap(),
            ];
            std::fs::write(&both, pems.concat()).unwrap();
            let client_config = certs::client_config_trusting(&both).unwrap();

            let (old_client, old_server) = connect(&tls.config, &client_config, 64 * 1024).await;
            let old_server = old_server.unwrap();
            tls.set_certificate(new_cert);
            let (new_client, new_server) = connect(&tls.config, &client_config, 64 * 1024).await;
            new_server.unwrap();
            let der = |pem: &std::path::Path| {
                let pem = std::fs::read(pem).unwrap();
                let first = rustls_pemfile::certs(&mut &pem[..]).next();
                first.unwrap().unwrap().to_vec()
            };
            assert_eq!(old_client.peer_certificate(), der(&old_pem));
            assert_eq!(new_client.peer_certificate(), der(&new_pem));
            write_all(&old_server, Bytes::from_static(b"still here"))
                .await
                .unwrap();
            assert_eq!(old_client.read_plain(10).await, b"still here");
        });
    }

    #[test]
    fn a_client_that_is_not_speaking_tls_fails_the_handshake_with_an_alert() {
        run(async {
            let (server_config, _) = mem::tls_configs();
            let (c, s) = mem::pair(64 * 1024);
            let accept = tokio::task::spawn_local(TlsConn::accept(s, server_config, Rc::default()));
            write_all(&c, Bytes::from_static(b"GET /events HTTP/1.1\r\n\r\n"))
                .await
                .unwrap();
            let err = accept.await.unwrap().err().expect("a failed handshake");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            let (n, alert) = c.read(Vec::with_capacity(64)).await;
            assert!(
                n.unwrap() > 0 && alert[0] == 0x15,
                "a TLS alert record: {alert:?}"
            );
        });
    }
}
