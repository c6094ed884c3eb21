//! For unit tests of layers: a request whose body really arrives over an
//! HTTP/2 stream, as every call's does.

use bytes::Bytes;
use http::{Request, Response};

use super::{Direction, RecvBody, ResponseBody};
use crate::grpc::{self, Code};

/// A request to `path` whose body, `body`, is received over a real HTTP/2
/// stream; and the task of its peer, which keeps the connection open.
pub async fn received(path: &str, body: Bytes) -> (Request<RecvBody>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let uri = format!("http://test{path}");
    let peer = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let (_response, mut stream) = sender.send_request(Request::post(uri).body(()).unwrap(), false).unwrap();
        stream.send_data(body, true).unwrap();
        std::future::pending::<()>().await;
    });
    let mut connection = h2::server::handshake(listener.accept().await.unwrap().0).await.unwrap();
    let (request, respond) = connection.accept().await.unwrap().unwrap();
    tokio::spawn(async move {
        let _respond = respond;
        std::future::poll_fn(|cx| connection.poll_closed(cx)).await.ok();
    });
    (request.map(|stream| RecvBody::new(stream, None)), peer)
}

/// A response whose body, `body` then an OK status in trailers, arrives
/// from a peer over a real HTTP/2 stream.
pub async fn answered(body: Bytes) -> ResponseBody {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut connection = h2::server::handshake(listener.accept().await.unwrap().0).await.unwrap();
        let (_, mut respond) = connection.accept().await.unwrap().unwrap();
        let mut stream = respond.send_response(Response::new(()), false).unwrap();
        stream.send_data(body, false).unwrap();
        stream.send_trailers(grpc::status_headers(Code::Ok, "")).unwrap();
        std::future::poll_fn(|cx| connection.poll_closed(cx)).await.ok();
    });
    let (sender, connection) =
        h2::client::handshake(tokio::net::TcpStream::connect(addr).await.unwrap()).await.unwrap();
    tokio::spawn(connection);
    let mut sender = sender.ready().await.unwrap();
    let (response, _) = sender.send_request(Request::new(()), true).unwrap();
    let response = response.await.unwrap();
    ResponseBody::streamed(RecvBody::new(response.into_body(), None), Direction::Inbound)
}

/// One gRPC message of `size` bytes, framed.
pub fn message(size: usize) -> Bytes {
    let mut framed = vec![0];
    framed.extend_from_slice(&(size as u32).to_be_bytes());
    framed.extend(std::iter::repeat_n(7u8, size));
    framed.into()
}
