//! Performing the app's probes for the kubelet (see `config::probes`): as
//! the kubelet would, against the app on localhost, each within its timeout
//! on a connection of its own.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::probes::{AppProbe, GrpcCheck, HttpGet};
use crate::grpc_health::{self, ServingStatus};

/// Runs `probe`: what passed, or why it failed, in a few words.
pub async fn perform(probe: &AppProbe) -> Result<String, String> {
    let run = async {
        if let Some(http) = &probe.http_get {
            http_get(http).await
        } else if let Some(check) = &probe.grpc {
            grpc_check(check).await
        } else if let Some(tcp) = &probe.tcp_socket {
            connect(tcp.port).await.map(|_| format!("port {} open", tcp.port))
        } else {
            Err("the probe has no handler".into())
        }
    };
    tokio::time::timeout(probe.timeout, run)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {:?}", probe.timeout)))
}

async fn connect(port: u16) -> Result<TcpStream, String> {
    let app = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect(app).await.map_err(|e| format!("{app}: {e}"))
}

async fn http_get(probe: &HttpGet) -> Result<String, String> {
    let tcp = connect(probe.port).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(&probe.path)
        .header(http::header::HOST, format!("127.0.0.1:{}", probe.port))
        // Apps tell probes apart by this, as the kubelet sends it.
        .header(http::header::USER_AGENT, "kube-probe/protomesh");
    for header in &probe.headers {
        request = request.header(&header.name, &header.value);
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    // Read the body, as the kubelet does, so that the app sees a whole exchange.
    let _ = response.into_body().collect().await;
    if (StatusCode::OK.as_u16()..400).contains(&status.as_u16()) {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status}"))
    }
}

async fn grpc_check(probe: &GrpcCheck) -> Result<String, String> {
    let tcp = connect(probe.port).await?;
    let (client, connection) = h2::client::handshake(tcp).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let head = grpc_health::check_head(&format!("127.0.0.1:{}", probe.port));
    let (response, mut send) = client.send_request(head, false).map_err(|e| e.to_string())?;
    send.send_data(grpc_health::check_request(&probe.service), true).map_err(|e| e.to_string())?;

    let response = response.await.map_err(|e| e.to_string())?;
    let (head, mut body) = response.into_parts();
    let mut received = BytesMut::new();
    while let Some(data) = body.data().await {
        let data = data.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(data.len());
        received.extend_from_slice(&data);
        if received.len() > grpc_health::MAX_MESSAGE {
            return Err(format!("an answer over {} bytes", grpc_health::MAX_MESSAGE));
        }
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    match grpc_health::read_answer(&head.headers, trailers.as_ref(), received.freeze()) {
        Ok(ServingStatus::Serving) => Ok("SERVING".into()),
        Ok(other) => Err(other.as_str_name().into()),
        Err(why) => Err(format!("{why} (HTTP {})", head.status)),
    }
}
