//! Wire protocol of port 7701, sans-IO: the HTTP upgrade (`handshake`) and inbound
//! WebSocket frames (`ws`). Outbound frames are built in `crate::frame`.

pub mod handshake;
pub mod ws;
