//! `protomesh inject` and `uninject` input: YAML or JSON manifests. What is
//! injected renders to a manifest that reads back, and injecting it again
//! changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protomesh::kube::manifest::{self, Options};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mut manifests) = manifest::parse(text, "fuzz") else { return };
    let options = Options { all: true, ..Default::default() };
    if manifest::inject(&mut manifests, &options).is_err() {
        return;
    }
    let rendered = manifest::render(&manifests);
    let mut again = manifest::parse(&rendered, "rendered").expect("what inject writes reads back");
    manifest::inject(&mut again, &options).expect("an injected manifest injects again");
    assert_eq!(manifest::render(&again), rendered, "injecting twice changes nothing");
    let _ = manifest::uninject(&mut again);
});
