//! Validates and frames one ~300 B event N times (default 200,000): the ingest hot path
//! on its own, for instruction counts that do not depend on machine noise:
//!
//! ```sh
//! cargo build --release --example validate_frame
//! valgrind --tool=callgrind --callgrind-out-file=cg.out target/release/examples/validate_frame
//! callgrind_annotate cg.out | head -30   # total instructions / N = instructions per event
//! ```

use krux_relay::event::Validator;
use krux_relay::frame::FrameArena;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LINE: &str = r#"{"type":"capability_invoked","timestamp":"2026-03-15T10:30:00.123Z","agent":"research-agent","session_id":"sess-a1b2c3d4","data":{"capability":"filesystem.read","arguments":{"path":"/workspace/data.csv"},"permission_tier":"autonomous","duration_ms":12,"note":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let mut v = Validator::new();
    let mut arena = FrameArena::new();
    let mut bytes = 0usize;
    for seq in 1..=n {
        let ev = v.validate(LINE.as_bytes()).expect("valid event");
        let f = arena.event_frame(LINE.as_bytes(), None, seq);
        bytes += f.len() + ev.keys.etype.index();
    }
    println!("{n} events ({} B line), {bytes} B framed", LINE.len());
}
