"""Request validation read by grpcio: the server's sidecar checks each request
against the buf.validate rules of the contract and refuses a bad one with
INVALID_ARGUMENT, its violations in google.rpc.BadRequest, which grpcio-status
reads; gzip-compressed requests are decompressed and checked alike."""

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def refusal(call):
    with pytest.raises(grpc.RpcError) as failure:
        call()
    error = failure.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    status = rpc_status.from_call(error)
    assert status is not None, "grpc-status-details-bin is set"
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return error, [(v.field, v.reason, v.description) for v in bad_request.field_violations]


@pytest.mark.parametrize("compression", [None, grpc.Compression.Gzip])
def test_a_request_that_breaks_a_rule_is_refused_before_the_app_with_its_violations(validated, compression):
    stub, pb, backend = validated["stub"], validated["pb"], validated["backend"]
    assert stub.Unary(pb.EchoRequest(message="fine"), timeout=10, compression=compression).message == "fine"
    calls = backend.calls
    error, violations = refusal(lambda: stub.Unary(pb.EchoRequest(message="x" * 13, fail_first=1), timeout=10,
                                                   compression=compression))
    assert backend.calls == calls, "the app never saw the call"
    assert violations == [
        ("", "no_fault_with_ok", "fail_first needs a status_code"),
        ("message", "string.max_len", "value length must be at most 12 characters"),
    ]
    assert error.details().startswith("protomesh inbound: request message 1 to /echo.v1.Echo/Unary breaks")
    assert error.details().endswith("(validate: true, config policy.defaults)")


def test_a_client_stream_is_checked_message_by_message(validated):
    stub, pb = validated["stub"], validated["pb"]
    reply = stub.ClientStream(iter([pb.EchoRequest(message="a"), pb.EchoRequest(message="b")]), timeout=10)
    assert reply.message == "2 messages"
    error, violations = refusal(lambda: stub.ClientStream(
        iter([pb.EchoRequest(message="a"), pb.EchoRequest(message="much too long a message")]), timeout=10))
    assert violations == [("message", "string.max_len", "value length must be at most 12 characters")]
    assert "request message 2 to /echo.v1.Echo/ClientStream" in error.details()
