//! io_uring backend (tokio-uring). A gathered write is one SQE; tokio-uring submits all
//! SQEs queued during a runtime tick with one `io_uring_enter`, so a fan-out round that
//! writes to every subscriber costs one system call, not one per socket.

use std::cell::RefCell;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

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

/// A connection: the io_uring stream, and the same socket registered for readiness with
/// the runtime's epoll (tokio-uring runs on tokio), for `read_ready`. Field order is drop
/// order: the registration goes before the stream closes the socket.
pub struct UringConn {
    ready: AsyncFd<RawFd>,
    stream: tokio_uring::net::TcpStream,
}

impl Listener for UringListener {
    type Conn = UringConn;
    async fn accept(&self) -> io::Result<(UringConn, SocketAddr)> {
        let (stream, addr) = self.0.accept().await?;
        stream.set_nodelay(true)?;
        let fd = stream.as_raw_fd();
        // Non-blocking for `read_ready`'s read; io_uring's operations do not mind (they
        // wait for readiness themselves).
        // SAFETY: `fd` is the open socket `stream` owns; the borrow ends with this statement.
        socket2::SockRef::from(&unsafe { BorrowedFd::borrow_raw(fd) }).set_nonblocking(true)?;
        // SAFETY: `fd` stays open for the registration's life: `stream` owns it and is
        // dropped after `ready` (field order of `UringConn`).
        let ready = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok((UringConn { ready, stream }, addr))
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
        let (res, slice) = self.stream.read(buf.slice(start..)).await;
        (res, slice.into_inner())
    }

    async fn read_ready(&self, scratch: &RefCell<Vec<u8>>) -> io::Result<usize> {
        loop {
            let mut ready = self.ready.readable().await?;
            let read = ready.try_io(|fd| {
                let mut buf = scratch.borrow_mut();
                // SAFETY: `fd` is the open socket this connection owns, and `buf` is valid
                // for writes of `buf.len()` bytes for the call.
                let n = unsafe { libc::recv(*fd.get_ref(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match read {
                Ok(res) => return res,
                Err(_would_block) => continue, // readiness cleared; wait again
            }
        }
    }

    async fn writev(&self, bufs: Vec<Span>) -> (io::Result<usize>, Vec<Span>) {
        self.stream.writev(bufs).await
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: the fd is the open socket this connection owns, and `buf` is valid for
        // reads of `buf.len()` bytes for the call.
        let n = unsafe { libc::send(*self.ready.get_ref(), buf.as_ptr().cast(), buf.len(), flags) };
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                e => Err(e),
            },
        }
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = self.stream.shutdown(how);
    }
}
