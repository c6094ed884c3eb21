//! Pods in network namespaces, for faults that loopback cannot show: each
//! pod is a namespace with its own address on a bridge, and what runs "in"
//! it runs on a thread that entered the namespace, so every socket it opens
//! is the pod's. Faults are real: nftables drops for a partition or packet
//! loss, a tbf qdisc for a slow link, and a pod is killed by stopping its
//! runtime, which closes its sockets as the kernel does for a killed process.
//!
//! The node routes between its pods and its Services: a Service is a virtual
//! IP that the node DNATs to its pods, as kube-proxy does, and masquerades,
//! so that replies from a pod on the same bridge come back through the node.
//! A pod's sidecar can run as a process of its own, as the sidecar's user,
//! behind the capture rules `protomesh init` installs.
//!
//! Needs root, `ip`, `tc`, `nft` and `setpriv` (CI has them); elsewhere the
//! tests that use pods skip, saying why.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The user a pod's sidecar process runs as, which the capture rules leave alone.
pub const PROXY_UID: u32 = 2102;

/// Why pods cannot be made here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "tc", "nft", "setpriv"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is not installed (apt-get install iproute2 nftables util-linux)"));
        }
    }
    None
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(output.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
}

/// Whether the sidecar's user can run `binary` where it is (a checkout
/// under root's home, say, it cannot reach).
pub fn proxy_user_can_run(binary: &Path) -> bool {
    let uid = PROXY_UID.to_string();
    let status = Command::new("setpriv")
        .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
        .arg(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    status.is_ok_and(|status| status.success())
}

/// Whether the kernel has IPv6; pods get IPv6 addresses too where it does.
pub fn ipv6() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

/// The address families pods have.
fn families() -> &'static [&'static str] {
    if ipv6() { &["ip", "ip6"] } else { &["ip"] }
}

/// Turns off IPv6 duplicate address detection for the interfaces made in
/// namespace `name` from now on: while an interface's link-local address is
/// tentative, neighbour discovery waits, and a connection's first packets are
/// lost for a second or two.
fn without_dad(name: &str) {
    if ipv6() {
        let off = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"];
        run("ip", &["netns", "exec", name, "sysctl", "-qw", off[0], off[1]]);
    }
}

/// Runs `script` through `nft -f` in the network namespace `netns`.
pub fn nft(netns: &str, script: &str) {
    use std::io::Write;
    let mut nft = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let output = nft.wait_with_output().unwrap();
    assert!(output.status.success(), "nft -f: {}\n{script}", String::from_utf8_lossy(&output.stderr));
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
    services: AtomicU32,
}

impl Node {
    pub fn new() -> Node {
        static NODES: AtomicU32 = AtomicU32::new(0);
        let index = NODES.fetch_add(1, Ordering::Relaxed);
        // Distinct per test process and per node within it, and short: interface names have 15 bytes.
        let name = format!("pm{}n{index}", std::process::id() % 100_000);
        let subnet = (std::process::id() % 200) as u8 ^ (index as u8);
        run("ip", &["netns", "add", &name]);
        without_dad(&name);
        run("ip", &["-n", &name, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &name, "link", "set", "br0", "up"]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        run("ip", &["-n", &name, "addr", "add", &format!("{}/24", Self::gateway(subnet)), "dev", "br0"]);
        run("ip", &["netns", "exec", &name, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        if ipv6() {
            run("ip", &["-n", &name, "addr", "add", &format!("{}/64", Self::gateway6(subnet)), "dev", "br0"]);
            run("ip", &["netns", "exec", &name, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        }
        for family in families() {
            let table = format!(
                "add table {family} services; \
                 add chain {family} services prerouting {{ type nat hook prerouting priority dstnat; }}; \
                 add chain {family} services postrouting {{ type nat hook postrouting priority srcnat; }}; \
                 add rule {family} services postrouting ct status dnat masquerade"
            );
            run("ip", &["netns", "exec", &name, "nft", &table]);
        }
        Node { name, subnet, pods: AtomicU32::new(0), services: AtomicU32::new(0) }
    }

    /// The node's address on its bridge, which its pods reach.
    pub fn address(&self) -> Ipv4Addr {
        Self::gateway(self.subnet)
    }

    fn gateway(subnet: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, subnet, 1)
    }

    fn gateway6(subnet: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x213, subnet.into(), 0, 0, 0, 0, 1)
    }

    /// A Service: a virtual IP whose `port` the node sends to the same port
    /// of one of `pods`, chosen in turn.
    pub fn service(&self, port: u16, pods: &[&Pod]) -> SocketAddr {
        let index = self.services.fetch_add(1, Ordering::Relaxed);
        let vip = Ipv4Addr::new(10, 96, self.subnet, index as u8 + 10);
        self.dnat("ip", vip.into(), port, pods.iter().map(|pod| pod.address.into()))
    }

    /// As [`Node::service`], on an IPv6 virtual IP to the pods' IPv6 addresses.
    pub fn service6(&self, port: u16, pods: &[&Pod]) -> SocketAddr {
        let index = self.services.fetch_add(1, Ordering::Relaxed);
        let vip = Ipv6Addr::new(0xfd00, 0x96, self.subnet.into(), 0, 0, 0, 0, index as u16 + 10);
        self.dnat("ip6", vip.into(), port, pods.iter().map(|pod| pod.address6().into()))
    }

    fn dnat(&self, family: &str, vip: IpAddr, port: u16, targets: impl Iterator<Item = IpAddr>) -> SocketAddr {
        let targets: Vec<String> = targets.enumerate().map(|(i, target)| format!("{i} : {target}")).collect();
        let rule = format!(
            "add rule {family} services prerouting {family} daddr {vip} tcp dport {port} \
             dnat to numgen inc mod {} map {{ {} }}",
            targets.len(),
            targets.join(", ")
        );
        run("ip", &["netns", "exec", &self.name, "nft", &rule]);
        SocketAddr::new(vip, port)
    }

    /// Runs `task` on a thread in the node's namespace, where the bridge is.
    pub fn run<T: Send + 'static>(&self, task: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name);
            task()
        })
    }

    /// A new pod whose network `set_up` makes, as a container runtime's CNI
    /// plugins do: given the node's namespace, where they run, and the pod's
    /// (empty) namespace, it returns the address they gave the pod's `eth0`.
    pub fn pod_by(&self, set_up: impl FnOnce(&str, &Path) -> Ipv4Addr) -> Pod {
        let index = self.pods.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{}p{index}", self.name);
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        let address = set_up(&self.name, &Path::new("/run/netns").join(&name));
        Pod { name, address, interface: "eth0".into(), subnet: self.subnet, index: u16::from(address.octets()[3]) }
    }

    /// The suite's API server, in the node's namespace at `ip` (a port of
    /// its own), served by a thread of its own for as long as the process runs.
    pub fn api_server(&self, ip: IpAddr) -> std::sync::Arc<crate::apiserver::ApiServer> {
        let (sender, receiver) = std::sync::mpsc::channel();
        self.run(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let api = crate::apiserver::ApiServer::start_at(SocketAddr::new(ip, 0)).await;
                sender.send(api).unwrap();
                std::future::pending::<()>().await
            })
        });
        receiver.recv().unwrap()
    }

    /// The node's network namespace.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The /24 of the node's bridge, `br0`, and its gateway address.
    pub fn subnet(&self) -> (String, Ipv4Addr) {
        (format!("10.213.{}.0/24", self.subnet), Self::gateway(self.subnet))
    }

    /// A new pod on the bridge, with the next address.
    pub fn pod(&self) -> Pod {
        let index = self.pods.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{}p{index}", self.name);
        let address = Ipv4Addr::new(10, 213, self.subnet, index as u8 + 1);
        run("ip", &["netns", "add", &name]);
        without_dad(&name);
        let (outside, inside) = (format!("{name}o"), format!("{name}i"));
        run(
            "ip",
            &["-n", &self.name, "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &name],
        );
        run("ip", &["-n", &self.name, "link", "set", &outside, "master", "br0", "up"]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        run("ip", &["-n", &name, "addr", "add", &format!("{address}/24"), "dev", &inside]);
        run("ip", &["-n", &name, "link", "set", &inside, "up"]);
        run("ip", &["-n", &name, "route", "add", "default", "via", &Self::gateway(self.subnet).to_string()]);
        let pod = Pod { name, address, interface: inside, subnet: self.subnet, index: index as u16 + 1 };
        if ipv6() {
            let address6 = format!("{}/64", pod.address6());
            run("ip", &["-n", &pod.name, "addr", "add", &address6, "dev", &pod.interface]);
            let gateway = Self::gateway6(self.subnet).to_string();
            run("ip", &["-n", &pod.name, "-6", "route", "add", "default", "via", &gateway]);
        }
        pod
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
    subnet: u8,
    index: u16,
}

impl Pod {
    /// The pod's IPv6 address, where the kernel has IPv6.
    pub fn address6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x213, self.subnet.into(), 0, 0, 0, 0, self.index)
    }

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

    /// Runs `protomesh init` with `args` in the pod, as its init container
    /// would; returns its output.
    pub fn init(&self, args: &[&str]) -> std::process::Output {
        self.init_command().args(args).output().unwrap()
    }

    /// Runs `protomesh init` in the pod with only the variables `env` (and
    /// `PATH`, which an image sets).
    pub fn init_with_env(&self, env: &[(String, String)]) -> std::process::Output {
        let mut command = self.init_command();
        command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        command.envs(env.iter().cloned()).output().unwrap()
    }

    fn init_command(&self) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_protomesh"), "init"]);
        command
    }

    /// The capture rules installed in the pod, as nft lists them.
    pub fn ruleset(&self) -> String {
        let output = Command::new("ip").args(["netns", "exec", &self.name, "nft", "list", "ruleset"]).output().unwrap();
        String::from_utf8(output.stdout).unwrap()
    }

    /// Starts `BINARY run --config CONFIG` in the pod as the sidecar's
    /// user, with `env` besides, its log written to `log`.
    pub fn sidecar(&self, binary: &Path, config: &Path, env: &[(String, String)], log: &Path) -> Child {
        let log = std::fs::File::create(log).unwrap();
        let uid = PROXY_UID.to_string();
        Command::new("ip")
            .args(["netns", "exec", &self.name, "setpriv", "--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .arg(binary)
            .args(["run", "--config"])
            .arg(config)
            .env("PROTOMESH_LOG", "info,protomesh=debug")
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Runs `script` through `nft -f` in the pod: rules other than those
    /// `protomesh init` installs.
    pub fn install_ruleset(&self, script: &str) {
        nft(&self.name, script);
    }

    fn nft(&self, script: &str) {
        nft(&self.name, script);
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
