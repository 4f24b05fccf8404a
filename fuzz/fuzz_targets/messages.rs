#![no_main]
//! Every signed message (opened from an envelope) and every message payload decoder.
use didgate_protocol::message::{
    self, Checkpoint, GrantBody, Message, Receipt, Refusal, Request, ResponseHead,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = message::open::<Request>(data);
    let _ = message::open::<GrantBody>(data);
    let _ = message::open::<Receipt>(data);
    let _ = message::open::<Refusal>(data);
    let _ = message::open::<Checkpoint>(data);
    if let Ok(r) = Request::decode(data) {
        // strict decoding: what decodes re-encodes and decodes to the same value
        assert_eq!(Request::decode(&r.encode()).ok(), Some(r));
    }
    // the fast decoders: whatever they accept, the strict ones accept, same value
    if let Some(fast) = Request::decode_plain(data) {
        assert_eq!(Request::decode(data), Ok(fast));
    }
    if let Some(fast) = Receipt::decode_plain(data) {
        assert_eq!(Receipt::decode(data), Ok(fast));
    }
    let _ = GrantBody::decode(data);
    let _ = Receipt::decode(data);
    let _ = Refusal::decode(data);
    let _ = Checkpoint::decode(data);
    let _ = ResponseHead::decode(data);
});
