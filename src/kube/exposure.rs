//! Services that take traffic from outside the cluster (LoadBalancer and
//! NodePort) and the pod ports they send it to. `inject` reads them from its
//! input, so that a pod behind such a Service takes its clients' plaintext on
//! those ports with no annotation: the node forwards them from outside the
//! mesh, where no sidecar could wrap them in mTLS. Meshed callers still use
//! mTLS there, and the pod's other ports stay strict.

use serde_json::{Map, Value};

/// One Service of the input that outside clients reach.
#[derive(Clone, Debug, PartialEq)]
pub struct Exposure {
    /// `LoadBalancer service/frontend-external`, as the report names it.
    pub service: String,
    /// `None`: the namespace of objects that name none.
    namespace: Option<String>,
    selector: Map<String, Value>,
    /// Each port's `targetPort` (a number or a container port's name), or its `port`.
    target_ports: Vec<Value>,
}

impl Exposure {
    /// The LoadBalancer and NodePort Services among `objects`. A Service
    /// without a selector picks no pod by labels, so it exposes none here.
    pub fn of<'a>(objects: impl Iterator<Item = &'a Value>) -> Vec<Exposure> {
        objects
            .filter(|object| object["kind"] == "Service")
            .filter_map(|service| {
                let kind = service["spec"]["type"].as_str().filter(|t| matches!(*t, "LoadBalancer" | "NodePort"))?;
                let selector = service["spec"]["selector"].as_object().filter(|s| !s.is_empty())?.clone();
                let ports = service["spec"]["ports"].as_array().into_iter().flatten();
                let target_ports = ports
                    .filter(|port| port["protocol"].as_str().unwrap_or("TCP") == "TCP")
                    .map(|port| port.get("targetPort").unwrap_or(&port["port"]).clone())
                    .collect();
                let name = service["metadata"]["name"].as_str().unwrap_or("(unnamed)");
                Some(Exposure {
                    service: format!("{kind} service/{name}"),
                    namespace: service["metadata"]["namespace"].as_str().map(str::to_string),
                    selector,
                    target_ports,
                })
            })
            .collect()
    }

    /// The ports of `template`, in `namespace`, that this Service sends
    /// outside traffic to; none when it does not select the pod.
    pub fn ports_of(&self, template: &Value, namespace: Option<&str>, default_namespace: Option<&str>) -> Vec<u16> {
        let same_namespace = self.namespace.as_deref().or(default_namespace) == namespace;
        let labels = &template["metadata"]["labels"];
        let selected = self.selector.iter().all(|(key, value)| &labels[key] == value);
        if !(same_namespace && selected) {
            return Vec::new();
        }
        let containers = template["spec"]["containers"].as_array().into_iter().flatten();
        let declared: Vec<&Value> = containers.filter_map(|c| c["ports"].as_array()).flatten().collect();
        self.target_ports
            .iter()
            .filter_map(|target| match target {
                Value::String(name) => declared.iter().find(|p| p["name"] == name.as_str())?["containerPort"].as_u64(),
                number => number.as_u64(),
            })
            .filter_map(|port| u16::try_from(port).ok().filter(|port| *port > 0))
            .collect()
    }
}

/// Each port of `template` that a Service of `exposures` takes outside
/// traffic to, with the first such Service.
pub fn exposed_ports(
    exposures: &[Exposure],
    template: &Value,
    namespace: Option<&str>,
    default_namespace: Option<&str>,
) -> Vec<(u16, String)> {
    let mut ports: Vec<(u16, String)> = Vec::new();
    for exposure in exposures {
        for port in exposure.ports_of(template, namespace, default_namespace) {
            if !ports.iter().any(|(known, _)| *known == port) {
                ports.push((port, exposure.service.clone()));
            }
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn frontend() -> Value {
        json!({
            "metadata": { "labels": { "app": "frontend", "tier": "web" } },
            "spec": { "containers": [{ "name": "server", "ports": [{ "name": "http", "containerPort": 8080 }, { "containerPort": 9090 }] }] },
        })
    }

    fn service(kind: &str, namespace: Option<&str>, target: Value) -> Value {
        let mut service = json!({
            "kind": "Service",
            "metadata": { "name": "frontend-external" },
            "spec": { "type": kind, "selector": { "app": "frontend" }, "ports": [{ "port": 80, "targetPort": target }] },
        });
        if let Some(namespace) = namespace {
            service["metadata"]["namespace"] = json!(namespace);
        }
        service
    }

    #[test]
    fn a_load_balancer_or_node_port_exposes_the_ports_it_targets_on_the_pods_it_selects() {
        let objects = [service("LoadBalancer", Some("shop"), json!(8080)), service("NodePort", None, json!("http"))];
        let exposures = Exposure::of(objects.iter());
        assert_eq!(exposures.len(), 2);
        assert_eq!(exposures[0].ports_of(&frontend(), Some("shop"), None), vec![8080]);
        assert_eq!(exposures[0].ports_of(&frontend(), Some("other"), None), Vec::<u16>::new(), "another namespace");
        assert_eq!(exposures[1].ports_of(&frontend(), Some("shop"), Some("shop")), vec![8080], "a named target port");
        let exposed = exposed_ports(&exposures, &frontend(), Some("shop"), Some("shop"));
        assert_eq!(exposed, vec![(8080, "LoadBalancer service/frontend-external".to_string())], "each port once");

        let mut other = frontend();
        other["metadata"]["labels"]["app"] = json!("cart");
        assert!(exposed_ports(&exposures, &other, Some("shop"), None).is_empty(), "not selected");
    }

    #[test]
    fn cluster_ip_services_and_services_without_a_selector_expose_nothing() {
        let mut headless = service("LoadBalancer", None, json!(8080));
        headless["spec"].as_object_mut().unwrap().remove("selector");
        let objects = [service("ClusterIP", None, json!(8080)), service("NodePort", None, json!("grpc")), headless];
        let exposures = Exposure::of(objects.iter());
        assert_eq!(exposures.len(), 1, "only the NodePort has a selector and a type that exposes");
        assert!(exposed_ports(&exposures, &frontend(), None, None).is_empty(), "no container port is named grpc");
        let defaulted = [json!({ "kind": "Service", "metadata": { "name": "web" },
            "spec": { "type": "NodePort", "selector": { "tier": "web" }, "ports": [{ "port": 9090 }] } })];
        assert_eq!(
            exposed_ports(&Exposure::of(defaulted.iter()), &frontend(), None, None),
            vec![(9090, "NodePort service/web".to_string())],
            "no targetPort: the port itself"
        );
    }
}
