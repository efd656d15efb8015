//! Credentials in the cluster: the key-value bucket that `user-token … --nats` and
//! `passphrase set --nats` write and every node watches.
//!
//! Keys: `token.<hex of the name>` → the token's record (JSON, its SHA-256 only, as in
//! `tokens.json`); `passphrase` → the Argon2id PHC string. Names are hex-encoded because a
//! token name may hold characters (`@`) a key may not.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream::kv::{self, Operation, Store};
use futures_util::StreamExt;

use crate::auth::{LiveCredentials, TokenRecord};

const TOKEN_KEY: &str = "token.";
const PASSPHRASE_KEY: &str = "passphrase";

fn token_key(name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{TOKEN_KEY}{hex}")
}

/// The bucket, created (file storage, one value per key) if missing.
pub async fn open(js: &async_nats::jetstream::Context, bucket: &str) -> anyhow::Result<Store> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: bucket.to_string(),
        description: "krux-relay credentials (token hashes, passphrase hash)".into(),
        history: 1,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another node or command created it meanwhile.
        Err(_) => js
            .get_key_value(bucket)
            .await
            .with_context(|| format!("opening the credentials bucket {bucket}")),
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
    if store
        .get(&key)
        .await
        .context("reading the bucket")?
        .is_none()
    {
        bail!("no token named `{name}` in the cluster");
    }
    store.purge(&key).await.context("revoking the token")?;
    Ok(())
}

pub async fn set_passphrase(store: &Store, phc: &str) -> anyhow::Result<()> {
    store
        .put(PASSPHRASE_KEY, phc.to_string().into())
        .await
        .context("storing the passphrase hash in the cluster")?;
    Ok(())
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

/// Keeps `live` equal to the bucket: a snapshot, then every change as it happens (so a
/// revocation reaches every node in well under a second). Starts again from a snapshot
/// whenever the watch breaks (a NATS restart). `loaded` is set once the first snapshot
/// is applied.
pub async fn watch(
    js: async_nats::jetstream::Context,
    bucket: String,
    live: Arc<LiveCredentials>,
    loaded: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut delay = Duration::from_millis(50);
    loop {
        match watch_once(&js, &bucket, &live, &loaded).await {
            Ok(()) => delay = Duration::from_millis(50),
            Err(e) => tracing::warn!("credentials bucket {bucket}: {e:#}; watching again"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

async fn watch_once(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    live: &LiveCredentials,
    loaded: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let store = open(js, bucket).await?;
    // Watch first, then read the snapshot: a change in between is in one or the other,
    // and applying one twice is harmless.
    let mut changes = store.watch_all().await.context("watching the bucket")?;
    let mut all = snapshot(&store).await?;
    apply(live, &all)?;
    loaded.store(true, std::sync::atomic::Ordering::SeqCst);
    while let Some(change) = changes.next().await {
        let change = change.context("watching the bucket")?;
        match change.operation {
            Operation::Put => all.insert(change.key, change.value),
            Operation::Delete | Operation::Purge => all.remove(&change.key),
        };
        apply(live, &all)?;
    }
    Ok(())
}

fn apply(live: &LiveCredentials, all: &BTreeMap<String, bytes::Bytes>) -> anyhow::Result<()> {
    let (tokens, phc) = decode(all);
    if live.replace(&tokens, phc)? {
        tracing::info!(
            tokens = tokens.len(),
            "credentials updated from the cluster"
        );
    }
    Ok(())
}
