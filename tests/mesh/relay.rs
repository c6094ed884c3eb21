//! No peer can borrow a workload's identity through its sidecar. Pods as in
//! `cluster.rs`: B (the client pod, `sa/client`) routes the echo service to D
//! (the server pod), whose authorization lets only B call; A (the peer pod,
//! `sa/peer`) is meshed, C (the outside pod) is not. A and C dial B's
//! outbound port, as though it were an app port, hoping that B's sidecar
//! sends their call on to D with B's identity. In every configuration of
//! B's mTLS mode, by gRPC or opaque TCP, over IPv4 and IPv6, D's app never
//! receives their call, while B's own app and D go on as before.

use std::net::{IpAddr, SocketAddr};

use crate::cluster::*;
use crate::harness::{TRUST_DOMAIN, id, within};
use crate::pods;
use crate::telemetry::{admin, sample};

const OUTBOUND_PORT: u16 = 4140;

/// D: strict, and only B may call.
fn only_b_may_call() -> String {
    format!(
        "{{listen: '0.0.0.0:4143', authorization: {{default: deny, rules: [{{name: only-b, methods: ['*'], \
         callers: ['spiffe://{TRUST_DOMAIN}/ns/test/sa/client']}}]}}}}"
    )
}

/// A's sidecar: captured calls no upstream routes go where A's app dialled,
/// over mTLS; with `opaque`, TCP to B's outbound port goes as opaque TCP
/// over mTLS instead.
fn peer_outbound(opaque: bool) -> String {
    if opaque {
        "{listen: '127.0.0.1:4140', opaque_ports: [4140], \
         original_destination: {opaque_mtls_networks: ['10.213.0.0/16', 'fd00:213::/32']}}"
            .into()
    } else {
        "{listen: '127.0.0.1:4140'}".into()
    }
}

/// The calls D's sidecar has handed to D's app.
fn calls_to_d(cluster: &Cluster) -> f64 {
    let metrics = cluster.server.run(|| async { admin(ADMIN.parse().unwrap(), "GET", "/metrics", "").await.1 });
    let metrics = metrics.join().unwrap();
    metrics
        .lines()
        .filter(|line| line.starts_with("protomesh_requests_total{direction=\"inbound\""))
        .filter(|line| line.contains("grpc_status=\"OK\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// B's outbound port, over IPv4 and (where the kernel has it) IPv6.
fn b_outbound(cluster: &Cluster) -> Vec<SocketAddr> {
    let mut targets = vec![SocketAddr::from((cluster.client.address, OUTBOUND_PORT))];
    if pods::ipv6() {
        targets.push(SocketAddr::from((cluster.client.address6(), OUTBOUND_PORT)));
    }
    targets
}

/// A cluster whose B takes `b_inbound` as its `inbound.mtls`, D lets only B
/// call, and A's sidecar is set by `opaque`.
fn start(b_mtls: &str, opaque: bool) -> Option<Cluster> {
    Cluster::start(Setup {
        client_config: format!("inbound: {{listen: '0.0.0.0:4143', mtls: {b_mtls}}}\n"),
        server_inbound: Some(only_b_may_call()),
        peer_outbound: Some(peer_outbound(opaque)),
        ..Setup::default()
    })
}

/// The controls: B's own app reaches D as B, and A calling D itself is denied.
fn b_may_call_d_and_a_may_not(cluster: &Cluster) {
    let service = cluster.service;
    let reply = cluster.in_client(move || async move {
        within("B's own call", echo_client(service).unary(request("from B's app"))).await.unwrap().into_inner()
    });
    assert_eq!(reply.caller, id("client").as_str(), "B's app calls D as B");
    let denied = cluster.peer.as_ref().unwrap().run(move || async move {
        // A has no upstream for the echo service: its call goes to the Service over mTLS as A.
        within("A's own call", echo_client(service).unary(request("from A's app"))).await.unwrap_err()
    });
    let denied = denied.join().unwrap();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
}

/// A (meshed) and C (not meshed) each dial B's outbound port: every call
/// fails, and D's app receives none of them.
fn relays_fail(cluster: &Cluster) {
    let before = calls_to_d(cluster);
    for target in b_outbound(cluster) {
        for pod in [cluster.peer.as_ref().unwrap(), &cluster.outside] {
            let name = pod.name.clone();
            let relayed = pod.run(move || async move {
                within("relay attempt", echo_client(target).unary(request("relay-canary"))).await
            });
            match relayed.join().unwrap() {
                Ok(reply) => panic!(
                    "{name}'s call through B's outbound port {target} reached D's app as {}; {}",
                    reply.into_inner().caller,
                    cluster.logs()
                ),
                Err(status) => assert_ne!(status.code(), tonic::Code::Ok),
            }
        }
    }
    assert_eq!(calls_to_d(cluster), before, "D's app received a relayed call; {}", cluster.logs());
}

#[test]
fn no_peer_calls_through_a_strict_sidecars_outbound_port() {
    let Some(cluster) = start("{mode: strict}", false) else { return };
    b_may_call_d_and_a_may_not(&cluster);
    relays_fail(&cluster);
}

#[test]
fn no_peer_calls_through_the_outbound_port_made_permissive() {
    let Some(cluster) = start("{mode: strict, ports: {4140: permissive}}", false) else { return };
    b_may_call_d_and_a_may_not(&cluster);
    relays_fail(&cluster);
}

#[test]
fn no_peer_calls_through_a_permissive_pods_outbound_port() {
    let Some(cluster) = start("{mode: permissive}", false) else { return };
    b_may_call_d_and_a_may_not(&cluster);
    relays_fail(&cluster);
}

#[test]
fn no_peer_relays_opaque_tcp_over_mtls_through_the_outbound_port() {
    for mode in ["{mode: strict}", "{mode: permissive}"] {
        let Some(cluster) = start(mode, true) else { return };
        relays_fail(&cluster);
    }
}

/// Rules that still redirect the outbound port to the inbound (as an older
/// `protomesh init` did): the inbound refuses a connection captured on its way
/// to the sidecar's own port, whatever the port's mode.
#[test]
fn the_inbound_refuses_what_capture_brings_for_a_sidecar_port() {
    let Some(cluster) = start("{mode: permissive}", false) else { return };
    b_rules_with(&cluster, &[("tcp dport { 4140, 4143, 4191 } return", "tcp dport { 4143, 4191 } return")]);
    relays_fail(&cluster);
    refused_by_b(&cluster, "{direction=\"inbound\",reason=\"sidecar_port\"}");
}

/// An outbound listener on every address, with no rule in the way: it takes
/// no connection from outside the pod.
#[test]
fn an_outbound_listener_open_to_the_network_refuses_peers() {
    let Some(cluster) = Cluster::start(Setup {
        client_listen: Some("0.0.0.0:4140"),
        server_inbound: Some(only_b_may_call()),
        peer_outbound: Some(peer_outbound(false)),
        ..Setup::default()
    }) else {
        return;
    };
    b_rules_with(&cluster, &[]);
    relays_fail(&cluster);
    refused_by_b(&cluster, "{direction=\"outbound\",reason=\"not_from_this_pod\"}");
    // The app in the pod still dials its sidecar on the pod's own address.
    let own = SocketAddr::from((IpAddr::from(cluster.client.address), OUTBOUND_PORT));
    let reply = cluster.in_client(move || async move {
        within("the pod's own call", echo_client(own).unary(request("own"))).await.unwrap().into_inner()
    });
    assert_eq!(reply.caller, id("client").as_str(), "the pod's own call goes through");
}

/// Replaces B's rules with what older versions installed: without the rule
/// that resets its outbound port from the network, and with `edits` (each
/// rule as nft lists it, and what it becomes).
fn b_rules_with(cluster: &Cluster, edits: &[(&str, &str)]) {
    let mut rules =
        cluster.client.ruleset().replace("\t\tiifname != \"lo\" tcp dport 4140 reject with tcp reset\n", "");
    for (rule, older) in edits {
        rules = rules.replace(rule, older);
    }
    cluster.client.install_ruleset(&format!("delete table inet protomesh\n{rules}"));
    let installed = cluster.client.ruleset();
    assert!(!installed.contains("reject") && edits.iter().all(|(_, older)| installed.contains(older)), "{installed}");
}

/// B's sidecar refused the relay attempts (two, or four with IPv6), counted under `labels`.
fn refused_by_b(cluster: &Cluster, labels: &str) {
    let series = format!("protomesh_connections_refused_total{labels}");
    let metrics = cluster.client.run(|| async { admin(ADMIN.parse().unwrap(), "GET", "/metrics", "").await.1 });
    let count = sample(&metrics.join().unwrap(), &series).unwrap_or(0.0);
    assert!(count >= 2.0, "{series}: {count}; {}", cluster.logs());
}
