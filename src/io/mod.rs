//! The I/O seam: the only code that differs between the io_uring and the epoll backend.
//!
//! Everything above it (handshake, subscriber queues, fan-out) sees a `Conn` that reads
//! into an owned buffer and writes a vector of `Span`s — runs of shared frame bytes
//! (owned buffers are what io_uring needs: the kernel holds them while the operation is
//! in flight). Both backends run one single-threaded runtime per reactor thread with
//! `tokio::task::spawn_local`, so tasks, timers and `Notify` work the same on either.

pub mod accept;
pub mod certs;
pub mod epoll;
#[cfg(test)]
pub mod mem;
pub mod tls;
pub mod tls13;
pub mod uring;

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;

use bytes::Bytes;

use crate::frame::Span;

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
    /// Waits until there are bytes to read (or the end), then reads them into `scratch`;
    /// returns how many (0: the end). `scratch` is shared by many connections: it is
    /// borrowed only after the wait, never across it, so an idle connection waits holding
    /// no buffer and, on io_uring, no operation in flight.
    async fn read_ready(&self, scratch: &RefCell<Vec<u8>>) -> io::Result<usize>;
    /// One gathered write of `bufs` (the outbox hands at most `MAX_IOV` of them); may be
    /// partial.
    async fn writev(&self, bufs: Vec<Span>) -> (io::Result<usize>, Vec<Span>);
    /// Writes what the socket takes right now, without waiting: 0 when it takes nothing
    /// (full, or not known to be writable). Never while a `writev` is in flight.
    fn try_write(&self, _buf: &[u8]) -> io::Result<usize> {
        Ok(0)
    }
    fn shutdown(&self, how: std::net::Shutdown);
}

#[allow(async_fn_in_trait)]
pub trait Listener: 'static {
    type Conn: Conn;
    async fn accept(&self) -> io::Result<(Self::Conn, SocketAddr)>;
}

/// Writes all of `buf` (handshake responses and other one-off writes).
pub async fn write_all<C: Conn>(conn: &C, buf: Bytes) -> io::Result<()> {
    let mut pending = vec![Span::from(buf)];
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

/// Drops the first `n` bytes of a gathered write: whole spans, then the written start of
/// the first partly written one. Returns the frames written completely.
pub fn advance(bufs: &mut Vec<Span>, mut n: usize) -> u64 {
    let mut frames = 0;
    let full = bufs
        .iter()
        .take_while(|b| {
            if n >= b.len() {
                n -= b.len();
                frames += u64::from(b.frames());
                true
            } else {
                false
            }
        })
        .count();
    bufs.drain(..full);
    if n > 0 {
        bufs[0].advance(n);
    }
    frames
}

/// What a reactor thread runs once its runtime is up, on either backend's listener.
#[allow(async_fn_in_trait)]
pub trait ReactorMain {
    async fn run<L: Listener>(self, listener: L);
}

/// Builds a reactor thread's runtime for `mode` and runs `main` on it with `listener`:
/// the one place that switches between backends.
pub fn run_reactor(
    mode: IoMode,
    listener: std::net::TcpListener,
    main: impl ReactorMain,
) -> io::Result<()> {
    match mode {
        IoMode::Uring => {
            let rt = tokio_uring::Runtime::new(tokio_uring::builder().entries(1024))?;
            rt.block_on(main.run(uring::UringListener::new(listener)));
            Ok(())
        }
        IoMode::Epoll | IoMode::Auto => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            tokio::task::LocalSet::new().block_on(&rt, async move {
                // Registering with epoll needs the runtime, so it happens inside it.
                main.run(epoll::EpollListener::new(listener)?).await;
                Ok(())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_over_partial_writes() {
        let mut v: Vec<Span> = [&b"abc"[..], b"de", b"fgh"]
            .into_iter()
            .map(|b| Span::from(Bytes::from_static(b)))
            .collect();
        let left = |v: &Vec<Span>| v.iter().map(|s| s.to_vec()).collect::<Vec<_>>();
        assert_eq!(advance(&mut v, 0), 0);
        assert_eq!(v.len(), 3);
        assert_eq!(advance(&mut v, 4), 1);
        assert_eq!(left(&v), vec![b"e".to_vec(), b"fgh".to_vec()]);
        assert_eq!(advance(&mut v, 3), 1);
        assert_eq!(left(&v), vec![b"h".to_vec()]);
        assert_eq!(advance(&mut v, 1), 1);
        assert!(v.is_empty());
    }
}
