//! krux-relay: the supervision event relay of the KruxOS Gateway.
//!
//! One event's path, in module order:
//!
//! 1. [`ingest`] reads publishers' NDJSON, [`event`] validates each line against the
//!    seed's schema (simd-json), the ingest assigns the next durable `seq`, and [`frame`]
//!    builds the event's complete WebSocket frame exactly once into a `bytes::Bytes`.
//! 2. [`ring`] — a lock-free single-producer/multi-consumer ring, also the replay window —
//!    carries that frame and its filter keys to every reactor.
//! 3. Each [`reactor`] thread owns a shard of subscriber sockets: it finds the matching
//!    subscribers through its [`filter`] index, queues a handle to the same `Bytes` for
//!    each, and writes each socket's queue with one gathered write per round.
//!
//! Protocol ([`proto`]), credentials ([`auth`]), filters and event rules are free of
//! socket I/O; [`io`] is the seam where the io_uring and epoll backends differ.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod datadir;
pub mod event;
pub mod filter;
pub mod fleet;
pub mod frame;
pub mod ingest;
pub mod io;
pub mod live;
pub mod metrics;
pub mod proto;
pub mod reactor;
pub mod ring;
pub mod server;
