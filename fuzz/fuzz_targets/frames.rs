#![no_main]
//! Frame decoder (specs/protocol.md, "Frames"): any byte stream gives frames or a typed error.
use didgate_protocol::frame::{FrameDecoder, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dec = FrameDecoder::new();
    // fed in two parts, as a stream arrives
    let cut = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    for part in [&data[..cut], &data[cut..]] {
        dec.push(part);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => assert!(f.payload.len() <= MAX_FRAME),
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = dec.finish();
});
