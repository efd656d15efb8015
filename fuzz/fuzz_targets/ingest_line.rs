//! The ingest line validator and frame builder: any accepted line becomes a frame whose
//! payload is valid JSON with the relay's `seq`; the accepted frames, queued as one run
//! (`Span`), read back as exactly their concatenation; nothing panics.
#![no_main]

use krux_relay::event::Validator;
use krux_relay::frame::{payload, FrameArena, Span};
use krux_relay::ingest::{Line, LineSplitter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut validator = Validator::new();
    let mut arena = FrameArena::new();
    let mut splitter = LineSplitter::new(1 << 16);
    let mut runs: Vec<Span> = Vec::new();
    let mut expected = Vec::new();
    let mut check = |_: u64, line: Line<'_>| {
        let Line::Text(text) = line else { return };
        let text = text.trim_ascii();
        if let Ok(ev) = validator.validate(text) {
            let stamp = ev.needs_stamp.then(|| "2026-03-15T10:30:00.123Z");
            let frame = arena.event_frame(text, stamp, 42);
            let v: serde_json::Value = serde_json::from_slice(payload(&frame)).expect("an accepted line frames as JSON");
            assert_eq!(v["seq"], 42);
            assert!(v["timestamp"].is_string());
            expected.extend_from_slice(&frame);
            if !runs.last_mut().is_some_and(|r| r.extend(&frame)) {
                runs.push(Span::event(&frame));
            }
        }
    };
    splitter.feed(data, &mut check);
    splitter.finish(&mut check);
    // Runs break only where a 256 KiB arena chunk ends; lines are at most 64 KiB here, so
    // a chunk is more than half full before the next starts.
    assert!(runs.len() <= 1 + expected.len() / (128 * 1024), "{} runs", runs.len());
    let joined: Vec<u8> = runs.iter().flat_map(|r| r.to_vec()).collect();
    assert_eq!(joined, expected);
});
