//! Certificates and TLS configs: the server's (from PEM files, replaceable while running,
//! or self-signed), its session-ticket keys, and the client trust that `tail --ca-cert`,
//! the load client and the tests use. `io::tls` runs connections with them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How long one ticket key seals new tickets; tickets open for up to twice this.
pub const TICKET_ROTATION: Duration = Duration::from_secs(6 * 60 * 60);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The relay's TLS side: one config for the process's life — so its session-ticket keys
/// are shared by every reactor — presenting a certificate that can be replaced while it
/// runs (new handshakes get the new one; established streams keep going).
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    cert: Arc<LiveCert>,
    pub tickets: Arc<TicketKeys>,
}

impl ServerTls {
    /// TLS 1.3 and 1.2, or 1.3 alone; stateless resumption with rotating ticket keys.
    pub fn new(cert: CertifiedKey, tls13_only: bool) -> anyhow::Result<ServerTls> {
        let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
            &[&rustls::version::TLS13]
        } else {
            rustls::DEFAULT_VERSIONS
        };
        let live = Arc::new(LiveCert(ArcSwap::from_pointee(cert)));
        let tickets = Arc::new(TicketKeys::new(TICKET_ROTATION)?);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(live.clone());
        // Resumption state lives in the tickets the clients hold, not in the relay.
        config.ticketer = tickets.clone();
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        // TLS 1.3 records are the relay's own once the handshake is done (`io::tls13`).
        config.enable_secret_extraction = true;
        config.key_log = Arc::new(super::tls13::LogSecrets);
        Ok(ServerTls {
            config: Arc::new(config),
            cert: live,
            tickets,
        })
    }

    /// New handshakes present `cert` from now on.
    pub fn set_certificate(&self, cert: CertifiedKey) {
        self.cert.0.store(Arc::new(cert));
    }
}

#[derive(Debug)]
struct LiveCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Session-ticket keys: tickets are sealed with the current key and opened with it or the
/// previous one, so a ticket resumes for one to two rotation periods, and a key is gone
/// for good two rotations after it was made.
pub struct TicketKeys {
    keys: RwLock<Keys>,
    period: Duration,
}

struct Keys {
    current: Arc<dyn ProducesTickets>,
    previous: Option<Arc<dyn ProducesTickets>>,
    rotate_at: Instant,
}

impl TicketKeys {
    pub fn new(period: Duration) -> anyhow::Result<TicketKeys> {
        Ok(TicketKeys {
            keys: RwLock::new(Keys {
                current: rustls::crypto::ring::Ticketer::new().context("ticket keys")?,
                previous: None,
                rotate_at: Instant::now() + period,
            }),
            period,
        })
    }

    /// A new current key; the current one only opens tickets from now on.
    pub fn rotate(&self) {
        let Ok(fresh) = rustls::crypto::ring::Ticketer::new() else {
            tracing::warn!("no randomness for a new ticket key; the current one stays");
            return;
        };
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.previous = Some(std::mem::replace(&mut keys.current, fresh));
        keys.rotate_at = Instant::now() + self.period;
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        let due = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .rotate_at;
        if Instant::now() >= due {
            self.rotate();
        }
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("period", &self.period)
            .finish()
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.period.as_secs() * 2).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys().current.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys();
        keys.current
            .decrypt(cipher)
            .or_else(|| keys.previous.as_ref()?.decrypt(cipher))
    }
}

/// A certificate chain and its key from PEM files, checked to belong together, the key
/// not readable by group or others (at start and on every renewal alike).
pub fn load_pem(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    crate::datadir::check_key(key)?;
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading certificates from {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", cert.display());
    let key_der = rustls_pemfile::private_key(&mut io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?,
    ))
    .with_context(|| format!("reading the private key from {}", key.display()))?
    .with_context(|| format!("{} holds no private key", key.display()))?;
    CertifiedKey::from_der(certs, key_der, &provider()).with_context(|| {
        format!(
            "{} and {} do not form a usable pair",
            cert.display(),
            key.display()
        )
    })
}

/// A fresh self-signed ECDSA P-256 certificate (cheap to sign with, per handshake) for
/// `localhost` and 127.0.0.1: its PEM is written to `cert_out` (so clients can trust it)
/// and its SHA-256 fingerprint returned.
pub fn self_signed(cert_out: &Path) -> anyhow::Result<(CertifiedKey, String)> {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating a P-256 key")?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .and_then(|p| p.self_signed(&key_pair))
        .context("generating a self-signed certificate")?;
    // Public, but written where a planted link could redirect it: never through one.
    crate::datadir::write_atomic(cert_out, cert.pem().as_bytes(), 0o644)?;
    let der = cert.der().clone();
    let fingerprint = fingerprint(&der);
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
    let certified = CertifiedKey::from_der(vec![der], key, &provider())
        .context("loading the self-signed certificate")?;
    Ok((certified, fingerprint))
}

/// Watches `--tls-cert`/`--tls-key` (polled every `every`, and at once on SIGHUP) and
/// puts a changed pair into service; a pair that does not load is refused with a log
/// line naming the file, and the one in service stays. Runs until `stop`.
pub fn watch(
    tls: Arc<ServerTls>,
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered before returning: from here on SIGHUP reloads instead of ending the relay.
    let mut hangup = rt.block_on(async { signal(SignalKind::hangup()) })?;
    let stamp = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        })
    };
    let mut seen = (stamp(&cert), stamp(&key));
    std::thread::Builder::new()
        .name("krux-certs".into())
        .spawn(move || {
            rt.block_on(async {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let asked = tokio::select! {
                        _ = hangup.recv() => true,
                        () = tokio::time::sleep(every) => false,
                    };
                    let now = (stamp(&cert), stamp(&key));
                    if !asked && now == seen {
                        continue;
                    }
                    seen = now;
                    match load_pem(&cert, &key) {
                        Ok(pair) => {
                            tls.set_certificate(pair);
                            tracing::info!(certificate = %cert.display(), "TLS certificate loaded; new connections use it");
                        }
                        Err(e) => tracing::error!(
                            "TLS certificate not replaced: {e:#}; the one in service stays"
                        ),
                    }
                }
            });
        })?;
    Ok(())
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
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_self_signed_certificate_is_ecdsa_p256() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, fingerprint) = self_signed(&dir.path().join("c.pem")).unwrap();
        assert_eq!(cert.key.algorithm(), rustls::SignatureAlgorithm::ECDSA);
        assert_eq!(fingerprint.len(), 32 * 3 - 1);
        assert!(cert.keys_match().is_ok());
    }

    #[test]
    fn a_mismatched_pair_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        self_signed(&cert).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, other.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = format!("{:#}", load_pem(&cert, &key).err().unwrap());
        assert!(
            err.contains("c.pem") && err.contains("k.pem") && err.contains("usable pair"),
            "{err}"
        );
    }
}
