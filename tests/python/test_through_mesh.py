"""A grpcio client and a grpcio server talk through a protomesh pair: what
an independent gRPC implementation sends and expects must hold end to end."""

import threading

import grpc
import pytest

from conftest import spiffe


def test_unary_round_trip_carries_the_verified_caller(mesh):
    reply = mesh["stub"].Unary(mesh["pb"].EchoRequest(message="hi"), timeout=10)
    assert reply.message == "hi"
    assert reply.caller == spiffe("client")


def test_server_streaming(mesh):
    replies = list(mesh["stub"].ServerStream(mesh["pb"].EchoRequest(reply_count=25, reply_payload_bytes=10),
                                             timeout=10))
    assert [r.sequence for r in replies] == list(range(25))


def test_client_streaming(mesh):
    requests = (mesh["pb"].EchoRequest(payload=b"x" * i) for i in range(30))
    reply = mesh["stub"].ClientStream(requests, timeout=10)
    assert (reply.sequence, reply.received_bytes) == (30, sum(range(30)))


def test_bidi_streaming_interleaves(mesh):
    pb = mesh["pb"]
    outgoing = []
    ready = threading.Condition()

    def requests():
        for i in range(10):
            with ready:
                ready.wait_for(lambda: len(outgoing) == i, timeout=10)
            yield pb.EchoRequest(message=f"m{i}")

    call = mesh["stub"].BidiStream(requests(), timeout=10)
    for i, reply in enumerate(call):
        assert (reply.message, reply.sequence) == (f"m{i}", i)
        with ready:
            outgoing.append(reply)
            ready.notify_all()
    assert len(outgoing) == 10


def test_metadata_and_trailing_metadata_cross_both_ways(mesh):
    metadata = (("x-echo-tag", "a"), ("x-echo-tag", "b"), ("x-echo-blob-bin", b"\x00\xff\x10"))
    reply, call = mesh["stub"].Unary.with_call(mesh["pb"].EchoRequest(message="m"), metadata=metadata, timeout=10)
    initial = call.initial_metadata()
    trailing = call.trailing_metadata()
    assert [v for k, v in initial if k == "x-echo-tag"] == ["a", "b"]
    assert dict(initial)["x-echo-blob-bin"] == b"\x00\xff\x10"
    assert [v for k, v in trailing if k == "x-echo-tag-trailer"] == ["a", "b"]
    assert dict(trailing)["x-echo-blob-trailer-bin"] == b"\x00\xff\x10"


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_every_status_code_passes_through(mesh, code):
    request = mesh["pb"].EchoRequest(status_code=code.value[0], status_message=f"because {code.name} ✓")
    with pytest.raises(grpc.RpcError) as failure:
        mesh["stub"].Unary(request, timeout=10)
    assert failure.value.code() == code
    assert failure.value.details() == f"because {code.name} ✓"


def test_large_messages(mesh):
    payload = bytes(range(256)) * (5 * 4096)  # 5 MiB
    reply = mesh["stub"].Unary(mesh["pb"].EchoRequest(payload=payload), timeout=20)
    assert reply.payload == payload


def test_compressed_messages(mesh):
    payload = b"z" * 300_000
    reply = mesh["stub"].Unary(mesh["pb"].EchoRequest(payload=payload), timeout=10,
                               compression=grpc.Compression.Gzip)
    assert reply.payload == payload


def test_deadline_is_forwarded_and_expires_as_deadline_exceeded(mesh):
    mesh["stub"].Unary(mesh["pb"].EchoRequest(), timeout=30)
    # grpc-core rounds grpc-timeout up when encoding it (30 s goes out as about 30.1 s).
    assert 25 < mesh["backend"].deadline_seen <= 30.5
    with pytest.raises(grpc.RpcError) as failure:
        mesh["stub"].Unary(mesh["pb"].EchoRequest(delay_ms=3000), timeout=0.3)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_client_cancellation_reaches_the_server(mesh):
    backend = mesh["backend"]
    backend.cancelled.clear()
    call = mesh["stub"].ServerStream(mesh["pb"].EchoRequest(reply_count=100_000, delay_ms=5), timeout=30)
    next(call)
    call.cancel()
    assert backend.cancelled.wait(timeout=10), "the server never saw the cancellation"


def test_unknown_method_is_unimplemented_by_the_sidecar(mesh):
    calls_before = mesh["backend"].calls
    shout = mesh["channel"].unary_unary("/echo.v1.Echo/Shout")
    with pytest.raises(grpc.RpcError) as failure:
        shout(b"", timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "protomesh outbound" in failure.value.details()
    assert "/echo.v1.Echo/Shout" in failure.value.details()
    assert mesh["backend"].calls == calls_before


def test_the_access_log_names_each_call(mesh):
    mesh["stub"].Unary(mesh["pb"].EchoRequest(message="logged"), timeout=10)
    lines = [line for line in mesh["client_log"].read_text().splitlines() if "protomesh::access" in line]
    assert any("/echo.v1.Echo/Unary" in line and 'grpc_status="OK"' in line for line in lines), lines[-3:]


def metric(admin_port, series):
    """The value of `series` (name and labels) on an admin server, 0 if absent."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(series)]
    return float(values[0]) if values else 0.0


def test_a_plaintext_client_of_the_mtls_port_is_told_why_at_once(mesh):
    refused = 'protomesh_tls_handshakes_total{direction="inbound",result="plaintext_http2"}'
    before = metric(mesh["server_admin"], refused)
    calls_before = mesh["backend"].calls
    channel = grpc.insecure_channel(f"127.0.0.1:{mesh['inbound']}")
    stub = mesh["stub"].__class__(channel)
    with pytest.raises(grpc.RpcError) as failure:
        stub.Unary(mesh["pb"].EchoRequest(message="plaintext"), timeout=10)
    channel.close()
    # Not a reconnect loop until the deadline: the reason, on the first connection.
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED, failure.value
    assert "takes only mTLS from meshed workloads" in failure.value.details()
    assert metric(mesh["server_admin"], refused) - before == 1
    assert mesh["backend"].calls == calls_before
