//! The inbound frame decoder: any bytes in any chunking decode to the same control frames
//! and the same verdict, without buffering data frames.
#![no_main]

use krux_relay::proto::ws::InboundDecoder;
use libfuzzer_sys::fuzz_target;

fn run(data: &[u8], chunk: usize) -> (Vec<String>, Option<u16>) {
    let mut d = InboundDecoder::new(4096);
    let mut seen = Vec::new();
    for part in data.chunks(chunk.max(1)) {
        if let Err(v) = d.feed(part, &mut |i| seen.push(format!("{i:?}"))) {
            return (seen, Some(v.code));
        }
    }
    (seen, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let whole = run(rest, rest.len());
    let chunked = run(rest, usize::from(first % 17) + 1);
    assert_eq!(whole, chunked);
});
