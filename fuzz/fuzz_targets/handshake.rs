//! The HTTP upgrade parser and the handshake decision: any bytes, never a panic; every
//! refusal is a well-formed response.
#![no_main]

use krux_relay::auth::Principal;
use krux_relay::proto::handshake::{decide, parse_request, Auth, Credential, Decision, Gate, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let req = match parse_request(data) {
        Ok(Parsed::Complete(req, len)) => {
            assert!(len <= data.len());
            req
        }
        Ok(Parsed::Partial) => return,
        Err(resp) => {
            assert!(resp.to_bytes().starts_with(b"HTTP/1.1 4"));
            return;
        }
    };
    let auth = |c: &Credential| match c {
        Credential::Token(t) if t.len() % 2 == 0 => Auth::Valid(Principal::User([0; 32])),
        Credential::Passphrase(p) if p.len() % 3 == 0 => Auth::RateLimited(5),
        _ => Auth::Invalid,
    };
    for at_capacity in [false, true] {
        // Compression on: any Sec-WebSocket-Extensions goes through the negotiation too.
        let gate = Gate { at_capacity, authenticate: &auth, allowed_origins: &[], compression: true };
        match decide(&req, &gate) {
            Decision::Refuse(r) => {
                let bytes = r.to_bytes();
                assert!(bytes.starts_with(b"HTTP/1.1 "));
                assert!(r.body.ends_with('\n') && r.body.lines().count() == 1, "one sentence");
            }
            Decision::Upgrade(u) => {
                let head = u.response(Some(1));
                assert!(head.starts_with(b"HTTP/1.1 101 ") && head.ends_with(b"\r\n\r\n"));
                if let Some(d) = u.deflate {
                    assert!((8..=15).contains(&d.window_bits));
                }
            }
            Decision::Page(_) => {}
        }
    }
});
