//! Pods in network namespaces, for faults that loopback cannot show: each
//! pod is a namespace with its own address on a bridge, and what runs "in"
//! it runs on a thread that entered the namespace, so every socket it opens
//! is the pod's. Faults are real: nftables drops for a partition or packet
//! loss, a tbf qdisc for a slow link, and a pod is killed by stopping its
//! runtime, which closes its sockets as the kernel does for a killed process.
//!
//! Needs root, `ip`, `tc` and `nft` (CI has them); elsewhere the tests that
//! use pods skip, saying why.

use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Why pods cannot be made here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "tc", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is not installed (apt-get install iproute2 nftables)"));
        }
    }
    None
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(output.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
}

/// Enters the network namespace `name` on this thread.
fn enter(name: &str) {
    let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: the descriptor is a namespace file, open for the duration of the call.
    let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(entered, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// A bridge in a namespace of its own, with a /24 for its pods; torn down when dropped.
pub struct Node {
    name: String,
    subnet: u8,
    pods: AtomicU32,
}

impl Node {
    pub fn new() -> Node {
        static NODES: AtomicU32 = AtomicU32::new(0);
        let index = NODES.fetch_add(1, Ordering::Relaxed);
        // Distinct per test process and per node within it, and short: interface names have 15 bytes.
        let name = format!("pm{}n{index}", std::process::id() % 100_000);
        let subnet = (std::process::id() % 200) as u8 ^ (index as u8);
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &name, "link", "set", "br0", "up"]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Node { name, subnet, pods: AtomicU32::new(0) }
    }

    /// A new pod on the bridge, with the next address.
    pub fn pod(&self) -> Pod {
        let index = self.pods.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{}p{index}", self.name);
        let address = Ipv4Addr::new(10, 213, self.subnet, index as u8 + 1);
        run("ip", &["netns", "add", &name]);
        let (outside, inside) = (format!("{name}o"), format!("{name}i"));
        run(
            "ip",
            &["-n", &self.name, "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &name],
        );
        run("ip", &["-n", &self.name, "link", "set", &outside, "master", "br0", "up"]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        run("ip", &["-n", &name, "addr", "add", &format!("{address}/24"), "dev", &inside]);
        run("ip", &["-n", &name, "link", "set", &inside, "up"]);
        Pod { name, address, interface: inside }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for index in 1..=self.pods.load(Ordering::Relaxed) {
            let _ = Command::new("ip").args(["netns", "del", &format!("{}p{index}", self.name)]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

#[derive(Clone)]
pub struct Pod {
    pub name: String,
    pub address: Ipv4Addr,
    interface: String,
}

impl Pod {
    /// Runs `task` on a thread inside the pod, on a runtime of its own, and
    /// returns what it returns.
    pub fn run<F, T>(&self, task: impl FnOnce() -> F + Send + 'static) -> std::thread::JoinHandle<T>
    where
        F: Future<Output = T>,
        T: Send + 'static,
    {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(task())
        })
    }

    fn nft(&self, script: &str) {
        run("ip", &["netns", "exec", &self.name, "nft", script]);
    }

    /// Cuts the pod off: every packet in or out is dropped, silently, as a
    /// partition or a dead node would.
    pub fn partition(&self) {
        self.nft(&format!(
            "add table inet fault; \
             add chain inet fault input {{ type filter hook input priority 0; }}; \
             add chain inet fault output {{ type filter hook output priority 0; }}; \
             add rule inet fault input iifname {0} drop; \
             add rule inet fault output oifname {0} drop",
            self.interface
        ));
    }

    /// Makes the pod's link slow and lossy: `rate` out of the pod, and
    /// `loss_percent` of the packets coming in dropped.
    pub fn slow(&self, rate: &str, loss_percent: u8) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "tc",
                "qdisc",
                "add",
                "dev",
                &self.interface,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "16kb",
                "latency",
                "500ms",
            ],
        );
        self.nft(&format!(
            "add table inet fault; \
             add chain inet fault input {{ type filter hook input priority 0; }}; \
             add rule inet fault input iifname {} numgen random mod 100 < {loss_percent} drop",
            self.interface
        ));
    }

    /// Undoes `partition` and `slow`.
    pub fn heal(&self) {
        let _ = Command::new("ip").args(["netns", "exec", &self.name, "nft", "delete table inet fault"]).output();
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.name, "tc", "qdisc", "del", "dev", &self.interface, "root"])
            .output();
    }
}
