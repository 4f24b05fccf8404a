#![no_main]
//! Audit entries as read from a store or an export.
use didgate_audit::entry::Entry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Entry::decode(data) {
        assert_eq!(Entry::decode(&e.encode()).ok(), Some(e));
    }
});
