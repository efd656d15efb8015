//! The commands around the server: `demo`, `user-token`, `publish`, `tail`.

pub mod demo;
pub mod publish;
pub mod tail;
pub mod token;
