//! Where a redirected connection was going: the destination before the
//! capture rules' redirect, which conntrack keeps (`SO_ORIGINAL_DST`).

use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// The address `tcp`'s peer dialed, when the capture rules redirected it to
/// this listener; `None` when it dialed the listener itself (or conntrack
/// does not track it, which means no rule redirected it).
pub fn original_destination(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let socket = SockRef::from(tcp);
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    };
    let original = original.ok()?.as_socket()?;
    // A dual-stack listener reports IPv4 peers' addresses as mapped IPv6.
    let original = SocketAddr::new(original.ip().to_canonical(), original.port());
    (original != SocketAddr::new(local.ip().to_canonical(), local.port())).then_some(original)
}
