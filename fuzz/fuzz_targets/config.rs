//! The config: a YAML file and `PROTOMESH_*` variables. The input's first
//! line is split at `;` into variables (`NAME=value`), the rest is the file.
//! Any input is a config or an error naming where it went wrong.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let (first, file) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&[][..], data),
    };
    let env: Vec<(String, String)> = String::from_utf8_lossy(first)
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (format!("PROTOMESH_{name}"), value.to_string()))
        .collect();
    let path = dir().path().join("protomesh.yaml");
    std::fs::write(&path, file).unwrap();
    if let Err(error) = protomesh::config::load(Some(&path), env) {
        let message = error.to_string();
        assert!(!message.is_empty());
    }
});
