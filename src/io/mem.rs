//! In-memory connections for tests: a `Conn` pair joined by two bounded byte pipes, and a
//! `Listener` fed through a channel, so TLS and the reactor's drivers run with no socket.
//! A pipe takes at most its capacity, so writes are partial the way a full socket's are.
//! `TlsClient` is the client side of TLS over one of them.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::{mpsc, Mutex, Notify};

use bytes::Bytes;

use super::{write_all, Conn, Listener};
use crate::frame::Span;

/// One direction: bytes written by one end, read by the other.
struct Pipe {
    bytes: RefCell<VecDeque<u8>>,
    capacity: usize,
    closed: Cell<bool>,
    readable: Notify,
    writable: Notify,
}

impl Pipe {
    fn new(capacity: usize) -> Rc<Pipe> {
        Rc::new(Pipe {
            bytes: RefCell::new(VecDeque::new()),
            capacity,
            closed: Cell::new(false),
            readable: Notify::new(),
            writable: Notify::new(),
        })
    }

    fn close(&self) {
        self.closed.set(true);
        self.readable.notify_one();
        self.writable.notify_one();
    }
}

/// One end of an in-memory connection. Dropping it closes both directions.
pub struct MemConn {
    rx: Rc<Pipe>,
    tx: Rc<Pipe>,
}

impl MemConn {
    /// Waits until the peer has written something (or closed), then lets `take` move
    /// bytes out of the pipe; returns how many it took (0: the end).
    async fn receive(&self, mut take: impl FnMut(&mut VecDeque<u8>) -> usize) -> usize {
        loop {
            let n = take(&mut self.rx.bytes.borrow_mut());
            if n > 0 {
                self.rx.writable.notify_one();
                return n;
            }
            if self.rx.closed.get() {
                return 0;
            }
            self.rx.readable.notified().await;
        }
    }
}

/// Two connected ends; each direction holds at most `capacity` unread bytes.
pub fn pair(capacity: usize) -> (MemConn, MemConn) {
    let (a, b) = (Pipe::new(capacity), Pipe::new(capacity));
    (
        MemConn {
            rx: a.clone(),
            tx: b.clone(),
        },
        MemConn { rx: b, tx: a },
    )
}

impl Conn for MemConn {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        let n = self
            .receive(|q| {
                let n = q.len().min(buf.capacity() - buf.len());
                buf.extend(q.drain(..n));
                n
            })
            .await;
        (Ok(n), buf)
    }

    async fn read_ready(&self, scratch: &RefCell<Vec<u8>>) -> io::Result<usize> {
        Ok(self
            .receive(|q| {
                let mut buf = scratch.borrow_mut();
                let n = q.len().min(buf.len());
                for (dst, src) in buf.iter_mut().zip(q.drain(..n)) {
                    *dst = src;
                }
                n
            })
            .await)
    }

    async fn writev(&self, bufs: Vec<Span>) -> (io::Result<usize>, Vec<Span>) {
        loop {
            if self.tx.closed.get() {
                return (Err(io::ErrorKind::BrokenPipe.into()), bufs);
            }
            let written = {
                let mut q = self.tx.bytes.borrow_mut();
                let mut room = self.tx.capacity - q.len();
                let mut n = 0;
                for b in &bufs {
                    let k = b.len().min(room);
                    q.extend(&b[..k]);
                    (n, room) = (n + k, room - k);
                }
                n
            };
            if written > 0 || bufs.iter().all(|b| b.is_empty()) {
                self.tx.readable.notify_one();
                return (Ok(written), bufs);
            }
            self.tx.writable.notified().await;
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        if self.tx.closed.get() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut q = self.tx.bytes.borrow_mut();
        let n = buf.len().min(self.tx.capacity - q.len());
        q.extend(&buf[..n]);
        if n > 0 {
            self.tx.readable.notify_one();
        }
        Ok(n)
    }

    fn shutdown(&self, _how: Shutdown) {
        self.rx.close();
        self.tx.close();
    }
}

impl Drop for MemConn {
    fn drop(&mut self) {
        self.shutdown(Shutdown::Both);
    }
}

/// Accepts the connections sent on its channel.
pub struct MemListener(Mutex<mpsc::UnboundedReceiver<MemConn>>);

pub fn listener() -> (mpsc::UnboundedSender<MemConn>, MemListener) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, MemListener(Mutex::new(rx)))
}

impl Listener for MemListener {
    type Conn = MemConn;
    async fn accept(&self) -> io::Result<(MemConn, SocketAddr)> {
        match self.0.lock().await.recv().await {
            Some(c) => Ok((c, SocketAddr::from(([127, 0, 0, 1], 1)))),
            None => std::future::pending().await, // no more connections: like a quiet port
        }
    }
}

/// The client side of TLS, driven by hand over one end of a pair (as rustls' own
/// tests drive connections).
pub struct TlsClient {
    conn: MemConn,
    tls: RefCell<rustls::ClientConnection>,
    /// Every byte the server sent, for looking at its records.
    pub raw: RefCell<Vec<u8>>,
    /// Sizes of the reads from the connection, taken in turn.
    read_sizes: RefCell<std::iter::Cycle<std::vec::IntoIter<usize>>>,
}

impl TlsClient {
    pub fn new(conn: MemConn, config: Arc<rustls::ClientConfig>) -> TlsClient {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        TlsClient {
            conn,
            tls: RefCell::new(rustls::ClientConnection::new(config, name).unwrap()),
            raw: RefCell::default(),
            read_sizes: RefCell::new(vec![16 * 1024].into_iter().cycle()),
        }
    }

    /// Reads from the connection in pieces of these sizes, in turn.
    pub fn read_in(&self, sizes: Vec<usize>) {
        *self.read_sizes.borrow_mut() = sizes.into_iter().cycle();
    }

    pub fn handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        self.tls.borrow().handshake_kind()
    }

    pub fn negotiated_cipher_suite(&self) -> Option<rustls::CipherSuite> {
        self.tls
            .borrow()
            .negotiated_cipher_suite()
            .map(|s| s.suite())
    }

    pub fn peer_certificate(&self) -> Vec<u8> {
        self.tls.borrow().peer_certificates().unwrap()[0].to_vec()
    }

    /// The (content type, length) of each record received so far.
    pub fn records(&self) -> Vec<(u8, usize)> {
        let raw = self.raw.borrow();
        let mut at = 0;
        let mut out = Vec::new();
        while at + 5 <= raw.len() {
            let len = usize::from(u16::from_be_bytes([raw[at + 3], raw[at + 4]]));
            out.push((raw[at], len));
            at += 5 + len;
        }
        out
    }

    pub async fn write(&self, plain: &[u8]) {
        let out = self.seal(plain);
        if !out.is_empty() {
            write_all(&self.conn, Bytes::from(out)).await.unwrap();
        }
    }

    /// The records `plain` is sealed into (after anything rustls had queued), not sent.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut tls = self.tls.borrow_mut();
        tls.writer().write_all(plain).unwrap();
        let mut out = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Sends a KeyUpdate asking the server to update its key too.
    pub async fn refresh_traffic_keys(&self) {
        self.tls.borrow_mut().refresh_traffic_keys().unwrap();
        self.flush().await;
    }

    pub fn conn(&self) -> &MemConn {
        &self.conn
    }

    pub async fn close_notify(&self) {
        self.tls.borrow_mut().send_close_notify();
        self.flush().await;
    }

    /// Sends whatever rustls has queued.
    async fn flush(&self) {
        self.write(b"").await;
    }

    /// Takes in what the server sent; false at EOF.
    async fn receive(&self) -> bool {
        let size = self.read_sizes.borrow_mut().next().unwrap();
        let (n, cipher) = self.conn.read(Vec::with_capacity(size)).await;
        if n.unwrap() == 0 {
            return false;
        }
        self.raw.borrow_mut().extend_from_slice(&cipher);
        let mut tls = self.tls.borrow_mut();
        // read_tls may take part of what it is given.
        let mut rest = &cipher[..];
        while !rest.is_empty() {
            tls.read_tls(&mut rest).unwrap();
            tls.process_new_packets().unwrap();
        }
        true
    }

    pub async fn handshake(&self) {
        loop {
            self.flush().await;
            if !self.tls.borrow().is_handshaking() {
                return;
            }
            assert!(self.receive().await, "EOF during the handshake");
        }
    }

    /// Plaintext until `n` bytes or EOF.
    pub async fn read_plain(&self, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let mut chunk = vec![0; 64 * 1024];
            match self.tls.borrow_mut().reader().read(&mut chunk) {
                Ok(k) => got.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if got.len() < n && !self.receive().await {
                break;
            }
        }
        got
    }
}

/// A self-signed server config and a client config trusting it.
pub fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("cert.pem");
    let (cert, _) = super::certs::self_signed(&pem).unwrap();
    let server = super::certs::ServerTls::new(cert, false).unwrap();
    (
        server.config,
        super::certs::client_config_trusting(&pem).unwrap(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pipe_takes_part_of_a_write_and_the_rest_once_read() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let (a, b) = pair(5);
            let spans = vec![
                Span::from(Bytes::from_static(b"abc")),
                Span::from(Bytes::from_static(b"defg")),
            ];
            let (n, _) = a.writev(spans).await;
            assert_eq!(n.unwrap(), 5);
            let (n, got) = b.read(Vec::with_capacity(64)).await;
            assert_eq!((n.unwrap(), &got[..]), (5, &b"abcde"[..]));
            drop(a);
            let (n, _) = b.read(Vec::with_capacity(64)).await;
            assert_eq!(n.unwrap(), 0, "the peer's drop reads as EOF");
            let (res, _) = b.writev(vec![Span::from(Bytes::from_static(b"x"))]).await;
            assert_eq!(res.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        });
    }
}
