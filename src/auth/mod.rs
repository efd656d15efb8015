//! Credentials of port 7701: user tokens, stored only as SHA-256 hashes in
//! `<data-dir>/tokens.json`, and the live view of them that a running server consults.
//! No sockets here.
//!
//! Tokens are 40 random base62 characters (≈238 bits), so a fast hash is enough: there is
//! nothing to brute-force. The operator passphrase, which a human chose, is different and
//! gets a slow salted hash (see the security issue).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Who a valid credential belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// A user token, identified by its stored hash (so that a revoke can find its streams).
    User([u8; 32]),
    /// The operator passphrase, identified by a digest of the stored hash it matched (so
    /// that changing the passphrase ends the sessions opened with the old one).
    Operator([u8; 32]),
}

pub mod passphrase;

pub const TOKEN_PREFIX: &str = "krx_user_";
const TOKEN_CHARS: usize = 40;
const FILE: &str = "tokens.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub name: String,
    /// Hex SHA-256 of the whole token text.
    pub sha256: String,
    pub created: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenRecord>,
}

impl TokenRecord {
    /// The record of a token just made: its name, hash and creation time.
    pub fn new(name: &str, token: &str) -> TokenRecord {
        TokenRecord {
            name: name.to_string(),
            sha256: hex(&hash_token(token)),
            created: crate::event::now_rfc3339_millis(),
        }
    }
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 32 bytes that 64 hex digits (either case) stand for; `None` for anything else.
pub fn unhex(s: &str) -> Option<[u8; 32]> {
    // Digits only: `from_str_radix` alone would also take a sign (`+f`).
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A fresh token: the prefix and 40 characters from [A-Za-z0-9], from the OS's CSPRNG.
pub fn generate_token() -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::from(TOKEN_PREFIX);
    while out.len() < TOKEN_PREFIX.len() + TOKEN_CHARS {
        let mut buf = [0u8; 64];
        getrandom::getrandom(&mut buf).context("reading the OS random source")?;
        // Rejection sampling keeps every character equally likely (248 = 4 × 62).
        for b in buf.into_iter().filter(|&b| b < 248) {
            if out.len() == TOKEN_PREFIX.len() + TOKEN_CHARS {
                break;
            }
            out.push(ALPHABET[usize::from(b % 62)] as char);
        }
    }
    Ok(out)
}

/// The token file of one data dir. Writes are atomic (temp file + rename), so a running
/// server never reads half a file.
pub struct TokenStore {
    path: PathBuf,
}

impl TokenStore {
    pub fn new(data_dir: &Path) -> TokenStore {
        TokenStore {
            path: data_dir.join(FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn list(&self) -> anyhow::Result<Vec<TokenRecord>> {
        Ok(self.read()?.tokens)
    }

    /// Creates a token named `name` and returns its text (the only time it exists).
    pub fn create(&self, name: &str) -> anyhow::Result<String> {
        check_name(name)?;
        let _lock = self.lock()?;
        let mut file = self.read()?;
        if file.tokens.iter().any(|t| t.name == name) {
            bail!("a token named `{name}` already exists; revoke it first or choose another name");
        }
        let token = generate_token()?;
        file.tokens.push(TokenRecord::new(name, &token));
        self.write(&file)?;
        Ok(token)
    }

    pub fn revoke(&self, name: &str) -> anyhow::Result<()> {
        let _lock = self.lock()?;
        let mut file = self.read()?;
        let before = file.tokens.len();
        file.tokens.retain(|t| t.name != name);
        if file.tokens.len() == before {
            bail!("no token named `{name}` in {}", self.path.display());
        }
        self.write(&file)
    }

    /// Serializes read-modify-write cycles across processes: without it, two concurrent
    /// commands both rewrite the file from what they read, and one change is lost (a
    /// revocation undone, a created token dropped). Released when the guard drops.
    fn lock(&self) -> anyhow::Result<std::fs::File> {
        use std::os::fd::AsRawFd;
        let path = self.path.with_extension("lock");
        let f = crate::datadir::open_private(&path)?;
        // SAFETY: flock only takes a descriptor, which `f` keeps open for the call.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(f)
    }

    fn read(&self) -> anyhow::Result<TokenFile> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    fn write(&self, file: &TokenFile) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(file).expect("token file serializes");
        crate::datadir::write_private_atomic(&self.path, &json)
    }
}

/// Token names are shown by `user-token list` one per line: printable, no whitespace or
/// control characters that could forge a line.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
        bail!("--name must be 1 to 64 characters of A-Z a-z 0-9 . _ - @ (got {name:?})");
    }
    Ok(())
}

/// The credentials a running server accepts, reloaded from disk by a watcher thread.
pub struct LiveCredentials {
    tokens: ArcSwap<Vec<([u8; 32], String)>>,
    passphrase: arc_swap::ArcSwapOption<passphrase::Verifier>,
    pub failures: passphrase::FailureLimiter,
    /// Bumped on every reload that changed something, so reactors re-check open streams.
    generation: AtomicU64,
    store: TokenStore,
    data_dir: PathBuf,
}

impl LiveCredentials {
    pub fn load(data_dir: &Path) -> anyhow::Result<Arc<LiveCredentials>> {
        let live = Self::empty(data_dir);
        live.reload()?;
        Ok(Arc::new(live))
    }

    /// No credentials yet (a cluster node, until it has read the bucket).
    pub fn empty(data_dir: &Path) -> LiveCredentials {
        LiveCredentials {
            tokens: ArcSwap::from_pointee(Vec::new()),
            passphrase: arc_swap::ArcSwapOption::empty(),
            failures: passphrase::FailureLimiter::default(),
            generation: AtomicU64::new(0),
            store: TokenStore::new(data_dir),
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Re-reads the token and passphrase files; returns whether anything changed.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let tokens = self.store.list()?;
        let phc = match std::fs::read_to_string(passphrase::path(&self.data_dir)) {
            Ok(s) => Some(s.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).context("reading the passphrase file"),
        };
        self.replace(&tokens, phc)
    }

    /// Makes `tokens` and `phc` the accepted credentials (from the files, or from the
    /// cluster's bucket); returns whether anything changed.
    pub fn replace(&self, tokens: &[TokenRecord], phc: Option<String>) -> anyhow::Result<bool> {
        let mut tokens: Vec<([u8; 32], String)> = tokens
            .iter()
            .filter_map(|r| Some((unhex(&r.sha256)?, r.name.clone())))
            .collect();
        tokens.sort();
        let mut changed = false;
        if **self.tokens.load() != tokens {
            self.tokens.store(Arc::new(tokens));
            changed = true;
        }
        let current = self.passphrase.load();
        if current.as_deref().map(passphrase::Verifier::phc) != phc.as_deref() {
            self.passphrase.store(
                phc.map(passphrase::Verifier::new)
                    .transpose()?
                    .map(Arc::new),
            );
            changed = true;
        }
        if changed {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        Ok(changed)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A user token's principal. Every stored hash is compared in constant time, so the
    /// time taken says nothing about which one (if any) matched.
    pub fn authenticate_token(&self, token: &str) -> Option<Principal> {
        if !token.starts_with(TOKEN_PREFIX) {
            return None;
        }
        let h = hash_token(token);
        let mut found = subtle::Choice::from(0);
        for (stored, _) in self.tokens.load().iter() {
            found |= stored.ct_eq(&h);
        }
        bool::from(found).then_some(Principal::User(h))
    }

    /// The operator passphrase verifier, if a passphrase is set.
    pub fn passphrase(&self) -> Option<Arc<passphrase::Verifier>> {
        self.passphrase.load_full()
    }

    /// Whether a principal admitted earlier is still valid (false once its token is
    /// revoked, or the passphrase was changed or removed).
    pub fn still_valid(&self, p: &Principal) -> bool {
        match p {
            Principal::User(h) => self.tokens.load().iter().any(|(stored, _)| stored == h),
            Principal::Operator(id) => self
                .passphrase
                .load()
                .as_deref()
                .is_some_and(|v| passphrase_id(v.phc()) == *id),
        }
    }

    /// Polls the data files every `every` until `stop` is set. Changes are seen within one
    /// period, so a create, revoke or passphrase change takes effect within 1 s.
    pub fn watch(self: Arc<Self>, every: Duration, stop: Arc<std::sync::atomic::AtomicBool>) {
        std::thread::Builder::new()
            .name("krux-credentials".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    match self.reload() {
                        Ok(true) => tracing::info!(
                            tokens = self.tokens.load().len(),
                            "credentials reloaded"
                        ),
                        Ok(false) => {}
                        Err(e) => tracing::warn!("keeping the previous credentials: {e:#}"),
                    }
                }
            })
            .expect("spawning the credentials watcher thread");
    }
}

/// Identifies one passphrase setting (a digest of its stored hash), so that streams opened
/// with an old passphrase are closed when it changes.
pub fn passphrase_id(phc: &str) -> [u8; 32] {
    Sha256::digest(phc.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_contract_shape() {
        let t = generate_token().unwrap();
        assert!(t.starts_with("krx_user_"));
        assert!(t.len() - TOKEN_PREFIX.len() >= 32);
        assert!(t[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(t, generate_token().unwrap());
    }

    #[test]
    fn create_list_revoke_and_live_view() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let live = LiveCredentials::load(dir.path()).unwrap();
        let t = store.create("ops").unwrap();
        assert!(store.create("ops").is_err(), "names are unique");

        let on_disk = std::fs::read_to_string(store.path()).unwrap();
        assert!(!on_disk.contains(&t), "only the hash is stored");
        assert_eq!(store.list().unwrap()[0].name, "ops");

        assert_eq!(live.authenticate_token(&t), None, "not reloaded yet");
        let g = live.generation();
        assert!(live.reload().unwrap());
        assert!(live.generation() > g);
        let p = live.authenticate_token(&t).expect("accepted after reload");
        assert!(live.still_valid(&p));
        assert_eq!(live.authenticate_token(&format!("{t}x")), None);

        store.revoke("ops").unwrap();
        assert!(store.revoke("ops").is_err());
        assert!(live.reload().unwrap());
        assert_eq!(live.authenticate_token(&t), None);
        assert!(!live.still_valid(&p));
        assert!(!live.reload().unwrap(), "no change, no new generation");
    }
}
