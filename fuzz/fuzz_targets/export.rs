#![no_main]
//! Export files (specs/audit-log.md, "Export files"): read or refused, never a panic.
use didgate_audit::export;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = export::read(data, "fuzz");
});
