//! Generates the example services' Rust types with the pure-Rust protox
//! compiler, so that no `protoc` is needed.

const PROTOS: &[&str] = &["../proto/examples/echo.proto", "../proto/examples/shop.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["../proto"])?;
    // `bytes` fields as `Bytes`, so payloads are shared rather than copied.
    tonic_prost_build::configure().bytes(".").compile_fds(descriptors)?;
    Ok(())
}
