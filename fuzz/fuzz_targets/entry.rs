#![no_main]
//! Audit entries as read from a store or an export, and the verifier's fast decoder against
//! the strict one.
use didgate_audit::entry::Entry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Entry::decode(data) {
        assert_eq!(Entry::decode(&e.encode()).ok(), Some(e));
    }
    // the verifier's fast path: whatever it accepts, the strict decoder accepts, same value
    if let Some(fast) = Entry::decode_plain(data) {
        assert_eq!(Entry::decode_strict(data), Ok(fast));
    }
});
