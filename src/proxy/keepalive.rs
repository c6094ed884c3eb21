//! Keepalive pings on an HTTP/2 connection, served or opened: a ping every
//! so often finds a peer that vanished without closing the connection.

use std::time::Duration;

/// Returns when a keepalive ping goes unanswered within `timeout`.
pub async fn keep_alive(pings: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut pings) = pings else { return std::future::pending().await };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;

    #[tokio::test]
    async fn keepalive_gives_up_on_a_peer_that_never_answers_a_ping() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts, then holds the socket without a word: a peer gone quiet.
        let silent = tokio::spawn(async move { listener.accept().await.unwrap() });
        let (_sender, mut connection) = h2::client::handshake(TcpStream::connect(addr).await.unwrap()).await.unwrap();
        let pings = connection.ping_pong();
        tokio::spawn(connection);
        let gave_up = keep_alive(pings, Duration::from_millis(10), Duration::from_millis(100));
        tokio::time::timeout(Duration::from_secs(10), gave_up).await.expect("keepalive gives up");
        drop(silent);
    }
}
