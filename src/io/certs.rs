//! Certificates and TLS configs: the server's from PEM files or self-signed, and the
//! client trust that `tail --ca-cert`, the load client and the tests use. `io::tls` runs
//! connections with them.

use std::io;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

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
    // Public, but written where a planted link could redirect it: never through one.
    crate::datadir::write_atomic(cert_out, ck.cert.pem().as_bytes(), 0o644)?;
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
