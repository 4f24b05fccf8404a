#![no_main]
//! COSE_Sign1 envelopes: verification of arbitrary bytes as each kind, and the fast reader
//! (`envelope::parse_plain`) against it.
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
    // the fast reader: what it accepts passes every check of `verify` but the key's and the
    // signature's, and verifies to its payload and digest
    if let Some(p) = envelope::parse_plain(data) {
        match envelope::verify(data, p.kind) {
            Ok(v) => {
                assert_eq!(v.payload(), p.payload);
                assert_eq!(v.digest(), envelope::signed_digest(p.protected, p.payload));
            }
            Err(e) => assert!(
                matches!(
                    e,
                    envelope::EnvelopeError::Kid(_)
                        | envelope::EnvelopeError::KidMethod(_)
                        | envelope::EnvelopeError::UnknownKey
                        | envelope::EnvelopeError::Signature
                ),
                "{e:?}"
            ),
        }
    }
});
