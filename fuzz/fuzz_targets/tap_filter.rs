//! `GET /tap`'s query: whatever a user asks for is a filter or a message
//! naming the parameter, and a filter never panics deciding on a call.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protomesh::call::Direction;
use protomesh::identity::SpiffeId;
use protomesh::telemetry::tap::TapFilter;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else { return };
    match TapFilter::parse(query) {
        Ok(filter) => {
            let caller = SpiffeId::parse("spiffe://td/ns/shop/sa/web").ok();
            for direction in [Direction::Inbound, Direction::Outbound] {
                let _ = filter.wants(direction, "/shop.v1.Cart/Add", caller.as_ref());
            }
            assert!(filter.max_bytes <= protomesh::telemetry::tap::filter::MAX_MESSAGE_BYTES);
        }
        Err(message) => assert!(message.starts_with("tap: "), "{message}"),
    }
});
