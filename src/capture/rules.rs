//! The capture rules, as an nftables ruleset.
//!
//! nftables rather than iptables: a pod's network namespace holds only the
//! rules installed here, so nothing needs the iptables front end for
//! compatibility, and one `nft -f` transaction replaces the whole table
//! atomically, which makes a rerun (a restarted init container) leave exactly
//! the same rules. The ruleset text is what an operator reads back with
//! `nft list table inet protomesh`.

use std::fmt::Write;
use std::str::FromStr;

use ipnet::IpNet;

/// The table every rule lives in; replaced whole on each install.
pub const TABLE: &str = "protomesh";

/// What to capture, from `protomesh init`'s flags (or their variables, which
/// the injector sets from the pod's annotations).
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct CaptureRules {
    /// The sidecar's user ID: its own connections are never captured.
    #[arg(long, env = "PROTOMESH_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,
    /// Where the app's outbound TCP is redirected (the sidecar's `outbound.listen` port).
    #[arg(long, env = "PROTOMESH_OUTBOUND_PORT", default_value_t = 4140)]
    pub outbound_port: u16,
    /// Where inbound TCP is redirected (the sidecar's `inbound.listen` port).
    #[arg(long, env = "PROTOMESH_INBOUND_PORT", default_value_t = 4143)]
    pub inbound_port: u16,
    /// The sidecar's admin port, reached directly by the kubelet and Prometheus.
    #[arg(long, env = "PROTOMESH_ADMIN_PORT", default_value_t = 4191)]
    pub admin_port: u16,
    /// Inbound ports left uncaptured, comma separated; `8000-8100` is a range.
    #[arg(long, env = "PROTOMESH_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<PortRange>,
    /// Destination ports of outbound connections left uncaptured.
    #[arg(long, env = "PROTOMESH_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<PortRange>,
    /// Destination networks of outbound connections left uncaptured (`10.0.0.0/8`, `fd00::/8`).
    #[arg(long, env = "PROTOMESH_SKIP_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub skip_outbound_cidrs: Vec<IpNet>,
}

/// One port, or an inclusive range written `first-last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let port = |text: &str| match text.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!("`{text}` is not a port (1-65535); write a port or a range such as 8000-8100")),
        };
        let (first, last) = match text.split_once('-') {
            Some((first, last)) => (port(first)?, port(last)?),
            None => (port(text)?, port(text)?),
        };
        if first > last {
            return Err(format!("`{text}`: a range runs from the lower port to the higher"));
        }
        Ok(PortRange { first, last })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
    }
}

impl CaptureRules {
    /// The ruleset: one transaction that creates the table if it is missing,
    /// deletes it, and creates it anew with the rules.
    ///
    /// The outbound port calls with the workload's identity, so it takes
    /// only the pod's own connections: one from outside is neither
    /// redirected (the inbound would hand it to `127.0.0.1:<outbound port>`)
    /// nor let through, whatever the skip lists say.
    pub fn ruleset(&self) -> String {
        let mut inbound_kept = vec![
            PortRange::single(self.inbound_port),
            PortRange::single(self.admin_port),
            PortRange::single(self.outbound_port),
        ];
        inbound_kept.extend(self.skip_inbound_ports.iter().copied());
        let mut text = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
        text.push_str("\tchain sidecar_only {\n\t\ttype filter hook input priority filter; policy accept;\n");
        let _ = writeln!(text, "\t\tiifname != \"lo\" tcp dport {} reject with tcp reset", self.outbound_port);
        text.push_str("\t}\n");
        text.push_str("\tchain inbound {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n");
        text.push_str("\t\tiifname \"lo\" return\n");
        let _ = writeln!(text, "\t\ttcp dport {} return", set(&inbound_kept));
        let _ = writeln!(text, "\t\tmeta l4proto tcp redirect to :{}", self.inbound_port);
        text.push_str("\t}\n");
        text.push_str("\tchain outbound {\n\t\ttype nat hook output priority -100; policy accept;\n");
        let _ = writeln!(text, "\t\tmeta skuid {} return", self.proxy_uid);
        text.push_str("\t\toifname \"lo\" return\n");
        if !self.skip_outbound_ports.is_empty() {
            let _ = writeln!(text, "\t\ttcp dport {} return", set(&self.skip_outbound_ports));
        }
        let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) =
            self.skip_outbound_cidrs.iter().partition(|net| matches!(net, IpNet::V4(_)));
        if !v4.is_empty() {
            let _ = writeln!(text, "\t\tip daddr {} return", set(&v4));
        }
        if !v6.is_empty() {
            let _ = writeln!(text, "\t\tip6 daddr {} return", set(&v6));
        }
        // IPv6 connections go to [::1], where the sidecar listens too.
        let _ = writeln!(text, "\t\tmeta l4proto tcp redirect to :{}", self.outbound_port);
        text.push_str("\t}\n}\n");
        text
    }
}

impl PortRange {
    fn single(port: u16) -> PortRange {
        PortRange { first: port, last: port }
    }
}

fn set<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        rules: CaptureRules,
    }

    fn rules(args: &[&str]) -> Result<CaptureRules, String> {
        let args = std::iter::once("init").chain(args.iter().copied());
        Cli::try_parse_from(args).map(|cli| cli.rules).map_err(|e| e.to_string())
    }

    #[test]
    fn default_rules_keep_the_sidecars_own_traffic_and_its_ports() {
        let text = rules(&[]).unwrap().ruleset();
        assert!(text.starts_with("table inet protomesh\ndelete table inet protomesh\n"), "{text}");
        assert!(
            text.contains("tcp dport { 4143, 4191, 4140 } return\n\t\tmeta l4proto tcp redirect to :4143"),
            "{text}"
        );
        assert!(text.contains("type filter hook input priority filter; policy accept;\n\t\tiifname != \"lo\" tcp dport 4140 reject with tcp reset\n"), "{text}");
        assert!(text.contains("type nat hook output priority -100; policy accept;\n\t\tmeta skuid 2102 return\n\t\toifname \"lo\" return\n"), "{text}");
        assert!(text.ends_with("\t\tmeta l4proto tcp redirect to :4140\n\t}\n}\n"), "{text}");
    }

    #[test]
    fn skip_lists_become_sets() {
        let text = rules(&[
            "--skip-inbound-ports=22,9000-9100",
            "--skip-outbound-ports",
            "5432",
            "--skip-outbound-cidrs=10.96.0.0/12,fd00::/8,169.254.169.254/32",
        ])
        .unwrap()
        .ruleset();
        assert!(text.contains("tcp dport { 4143, 4191, 4140, 22, 9000-9100 } return"), "{text}");
        assert!(text.contains("tcp dport { 5432 } return"), "{text}");
        assert!(text.contains("ip daddr { 10.96.0.0/12, 169.254.169.254/32 } return"), "{text}");
        assert!(text.contains("ip6 daddr { fd00::/8 } return"), "{text}");
    }

    #[test]
    fn no_skip_list_opens_the_outbound_port_to_the_network() {
        let text = rules(&["--skip-inbound-ports=4000-4200", "--outbound-port=15001"]).unwrap().ruleset();
        assert!(text.contains("iifname != \"lo\" tcp dport 15001 reject with tcp reset"), "{text}");
        assert!(text.contains("tcp dport { 4143, 4191, 15001, 4000-4200 } return"), "never redirected: {text}");
    }

    #[test]
    fn bad_ports_and_networks_are_named() {
        let error = rules(&["--skip-inbound-ports=22,http"]).unwrap_err();
        assert!(error.contains("`http` is not a port"), "{error}");
        let error = rules(&["--skip-outbound-ports=9100-9000"]).unwrap_err();
        assert!(error.contains("from the lower port to the higher"), "{error}");
        let error = rules(&["--skip-outbound-cidrs=10.0.0.0/33"]).unwrap_err();
        assert!(error.contains("--skip-outbound-cidrs"), "{error}");
    }
}
