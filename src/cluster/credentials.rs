//! Credentials in the cluster: the key-value bucket that `user-token … --nats` and
//! `passphrase set --nats` write and every node watches.
//!
//! Keys: `token.<hex of the name>` → the token's record (JSON, its SHA-256 only, as in
//! `tokens.json`); `passphrase` → the Argon2id PHC string; `stream-key` → the cluster's
//! stream key (32 random bytes, hex), created by the first node, with which nodes sign
//! the messages they store. Names are hex-encoded because a token name may hold
//! characters (`@`) a key may not.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwapOption;
use async_nats::jetstream::kv::{self, Operation, Store};
use futures_util::StreamExt;
use ring::hmac;

use crate::auth::{LiveCredentials, TokenRecord};

const TOKEN_KEY: &str = "token.";
const PASSPHRASE_KEY: &str = "passphrase";
const STREAM_KEY: &str = "stream-key";
/// How long the bucket may hold a change the watch has not delivered.
const STALLED: Duration = Duration::from_secs(1);

/// The stream key nodes sign and check stored messages with: the bucket's current one,
/// and the one before it (messages signed just before a change still verify).
#[derive(Default)]
pub struct StreamKeys {
    keys: ArcSwapOption<([u8; 32], Vec<hmac::Key>)>,
}

impl StreamKeys {
    /// The key to sign with, once the bucket has been read.
    pub fn signing(&self) -> Option<hmac::Key> {
        self.keys.load().as_ref().and_then(|k| k.1.first().cloned())
    }

    pub fn loaded(&self) -> bool {
        self.keys.load().is_some()
    }

    /// Whether `mac` is a node's MAC of `payload` under the current or previous key.
    pub fn verify(&self, payload: &[u8], mac: &str) -> bool {
        self.keys.load().as_ref().is_some_and(|k| {
            k.1.iter()
                .any(|key| super::batch::verify(key, payload, mac))
        })
    }

    /// Takes the bucket's value (hex); false if it is not a key.
    fn set(&self, hex: &[u8]) -> bool {
        let raw = std::str::from_utf8(hex)
            .ok()
            .and_then(|h| crate::auth::unhex(h.trim()));
        let Some(raw) = raw else { return false };
        let old = self.keys.load_full();
        if old.as_ref().is_some_and(|o| o.0 == raw) {
            return true;
        }
        let mut keys = vec![hmac::Key::new(hmac::HMAC_SHA256, &raw)];
        if let Some(o) = &old {
            tracing::warn!("the cluster's stream key changed; messages signed with the previous one still verify until the next change");
            keys.push(hmac::Key::new(hmac::HMAC_SHA256, &o.0));
        }
        self.keys.store(Some(Arc::new((raw, keys))));
        true
    }
}

fn token_key(name: &str) -> String {
    format!("{TOKEN_KEY}{}", crate::auth::hex(name.as_bytes()))
}

/// The bucket, created (file storage, one value per key) if missing.
pub async fn open(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> anyhow::Result<Store> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: bucket.to_string(),
        description: "krux-relay credentials (token hashes, passphrase hash)".into(),
        history: 1,
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another node or command created it meanwhile, or the cluster is electing a
        // leader.
        Err(_) => {
            again(&format!("opening the credentials bucket {bucket}"), || {
                js.get_key_value(bucket)
            })
            .await
        }
    }
}

/// Creates a token named `name`; returns its text (only its hash is stored).
pub async fn create_token(store: &Store, name: &str) -> anyhow::Result<String> {
    crate::auth::check_name(name)?;
    let token = crate::auth::generate_token()?;
    let record = crate::auth::TokenRecord::new(name, &token);
    match store
        .create(token_key(name), serde_json::to_vec(&record)?.into())
        .await
    {
        Ok(_) => Ok(token),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            bail!("a token named `{name}` already exists; revoke it first or choose another name")
        }
        Err(e) => Err(e).context("storing the token in the cluster"),
    }
}

pub async fn revoke_token(store: &Store, name: &str) -> anyhow::Result<()> {
    let key = token_key(name);
    if again("reading the bucket", || store.get(&key))
        .await?
        .is_none()
    {
        bail!("no token named `{name}` in the cluster");
    }
    again("revoking the token", || store.purge(&key)).await
}

pub async fn set_passphrase(store: &Store, phc: &str) -> anyhow::Result<()> {
    let phc = bytes::Bytes::from(phc.to_string());
    again("storing the passphrase hash in the cluster", || {
        store.put(PASSPHRASE_KEY, phc.clone())
    })
    .await
    .map(drop)
}

/// Runs `op` until it succeeds, for up to 10 s: while a NATS cluster elects a leader for
/// the bucket (4-9 s after a server died), its requests fail. Idempotent operations only.
async fn again<T, E, F>(what: &str, mut op: impl FnMut() -> F) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
    F: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e).context(what.to_string())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Every current key and value.
async fn snapshot(store: &Store) -> anyhow::Result<BTreeMap<String, bytes::Bytes>> {
    let mut keys = store.keys().await.context("listing the bucket")?;
    let mut all = BTreeMap::new();
    while let Some(key) = keys.next().await {
        let key = key.context("listing the bucket")?;
        if let Some(v) = store.get(&key).await.context("reading the bucket")? {
            all.insert(key, v);
        }
    }
    Ok(all)
}

pub async fn list_tokens(store: &Store) -> anyhow::Result<Vec<TokenRecord>> {
    let (tokens, _) = decode(&snapshot(store).await?);
    Ok(tokens)
}

/// The records and the passphrase hash in a set of bucket values (malformed ones skipped).
fn decode(all: &BTreeMap<String, bytes::Bytes>) -> (Vec<TokenRecord>, Option<String>) {
    let tokens = all
        .iter()
        .filter(|(k, _)| k.starts_with(TOKEN_KEY))
        .filter_map(|(k, v)| match serde_json::from_slice(v) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("credentials bucket: skipping {k}: {e}");
                None
            }
        })
        .collect();
    let phc = all
        .get(PASSPHRASE_KEY)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|s| s.trim().to_string());
    (tokens, phc)
}

/// What the watch keeps up to date, and with what.
pub struct Watched {
    pub bucket: String,
    pub replicas: usize,
    pub live: Arc<LiveCredentials>,
    pub keys: Arc<StreamKeys>,
    /// Set once the first snapshot (and the stream key) is applied.
    pub loaded: Arc<std::sync::atomic::AtomicBool>,
}

/// Keeps `live` and `keys` equal to the bucket: a snapshot, then every change as it
/// happens (so a revocation reaches every node in well under a second). Starts again
/// from a snapshot whenever the watch breaks, and after every reconnection to NATS (a
/// watch through a server that died can stay silent), so a change made while this node
/// was cut off applies once it is back.
pub async fn watch(js: async_nats::jetstream::Context, nats: super::Nats, w: Watched) {
    let mut delay = Duration::from_millis(50);
    let mut warned = false;
    loop {
        match watch_once(&js, &nats, &w, &mut warned).await {
            Ok(()) => delay = Duration::from_millis(50),
            Err(e) => tracing::warn!("credentials bucket {}: {e:#}; watching again", w.bucket),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

async fn watch_once(
    js: &async_nats::jetstream::Context,
    nats: &super::Nats,
    w: &Watched,
    warned: &mut bool,
) -> anyhow::Result<()> {
    let connects = nats.connects.load(std::sync::atomic::Ordering::SeqCst);
    let mut store = open(js, &w.bucket, w.replicas).await?;
    if !*warned {
        *warned = true;
        let status = store
            .status()
            .await
            .context("reading the bucket's settings")?;
        let has = status.info.config.num_replicas;
        if has != w.replicas {
            tracing::warn!(
                bucket = %w.bucket,
                "the credentials bucket has {has} replica(s), --nats-replicas says {}; a node only sets replicas when it creates the bucket (change it with `nats kv edit` or `nats stream edit KV_{}`)",
                w.replicas,
                w.bucket
            );
        }
    }
    // What the bucket holds now: the watch delivers only what comes after.
    let mut seen = store
        .status()
        .await
        .context("reading the bucket's state")?
        .info
        .state
        .last_sequence;
    // Watch first, then read the snapshot: a change in between is in one or the other,
    // and applying one twice is harmless.
    let mut changes = store.watch_all().await.context("watching the bucket")?;
    let mut all = snapshot(&store).await?;
    if !all.contains_key(STREAM_KEY) {
        all.insert(STREAM_KEY.into(), create_stream_key(&mut store).await?);
    }
    apply(&w.live, &w.keys, &all)?;
    w.loaded.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // Since when the bucket has held a revision later than the watch delivered (`seen`):
    // a watch whose consumer lived on a server that died stays silent.
    let mut behind_since = None::<tokio::time::Instant>;
    let mut checked = tokio::time::Instant::now();
    loop {
        let change = tokio::select! {
            c = changes.next() => c,
            _ = tick.tick() => {
                if nats.connects.load(std::sync::atomic::Ordering::SeqCst) != connects {
                    return Ok(()); // reconnected: start again from a snapshot
                }
                if checked.elapsed() >= Duration::from_millis(500) {
                    checked = tokio::time::Instant::now();
                    if let Ok(status) = store.status().await {
                        if status.info.state.last_sequence > seen {
                            let since = *behind_since.get_or_insert_with(tokio::time::Instant::now);
                            if since.elapsed() >= STALLED {
                                anyhow::bail!("the watch is stalled");
                            }
                        } else {
                            behind_since = None;
                        }
                    }
                }
                continue;
            }
        };
        let Some(change) = change else { return Ok(()) };
        let change = change.context("watching the bucket")?;
        (seen, behind_since) = (seen.max(change.revision), None);
        match change.operation {
            Operation::Put => all.insert(change.key, change.value),
            // The stream key stays: messages already stored were signed with it.
            Operation::Delete | Operation::Purge if change.key == STREAM_KEY => continue,
            Operation::Delete | Operation::Purge => all.remove(&change.key),
        };
        apply(&w.live, &w.keys, &all)?;
    }
}

/// A new random stream key, unless another node created one first (then that one).
async fn create_stream_key(store: &mut Store) -> anyhow::Result<bytes::Bytes> {
    let mut raw = [0u8; 32];
    getrandom::getrandom(&mut raw)?;
    let hex = crate::auth::hex(&raw);
    match store.create(STREAM_KEY, hex.clone().into()).await {
        Ok(_) => {
            tracing::info!("created the cluster's stream key");
            Ok(hex.into())
        }
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => store
            .get(STREAM_KEY)
            .await
            .context("reading the stream key")?
            .context("the stream key vanished while it was read"),
        Err(e) => Err(e).context("creating the stream key"),
    }
}

fn apply(
    live: &LiveCredentials,
    keys: &StreamKeys,
    all: &BTreeMap<String, bytes::Bytes>,
) -> anyhow::Result<()> {
    if let Some(k) = all.get(STREAM_KEY) {
        if !keys.set(k) {
            tracing::error!("the credentials bucket's stream-key is not 64 hex digits: ignored; stored messages cannot be signed or checked until it is");
        }
    }
    let (tokens, phc) = decode(all);
    if live.replace(&tokens, phc)? {
        tracing::info!(
            tokens = tokens.len(),
            "credentials updated from the cluster"
        );
    }
    Ok(())
}
