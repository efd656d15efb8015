//! permessage-deflate (RFC 7692) over real sockets: negotiation, compressed and plain
//! subscribers side by side (live, fallen behind, resumed), each event compressed at most
//! once, and independent clients: Python's `websockets` and headless Chromium (each
//! skipped outside CI when missing; `.ci/run` installs both).

mod common;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

/// The events every test publishes: the seed's 11 (most too small to be worth
/// compressing), a burst of 2,000 from the fleet, and one of 9 MiB.
fn workload() -> (String, usize) {
    let mut fleet = krux_relay::fleet::Fleet::new(300, 7);
    let mut text = SEED.to_string();
    for _ in 0..2000 {
        text += &format!("{}\n", fleet.next_event());
    }
    // Text that compresses the way logs do: repeated words, varying numbers.
    let blob: String = (0..2_000_000)
        .map(|i| format!("w{} ", i % 977))
        .collect::<String>()
        .chars()
        .take(9 << 20)
        .collect();
    text += &format!(
        "{}\n",
        serde_json::json!({"type": "health_alert", "agent": null, "data": {
            "component": "disk", "severity": "info", "message": "large", "threshold": "80%",
            "blob": blob}})
    );
    (text, 11 + 2000 + 1)
}

/// What a subscriber got: each event's JSON (inflated when it came compressed), how
/// many came compressed, and the bytes on the wire.
#[derive(Default)]
struct Got {
    events: Vec<Vec<u8>>,
    compressed: usize,
    wire_bytes: usize,
}

/// Reads `n` event frames (failing on a close or after 30 s).
async fn read_events(s: &mut TcpStream, n: usize) -> Got {
    let mut got = Got::default();
    let (mut buf, mut at) = (Vec::with_capacity(1 << 20), 0);
    let read = async {
        while got.events.len() < n {
            match krux_testkit::parse_frame(&buf[at..]) {
                Some((frame, used)) => {
                    let rsv1 = buf[at] & 0x40 != 0;
                    at += used;
                    if frame.opcode != krux_testkit::frames::TEXT {
                        assert_eq!(frame.close(), None, "closed");
                        continue; // a keepalive ping
                    }
                    got.wire_bytes += used;
                    got.compressed += usize::from(rsv1);
                    got.events.push(match rsv1 {
                        true => krux_testkit::inflate_message(frame.payload),
                        false => frame.payload.to_vec(),
                    });
                }
                None => {
                    buf.drain(..at);
                    at = 0;
                    assert!(s.read_buf(&mut buf).await.unwrap() > 0, "the relay closed");
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .is_err()
    {
        panic!("{} of {n} events within 30 s", got.events.len());
    }
    got
}

/// Events at or above the default `--compression-min-size` (128 B).
fn worth_compressing(events: &[Vec<u8>]) -> usize {
    events.iter().filter(|e| e.len() >= 128).count()
}

fn seqs(events: &[Vec<u8>]) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            serde_json::from_slice::<serde_json::Value>(e).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// A subscriber with the extension and one without get byte-identical events, live and
/// after falling behind (a queue bound far below what is published, and a socket that
/// reads late), and a resume with `since` replays the same compressed frames; every
/// event is compressed at most once, whoever needed it.
#[tokio::test]
async fn compressed_and_plain_subscribers_get_the_same_events_live_behind_and_resumed() {
    let relay = Relay::start_with(&["--client-queue", "64KiB"]).await;
    let (mut live, head) = raw_subscribe_with(&relay, "", OFFER, None).await;
    assert!(
        head.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
        ),
        "{head}"
    );
    let (mut plain, head) = raw_subscribe_with(&relay, "", "", None).await;
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
    let (mut behind, _) = raw_subscribe_with(&relay, "", OFFER, Some(4096)).await;
    let (text, n) = workload();
    let publishing = {
        let relay_ingest = relay.ingest;
        tokio::spawn(async move {
            let mut s = TcpStream::connect(relay_ingest).await.unwrap();
            s.write_all(text.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        })
    };
    let (live, plain) = tokio::join!(read_events(&mut live, n), read_events(&mut plain, n));
    // The third reads only now: it fell behind and catches up from the window.
    let behind = read_events(&mut behind, n).await;
    let summary = publishing.await.unwrap();
    assert!(summary.contains(&format!("\"accepted\":{n}")), "{summary}");

    assert_eq!(seqs(&plain.events), (1..=n as u64).collect::<Vec<_>>());
    assert!(live.events == plain.events, "live: not the same bytes");
    assert!(behind.events == plain.events, "behind: not the same bytes");
    assert_eq!(plain.compressed, 0);
    // Events of 128 bytes and more compressed (the 9 MiB one too), smaller ones not.
    assert_eq!(live.compressed, worth_compressing(&plain.events));
    assert!(live.compressed > 500, "{}", live.compressed);
    assert_eq!(behind.compressed, live.compressed);
    assert!(
        live.wire_bytes * 3 < plain.wire_bytes,
        "{} compressed vs {} plain",
        live.wire_bytes,
        plain.wire_bytes
    );
    // A resume from the start with the extension: the same events, the same frames.
    let (mut resumed, _) = raw_subscribe_with(&relay, "since=0", OFFER, None).await;
    let resumed = read_events(&mut resumed, n).await;
    assert!(
        resumed.events == plain.events,
        "resumed: not the same bytes"
    );
    assert_eq!(resumed.wire_bytes, live.wire_bytes);

    let scrape = metrics(&relay).await;
    let made = metric_value(&scrape, "krux_compressed_frames_total").unwrap();
    assert_eq!(made as usize, live.compressed, "each event compressed once");
    let (before, after) = (
        metric_value(&scrape, "krux_compression_bytes_in_total").unwrap(),
        metric_value(&scrape, "krux_compression_bytes_out_total").unwrap(),
    );
    assert!(after * 3 < before, "{after} of {before}");
    assert_eq!(
        metric_value(&scrape, "krux_compression_subscribers"),
        Some(3)
    );
}

/// Offers the relay can meet are answered per RFC 7692, the rest declined (the upgrade
/// goes on without compression); with `--compression off` nothing is accepted.
#[tokio::test]
async fn negotiation_follows_rfc_7692() {
    let relay = Relay::start().await;
    let ext = |head: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
            .map(str::to_string)
    };
    for (offer, answer) in [
        ("permessage-deflate", Some("permessage-deflate; server_no_context_takeover")),
        (
            "permessage-deflate; server_max_window_bits=10; client_no_context_takeover",
            Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=10"),
        ),
        // Several offers: the first the relay can meet.
        (
            "permessage-deflate; server_max_window_bits=5, permessage-deflate; client_max_window_bits=12",
            Some("permessage-deflate; server_no_context_takeover"),
        ),
        ("permessage-deflate; mystery=1", None),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", None),
        ("permessage-deflate; server_max_window_bits", None),
        ("x-webkit-deflate-frame", None),
        (";;,,", None),
    ] {
        let (_s, head) =
            raw_subscribe_with(&relay, "", &format!("Sec-WebSocket-Extensions: {offer}\r\n"), None).await;
        assert_eq!(ext(&head).as_deref(), answer, "{offer}");
    }
    let off = Relay::start_with(&["--compression", "off"]).await;
    let (_s, head) = raw_subscribe_with(&off, "", OFFER, None).await;
    assert_eq!(ext(&head), None, "--compression off");
}

/// A masked client frame.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![first, 0x80 | payload.len() as u8, 1, 2, 3, 4];
    f.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
    );
    f
}

/// Frames a subscriber sends: with the extension, a compressed data message is read past
/// like any data frame; RSV1 on a control frame closes with 1002, as RSV1 does on any
/// frame from a subscriber without the extension.
#[tokio::test]
async fn compressed_frames_from_subscribers_are_handled_per_the_rfc() {
    let relay = Relay::start().await;
    let (mut s, _) = raw_subscribe_with(&relay, "", OFFER, None).await;
    s.write_all(&client_frame(0xC1, &[0x4a, 0x04, 0x00]))
        .await
        .unwrap();
    s.write_all(&client_frame(0x89, b"still here"))
        .await
        .unwrap();
    let (mut buf, mut pong) = (Vec::new(), None);
    while pong.is_none() {
        assert!(s.read_buf(&mut buf).await.unwrap() > 0, "closed");
        if let Some((f, _)) = krux_testkit::parse_frame(&buf) {
            pong = Some((f.opcode, f.payload.to_vec()));
        }
    }
    assert_eq!(
        pong,
        Some((krux_testkit::frames::PONG, b"still here".to_vec()))
    );

    for (offer, frame) in [
        (OFFER, client_frame(0xC9, b"x")),
        ("", client_frame(0xC1, b"x")),
    ] {
        let (mut s, _) = raw_subscribe_with(&relay, "", offer, None).await;
        s.write_all(&frame).await.unwrap();
        let (_, close) = read_raw_frames(&mut s, usize::MAX).await;
        assert_eq!(
            close.map(|c| c.0),
            Some(1002),
            "{frame:02x?} with offer {offer:?}"
        );
    }
}

/// The events as a subscriber without the extension gets them, hashed, and how many are
/// worth compressing.
async fn plain_hashes(s: &mut TcpStream, n: usize) -> (Vec<String>, usize) {
    let got = read_events(s, n).await;
    let hashes = got
        .events
        .iter()
        .map(|e| format!("{:x}", Sha256::digest(e)));
    (hashes.collect(), worth_compressing(&got.events))
}

/// Python's `websockets` with `compression="deflate"` and without: the same messages, the
/// same as a raw subscriber beside them gets.
#[tokio::test]
async fn python_websockets_with_deflate_gets_the_same_events() {
    if !have_python_websockets() {
        return;
    }
    let relay = Relay::start().await;
    let (mut raw, _) = raw_subscribe_with(&relay, "", "", None).await;
    let (text, n) = workload();
    let url = format!("ws://{}/events", relay.ws);
    let client = PythonClient::start(
        "python_compressed.py",
        &[&url, &relay.token, &n.to_string()],
    );
    let (replies, (want, big)) = tokio::join!(relay.publish(&text), plain_hashes(&mut raw, n));
    assert_eq!(replies.last().unwrap()["accepted"], n);
    let v = client.result(Duration::from_secs(60)).await;
    assert_eq!(
        v["deflate"]["extensions"],
        serde_json::json!(["PerMessageDeflate"])
    );
    assert_eq!(v["plain"]["extensions"], serde_json::json!([]));
    for who in ["deflate", "plain"] {
        assert!(
            v[who]["sha256"] == serde_json::json!(want),
            "{who}: not the same events"
        );
    }
    let scrape = metrics(&relay).await;
    assert_eq!(
        metric_value(&scrape, "krux_compressed_frames_total"),
        Some(big as u64)
    );
}

/// Headless Chromium (which offers permessage-deflate on every WebSocket) gets the same
/// events as a raw subscriber without the extension, the 9 MiB one and the burst included.
#[tokio::test]
async fn chromium_gets_the_same_events_compressed() {
    if !have_tool("chromium", &["--version"], "apt-get install chromium") {
        return;
    }
    let relay = Relay::start().await;
    // The relay's own page, so that the socket below is same-origin (and SHA-256 is at
    // hand: a loopback origin is a secure context).
    let mut page = common::browser::Browser::open(&format!("http://{}/", relay.ws)).await;
    page.wait_for(
        "location.protocol === 'http:' && document.readyState === 'complete'",
        Duration::from_secs(10),
        "location.href",
    )
    .await;
    page.eval(&format!(
        "window.got = []; window.ws = new WebSocket(`ws://${{location.host}}/events?access_token={}`); \
         ws.onmessage = (m) => got.push(m.data); \
         new Promise((ok) => ws.onopen = ok).then(() => ws.extensions)",
        relay.token
    ))
    .await;
    assert_eq!(
        page.eval("ws.extensions").await,
        "permessage-deflate; server_no_context_takeover"
    );
    let (mut raw, _) = raw_subscribe_with(&relay, "", "", None).await;
    let (text, n) = workload();
    let (_, (want, big)) = tokio::join!(relay.publish(&text), plain_hashes(&mut raw, n));
    page.wait_for(
        &format!("got.length === {n}"),
        Duration::from_secs(30),
        "got.length",
    )
    .await;
    let hashes = page
        .eval(
            "Promise.all(got.map(async (m) => [...new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(m)))].map((b) => b.toString(16).padStart(2, '0')).join('')))",
        )
        .await;
    assert!(
        hashes == serde_json::json!(want),
        "Chromium: not the same events"
    );
    let scrape = metrics(&relay).await;
    assert_eq!(
        metric_value(&scrape, "krux_compression_subscribers"),
        Some(1)
    );
    assert_eq!(
        metric_value(&scrape, "krux_compressed_frames_total"),
        Some(big as u64)
    );
}

/// `tail` offers the extension and prints the same events as a raw subscriber without
/// it gets, the compressed ones inflated.
#[tokio::test]
async fn tail_reads_compressed_events() {
    let relay = Relay::start().await;
    let child = tail(&relay, &["--json", "--no-reconnect", "--count", "2012"]);
    wait_subscribers(&relay, 1).await;
    let (mut raw, _) = raw_subscribe_with(&relay, "", "", None).await;
    let (text, n) = workload();
    assert_eq!(n, 2012);
    let (_, (want, big)) = tokio::join!(relay.publish(&text), plain_hashes(&mut raw, n));
    let done = tokio::task::spawn_blocking(move || {
        finish_within(child, Duration::from_secs(60), "tail --count 2012")
    })
    .await
    .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let got: Vec<String> = String::from_utf8(done.stdout)
        .unwrap()
        .lines()
        .map(|l| format!("{:x}", Sha256::digest(l.as_bytes())))
        .collect();
    assert!(
        got == want,
        "tail printed other events ({} lines)",
        got.len()
    );
    let scrape = metrics(&relay).await;
    assert_eq!(
        metric_value(&scrape, "krux_compressed_frames_total"),
        Some(big as u64),
        "tail negotiated the extension"
    );
}
