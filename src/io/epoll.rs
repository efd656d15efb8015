//! epoll backend (plain tokio), for where io_uring is not allowed: same owned-buffer
//! interface, readiness-based underneath.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};

use super::{Conn, Listener};
use crate::frame::Span;

pub struct EpollListener(tokio::net::TcpListener);

impl EpollListener {
    pub fn new(l: std::net::TcpListener) -> io::Result<Self> {
        l.set_nonblocking(true)?;
        Ok(EpollListener(tokio::net::TcpListener::from_std(l)?))
    }
}

pub struct EpollConn(tokio::net::TcpStream);

impl Listener for EpollListener {
    type Conn = EpollConn;
    async fn accept(&self) -> io::Result<(EpollConn, SocketAddr)> {
        let (s, addr) = self.0.accept().await?;
        s.set_nodelay(true)?;
        Ok((EpollConn(s), addr))
    }
}

impl Conn for EpollConn {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        loop {
            if let Err(e) = self.0.readable().await {
                return (Err(e), buf);
            }
            match self.0.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return (res, buf),
            }
        }
    }

    async fn read_ready(&self, scratch: &RefCell<Vec<u8>>) -> io::Result<usize> {
        loop {
            self.0.readable().await?;
            match self.0.try_read(&mut scratch.borrow_mut()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return res,
            }
        }
    }

    async fn writev(&self, bufs: Vec<Span>) -> (io::Result<usize>, Vec<Span>) {
        loop {
            if let Err(e) = self.0.writable().await {
                return (Err(e), bufs);
            }
            let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            match self.0.try_write_vectored(&slices) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return (res, bufs),
            }
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self.0.try_write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            res => res,
        }
    }

    fn shutdown(&self, how: Shutdown) {
        // SAFETY-free route: tokio exposes no shutdown(&self), so use the socket's fd.
        let _ = socket2::SockRef::from(&self.0).shutdown(how);
    }
}
