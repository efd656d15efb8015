//! TLS for port 7701: rustls as a sans-IO state machine over any `Conn`, so it works the
//! same on both backends. The reactor owns the socket; rustls owns the TLS state.
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
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use rustls::ServerConnection;

use super::{write_all, Conn};
use crate::frame::Span;

/// A server config from PEM files.
pub fn config_from_pem(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading certificates from {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", cert.display());
    let key = rustls_pemfile::private_key(&mut io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?,
    ))
    .with_context(|| format!("reading the private key from {}", key.display()))?
    .with_context(|| format!("{} holds no private key", key.display()))?;
    build(certs, key)
}

/// A self-signed certificate for `localhost` and 127.0.0.1: its PEM is written to
/// `cert_out` (so clients can trust it) and its SHA-256 fingerprint returned.
pub fn self_signed(cert_out: &Path) -> anyhow::Result<(Arc<rustls::ServerConfig>, String)> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("generating a self-signed certificate")?;
    std::fs::write(cert_out, ck.cert.pem())
        .with_context(|| format!("writing {}", cert_out.display()))?;
    let der = ck.cert.der().clone();
    let fingerprint = fingerprint(&der);
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    Ok((build(vec![der], key)?, fingerprint))
}

/// A client config trusting exactly the certificates in `pem` (a CA, or the relay's
/// self-signed certificate): what `tail --ca-cert`, the load client and the tests use.
pub fn client_config_trusting(pem: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let file = std::fs::File::open(pem).with_context(|| format!("opening {}", pem.display()))?;
    for cert in rustls_pemfile::certs(&mut io::BufReader::new(file)) {
        roots.add(cert.with_context(|| format!("reading {}", pem.display()))?)?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
        pem.display()
    );
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// `AB:CD:…` SHA-256 of a DER certificate, as browsers show it.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn build(
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the certificate and key do not form a usable pair")?;
    Ok(Arc::new(cfg))
}

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
