//! The ingest line validator and frame builder: any accepted line becomes a frame whose
//! payload is valid JSON with the relay's `seq`; nothing panics.
#![no_main]

use krux_relay::event::Validator;
use krux_relay::frame::{event_frame, payload};
use krux_relay::ingest::{Line, LineSplitter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut validator = Validator::new();
    let mut splitter = LineSplitter::new(1 << 16);
    let mut check = |_: u64, line: Line<'_>| {
        let Line::Text(text) = line else { return };
        let text = text.trim_ascii();
        if let Ok(ev) = validator.validate(text) {
            let stamp = ev.needs_stamp.then(|| "2026-03-15T10:30:00.123Z");
            let frame = event_frame(text, stamp, 42);
            let v: serde_json::Value = serde_json::from_slice(payload(&frame)).expect("an accepted line frames as JSON");
            assert_eq!(v["seq"], 42);
            assert!(v["timestamp"].is_string());
        }
    };
    splitter.feed(data, &mut check);
    splitter.finish(&mut check);
});
