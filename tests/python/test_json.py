"""JSON over HTTP with requests, against the same grpcio app the grpcio
client calls: the server's sidecar maps each request by the google.api.http
options of proto/examples/echo.proto, checks it against the contract's
buf.validate rules, and answers in the proto3 JSON mapping, failures as a
JSON google.rpc.Status under the HTTP status gRPC's mapping gives."""

import requests


def test_the_same_call_over_json_and_over_grpc_reaches_the_grpcio_app_alike(validated):
    stub, pb, backend, web = validated["stub"], validated["pb"], validated["backend"], validated["web"]
    over_grpc = stub.Unary(pb.EchoRequest(message="hello", payload=b"\x01\x02"), timeout=10)
    calls = backend.calls
    over_json = requests.post(f"{web}/v1/echo", json={"message": "hello", "payload": "AQI="}, timeout=10)
    assert over_json.status_code == 200, over_json.text
    assert over_json.headers["content-type"] == "application/json"
    assert over_json.json() == {"message": over_grpc.message, "payload": "AQI=", "receivedBytes": "2"}
    assert backend.calls == calls + 1
    assert backend.callers[-1] is None, "no caller identity for a caller without a certificate"

    by_path = requests.get(f"{web}/v1/echo/caf%C3%A9", timeout=10)
    assert by_path.json() == {"message": "café"}
    payload = requests.get(f"{web}/v1/echo/x/payload", params={"payload": "BwcH"}, timeout=10)
    assert payload.json() == "BwcH", "response_body: the one field"


def test_a_server_stream_comes_back_as_a_json_array(validated):
    streamed = requests.get(f"{validated['web']}/v1/echo/s:stream", params={"replyCount": 3}, timeout=10)
    assert streamed.status_code == 200, streamed.text
    assert [reply.get("sequence", 0) for reply in streamed.json()] == [0, 1, 2]


def test_a_request_that_breaks_a_rule_is_a_400_with_its_violations_as_json(validated):
    backend, web = validated["backend"], validated["web"]
    calls = backend.calls
    refused = requests.post(f"{web}/v1/echo", json={"message": "x" * 13}, timeout=10)
    assert refused.status_code == 400, refused.text
    status = refused.json()
    assert status["code"] == 3
    assert "breaks the buf.validate rules of echo.v1.EchoRequest" in status["message"]
    bad_request, violations = status["details"]
    assert bad_request["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert bad_request["fieldViolations"][0]["field"] == "message"
    assert bad_request["fieldViolations"][0]["reason"] == "string.max_len"
    assert violations["@type"] == "type.googleapis.com/buf.validate.Violations"
    assert violations["violations"][0]["ruleId"] == "string.max_len"
    assert backend.calls == calls, "the app never saw it"


def test_failures_map_to_http_statuses(validated):
    web = validated["web"]
    failed = requests.post(f"{web}/v1/echo", json={"message": "x", "statusCode": 5, "statusMessage": "gone"},
                           timeout=10)
    assert (failed.status_code, failed.json()) == (404, {"code": 5, "message": "gone"})
    not_json = requests.post(f"{web}/v1/echo", data="{", headers={"content-type": "application/json"}, timeout=10)
    assert not_json.status_code == 400 and "is not the JSON of echo.v1.EchoRequest" in not_json.json()["message"]
    nowhere = requests.get(f"{web}/v1/nowhere", timeout=10)
    assert (nowhere.status_code, nowhere.json()["code"]) == (404, 5)
    unlisted = requests.post(f"{web}/v1/echo:collect", json={}, timeout=10)
    assert unlisted.status_code == 404, "ClientStream is not in inbound.web.methods: no route"
