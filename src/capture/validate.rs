//! `protomesh init --validate`: that the pod's capture rules are in place,
//! checked as the app meets them, by a process with no privilege (the node's
//! CNI plugin installed them). It listens where the rules send the app's
//! outbound connections, dials an address outside the pod, and looks for its
//! own connection arriving there with the address it dialled as its original
//! destination: over IPv4, or over IPv6 in a pod with no IPv4 route.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::destination::original_destination;
use super::rules::CaptureRules;

/// Documentation networks (RFC 5737): nothing answers there, so only the
/// rules' redirect can take the connection.
const PROBES: [Ipv4Addr; 3] =
    [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(198, 51, 100, 1), Ipv4Addr::new(203, 0, 113, 1)];
/// The IPv6 documentation prefix (RFC 3849), for an IPv6-only pod.
const PROBES_V6: [Ipv6Addr; 2] =
    [Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1)];
const PORTS: [u16; 4] = [80, 443, 8080, 50051];

/// The exit code of `protomesh init --validate` when the rules are missing,
/// by which the CNI installer's repair knows the pods to make again.
pub const NOT_CAPTURED_EXIT_CODE: u8 = 77;

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error(
        "the pod's capture rules are not in place: a connection to {dialled} did not reach the sidecar's outbound port \
         {port} ({why}). The pod asks the node's protomesh-cni plugin for its rules (protomesh.io/capture-by: cni): \
         check that the protomesh-cni DaemonSet runs on this node and that its plugin is in the node's CNI \
         configuration, or set protomesh.io/capture-by: init"
    )]
    NotCaptured { dialled: SocketAddr, port: u16, why: String },
    #[error("cannot listen on {at}, where the rules send the app's connections: {error}")]
    Listen { at: SocketAddr, error: std::io::Error },
    #[error(
        "every address tried is left uncaptured by the skip lists (--skip-outbound-ports, --skip-outbound-cidrs): \
         nothing can show that the rules are in place"
    )]
    NothingToDial,
}

/// Checks within `timeout` that the app's outbound connections reach the
/// sidecar's outbound port: over IPv4, or, where the pod has no IPv4 route,
/// over IPv6 (whose rules send them to `[::1]`). A pod without the rules
/// fails with [`ValidateError::NotCaptured`].
pub async fn validate(rules: &CaptureRules, timeout: Duration) -> Result<(), ValidateError> {
    // A UDP socket's connect looks the route up and sends nothing.
    let routed = |to: IpAddr| {
        let unspecified: IpAddr =
            if to.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        std::net::UdpSocket::bind((unspecified, 0)).and_then(|socket| socket.connect((to, 9))).is_ok()
    };
    validate_over(rules, timeout, !routed(PROBES[0].into())).await
}

async fn validate_over(rules: &CaptureRules, timeout: Duration, ipv6: bool) -> Result<(), ValidateError> {
    let port = rules.outbound_port;
    let at = SocketAddr::new(if ipv6 { Ipv6Addr::LOCALHOST.into() } else { Ipv4Addr::LOCALHOST.into() }, port);
    let listener = TcpListener::bind(at).await.map_err(|error| ValidateError::Listen { at, error })?;
    let dialled = probe_address(rules, ipv6).ok_or(ValidateError::NothingToDial)?;
    let not_captured = |why: String| ValidateError::NotCaptured { dialled, port, why };
    let token: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    let dial = async {
        let mut tcp = TcpStream::connect(dialled).await?;
        tcp.write_all(&token).await?;
        // Held open until the listener has read the token.
        let mut end = [0u8; 1];
        let _ = tcp.read(&mut end).await;
        Ok::<_, std::io::Error>(())
    };
    let arrive = async {
        loop {
            let (mut tcp, _) = listener.accept().await?;
            let mut read = [0u8; 16];
            if tcp.read_exact(&mut read).await.is_ok() && read == token {
                return Ok::<_, std::io::Error>(original_destination(&tcp));
            }
        }
    };
    let arrived = tokio::time::timeout(timeout, async {
        tokio::pin!(dial);
        tokio::select! {
            arrived = arrive => arrived.map_err(|e| format!("accepting: {e}")),
            dialled = &mut dial => match dialled {
                Ok(()) => Err("the connection ended before it arrived".to_string()),
                Err(error) => Err(format!("connecting: {error}")),
            },
        }
    })
    .await
    .map_err(|_| not_captured(format!("nothing arrived within {timeout:?}")))?
    .map_err(not_captured)?;
    match arrived {
        Some(original) if original == dialled => Ok(()),
        other => Err(not_captured(format!("it arrived with original destination {other:?}"))),
    }
}

/// An address outside the pod, of the family asked, that the rules capture.
fn probe_address(rules: &CaptureRules, ipv6: bool) -> Option<SocketAddr> {
    let port = PORTS.into_iter().find(|port| !rules.skip_outbound_ports.iter().any(|range| range.contains(*port)))?;
    let candidates: Vec<IpAddr> = match ipv6 {
        false => PROBES.into_iter().map(IpAddr::V4).collect(),
        true => PROBES_V6.into_iter().map(IpAddr::V6).collect(),
    };
    let ip = candidates.into_iter().find(|ip| !rules.skip_outbound_cidrs.iter().any(|net| net.contains(ip)))?;
    Some(SocketAddr::new(ip, port))
}
