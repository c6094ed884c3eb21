"""A protomesh sidecar pair as real processes, between a grpcio client and a
grpcio server: an implementation of gRPC independent of the Rust side."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "py.protomesh.local"


def spiffe(workload):
    return f"spiffe://{TRUST_DOMAIN}/ns/py/sa/{workload}"


def protomesh_bin():
    path = os.environ.get("TEST_PROTOMESH_BIN")
    if not path:
        pytest.exit("set TEST_PROTOMESH_BIN to the protomesh binary (cargo test sets it)", returncode=2)
    return path


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    """echo_pb2 and echo_pb2_grpc, generated from the repo's contract."""
    from grpc_tools import protoc
    import grpc_tools

    out = tmp_path_factory.mktemp("stubs")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for proto in ["protomesh/v1/options.proto", "examples/echo.proto"]:
        code = protoc.main(["protoc", f"-I{REPO / 'proto'}", f"-I{well_known}", f"--python_out={out}",
                            f"--grpc_python_out={out}", proto])
        assert code == 0, f"protoc failed on {proto}"
    sys.path.insert(0, str(out))
    from examples import echo_pb2, echo_pb2_grpc  # noqa: E402
    return echo_pb2, echo_pb2_grpc


class Backend:
    """What the grpcio echo server saw."""

    def __init__(self):
        self.calls = 0
        self.cancelled = threading.Event()
        self.deadline_seen = None
        self.callers = []


_HANDED_OUT = set()


def free_port():
    """A port free now, and not handed out before: the ports are bound later,
    by the sidecars, so the kernel may offer one twice meanwhile."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def start_sidecar(name, config_path, log_path):
    log = open(log_path, "w+")
    process = subprocess.Popen([protomesh_bin(), "run", "--config", str(config_path)], stderr=log,
                               stdout=subprocess.DEVNULL, env={**os.environ, "PROTOMESH_LOG": "info"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} sidecar exited: {Path(log_path).read_text()}")
        if "sidecar started" in Path(log_path).read_text():
            return process, log
        time.sleep(0.02)
    process.kill()
    raise RuntimeError(f"{name} sidecar did not start: {Path(log_path).read_text()}")


def start_pair(work, app_port, include, server_policy="", web_methods=None):
    """A client and a server sidecar in front of the app at `app_port`, with
    the contracts under `include`, the server taking JSON and gRPC-Web for
    `web_methods` if given: (outbound port, inbound port, server admin port,
    web port or None, [(process, log)])."""
    if not (work / "certs").exists():
        subprocess.run([protomesh_bin(), "certs", "--out", str(work / "certs"), "--trust-domain", TRUST_DOMAIN,
                        "--namespace", "py", "client", "server"], check=True, stdout=subprocess.DEVNULL)
    outbound, inbound = free_port(), free_port()
    common = (f"contracts: {{protos: [examples/echo.proto], include: ['{include}']}}\n"
              "drain_timeout: 2s\n")

    def admin():
        return f"admin: {{listen: '127.0.0.1:{free_port()}'}}\n"

    def identity(name):
        certs = work / "certs"
        return f"identity: {{cert: {certs}/{name}.pem, key: {certs}/{name}-key.pem, trust_bundle: {certs}/ca.pem}}\n"

    server_admin = free_port()
    web_port = web_methods and free_port()
    web = f", web: {{listen: '127.0.0.1:{web_port}', methods: {web_methods}}}" if web_methods else ""
    (work / "server.yaml").write_text(
        identity("server") + common + f"admin: {{listen: '127.0.0.1:{server_admin}'}}\n" + server_policy +
        f"outbound: {{listen: '127.0.0.1:{free_port()}'}}\n"
        f"inbound: {{listen: '127.0.0.1:{inbound}', app: '127.0.0.1:{app_port}'{web}}}\n")
    (work / "client.yaml").write_text(
        identity("client") + common + admin() + "access_log: true\n" +
        f"outbound:\n  listen: '127.0.0.1:{outbound}'\n  upstreams:\n"
        f"    - {{services: [echo.v1.Echo], endpoints: ['127.0.0.1:{inbound}'], identity: '{spiffe('server')}'}}\n")
    sidecars = [start_sidecar(name, work / f"{name}.yaml", work / f"{name}.log") for name in ("server", "client")]
    return outbound, inbound, server_admin, web_port, sidecars


def stop(sidecars):
    for process, log in sidecars:
        process.send_signal(signal.SIGTERM)
    for process, log in sidecars:
        assert process.wait(timeout=10) == 0, "a sidecar did not shut down cleanly on SIGTERM"
        log.close()


@pytest.fixture(scope="session")
def mesh(stubs, tmp_path_factory):
    echo_pb2, echo_pb2_grpc = stubs
    from echo_backend import EchoBackend

    work = tmp_path_factory.mktemp("mesh")
    backend = Backend()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", -1),
                                  ("grpc.max_send_message_length", -1)])
    echo_pb2_grpc.add_EchoServicer_to_server(EchoBackend(echo_pb2, backend), server)
    app_port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    outbound, inbound, server_admin, _, sidecars = start_pair(work, app_port, REPO / "proto")
    channel = grpc.insecure_channel(f"127.0.0.1:{outbound}", options=[
        ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    yield {"stub": echo_pb2_grpc.EchoStub(channel), "pb": echo_pb2, "backend": backend, "channel": channel,
           "sidecars": sidecars, "client_log": work / "client.log", "inbound": inbound,
           "server_admin": server_admin, "app_port": app_port}
    channel.close()
    stop(sidecars)
    server.stop(grace=None)


@pytest.fixture(scope="session")
def validated(stubs, mesh, tmp_path_factory):
    """A second pair in front of the same app, whose server sidecar validates
    the echo service's requests against rules added to its contract, and
    takes JSON calls to Unary and ServerStream by the contract's routes."""
    work = tmp_path_factory.mktemp("validated")
    include = work / "proto"
    (include / "examples").mkdir(parents=True)
    echo = (REPO / "proto" / "examples" / "echo.proto").read_text()
    echo = echo.replace('import "protomesh/v1/options.proto";',
                        'import "protomesh/v1/options.proto";\nimport "buf/validate/validate.proto";', 1)
    echo = echo.replace("string message = 1;", "string message = 1 [(buf.validate.field).string.max_len = 12];", 1)
    echo = echo.replace("message EchoRequest {", "message EchoRequest {\n  option (buf.validate.message).cel = "
                        "{ id: \"no_fault_with_ok\", message: \"fail_first needs a status_code\", "
                        "expression: \"this.fail_first == 0u || this.status_code != 0\" };", 1)
    (include / "examples" / "echo.proto").write_text(echo)
    app_port = mesh["app_port"]
    outbound, _, admin, web, sidecars = start_pair(work, app_port, include, "policy: {defaults: {validate: true}}\n",
                                                   web_methods="['echo.v1.Echo/Unary', 'echo.v1.Echo/ServerStream']")
    channel = grpc.insecure_channel(f"127.0.0.1:{outbound}")
    yield {"stub": mesh["stub"].__class__(channel), "pb": mesh["pb"], "backend": mesh["backend"], "admin": admin,
           "web": f"http://127.0.0.1:{web}"}
    channel.close()
    stop(sidecars)
