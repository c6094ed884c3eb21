//! Performing the app's probes for the kubelet (see `config::probes`): as
//! the kubelet would, against the app on localhost, each within its timeout
//! on a connection of its own.

use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::TcpStream;

use crate::config::probes::{AppProbe, GrpcCheck, HttpGet};
use crate::grpc;
use crate::pb::grpc::health::v1::{HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus};

/// A health answer is a few bytes; an app sending more is not answering it.
const MAX_ANSWER: usize = 64 << 10;

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
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://127.0.0.1:{}/grpc.health.v1.Health/Check", probe.port))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut send) = client.send_request(request, false).map_err(|e| e.to_string())?;
    let message = HealthCheckRequest { service: probe.service.clone() }.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.extend_from_slice(&[0]);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    send.send_data(framed.freeze(), true).map_err(|e| e.to_string())?;

    let response = response.await.map_err(|e| e.to_string())?;
    let (head, mut body) = response.into_parts();
    let mut received = BytesMut::new();
    while let Some(data) = body.data().await {
        let data = data.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(data.len());
        received.extend_from_slice(&data);
        if received.len() > MAX_ANSWER {
            return Err(format!("an answer over {MAX_ANSWER} bytes"));
        }
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    // A trailers-only answer carries its status in the head.
    let status = trailers.as_ref().unwrap_or(&head.headers).get(grpc::GRPC_STATUS);
    match status.and_then(|s| s.to_str().ok()) {
        Some("0") => {}
        Some(code) => return Err(format!("grpc-status {code}")),
        None => return Err(format!("no grpc-status (HTTP {})", head.status)),
    }
    if received.len() < 5 {
        return Err("no response message".into());
    }
    received.advance(5);
    let answer = HealthCheckResponse::decode(received).map_err(|e| format!("malformed response: {e}"))?;
    match ServingStatus::try_from(answer.status) {
        Ok(ServingStatus::Serving) => Ok("SERVING".into()),
        Ok(other) => Err(other.as_str_name().into()),
        Err(_) => Err(format!("unknown status {}", answer.status)),
    }
}
