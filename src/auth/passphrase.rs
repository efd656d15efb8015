//! The operator passphrase: stored as an Argon2id PHC string in `<data-dir>/passphrase`,
//! verified slowly once, then cheaply. No sockets here.
//!
//! After a successful verification the relay keeps `SHA-256(key ‖ passphrase)` with a
//! random per-process key — never the passphrase — so a reconnect storm of operator
//! sessions costs one hash each, not one Argon2 run each. A candidate that does not match
//! the cached digest is wrong (there is one passphrase), so it is rejected as cheaply.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const FILE: &str = "passphrase";
/// Failed attempts allowed per client address per window, then 429.
const MAX_FAILURES: u32 = 5;
const WINDOW: Duration = Duration::from_secs(60);

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Hashes and stores a new passphrase (atomically, mode 0600).
pub fn set(data_dir: &Path, passphrase: &str) -> anyhow::Result<()> {
    let phc = hash(passphrase)?;
    crate::datadir::write_private_atomic(&path(data_dir), format!("{phc}\n").as_bytes())
}

/// The Argon2id PHC string of a new passphrase (at least 8 characters).
pub fn hash(passphrase: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        passphrase.chars().count() >= 8,
        "the passphrase must have at least 8 characters"
    );
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).context("reading the OS random source")?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let phc = Argon2::default()
        .hash_password(passphrase.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing the passphrase: {e}"))?
        .to_string();
    Ok(phc)
}

/// The stored hash, and the cheap verifier learned from the first success.
pub struct Verifier {
    phc: String,
    key: [u8; 32],
    learned: Mutex<Option<[u8; 32]>>,
}

impl Verifier {
    pub fn new(phc: String) -> anyhow::Result<Verifier> {
        PasswordHash::new(&phc)
            .map_err(|e| anyhow::anyhow!("the stored passphrase hash is malformed: {e}"))?;
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).context("reading the OS random source")?;
        Ok(Verifier {
            phc,
            key,
            learned: Mutex::new(None),
        })
    }

    pub fn phc(&self) -> &str {
        &self.phc
    }

    fn digest(&self, candidate: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(candidate.as_bytes());
        h.finalize().into()
    }

    /// `Some(answer)` when the cheap check decides; `None` when only Argon2 can.
    pub fn check_fast(&self, candidate: &str) -> Option<bool> {
        let learned = *self.learned.lock().expect("passphrase verifier lock");
        learned.map(|d| bool::from(d.ct_eq(&self.digest(candidate))))
    }

    /// The slow, salted check (blocking: run it off the reactor). Learns the cheap
    /// verifier on success.
    pub fn check_slow(&self, candidate: &str) -> bool {
        let Ok(hash) = PasswordHash::new(&self.phc) else {
            return false;
        };
        let ok = Argon2::default()
            .verify_password(candidate.as_bytes(), &hash)
            .is_ok();
        if ok {
            *self.learned.lock().expect("passphrase verifier lock") = Some(self.digest(candidate));
        }
        ok
    }
}

/// Failed passphrase attempts per client address, in fixed windows.
#[derive(Default)]
pub struct FailureLimiter {
    seen: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl FailureLimiter {
    /// Seconds until `ip` may try again, if it is over the limit now.
    pub fn blocked_for(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let seen = self.seen.lock().expect("limiter lock");
        let &(n, start) = seen.get(&ip)?;
        let left = WINDOW.saturating_sub(now.duration_since(start));
        (n >= MAX_FAILURES && !left.is_zero()).then(|| left.as_secs().max(1))
    }

    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut seen = self.seen.lock().expect("limiter lock");
        if seen.len() > 100_000 {
            seen.retain(|_, (_, start)| now.duration_since(*start) < WINDOW);
        }
        let entry = seen.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_once_then_cheap() {
        let dir = tempfile::tempdir().unwrap();
        set(dir.path(), "correct horse battery").unwrap();
        assert!(set(dir.path(), "short").is_err());
        let phc = std::fs::read_to_string(path(dir.path())).unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(!phc.contains("correct horse"));
        let v = Verifier::new(phc.trim().to_string()).unwrap();
        assert_eq!(
            v.check_fast("correct horse battery"),
            None,
            "nothing learned yet"
        );
        assert!(!v.check_slow("wrong horse battery"));
        assert_eq!(
            v.check_fast("wrong horse battery"),
            None,
            "a failure teaches nothing"
        );
        assert!(v.check_slow("correct horse battery"));
        assert_eq!(v.check_fast("correct horse battery"), Some(true));
        assert_eq!(v.check_fast("correct horse batterY"), Some(false));
    }

    #[test]
    fn failures_are_limited_per_address_and_window() {
        let l = FailureLimiter::default();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert_eq!(l.blocked_for(a, t0), None);
            l.record_failure(a, t0);
        }
        assert_eq!(l.blocked_for(a, t0), Some(60));
        assert_eq!(
            l.blocked_for(b, t0),
            None,
            "other addresses are not affected"
        );
        assert_eq!(l.blocked_for(a, t0 + WINDOW), None, "the window passes");
        l.record_failure(a, t0 + WINDOW);
        assert_eq!(
            l.blocked_for(a, t0 + WINDOW),
            None,
            "a new window starts from zero"
        );
    }
}
