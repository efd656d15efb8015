//! io_uring backend (tokio-uring). A gathered write is one SQE; tokio-uring submits all
//! SQEs queued during a runtime tick with one `io_uring_enter`, so a fan-out round that
//! writes to every subscriber costs one system call, not one per socket.

use std::io;
use std::net::{Shutdown, SocketAddr};

use super::{Conn, Listener};
use crate::frame::Span;

// SAFETY: a span's bytes live in a buffer it holds a reference to (see `Span`'s `Deref`),
// which does not move or change while the span exists, including while it is owned by an
// in-flight operation; `bytes_init == bytes_total` because the bytes are all initialized.
unsafe impl tokio_uring::buf::IoBuf for Span {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.len()
    }

    fn bytes_total(&self) -> usize {
        self.len()
    }
}

pub struct UringListener(tokio_uring::net::TcpListener);

impl UringListener {
    pub fn new(l: std::net::TcpListener) -> Self {
        UringListener(tokio_uring::net::TcpListener::from_std(l))
    }
}

pub struct UringConn(tokio_uring::net::TcpStream);

impl Listener for UringListener {
    type Conn = UringConn;
    async fn accept(&self) -> io::Result<(UringConn, SocketAddr)> {
        let (s, addr) = self.0.accept().await?;
        s.set_nodelay(true)?;
        Ok((UringConn(s), addr))
    }
}

impl Conn for UringConn {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        use tokio_uring::buf::BoundedBuf;
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        // Read into the spare capacity after the bytes already held.
        let start = buf.len();
        let (res, slice) = self.0.read(buf.slice(start..)).await;
        (res, slice.into_inner())
    }

    async fn writev(&self, bufs: Vec<Span>) -> (io::Result<usize>, Vec<Span>) {
        self.0.writev(bufs).await
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = self.0.shutdown(how);
    }
}
