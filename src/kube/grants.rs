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
//! repairs what changed while it was down; what fails is tried again every
//! 10 s. Between lists, a namespace that was never granted costs no request.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

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

/// How long a namespace whose bindings could not be kept waits before they are tried again.
const RETRY: Duration = Duration::from_secs(10);

/// Keeps the bindings of labelled namespaces until the process ends.
pub async fn run(client: kube::Client) {
    let namespaces = Api::<Namespace>::all(client.clone());
    let mut events = watcher::watcher(namespaces, watcher::Config::default()).backoff(Reconnect::default()).boxed();
    // The namespaces granted; at the end of each (re)list, the cluster-wide
    // bindings of every other namespace go.
    let mut granted = BTreeSet::new();
    // Namespaces whose bindings failed to be kept, and whether they are labelled.
    let mut failed: BTreeMap<String, bool> = BTreeMap::new();
    let mut retry = tokio::time::interval(RETRY);
    // Failed namespaces whose retry is due, taken one at a time between events.
    let mut due: Vec<(String, bool)> = Vec::new();
    loop {
        let (namespace, labelled, listing) = match due.pop() {
            Some((namespace, labelled)) => (namespace, labelled, true),
            None => tokio::select! {
                event = events.next() => match event {
                    None => return,
                    Some(Ok(Event::Init)) => {
                        granted.clear();
                        continue;
                    }
                    Some(Ok(Event::InitDone)) => {
                        if let Err(error) = collect_strays(&client, &granted).await {
                            tracing::warn!(%error, "cluster role bindings of unlabelled namespaces not collected");
                        }
                        continue;
                    }
                    Some(Ok(Event::InitApply(namespace))) => (name(&namespace), enabled(&namespace), true),
                    Some(Ok(Event::Apply(namespace))) => (name(&namespace), enabled(&namespace), false),
                    Some(Ok(Event::Delete(namespace))) => (name(&namespace), false, true),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "watching namespaces; trying again");
                        continue;
                    }
                },
                _ = retry.tick() => {
                    due.extend(std::mem::take(&mut failed));
                    continue;
                }
            },
        };
        // The namespace's latest state decides; a failure before it is moot.
        let was_failed = failed.remove(&namespace).is_some();
        // An unlabelled namespace has bindings to take out only if it had
        // them: when it was granted (or failed to be), or, at a (re)list, as
        // it may have been while the injector was down.
        if !labelled && !listing && !was_failed && !granted.contains(&namespace) {
            continue;
        }
        match reconcile(&client, &namespace, labelled).await {
            Ok(()) if labelled => {
                granted.insert(namespace);
            }
            Ok(()) => {
                granted.remove(&namespace);
            }
            Err(error) => {
                tracing::warn!(%error, "namespace bindings not kept; tried again in {RETRY:?}");
                failed.insert(namespace, labelled);
            }
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

fn made_here(annotations: Option<&BTreeMap<String, String>>) -> bool {
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
