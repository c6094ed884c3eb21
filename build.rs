//! Generates Rust types for the gRPC health messages (the sidecar performs
//! the app's gRPC probes; the policy options are read reflectively, as
//! contracts are) with the pure-Rust protox compiler, so that no `protoc` is needed anywhere; and lays out
//! the release binary's functions in the order `bench/link_order.py` recorded.

const PROTOS: &[&str] = &["proto/grpc/health/v1/health.proto"];
const LINK_ORDER: &str = "bench/protomesh.order";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    // Messages only: the sidecar speaks HTTP/2 itself and carries no tonic transport.
    tonic_prost_build::configure().build_client(false).build_server(false).compile_fds(descriptors)?;
    order_functions()
}

/// Code run at start sits together and so does code run under load: an idle
/// sidecar maps fewer pages of text, a busy one touches fewer. Only where the
/// linker is rustc's default lld (x86_64 Linux) and only for release builds;
/// functions the file names but the binary lacks are skipped.
fn order_functions() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={LINK_ORDER}");
    let target = std::env::var("TARGET")?;
    let profile = std::env::var("PROFILE")?;
    if target == "x86_64-unknown-linux-gnu" && profile == "release" {
        let order = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join(LINK_ORDER);
        println!("cargo:rustc-link-arg-bin=protomesh=-Wl,--symbol-ordering-file={}", order.display());
        println!("cargo:rustc-link-arg-bin=protomesh=-Wl,--no-warn-symbol-ordering");
    }
    Ok(())
}
