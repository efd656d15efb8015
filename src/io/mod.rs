//! The I/O seam: the only code that differs between the io_uring and the epoll backend.
//!
//! Everything above it (handshake, subscriber queues, fan-out) sees a `Conn` that reads
//! into an owned buffer and writes a vector of shared `Bytes` (owned buffers are what
//! io_uring needs: the kernel holds them while the operation is in flight). Both backends
//! run one single-threaded runtime per reactor thread with `tokio::task::spawn_local`, so
//! tasks, timers and `Notify` work the same on either.

pub mod epoll;
pub mod tls;
pub mod uring;

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use bytes::Bytes;

/// Which backend a reactor runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring if the kernel allows it, else epoll.
    Auto,
    Uring,
    Epoll,
}

/// Whether this process may set up an io_uring instance (seccomp and old kernels say no).
pub fn uring_available() -> Result<(), io::Error> {
    io_uring::IoUring::new(8).map(drop)
}

/// Resolves `auto` to the backend that will actually run.
pub fn resolve(mode: IoMode) -> io::Result<IoMode> {
    match mode {
        IoMode::Epoll => Ok(IoMode::Epoll),
        IoMode::Uring => uring_available().map(|()| IoMode::Uring),
        IoMode::Auto => Ok(match uring_available() {
            Ok(()) => IoMode::Uring,
            Err(e) => {
                tracing::warn!("io_uring is unavailable ({e}); using the epoll backend");
                IoMode::Epoll
            }
        }),
    }
}

/// One accepted connection. `&self` methods, so the reader and the writer task of a
/// subscriber can share it through an `Rc`.
#[allow(async_fn_in_trait)] // single-threaded runtimes: futures are deliberately not Send
pub trait Conn: 'static {
    /// Reads into `buf`'s spare capacity; returns the buffer with the bytes appended.
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// One gathered write of `bufs` (at most `MAX_IOV` of them); may be partial.
    async fn writev(&self, bufs: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>);
    fn shutdown(&self, how: std::net::Shutdown);
}

#[allow(async_fn_in_trait)]
pub trait Listener: 'static {
    type Conn: Conn;
    async fn accept(&self) -> io::Result<(Self::Conn, SocketAddr)>;
}

/// Largest number of buffers handed to one writev (Linux's IOV_MAX).
pub const MAX_IOV: usize = 1024;

/// Writes all of `buf` (handshake responses and other one-off writes).
pub async fn write_all<C: Conn>(conn: &C, buf: Bytes) -> io::Result<()> {
    let mut pending = vec![buf];
    while !pending.is_empty() {
        let (res, mut bufs) = conn.writev(pending).await;
        let n = res?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        advance(&mut bufs, n);
        pending = bufs;
    }
    Ok(())
}

/// Drops the first `n` bytes of a gathered write: whole buffers, then a cheap `Bytes`
/// slice of the first partly written one.
pub fn advance(bufs: &mut Vec<Bytes>, mut n: usize) {
    let full = bufs
        .iter()
        .take_while(|b| {
            if n >= b.len() {
                n -= b.len();
                true
            } else {
                false
            }
        })
        .count();
    bufs.drain(..full);
    if n > 0 {
        let first = &mut bufs[0];
        *first = first.slice(n..);
    }
}

/// A reactor thread's runtime and listener: the one switch between backends.
pub fn run_reactor<F, Fut>(mode: IoMode, listener: std::net::TcpListener, body: F) -> io::Result<()>
where
    F: FnOnce(ListenerKind) -> Fut,
    Fut: Future<Output = ()>,
{
    match mode {
        IoMode::Uring => {
            let rt = tokio_uring::Runtime::new(tokio_uring::builder().entries(1024))?;
            rt.block_on(async move {
                body(ListenerKind::Uring(uring::UringListener::new(listener))).await
            });
            Ok(())
        }
        IoMode::Epoll | IoMode::Auto => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let l = epoll::EpollListener::new(listener)
                    .expect("registering the listener with epoll");
                body(ListenerKind::Epoll(l)).await
            });
            Ok(())
        }
    }
}

/// The listener of whichever backend runs; the reactor is generic over `Listener`.
pub enum ListenerKind {
    Uring(uring::UringListener),
    Epoll(epoll::EpollListener),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_over_partial_writes() {
        let mut v = vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"fgh"),
        ];
        advance(&mut v, 0);
        assert_eq!(v.len(), 3);
        advance(&mut v, 4);
        assert_eq!(
            v,
            vec![Bytes::from_static(b"e"), Bytes::from_static(b"fgh")]
        );
        advance(&mut v, 3);
        assert_eq!(v, vec![Bytes::from_static(b"h")]);
        advance(&mut v, 1);
        assert!(v.is_empty());
    }
}
