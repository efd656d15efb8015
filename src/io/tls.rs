//! TLS for port 7701: rustls as a sans-IO state machine over any `Conn`, so it works the
//! same on both backends. The reactor owns the socket; rustls owns the TLS state. The
//! certificates and configs it runs with come from `io::certs`.
//!
//! TLS breaks the shared-frame fast path on purpose: every subscriber's bytes are
//! encrypted separately (one copy and one AES-GCM pass per subscriber per frame), so a
//! TLS subscriber costs what the encryption of its stream costs. Plaintext subscribers on
//! the same relay keep the zero-copy path (see docs/security.md).
//!
//! Post-handshake TLS messages the read side produces (alerts, key updates) stay queued
//! in rustls and go out with the writer's next write, so records are only ever written
//! by one task, in order.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use bytes::Bytes;
use rustls::ServerConnection;

use super::{write_all, Conn};
use crate::frame::Span;

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

pub struct TlsConn<C> {
    inner: C,
    tls: RefCell<ServerConnection>,
}

/// Sends whatever rustls has queued.
async fn flush<C: Conn>(inner: &C, tls: &RefCell<ServerConnection>) -> io::Result<()> {
    let out = {
        let mut tls = tls.borrow_mut();
        let mut out = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut out)?;
        }
        out
    };
    if out.is_empty() {
        return Ok(());
    }
    write_all(inner, Bytes::from(out)).await
}

impl<C: Conn> TlsConn<C> {
    /// Runs the TLS handshake to completion (the caller bounds it in time).
    pub async fn accept(inner: C, config: Arc<rustls::ServerConfig>) -> io::Result<TlsConn<C>> {
        let tls = RefCell::new(ServerConnection::new(config).map_err(tls_err)?);
        let mut buf = Vec::with_capacity(16 * 1024);
        loop {
            flush(&inner, &tls).await?;
            if !tls.borrow().is_handshaking() {
                break;
            }
            let (res, b) = inner.read(buf).await;
            buf = b;
            if res? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let processed = {
                let mut t = tls.borrow_mut();
                t.read_tls(&mut &buf[..])?;
                t.process_new_packets().map(drop)
            };
            buf.clear();
            if let Err(e) = processed {
                let _ = flush(&inner, &tls).await; // the alert that says why
                return Err(tls_err(e));
            }
        }
        // Room for a round of queued frames without extra write calls.
        tls.borrow_mut().set_buffer_limit(Some(1 << 20));
        Ok(TlsConn { inner, tls })
    }
}

impl<C: Conn> Conn for TlsConn<C> {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        loop {
            {
                let mut tls = self.tls.borrow_mut();
                let start = buf.len();
                let room = (buf.capacity() - start).max(1024);
                buf.resize(start + room, 0);
                let got = tls.reader().read(&mut buf[start..]);
                match got {
                    Ok(n) => {
                        buf.truncate(start + n);
                        return (Ok(n), buf); // 0: the peer's close_notify
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf.truncate(start),
                    Err(e) => {
                        buf.truncate(start);
                        return (Err(e), buf);
                    }
                }
            }
            let (res, cipher) = self.inner.read(Vec::with_capacity(16 * 1024)).await;
            match res {
                Ok(0) => return (Ok(0), buf),
                Ok(_) => {}
                Err(e) => return (Err(e), buf),
            }
            let mut tls = self.tls.borrow_mut();
            if let Err(e) = tls.read_tls(&mut &cipher[..]) {
                return (Err(e), buf);
            }
            if let Err(e) = tls.process_new_packets() {
                return (Err(tls_err(e)), buf);
            }
        }
    }

    async fn read_ready(&self, scratch: &RefCell<Vec<u8>>) -> io::Result<usize> {
        loop {
            {
                let mut buf = scratch.borrow_mut();
                match self.tls.borrow_mut().reader().read(&mut buf) {
                    Ok(n) => return Ok(n), // 0: the peer's close_notify
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // No plaintext yet: ciphertext into the same scratch, then into rustls.
            let n = self.inner.read_ready(scratch).await?;
            if n == 0 {
                return Ok(0);
            }
            let (mut tls, buf) = (self.tls.borrow_mut(), scratch.borrow());
            let mut cipher = &buf[..n];
            while !cipher.is_empty() {
                tls.read_tls(&mut cipher)?;
                tls.process_new_packets().map_err(tls_err)?;
            }
        }
    }

    async fn writev(&self, bufs: Vec<Span>) -> (io::Result<usize>, Vec<Span>) {
        let (accepted, out) = {
            let mut tls = self.tls.borrow_mut();
            let mut accepted = 0;
            for b in &bufs {
                match tls.writer().write(b) {
                    Ok(n) => {
                        accepted += n;
                        if n < b.len() {
                            break;
                        }
                    }
                    Err(e) => return (Err(e), bufs),
                }
            }
            let mut out = Vec::new();
            while tls.wants_write() {
                if let Err(e) = tls.write_tls(&mut out) {
                    return (Err(e), bufs);
                }
            }
            (accepted, out)
        };
        // The ciphertext must go out whole before the next record is made.
        if out.is_empty() {
            return (Ok(accepted), bufs);
        }
        if let Err(e) = write_all(&self.inner, Bytes::from(out)).await {
            return (Err(e), bufs);
        }
        (Ok(accepted), bufs)
    }

    fn shutdown(&self, how: Shutdown) {
        self.inner.shutdown(how);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::{self, TlsClient};

    fn run(test: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, test);
    }

    #[test]
    fn frames_written_through_small_partial_writes_arrive_whole_and_in_order() {
        run(async {
            let (server_config, client_config) = mem::tls_configs();
            // 1,000 bytes in flight at most: every record crosses in several writes.
            let (c, s) = mem::pair(1000);
            let client = TlsClient::new(c, client_config);
            let accept = tokio::task::spawn_local(TlsConn::accept(s, server_config));
            client.handshake().await;
            let server = accept.await.unwrap().unwrap();

            let parts: Vec<Vec<u8>> =
                vec![b"first".to_vec(), vec![b'x'; 100_000], b"last".to_vec()];
            let expected = parts.concat();
            let writer = tokio::task::spawn_local(async move {
                let mut spans: Vec<Span> = parts
                    .into_iter()
                    .map(|p| Span::from(Bytes::from(p)))
                    .collect();
                while !spans.is_empty() {
                    let (n, mut left) = server.writev(spans).await;
                    super::super::advance(&mut left, n.unwrap());
                    spans = left;
                }
                server
            });
            assert_eq!(client.read_plain(expected.len()).await, expected);
            let server = writer.await.unwrap();

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
    fn a_client_that_is_not_speaking_tls_fails_the_handshake_with_an_alert() {
        run(async {
            let (server_config, _) = mem::tls_configs();
            let (c, s) = mem::pair(64 * 1024);
            let accept = tokio::task::spawn_local(TlsConn::accept(s, server_config));
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
