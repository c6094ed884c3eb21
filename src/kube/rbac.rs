//! What an injected pod's service account must be granted for its sidecar
//! to start and to find what it calls: bindings to the ClusterRoles that
//! `k8s/identity` (`protomesh-identity`: csi-driver-spiffe asks for the
//! pod's certificate as its service account) and `k8s/discovery`
//! (`protomesh-discovery` in its namespace, `protomesh-service-lookup`
//! cluster-wide) install once per cluster. One binding per service account
//! and role, named after both, so that manifests injected apart (one app at
//! a time) add to each other's grants and never replace them, and injecting
//! again adds nothing. `protomesh-pod-lookup` is left to bind by hand: it
//! reads every pod of the cluster, more than most apps need.

use serde_json::{Value, json};

use super::settings::{self, IdentitySource, Settings};

/// The value of [`settings::CREATED_BY`] on the objects added here, by
/// which `uninject` knows them.
pub const ADDED_BY: &str = "protomesh inject";

/// A service account that injected pods run as.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Account {
    pub namespace: String,
    pub name: String,
    /// Whether csi-driver-spiffe requests its pods' certificates (not when
    /// they come from a Secret, `protomesh.io/identity: secret`).
    pub requests_certificates: bool,
}

impl Account {
    /// The service account of a pod injected with `settings`, in `namespace`.
    pub fn of(settings: &Settings, namespace: &str) -> Account {
        let requests_certificates = settings.identity == IdentitySource::Csi;
        Account { namespace: namespace.into(), name: settings.service_account.clone(), requests_certificates }
    }
}

/// The bindings `account` needs: in its namespace, to `protomesh-identity`
/// (when its certificates are requested) and `protomesh-discovery`;
/// cluster-wide, to `protomesh-service-lookup`.
pub fn bindings(account: &Account) -> Vec<Value> {
    let Account { namespace, name, requests_certificates } = account;
    let subject = json!({ "kind": "ServiceAccount", "name": name, "namespace": namespace });
    let binding = |kind: &str, role: &str, binding_name: String, namespace: Option<&str>| {
        binding_to(kind, role, binding_name, namespace, &subject, ADDED_BY)
    };
    // Colons as Kubernetes' own bindings use them: neither a namespace nor a
    // service account name has one, so no two accounts share a name.
    let identity = binding("RoleBinding", "protomesh-identity", format!("protomesh-identity:{name}"), Some(namespace));
    let discovery =
        binding("RoleBinding", "protomesh-discovery", format!("protomesh-discovery:{name}"), Some(namespace));
    let lookup = binding(
        "ClusterRoleBinding",
        "protomesh-service-lookup",
        format!("protomesh-service-lookup:{namespace}:{name}"),
        None,
    );
    let identity = requests_certificates.then_some(identity);
    identity.into_iter().chain([discovery, lookup]).collect()
}

/// The value of [`settings::CREATED_BY`] on the bindings [`namespace_bindings`] makes.
pub const GRANTED_BY: &str = "protomesh injector";

/// The bindings for every service account of `namespace` (the group
/// `system:serviceaccounts:<namespace>`), which the injector keeps for the
/// namespaces labelled `protomesh.io/inject=enabled`: in it, to
/// `protomesh-identity` and `protomesh-discovery`; cluster-wide, to
/// `protomesh-service-lookup`.
pub fn namespace_bindings(namespace: &str) -> Vec<Value> {
    let group = json!({ "kind": "Group", "apiGroup": "rbac.authorization.k8s.io",
        "name": format!("system:serviceaccounts:{namespace}") });
    let binding = |kind: &str, role: &str, name: String, namespace: Option<&str>| {
        binding_to(kind, role, name, namespace, &group, GRANTED_BY)
    };
    vec![
        binding("RoleBinding", "protomesh-identity", "protomesh-identity".into(), Some(namespace)),
        binding("RoleBinding", "protomesh-discovery", "protomesh-discovery".into(), Some(namespace)),
        binding(
            "ClusterRoleBinding",
            "protomesh-service-lookup",
            format!("protomesh-service-lookup:{namespace}"),
            None,
        ),
    ]
}

/// A binding of `subject` to ClusterRole `role`, annotated as made by `made_by`.
fn binding_to(kind: &str, role: &str, name: String, namespace: Option<&str>, subject: &Value, made_by: &str) -> Value {
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), json!(name));
    if let Some(namespace) = namespace {
        metadata.insert("namespace".into(), json!(namespace));
    }
    metadata.insert("labels".into(), json!({ "app.kubernetes.io/part-of": "protomesh" }));
    metadata.insert("annotations".into(), json!({ settings::CREATED_BY: made_by }));
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": metadata,
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
        "subjects": [subject],
    })
}

/// Whether `object` is one that [`bindings`] made.
pub fn added(object: &Value) -> bool {
    object["metadata"]["annotations"][settings::CREATED_BY] == ADDED_BY
}

/// `kind/name`, and ` (namespace)` for a namespaced object: how reports name it.
pub fn described(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or_default().to_lowercase();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    match object["metadata"]["namespace"].as_str() {
        Some(namespace) => format!("{kind}/{name} ({namespace})"),
        None => format!("{kind}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::settings::Defaults;

    /// The account of a pod template with `annotations` and `spec`, in namespace `shop`.
    fn account_of(annotations: Value, spec: Value) -> Account {
        let template = json!({ "metadata": { "annotations": annotations }, "spec": spec });
        Account::of(&Settings::read(&template, "w", &Defaults::default()).unwrap(), "shop")
    }

    #[test]
    fn a_pod_runs_as_its_named_service_account_or_default() {
        let of = |spec: Value| account_of(json!({}), spec).name;
        assert_eq!(of(json!({ "serviceAccountName": "cart" })), "cart");
        assert_eq!(of(json!({ "serviceAccount": "legacy" })), "legacy");
        assert_eq!(of(json!({})), "default");
    }

    #[test]
    fn certificates_from_a_secret_need_no_grant_to_request_them() {
        let account = account_of(json!({ settings::IDENTITY: "secret" }), json!({}));
        assert!(!account.requests_certificates);
        let kinds: Vec<String> = bindings(&account).iter().map(described).collect();
        assert_eq!(
            kinds,
            [
                "rolebinding/protomesh-discovery:default (shop)",
                "clusterrolebinding/protomesh-service-lookup:shop:default"
            ]
        );
    }

    #[test]
    fn each_account_gets_its_own_bindings_to_the_three_roles() {
        let account = Account { namespace: "shop".into(), name: "cart".into(), requests_certificates: true };
        let made = bindings(&account);
        let named: Vec<String> = made.iter().map(described).collect();
        assert_eq!(
            named,
            [
                "rolebinding/protomesh-identity:cart (shop)",
                "rolebinding/protomesh-discovery:cart (shop)",
                "clusterrolebinding/protomesh-service-lookup:shop:cart",
            ]
        );
        for binding in &made {
            assert!(added(binding));
            assert_eq!(binding["subjects"], json!([{ "kind": "ServiceAccount", "name": "cart", "namespace": "shop" }]));
            assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
        }
    }
}
