//! The commands around the server: `demo`, `user-token`, `passphrase`, `publish`, `tail`.

pub mod demo;
pub mod passphrase;
pub mod publish;
pub mod tail;
pub mod token;
pub mod ws_client;
