#![no_main]
//! COSE_Sign1 envelopes: verification of arbitrary bytes as each kind.
use didgate_protocol::envelope::{self, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in [
        Kind::Request,
        Kind::Grant,
        Kind::Receipt,
        Kind::Refusal,
        Kind::Checkpoint,
    ] {
        if let Ok(v) = envelope::verify(data, kind) {
            // what verified is what the digest names
            let _ = (v.signer(), v.payload(), v.digest());
        }
    }
});
