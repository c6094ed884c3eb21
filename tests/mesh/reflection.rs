//! Server reflection from the contracts: on the outbound listener for the
//! whole mesh, on the inbound port for a peer (authorized as any method),
//! both versions; each answer the same as a tonic-reflection server built
//! from the same files gives; grpcurl and grpcio's reflection client read
//! it; a reload changes what it says.

use std::net::SocketAddr;

use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

use crate::harness::{Mesh, MeshOptions, within};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// What a reflection stream answered: each response, then how it ended
/// (tonic-reflection ends it with a status for a symbol it does not know).
type Answers = (Vec<ServerReflectionResponse>, Option<tonic::Status>);

/// Asks each of `requests` in turn on one reflection stream, as grpcurl does.
async fn ask(channel: Channel, requests: &[MessageRequest]) -> Result<Answers, tonic::Status> {
    let requests: Vec<ServerReflectionRequest> = requests
        .iter()
        .map(|r| ServerReflectionRequest { host: String::new(), message_request: Some(r.clone()) })
        .collect();
    let mut client = ServerReflectionClient::new(channel);
    let mut answers = client.server_reflection_info(tokio_stream::iter(requests.clone())).await?.into_inner();
    let mut responses = Vec::new();
    while let Some(answer) = within("a reflection answer", answers.next()).await {
        match answer {
            Ok(response) => responses.push(response),
            Err(status) => return Ok((responses, Some(status))),
        }
    }
    Ok((responses, None))
}

/// What the tests ask: the services, a file by name, a service's and a
/// message's file, an extension's, the imports by name (as grpcurl asks for
/// them), and a symbol no one has.
fn questions() -> Vec<MessageRequest> {
    vec![
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileByFilename("examples/shop.proto".into()),
        MessageRequest::FileContainingSymbol("echo.v1.Echo".into()),
        MessageRequest::FileContainingSymbol("shop.v1.OrderRequest".into()),
        MessageRequest::FileContainingSymbol("google.protobuf.MethodOptions".into()),
        MessageRequest::AllExtensionNumbersOfType("google.protobuf.MethodOptions".into()),
        MessageRequest::FileByFilename("protomesh/v1/options.proto".into()),
        MessageRequest::FileByFilename("google/protobuf/descriptor.proto".into()),
        MessageRequest::FileContainingSymbol("no.such.Service".into()),
    ]
}

/// A tonic server with tonic-reflection built from the contracts' files as
/// protox compiles them (the options first, as the sidecar loads them).
async fn tonic_reflection_of_the_same_files() -> SocketAddr {
    let mut compiler = protox::Compiler::new([format!("{REPO}/proto")]).unwrap();
    compiler.include_imports(true);
    for file in ["protomesh/v1/options.proto", "examples/echo.proto", "examples/shop.proto"] {
        compiler.open_file(file).unwrap();
    }
    let set = compiler.descriptor_pool().encode_to_vec();
    let reflection =
        tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(&set).build_v1().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    protomesh_samples::serve(Server::builder().add_service(reflection), listener).await
}

fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy()
}

/// The messages' bytes, for comparing answers exactly.
fn encoded(responses: &[ServerReflectionResponse]) -> Vec<Vec<u8>> {
    responses.iter().map(Message::encode_to_vec).collect()
}

fn services(response: &ServerReflectionResponse) -> Vec<String> {
    match &response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.iter().map(|s| s.name.clone()).collect(),
        other => panic!("not a list of services: {other:?}"),
    }
}

#[tokio::test]
async fn the_outbound_listener_answers_reflection_for_the_mesh_as_tonic_reflection_would() {
    let mesh = Mesh::start().await;
    let (sidecar, ended) = ask(mesh.channel(), &questions()).await.unwrap();
    let (tonic, tonic_ended) = ask(channel(tonic_reflection_of_the_same_files().await), &questions()).await.unwrap();
    assert_eq!(encoded(&sidecar), encoded(&tonic), "the sidecar's answers are tonic-reflection's");
    assert_eq!(sidecar.len(), questions().len() - 1, "one answer per known symbol");
    let (ended, tonic_ended) = (ended.unwrap(), tonic_ended.unwrap());
    assert_eq!((ended.code(), ended.message()), (tonic_ended.code(), tonic_ended.message()));
    assert_eq!(ended.code(), tonic::Code::NotFound, "{ended:?}");

    let listed = services(&sidecar[0]);
    for service in ["echo.v1.Echo", "shop.v1.Checkout", "shop.v1.Inventory", "grpc.reflection.v1.ServerReflection"] {
        assert!(listed.contains(&service.to_string()), "{listed:?}");
    }
    let file = |response: &ServerReflectionResponse| match &response.message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice())
                .unwrap()
                .name()
                .to_string()
        }
        other => panic!("not a file: {other:?}"),
    };
    assert_eq!(file(&sidecar[2]), "examples/echo.proto");
    assert_eq!(file(&sidecar[6]), "protomesh/v1/options.proto", "the contracts' imports");
    assert_eq!(file(&sidecar[7]), "google/protobuf/descriptor.proto", "and the well-known types they import");
    assert_eq!(mesh.calls(), 0, "answered by the sidecar, not sent to any app");
}

/// A channel to the server sidecar's inbound port, as `workload`'s sidecar would open it.
async fn inbound_channel(mesh: &Mesh, workload: &str) -> Channel {
    let connection = std::sync::Mutex::new(Some(mesh.connect_inbound(workload).await));
    Endpoint::from_static("http://server.test")
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = connection.lock().unwrap().take().expect("one connection");
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream)) }
        }))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_peer_asks_a_sidecar_for_its_contracts_as_its_authorization_allows() {
    // Only the client may ask for the contracts; every other method is the rules' as before.
    let authorization = "{default: deny, rules: [\
        {name: echo, methods: ['echo.v1.Echo/*'], callers: ['*']},\
        {name: contracts-for-the-client, methods: ['grpc.reflection.v1.ServerReflection/*'], \
         callers: ['spiffe://test.protomesh.local/ns/test/sa/client']}]}";
    let mesh = Mesh::start_with(MeshOptions { authorization, ..Default::default() }).await;

    let (answers, _) = ask(inbound_channel(&mesh, "client").await, &questions()[..1]).await.unwrap();
    assert!(services(&answers[0]).contains(&"shop.v1.Inventory".to_string()), "{answers:?}");

    let refused = ask(inbound_channel(&mesh, "other").await, &questions()[..1]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("not allowed by authorization rule \"contracts-for-the-client\""),
        "{refused:?}"
    );
    // v1alpha, which no rule names, falls to the default.
    let alpha = tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
        inbound_channel(&mesh, "client").await,
    )
    .server_reflection_info(tokio_stream::iter(Vec::new()))
    .await;
    let denied = match alpha {
        Ok(response) => response.into_inner().next().await.expect("an answer").unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("the default is deny"), "{denied:?}");
    assert_eq!(mesh.calls(), 0);
}

#[tokio::test]
async fn reflection_follows_a_reload_of_the_contracts() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["examples/echo.proto", "examples/shop.proto"] {
        std::fs::create_dir_all(dir.path().join("examples")).unwrap();
        std::fs::copy(format!("{REPO}/proto/{file}"), dir.path().join(file)).unwrap();
    }
    let options = MeshOptions {
        proto_dir: Some(dir.path().display().to_string()),
        protos: "['examples/*.proto']",
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let listed = || async { services(&ask(mesh.channel(), &questions()[..1]).await.unwrap().0[0]) };
    assert!(!listed().await.contains(&"extra.v1.Extra".to_string()));
    std::fs::write(
        dir.path().join("examples/extra.proto"),
        "syntax = \"proto3\";\npackage extra.v1;\nservice Extra { rpc Get(Empty) returns (Empty); }\nmessage Empty {}\n",
    )
    .unwrap();
    within("the new contract in reflection", async {
        while !listed().await.contains(&"extra.v1.Extra".to_string()) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn grpcurl_and_grpcio_explore_the_mesh_through_the_outbound_listener() {
    if std::process::Command::new("grpcurl").arg("-version").output().is_err() {
        eprintln!("skipped: grpcurl is not installed (pip install -r tests/python/requirements.txt)");
        return;
    }
    let mesh = Mesh::start().await;
    let outbound = mesh.client_sidecar.outbound_addr.to_string();
    let run = |program: &str, args: Vec<String>| {
        let mut command = tokio::process::Command::new(program);
        command.args(args);
        async move {
            let output = within("a client", command.output()).await.unwrap();
            let said = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(output.status.success(), "{said}{}", String::from_utf8_lossy(&output.stderr));
            said
        }
    };
    let grpcurl = |verb: &[&str]| {
        let args = ["-plaintext", outbound.as_str()].iter().chain(verb).map(|a| a.to_string()).collect();
        run("grpcurl", args)
    };
    let listed = grpcurl(&["list"]).await;
    for service in ["echo.v1.Echo", "shop.v1.Checkout", "shop.v1.Inventory", "shop.v1.Pricing"] {
        assert!(listed.lines().any(|line| line == service), "{listed}");
    }
    let described = grpcurl(&["describe", "shop.v1.Inventory.GetStock"]).await;
    assert!(described.contains("rpc GetStock ( .shop.v1.StockRequest ) returns ( .shop.v1.Stock )"), "{described}");

    let script = format!("{REPO}/tests/python/reflection_client.py");
    let said = run("python3", vec![script, outbound.clone()]).await;
    assert!(said.contains("shop.v1.Inventory.GetStock: shop.v1.StockRequest -> shop.v1.Stock"), "{said}");
}
