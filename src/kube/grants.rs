//! `protomesh webhook --grant-namespaces`: the bindings every service account
//! of an injected namespace needs, kept by the injector, as `inject` adds them
//! per account for the manifests it reads. The webhook sees pods, not the
//! manifests they came from; so for each namespace labelled
//! `protomesh.io/inject=enabled` the injector applies [`rbac::namespace_bindings`]
//! (identity and discovery in the namespace, the Service lookup cluster-wide,
//! each to the namespace's service-account group), and takes them out again
//! when the label goes; a deleted namespace takes its RoleBindings with it,
//! and the injector its ClusterRoleBinding. Reconciled from a watch of the
//! namespaces, with server-side apply, so replicas agree and a restart
//! repairs what changed while it was down.

use std::collections::BTreeSet;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;

use super::rbac::{self, GRANTED_BY};
use super::settings;
use crate::discovery::kubernetes::Reconnect;

/// The field manager of the bindings applied here.
const MANAGER: &str = "protomesh-injector";

/// Keeps the bindings of labelled namespaces until the watch ends (it
/// retries on its own, so only with the process).
pub async fn run(client: kube::Client) {
    let namespaces = Api::<Namespace>::all(client.clone());
    let mut events = watcher::watcher(namespaces, watcher::Config::default()).backoff(Reconnect::default()).boxed();
    // The labelled namespaces seen while a (re)list runs; at its end, the
    // cluster-wide bindings of every other namespace go.
    let mut listed = BTreeSet::new();
    while let Some(event) = events.next().await {
        let result = match event {
            Ok(Event::Init) => {
                listed.clear();
                Ok(())
            }
            Ok(Event::InitApply(namespace)) => {
                let labelled = enabled(&namespace);
                if labelled {
                    listed.insert(name(&namespace));
                }
                reconcile(&client, &name(&namespace), labelled).await
            }
            Ok(Event::InitDone) => collect_strays(&client, &listed).await,
            Ok(Event::Apply(namespace)) => reconcile(&client, &name(&namespace), enabled(&namespace)).await,
            Ok(Event::Delete(namespace)) => reconcile(&client, &name(&namespace), false).await,
            Err(error) => Err(format!("watching namespaces: {error}")),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "namespace bindings not kept; tried again on the namespace's next change");
        }
    }
}

fn name(namespace: &Namespace) -> String {
    namespace.metadata.name.clone().unwrap_or_default()
}

fn enabled(namespace: &Namespace) -> bool {
    let labels = namespace.metadata.labels.as_ref();
    let terminating = namespace.metadata.deletion_timestamp.is_some();
    !terminating && labels.and_then(|l| l.get(settings::INJECT)).is_some_and(|v| v == "enabled")
}

/// Applies the namespace's bindings, or deletes those the injector made.
async fn reconcile(client: &kube::Client, namespace: &str, labelled: bool) -> Result<(), String> {
    for binding in rbac::namespace_bindings(namespace) {
        let name = binding["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let done = match binding["kind"].as_str() {
            Some("RoleBinding") => {
                let api = Api::<RoleBinding>::namespaced(client.clone(), namespace);
                keep(&api, &name, &binding, labelled).await
            }
            _ => keep(&Api::<ClusterRoleBinding>::all(client.clone()), &name, &binding, labelled).await,
        };
        done.map_err(|error| format!("{} for namespace {namespace}: {error}", rbac::described(&binding)))?;
    }
    if labelled {
        tracing::info!(%namespace, "bindings for the namespace's service accounts applied");
    }
    Ok(())
}

/// Applies `binding`, or deletes it if the injector made it; gone already is done.
async fn keep<K>(api: &Api<K>, name: &str, binding: &Value, labelled: bool) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    if labelled {
        return api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(binding)).await.map(drop);
    }
    match api.get_opt(name).await? {
        Some(found) if made_here(found.meta().annotations.as_ref()) => {
            api.delete(name, &DeleteParams::default()).await.map(drop).or_else(gone)
        }
        _ => Ok(()),
    }
}

fn made_here(annotations: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    annotations.and_then(|a| a.get(settings::CREATED_BY)).is_some_and(|by| by == GRANTED_BY)
}

fn gone(error: kube::Error) -> Result<(), kube::Error> {
    match &error {
        kube::Error::Api(status) if status.code == 404 => Ok(()),
        _ => Err(error),
    }
}

/// Deletes the cluster-wide bindings the injector made for namespaces no
/// longer labelled (or gone) while it was not watching.
async fn collect_strays(client: &kube::Client, labelled: &BTreeSet<String>) -> Result<(), String> {
    let api = Api::<ClusterRoleBinding>::all(client.clone());
    let made = api
        .list(&ListParams::default().labels("app.kubernetes.io/part-of=protomesh"))
        .await
        .map_err(|error| format!("listing cluster role bindings: {error}"))?;
    for binding in made.items.iter().filter(|b| made_here(b.metadata.annotations.as_ref())) {
        let name = binding.metadata.name.clone().unwrap_or_default();
        let namespace = name.strip_prefix("protomesh-service-lookup:").unwrap_or_default();
        if !labelled.contains(namespace) {
            api.delete(&name, &DeleteParams::default())
                .await
                .map(drop)
                .or_else(gone)
                .map_err(|error| format!("clusterrolebinding/{name}: {error}"))?;
        }
    }
    Ok(())
}
