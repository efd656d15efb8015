//! What krux-relay's tests, the load client and its tests share, so each exists once:
//! spawning a server on port 0 and reading its ready file, the WebSocket upgrade request,
//! reading server frames (whole, or counted as they stream by), and `assert_success`.
//! It does not depend on krux-relay, so the relay's own unit tests can use it too.

pub mod frames;
pub mod spawn;

pub use frames::{inflate_message, parse_frame, Frame, FrameCounter, Head, Seen};
pub use spawn::{ready_addr, wait_ready_file};

use std::process::Output;

/// A WebSocket upgrade request for `target` (path and query) with extra header lines
/// (each ending in `\r\n`).
pub fn upgrade_request(target: &str, host: &str, extra_headers: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    )
}

/// A command that must have succeeded; its output says why if not.
#[track_caller]
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
