//! What `protomesh-cni` reads: a node's network configuration (a list, or a
//! single plugin's), which the installer chains the plugin into, and a pod
//! as the API returns it, whose capture rules the plugin installs. Chaining
//! puts the plugin last exactly once and keeps every other plugin as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protomesh::cni::install::{PLUGIN, chained};
use protomesh::cni::rules_for;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
    let _ = rules_for(&value, "fuzz");
    let entry = json!({ "type": PLUGIN });
    let Ok(list) = chained(value.clone(), entry.clone()) else { return };
    let plugins = list["plugins"].as_array().expect("a list");
    assert_eq!(plugins.last(), Some(&entry));
    assert_eq!(plugins.iter().filter(|p| p["type"] == PLUGIN).count(), 1);
    assert_eq!(chained(list.clone(), entry).expect("a list chains again"), list, "chaining twice changes nothing");
    if let Some(before) = value["plugins"].as_array() {
        let others: Vec<&Value> = before.iter().filter(|p| p["type"] != PLUGIN).collect();
        assert_eq!(plugins[..plugins.len() - 1].iter().collect::<Vec<_>>(), others);
    }
});
