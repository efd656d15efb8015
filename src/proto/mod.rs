//! Wire protocol of port 7701, sans-IO: the HTTP upgrade (`handshake`), inbound
//! WebSocket frames (`ws`) and permessage-deflate (`deflate`: negotiation and compressing
//! one message). Outbound frames are built in `crate::frame`.

pub mod deflate;
pub mod handshake;
pub mod ws;
