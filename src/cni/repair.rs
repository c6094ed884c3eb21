//! Repair, as istio-cni's and linkerd-cni's repair controllers do it: a pod
//! whose network was set up while the plugin was not in its node's chain (the
//! DaemonSet being upgraded or restarted) has no capture rules; its
//! `protomesh-init` check then fails with [`NOT_CAPTURED_EXIT_CODE`] and it
//! would stay in `Init:CrashLoopBackOff`. The installer watches the pods of
//! its node and deletes such a pod, so that its controller makes it again,
//! now through the plugin. A pod no controller owns is left, and logged: no
//! one would make it again.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::capture::NOT_CAPTURED_EXIT_CODE;
use crate::discovery::kubernetes::{Reconnect, read_kubeconfig};
use crate::kube::{INIT, settings};

/// How long one watch runs before it is made again with the kubeconfig
/// read afresh (the installer rewrites it as the token rotates).
const RENEW: Duration = Duration::from_secs(600);

/// Deletes this node's pods whose capture check failed for want of rules,
/// until the process ends.
pub async fn run(node: String, kubeconfig: PathBuf) {
    loop {
        match read_kubeconfig(&kubeconfig)
            .await
            .and_then(|config| kube::Client::try_from(config).map_err(|e| e.to_string()))
        {
            Ok(client) => {
                let _ = tokio::time::timeout(RENEW, watch(client, &node)).await;
            }
            Err(error) => {
                tracing::warn!(%error, "protomesh-cni repair: no API client yet; trying again");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

async fn watch(client: kube::Client, node: &str) {
    let pods = Api::<Pod>::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher::watcher(pods, config).backoff(Reconnect::default()).boxed();
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(Event::Apply(pod) | Event::InitApply(pod)) => pod,
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "protomesh-cni repair: watching this node's pods");
                continue;
            }
        };
        if !needs_repair(&pod) {
            continue;
        }
        let (namespace, name) =
            (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
        if pod.metadata.owner_references.as_ref().is_none_or(Vec::is_empty) {
            tracing::warn!(%namespace, %name, "protomesh-cni repair: pod started without its capture rules, and no controller would make it again: delete it to repair it");
            continue;
        }
        // Only this pod, not one made again under the same name since.
        let same = DeleteParams {
            preconditions: Some(Preconditions { uid: pod.metadata.uid.clone(), resource_version: None }),
            ..Default::default()
        };
        match Api::<Pod>::namespaced(client.clone(), &namespace).delete(&name, &same).await {
            Ok(_) => {
                tracing::info!(%namespace, %name, "protomesh-cni repair: deleted a pod that started without its capture rules, for its controller to make it again")
            }
            Err(error) => {
                tracing::warn!(%namespace, %name, %error, "protomesh-cni repair: could not delete a pod without its capture rules")
            }
        }
    }
}

/// Whether `pod` asks the plugin for its rules and its capture check failed
/// because they are missing (now, or the last time it ran).
pub fn needs_repair(pod: &Pod) -> bool {
    let by_cni =
        pod.metadata.annotations.as_ref().and_then(|a| a.get(settings::CAPTURE_BY)).is_some_and(|by| by == "cni");
    let statuses = pod.status.as_ref().and_then(|s| s.init_container_statuses.as_ref());
    let check = statuses.into_iter().flatten().find(|status| status.name == INIT);
    let failed_for_rules = check.is_some_and(|status| {
        let states = [status.state.as_ref(), status.last_state.as_ref()];
        states
            .into_iter()
            .flatten()
            .filter_map(|state| state.terminated.as_ref())
            .any(|t| t.exit_code == i32::from(NOT_CAPTURED_EXIT_CODE))
    });
    by_cni && failed_for_rules
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(capture_by: &str, exit_code: i32, last: bool) -> Pod {
        let terminated = json!({ "terminated": { "exitCode": exit_code } });
        let (state, last_state) = if last {
            (json!({ "waiting": { "reason": "CrashLoopBackOff" } }), terminated)
        } else {
            (terminated, json!({}))
        };
        serde_json::from_value(json!({
            "metadata": { "name": "p", "annotations": { "protomesh.io/capture-by": capture_by } },
            "status": { "initContainerStatuses": [{ "name": INIT, "state": state, "lastState": last_state, "ready": false, "restartCount": 1, "image": "i", "imageID": "" }] },
        }))
        .unwrap()
    }

    #[test]
    fn only_a_pod_captured_by_the_plugin_whose_check_found_no_rules_is_repaired() {
        let code = i32::from(NOT_CAPTURED_EXIT_CODE);
        assert!(needs_repair(&pod("cni", code, false)));
        assert!(needs_repair(&pod("cni", code, true)), "in CrashLoopBackOff after the failed check");
        assert!(!needs_repair(&pod("cni", 1, true)), "another failure");
        assert!(!needs_repair(&pod("init", code, true)), "captured by its own init container");
    }
}
