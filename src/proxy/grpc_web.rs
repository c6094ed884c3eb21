//! gRPC-Web for browsers (work in progress on this branch): an opted-in
//! inbound port or listener serves `application/grpc-web` and `-text` over
//! HTTP/1.1, each call translated into an ordinary gRPC call through the
//! inbound stack, so every inbound policy applies; CORS preflights are
//! answered from config. `codec.rs` is the protocol's encoding.

pub mod codec;
pub mod cors;
