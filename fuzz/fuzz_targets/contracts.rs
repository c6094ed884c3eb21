//! Contracts: a `.proto` file compiled with the built-in options, its
//! methods tabled and their policy options read.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protomesh::contract::ContractsConfig;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(dir().path().join("fuzz.proto"), data).unwrap();
    let config = ContractsConfig {
        protos: vec!["fuzz.proto".into()],
        include: vec![dir().path().to_path_buf()],
        ..Default::default()
    };
    let _ = protomesh::contract::Contracts::load(&config);
});
