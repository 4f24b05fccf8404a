#![no_main]
//! did:key strings and DID URLs (key ids): refused, or canonical.
use didgate_protocol::Did;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(did) = Did::parse(text) {
        // one key, one spelling
        assert_eq!(did.to_string(), text);
    }
    let _ = Did::from_key_id(text);
});
