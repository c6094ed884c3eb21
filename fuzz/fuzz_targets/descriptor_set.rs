//! Contracts given as a binary FileDescriptorSet.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protomesh::contract::ContractsConfig;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("contracts.pb");
    std::fs::write(&path, data).unwrap();
    let config = ContractsConfig { descriptor_sets: vec![path], ..Default::default() };
    let _ = protomesh::contract::Contracts::load(&config);
});
