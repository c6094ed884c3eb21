//! Opaque TCP within bounds, in pods (`cluster.rs`): the app's own
//! connection pool never blocks its gRPC calls, one destination cannot take
//! every place, idle, silent and slow connections end within the documented
//! bounds, a server-first protocol answers through a permissive port at once,
//! and a flood of refused clients leaves a bounded log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cluster::*;
use crate::harness::within;
use crate::pods::Pod;

/// Ports of servers that never speak first.
const SILENT_PORT: u16 = 7100;
const OTHER_SILENT_PORT: u16 = 7101;
/// The server pod's permissive TCP port, and its server-first one (MySQL's).
const PERMISSIVE_TCP_PORT: u16 = 7200;
const SERVER_FIRST_PORT: u16 = 3306;

/// What a server saw of its connections.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    /// Connections whose client finished sending (or broke).
    finished: AtomicUsize,
}

impl Seen {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }
    fn finished(&self) -> usize {
        self.finished.load(Ordering::Acquire)
    }
}

/// A server in `pod` on `port` that never writes and never closes: it reads
/// each connection to its end and keeps it open after. With `greeting`, it
/// speaks first, as MySQL does.
fn server(pod: &Pod, port: u16, greeting: Option<&'static [u8]>) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    let (listening, ready) = std::sync::mpsc::channel();
    // The thread runs as long as the test process: the pod's app.
    drop(pod.run(move || async move {
        // Room for the sidecar's connections while this thread is not scheduled.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([0, 0, 0, 0], port))).unwrap();
        let listener = socket.listen(4096).unwrap();
        listening.send(()).unwrap();
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            counts.accepted.fetch_add(1, Ordering::AcqRel);
            let counts = counts.clone();
            tokio::spawn(async move {
                if let Some(greeting) = greeting {
                    let _ = tcp.write_all(greeting).await;
                }
                let mut sink = [0u8; 1024];
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                counts.finished.fetch_add(1, Ordering::AcqRel);
                // Keep our side open until the test process ends.
                std::future::pending::<()>().await;
                drop(tcp);
            });
        }
    }));
    ready.recv().unwrap();
    seen
}

/// Waits until `done` holds, at most `limit`; says whether it did.
async fn until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Opens `count` connections to `target`, one after another.
async fn open(target: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        connections.push(within("connect", TcpStream::connect(target)).await.unwrap());
    }
    connections
}

/// How long until the far end closes `tcp` (read returns 0 or fails).
async fn closed_within(mut tcp: TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut sink = [0u8; 64];
    let closing = async { while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {} };
    tokio::time::timeout(limit, closing).await.ok().map(|_| start.elapsed())
}

fn more_open_files() {
    // Thousands of connections, each end a descriptor of this process.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
}

async fn unary_calls_succeed(service: SocketAddr, count: usize) {
    let mut client = echo_client(service);
    for i in 0..count {
        let reply = within("gRPC call", client.unary(request(&format!("call {i}")))).await;
        assert_eq!(reply.unwrap().into_inner().message, format!("call {i}"));
    }
}

#[test]
fn the_apps_pool_of_2000_connections_to_one_server_leaves_its_grpc_calls_working() {
    const POOL: usize = 2000;
    more_open_files();
    let setup = Setup { client_config: "limits: {opaque_half_closed_timeout: 1s}\n".into(), ..Setup::default() };
    let Some(cluster) = Cluster::start(setup) else { return };
    let seen = server(&cluster.outside, SILENT_PORT, None);
    let target = SocketAddr::from((cluster.outside.address, SILENT_PORT));
    let service = cluster.service;
    let counts = seen.clone();
    cluster.in_client(move || async move {
        let pool = open(target, POOL).await;
        // Each is forwarded once the detection gives up on its first bytes.
        assert!(until(Duration::from_secs(30), || counts.accepted() == POOL).await, "{} forwarded", counts.accepted());
        unary_calls_succeed(service, 20).await;
        // The app's process ends: every connection is closed on its side,
        // while the server keeps its own open.
        drop(pool);
        assert!(until(Duration::from_secs(30), || counts.finished() == POOL).await, "{} finished", counts.finished());
        unary_calls_succeed(service, 20).await;
    });
    let half_closed = "protomesh_opaque_connections_total{direction=\"outbound\",result=\"half_closed_timeout\"}";
    cluster.await_metric(&cluster.client, half_closed, POOL as f64);
    for limit in ["max_connections", "max_connections_per_source", "max_opaque_connections"] {
        let series = format!("protomesh_connections_closed_at_limit_total{{direction=\"outbound\",limit=\"{limit}\"}}");
        cluster.await_metric(&cluster.client, &series, 0.0);
    }
}

#[test]
fn one_destination_cannot_take_every_place_for_opaque_tcp() {
    let setup =
        Setup { client_config: "limits: {max_opaque_connections_per_destination: 100}\n".into(), ..Setup::default() };
    let Some(cluster) = Cluster::start(setup) else { return };
    let (busy, other) =
        (server(&cluster.outside, SILENT_PORT, None), server(&cluster.outside, OTHER_SILENT_PORT, None));
    let outside = cluster.outside.address;
    let service = cluster.service;
    cluster.in_client(move || async move {
        let _held = open(SocketAddr::from((outside, SILENT_PORT)), 120).await;
        assert!(until(Duration::from_secs(20), || busy.accepted() == 100).await, "{} forwarded", busy.accepted());
        let _others = open(SocketAddr::from((outside, OTHER_SILENT_PORT)), 10).await;
        assert!(until(Duration::from_secs(20), || other.accepted() == 10).await, "another destination is served");
        unary_calls_succeed(service, 10).await;
        assert_eq!(busy.accepted(), 100, "no more than the limit reached the busy destination");
    });
    let refused = "protomesh_connections_closed_at_limit_total{direction=\"outbound\",limit=\"max_opaque_connections_per_destination\"}";
    cluster.await_metric(&cluster.client, refused, 20.0);
}

#[test]
fn silent_and_slow_clients_of_a_permissive_port_end_within_their_bounds() {
    const IDLE: usize = 1000;
    const SLOWLORIS: usize = 300;
    more_open_files();
    let setup = Setup {
        server_inbound: Some(format!(
            "{{listen: '0.0.0.0:4143', detect_timeout: 1s, \
             mtls: {{mode: strict, ports: {{{PERMISSIVE_TCP_PORT}: permissive, {SERVER_FIRST_PORT}: permissive}}}}}}"
        )),
        server_config: "limits: {opaque_idle_timeout: 2s}\n".into(),
        ..Setup::default()
    };
    let Some(cluster) = Cluster::start(setup) else { return };
    let app = server(&cluster.server, PERMISSIVE_TCP_PORT, None);
    let greeted = server(&cluster.server, SERVER_FIRST_PORT, Some(b"5.7.0-mysql-greeting"));
    let server_pod = cluster.server.address;
    let counts = app.clone();
    cluster
        .outside
        .run(move || async move {
            // Silent: closed at inbound.detect_timeout (1 s), never handed to the app.
            let idle = open(SocketAddr::from((server_pod, PERMISSIVE_TCP_PORT)), IDLE).await;
            let closing = idle.into_iter().map(|tcp| closed_within(tcp, Duration::from_secs(10)));
            let closed = futures_util::future::join_all(closing).await;
            assert!(closed.iter().all(Option::is_some), "every silent connection was closed");
            assert_eq!(counts.accepted(), 0, "a silent connection reached the app");

            // Slowloris: a byte now and one every 5 s; closed by
            // limits.opaque_idle_timeout (2 s) before the next byte.
            let slow = open(SocketAddr::from((server_pod, PERMISSIVE_TCP_PORT)), SLOWLORIS).await;
            let closing = slow.into_iter().map(|mut tcp| async move {
                tcp.write_all(b"G").await.unwrap();
                let closed = closed_within(tcp, Duration::from_secs(4)).await;
                closed.expect("closed before the next byte was due")
            });
            let closed = futures_util::future::join_all(closing).await;
            assert_eq!(closed.len(), SLOWLORIS);
            assert_eq!(counts.accepted(), SLOWLORIS, "each slow client reached the app");
            assert!(until(Duration::from_secs(5), || counts.finished() == SLOWLORIS).await, "the app saw them end");

            // Server first: forwarded at once (opaque_ports), so the client
            // hears the greeting though it sends nothing.
            let mut mysql = TcpStream::connect((server_pod, SERVER_FIRST_PORT)).await.unwrap();
            let mut greeting = [0u8; 20];
            within("the server's greeting", mysql.read_exact(&mut greeting)).await.unwrap();
            assert_eq!(&greeting, b"5.7.0-mysql-greeting");
        })
        .join()
        .unwrap_or_else(|_| panic!("failed; {}", cluster.logs()));
    assert_eq!(greeted.accepted(), 1);
    let series =
        |limit: &str| format!("protomesh_connections_closed_at_limit_total{{direction=\"inbound\",limit=\"{limit}\"}}");
    cluster.await_metric(&cluster.server, &series("detect_timeout"), IDLE as f64);
    cluster.await_metric(&cluster.server, &series("opaque_idle_timeout"), SLOWLORIS as f64);
}

/// One gRPC call in plaintext HTTP/2 to `target`: the `grpc-status` of its answer.
async fn plaintext_call(target: SocketAddr) -> Option<String> {
    let (sender, connection) = h2::client::handshake(TcpStream::connect(target).await.ok()?).await.ok()?;
    tokio::spawn(connection);
    let request = http::Request::post("http://server/echo.v1.Echo/Unary")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, _) = sender.ready().await.ok()?.send_request(request, true).ok()?;
    let status = response.await.ok()?.headers().get("grpc-status")?.to_str().ok()?.to_string();
    Some(status)
}

#[test]
fn a_flood_of_refused_plaintext_clients_leaves_a_bounded_log() {
    const CLIENTS: usize = 200;
    const ROUNDS: usize = 25;
    let setup = Setup { server_env: vec![("PROTOMESH_LOG".into(), "info".into())], ..Setup::default() };
    let Some(cluster) = Cluster::start(setup) else { return };
    let log = cluster.sidecars[0].1.clone();
    let before = std::fs::metadata(&log).unwrap().len();
    let target = SocketAddr::from((cluster.server.address, APP_PORT));
    let refused = cluster.outside.run(move || async move {
        let deadline = Instant::now() + Duration::from_secs(15);
        let clients = (0..CLIENTS).map(|_| async move {
            let mut refused = 0;
            for _ in 0..ROUNDS {
                if Instant::now() > deadline {
                    break;
                }
                let call = tokio::time::timeout(Duration::from_secs(2), plaintext_call(target));
                refused += usize::from(matches!(call.await, Ok(Some(status)) if status == "7"));
            }
            refused
        });
        futures_util::future::join_all(clients).await.into_iter().sum::<usize>()
    });
    let refused = refused.join().unwrap();
    assert!(refused >= CLIENTS * ROUNDS / 2, "only {refused} refusals were seen");
    let grown = std::fs::metadata(&log).unwrap().len() - before;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().filter(|line| line.contains("refused plaintext HTTP/2")).count();
    assert!(lines <= 2, "{lines} lines for {refused} refusals:\n{text}");
    assert!(grown < 8 << 10, "the log grew by {grown} bytes for {refused} refusals:\n{text}");
}
