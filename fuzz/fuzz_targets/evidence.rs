#![no_main]
//! Evidence bundles: decoded and checked alone, or refused.
use didgate_audit::evidence;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = evidence::Bundle::decode(data);
    let _ = evidence::check(data);
});
