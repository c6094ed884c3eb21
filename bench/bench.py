"""Measures the cost of a sidecar pair: the echo backend reached directly,
through Envoy (as an mTLS sidecar pair, one worker and its default) and
through protomesh (one worker, the default, and two; and one worker while a
tap on each sidecar shows every call, up to 1,000 events a second), in one run.

A last path sends JSON over HTTP/1.1 to the server sidecar's web listener,
which transcodes it by the contract's google.api.http routes.

Per path and round: requests/s at saturation (unary and server-streaming),
latency percentiles at a fixed 1,000 requests/s and for serial calls, CPU
time per request of each proxy (from /proc), and resident memory. Every load
run is bounded in time; every process listens on 127.0.0.1. h2load counts any
HTTP 200 as a success, so each run is checked against the calls the backend
says it served. Results are medians over rounds, with ratios to the direct
path and to Envoy.
"""

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "target" / "release"
TRUST_DOMAIN = "bench.protomesh.local"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
HEADERS = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
# protomesh with two workers, as Envoy runs by default on two cores.
MESH_TWO = "protomesh worker_threads: 2"
# protomesh while `protomesh tap` shows every call on both sidecars, at the
# most events a tap takes (1,000 a second): what tapping costs.
MESH_TAPPED = "protomesh, every call tapped"
# protomesh with `validate: true` on the echo service, whose request carries
# buf.validate rules (two field rules and a CEL expression): what
# validation costs, all in the server's sidecar.
MESH_VALIDATED = "protomesh, every request validated"
# JSON over HTTP/1.1 to the server sidecar's web listener, transcoded by the
# echo contract's google.api.http routes: the client sidecar takes no part,
# so the server's CPU per call is the figure to set beside the gRPC paths'.
MESH_JSON = "protomesh, JSON calls to the server's web listener"
JSON_HEADERS = ["-H", "content-type: application/json"]


def spiffe(name):
    return f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/{name}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def echo_request(message=b"", reply_count=0, delay_ms=0) -> bytes:
    """An echo.v1.EchoRequest in protobuf wire format (fields 1, 5, 7)."""
    out = b""
    if message:
        out += b"\x0a" + bytes([len(message)]) + message
    for field, value in ((5, reply_count), (7, delay_ms)):
        if value:
            out += bytes([field << 3]) + varint(value)
    return out


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def wait_for_port(port, process, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.01)
    sys.exit(f"{what} did not listen on {port}")


class Proc:
    """A process and its CPU and memory figures from /proc."""

    def __init__(self, name, args, **kwargs):
        self.name = name
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kwargs)

    @property
    def pid(self):
        return self.popen.pid

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def memory(self):
        """(resident, peak resident, private) in MiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        kib = lambda key: int(re.search(rf"^{key}:\s+(\d+)", status, re.M).group(1))
        rollup = Path(f"/proc/{self.pid}/smaps_rollup").read_text()
        private = sum(int(m) for m in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+)", rollup, re.M))
        return kib("VmRSS") / 1024, kib("VmHWM") / 1024, private / 1024

    def stop(self):
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


class Backend(Proc):
    def __init__(self, port):
        super().__init__("echo", [str(RELEASE / "protomesh-samples"), "echo", f"127.0.0.1:{port}"])
        wait_for_port(port, self.popen, "echo backend")

    def served(self):
        self.popen.send_signal(signal.SIGUSR1)
        while True:
            line = self.popen.stdout.readline()
            if line.startswith("served "):
                return int(line.split()[1])


def validated_contracts(work):
    """The echo contract with buf.validate rules on its request, validated for the service."""
    include = work / "validated"
    (include / "examples").mkdir(parents=True, exist_ok=True)
    echo = (REPO / "proto" / "examples" / "echo.proto").read_text()
    echo = echo.replace('import "protomesh/v1/options.proto";',
                        'import "protomesh/v1/options.proto";\nimport "buf/validate/validate.proto";', 1)
    echo = echo.replace('{ timeout: "30s" }', '{ timeout: "30s" validate: true }', 1)
    echo = echo.replace("string message = 1;", "string message = 1 [(buf.validate.field).string.max_len = 64];", 1)
    echo = echo.replace("uint32 reply_count = 5;", "uint32 reply_count = 5 [(buf.validate.field).uint32.lte = 1000];", 1)
    echo = echo.replace("message EchoRequest {", "message EchoRequest {\n  option (buf.validate.message).cel = "
                        "{ id: \"short_delay\", message: \"at most a minute\", expression: \"this.delay_ms <= 60000\" };", 1)
    (include / "examples" / "echo.proto").write_text(echo)
    shutil.copy(REPO / "proto" / "examples" / "shop.proto", include / "examples" / "shop.proto")
    return include


def protomesh_pair(work, backend_port, workers=1, launcher=(), include=REPO / "proto", web_port=None):
    """Starts a client and a server sidecar, each under `launcher` (a command prefix)
    if given, with the contracts under `include`, the server with a web listener on
    `web_port` if given; returns (entry port, [procs], readiness ms)."""
    outbound, inbound = free_port(), free_port()
    web = f", web: {{listen: '127.0.0.1:{web_port}', methods: ['*']}}" if web_port else ""
    certs = work / "certs"
    admins = {}

    def config(name, body):
        admins[name] = free_port()
        path = work / f"protomesh-{name}.yaml"
        path.write_text(
            f"identity: {{cert: {certs}/{name}.pem, key: {certs}/{name}-key.pem, trust_bundle: {certs}/ca.pem}}\n"
            f"contracts: {{protos: [examples/echo.proto], include: ['{include}']}}\n"
            f"admin: {{listen: '127.0.0.1:{admins[name]}'}}\nworker_threads: {workers}\n" + body)
        return path

    server = config("server", f"outbound: {{listen: '127.0.0.1:{free_port()}'}}\n"
                              f"inbound: {{listen: '127.0.0.1:{inbound}', app: '127.0.0.1:{backend_port}'{web}}}\n")
    client = config("client", f"outbound:\n  listen: '127.0.0.1:{outbound}'\n  upstreams:\n"
                              f"    - {{services: [echo.v1.Echo], endpoints: ['127.0.0.1:{inbound}'],"
                              f" identity: '{spiffe('server')}'}}\n")
    env = {**os.environ, "PROTOMESH_LOG": "warn"}
    procs, ready_ms = [], []
    for name, path in (("server", server), ("client", client)):
        started = time.monotonic()
        proc = Proc(f"protomesh {name}", [*launcher, str(RELEASE / "protomesh"), "run", "--config", str(path)], env=env)
        ready_ms.append(wait_until_ready(admins[name], proc, started))
        procs.append(proc)
    return outbound, procs, max(ready_ms)


class Tap:
    """A reader of a sidecar's GET /tap stream, on a thread, as `protomesh tap --json` reads it."""

    def __init__(self, work, name, query):
        admin = int(re.search(r"admin: \{listen: '127.0.0.1:(\d+)'", (work / f"protomesh-{name}.yaml").read_text()).group(1))
        self.sock = socket.create_connection(("127.0.0.1", admin))
        self.sock.sendall(f"GET /tap?{query} HTTP/1.1\r\nhost: bench\r\n\r\n".encode())
        if b" 200 " not in self.sock.recv(64)[:16]:
            sys.exit(f"the {name} sidecar refused the tap")
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass

    def stop(self):
        self.sock.close()


def wait_until_ready(admin_port, proc, started):
    """Milliseconds from start until /ready answers 200."""
    deadline = started + 20
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            sys.exit(f"{proc.name} exited early")
        try:
            with socket.create_connection(("127.0.0.1", admin_port), timeout=0.2) as s:
                s.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
                if b" 200 " in s.recv(64)[:16]:
                    return (time.monotonic() - started) * 1000
        except OSError:
            pass
        time.sleep(0.001)
    sys.exit(f"{proc.name} never became ready")


ENVOY_TLS = """
          common_tls_context:
            tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{filename: {certs}/{me}.pem}}
                private_key: {{filename: {certs}/{me}-key.pem}}
            validation_context:
              trusted_ca: {{filename: {certs}/ca.pem}}
              match_typed_subject_alt_names:
                - san_type: URI
                  matcher: {{exact: "{peer}"}}"""

ENVOY = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
    - name: listener
      address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
      # Connections spread evenly over the workers, as protomesh hands them out in turn.
      enable_reuse_port: false
      connection_balance_config: {{exact_balance: {{}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: sidecar
                codec_type: HTTP2
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes: [{{match: {{prefix: "/"}}, route: {{cluster: upstream, timeout: 0s}}}}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
{downstream_tls}
  clusters:
    - name: upstream
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{http2_protocol_options: {{}}}}
      load_assignment:
        cluster_name: upstream
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]
{upstream_tls}
"""


def envoy_pair(work, backend_port, concurrency):
    """Envoy configured as the same sidecar pair: h2c in, mTLS between, h2c to the backend."""
    outbound, inbound = free_port(), free_port()
    certs = work / "certs"
    server_tls = ("          transport_socket:\n            name: envoy.transport_sockets.tls\n            typed_config:\n"
                  "              \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n"
                  "              require_client_certificate: true\n"
                  + ENVOY_TLS.format(certs=certs, me="server", peer=spiffe("client")).replace("\n          ", "\n              "))
    client_tls = ("      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n"
                  "          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n"
                  + ENVOY_TLS.format(certs=certs, me="client", peer=spiffe("server")))
    procs = []
    for name, listen, upstream, down, up in (("server", inbound, backend_port, server_tls, ""),
                                             ("client", outbound, inbound, "", client_tls)):
        path = work / f"envoy-{name}-{concurrency}.yaml"
        path.write_text(ENVOY.format(admin=free_port(), listen=listen, upstream=upstream,
                                     downstream_tls=down, upstream_tls=up))
        args = ["envoy", "-c", str(path), "--log-level", "error", "--disable-hot-restart"]
        if concurrency:
            args += ["--concurrency", str(concurrency)]
        proc = Proc(f"envoy {name}", args)
        wait_for_port(listen, proc.popen, f"envoy {name}")
        procs.append(proc)
    return outbound, procs


def h2load(args, port, path, body_file, log=None, headers=HEADERS):
    """`body_file` None: a GET."""
    command = ["h2load", *args, *(["-d", str(body_file)] if body_file else []), *headers]
    if log:
        command += ["--log-file", str(log)]
    output = subprocess.run(command + [f"http://127.0.0.1:{port}{path}"],
                            capture_output=True, text=True, timeout=120).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", output)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    if not done or not rate:
        sys.exit(f"h2load said:\n{output}")
    # Every figure is of calls that succeeded: a rate of failures is no rate.
    finished, succeeded = int(done.group(1)), int(done.group(2))
    if succeeded < finished:
        sys.exit(f"h2load: {finished - succeeded} of {finished} calls to {path} failed:\n{output}")
    return succeeded, float(rate.group(1))


def percentiles(log):
    times = sorted(int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.strip())
    pick = lambda p: times[min(len(times) - 1, int(len(times) * p))]
    return pick(0.5), pick(0.9), pick(0.99)


def measure(path_name, port, proxies, backend, bodies, seconds, work):
    """One round over one path: a dict of figures."""
    figures = {}
    cpu_before = [p.cpu_seconds() for p in proxies]
    served_before = backend.served()
    ok, rate = h2load(["-D", str(seconds), "-c", "8", "-m", "32", "--warm-up-time", "1"],
                      port, "/echo.v1.Echo/Unary", bodies["unary"])
    served = backend.served() - served_before
    if served < ok:
        sys.exit(f"{path_name}: h2load saw {ok} successes but the backend served {served} calls")
    figures["rps"] = rate
    cpu = [p.cpu_seconds() - before for p, before in zip(proxies, cpu_before)]
    figures["cpu_us"] = [c / served * 1e6 for c in cpu] if served else []
    figures["rss_load"] = [p.memory() for p in proxies]

    _, figures["stream_rps"] = h2load(["-D", str(seconds), "-c", "8", "-m", "32", "--warm-up-time", "1"],
                                      port, "/echo.v1.Echo/ServerStream", bodies["stream"])
    log = work / f"{path_name}-fixed.log"
    h2load(["-D", str(seconds), "-c", "4", "--rps", "250"], port, "/echo.v1.Echo/Unary", bodies["unary"], log)
    figures["fixed"] = percentiles(log)
    log = work / f"{path_name}-serial.log"
    h2load(["-n", "3000", "-c", "1", "-m", "1"], port, "/echo.v1.Echo/Unary", bodies["unary"], log)
    figures["serial"] = percentiles(log)
    return figures


def measure_json(port, proxies, backend, bodies, seconds, work):
    """One round of JSON calls over HTTP/1.1 (one call at a time on each of
    32 connections): the same figures as `measure`, for the same calls."""
    figures = {}
    h1 = lambda *args: ["--h1", *args]
    cpu_before = [p.cpu_seconds() for p in proxies]
    served_before = backend.served()
    ok, rate = h2load(h1("-D", str(seconds), "-c", "32", "-m", "1", "--warm-up-time", "1"),
                      port, "/v1/echo", bodies["json"], headers=JSON_HEADERS)
    served = backend.served() - served_before
    if served < ok:
        sys.exit(f"json: h2load saw {ok} successes but the backend served {served} calls")
    figures["rps"] = rate
    cpu = [p.cpu_seconds() - before for p, before in zip(proxies, cpu_before)]
    figures["cpu_us"] = [c / served * 1e6 for c in cpu] if served else []
    figures["rss_load"] = [p.memory() for p in proxies]
    _, figures["stream_rps"] = h2load(h1("-D", str(seconds), "-c", "32", "-m", "1", "--warm-up-time", "1"),
                                      port, "/v1/echo/s:stream?replyCount=10", None, headers=JSON_HEADERS)
    log = work / "json-fixed.log"
    h2load(h1("-D", str(seconds), "-c", "4", "--rps", "250"), port, "/v1/echo", bodies["json"], log, JSON_HEADERS)
    figures["fixed"] = percentiles(log)
    log = work / "json-serial.log"
    h2load(h1("-n", "3000", "-c", "1", "-m", "1"), port, "/v1/echo", bodies["json"], log, JSON_HEADERS)
    figures["serial"] = percentiles(log)
    return figures


def held_streams(port, proxies, bodies):
    """Holds 10,000 streams open at once; memory per stream of each proxy, in KiB."""
    before = [p.memory()[0] for p in proxies]
    load = subprocess.Popen(["h2load", "-n", "10000", "-c", "10", "-m", "1000", "-d", str(bodies["held"]), *HEADERS,
                             f"http://127.0.0.1:{port}/echo.v1.Echo/ServerStream"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.5)  # the backend holds each stream 4 s: sample while all are open
    during = [p.memory()[0] for p in proxies]
    load.wait(timeout=60)
    return [(d - b) * 1024 / 10000 for d, b in zip(during, before)]


def median(values):
    return statistics.median(values) if values else float("nan")


def prepare(work):
    """Writes the pair's certificates under `work`, and the request bodies; returns {name: body file}."""
    subprocess.run([str(RELEASE / "protomesh"), "certs", "--out", str(work / "certs"), "--trust-domain", TRUST_DOMAIN,
                    "--namespace", "bench", "client", "server"], check=True, stdout=subprocess.DEVNULL)
    bodies = {}
    for name, message in (("unary", echo_request(b"hello")), ("stream", echo_request(b"s", reply_count=10)),
                          ("held", echo_request(b"h", reply_count=1, delay_ms=4000))):
        bodies[name] = work / f"{name}.bin"
        bodies[name].write_bytes(grpc_frame(message))
    bodies["json"] = work / "json.json"
    bodies["json"].write_text('{"message": "hello"}')
    return bodies


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="length of each timed load")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="protomesh-bench-"))
    bodies = prepare(work)
    backend_port = free_port()
    backend = Backend(backend_port)
    results = {name: [] for name in ("direct", "envoy --concurrency 1", "envoy", "protomesh", MESH_TWO, MESH_TAPPED,
                                      MESH_VALIDATED, MESH_JSON)}
    extra = {}
    try:
        for round_number in range(options.rounds):
            print(f"round {round_number + 1} of {options.rounds}", flush=True)
            results["direct"].append(measure("direct", backend_port, [], backend, bodies, options.seconds, work))
            for name, concurrency in (("envoy --concurrency 1", 1), ("envoy", 0)):
                port, procs = envoy_pair(work, backend_port, concurrency)
                try:
                    results[name].append(measure(f"envoy{concurrency}", port, procs, backend, bodies, options.seconds, work))
                    if round_number == 0 and concurrency == 0:
                        extra["envoy idle"] = [p.memory() for p in procs]
                        extra["envoy held"] = held_streams(port, procs, bodies)
                finally:
                    for p in procs:
                        p.stop()
            for name, workers in (("protomesh", 1), (MESH_TWO, 2)):
                port, procs, ready = protomesh_pair(work, backend_port, workers)
                try:
                    extra.setdefault(f"{name} ready_ms", []).append(ready)
                    if round_number == 0:
                        extra[f"{name} idle"] = [p.memory() for p in procs]
                    results[name].append(measure(f"mesh{workers}", port, procs, backend, bodies, options.seconds, work))
                    if round_number == 0 and workers == 1:
                        extra["protomesh held"] = held_streams(port, procs, bodies)
                finally:
                    for p in procs:
                        p.stop()
            port, procs, _ = protomesh_pair(work, backend_port, 1)
            taps = [Tap(work, name, "rate=1000") for name in ("client", "server")]
            try:
                results[MESH_TAPPED].append(measure("tapped", port, procs, backend, bodies, options.seconds, work))
            finally:
                for tap in taps:
                    tap.stop()
                for p in procs:
                    p.stop()
            port, procs, _ = protomesh_pair(work, backend_port, 1, include=validated_contracts(work))
            try:
                results[MESH_VALIDATED].append(measure("validated", port, procs, backend, bodies, options.seconds, work))
            finally:
                for p in procs:
                    p.stop()
            web_port = free_port()
            _, procs, _ = protomesh_pair(work, backend_port, 1, web_port=web_port)
            try:
                results[MESH_JSON].append(measure_json(web_port, procs, backend, bodies, options.seconds, work))
            finally:
                for p in procs:
                    p.stop()
    finally:
        backend.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("Kubernetes discovery", flush=True)
    extra["discovery"] = subprocess.run(
        [str(RELEASE / "examples" / "discovery"), str(RELEASE / "protomesh"), str(REPO)],
        check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    report(results, extra, options)


def report(results, extra, options):
    def med(path, key, index=None):
        values = [r[key] if index is None else r[key][index] for r in results[path] if r[key]]
        return median(values)

    direct_p50 = med("direct", "fixed", 0)
    rows = []
    for path in results:
        proxies = 0 if path == "direct" else 2
        cpu = [med(path, "cpu_us", i) for i in range(proxies)]
        rss = [median([r["rss_load"][i][0] for r in results[path]]) for i in range(proxies)]
        peak = [median([r["rss_load"][i][1] for r in results[path]]) for i in range(proxies)]
        private = [median([r["rss_load"][i][2] for r in results[path]]) for i in range(proxies)]
        rows.append({
            "path": path, "rps": med(path, "rps"), "stream_rps": med(path, "stream_rps"),
            "p50": med(path, "fixed", 0), "p90": med(path, "fixed", 1), "p99": med(path, "fixed", 2),
            "serial50": med(path, "serial", 0), "serial99": med(path, "serial", 2),
            "cpu": sum(cpu), "cpu_each": cpu, "rss": rss, "peak": peak, "private": private,
        })
    by = {row["path"]: row for row in rows}
    direct, envoy, mesh_one = by["direct"], by["envoy"], by["protomesh"]
    envoy_best = max((by["envoy"], by["envoy --concurrency 1"]), key=lambda r: r["rps"])
    mesh = max((mesh_one, by[MESH_TWO]), key=lambda r: r["rps"])

    lines = [
        "# Benchmark results",
        "",
        f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{cpu_model()}; Envoy {envoy_version()}; {version(['h2load', '--version'])}; "
        f"protomesh {git_rev()}. Rerun with `bench/run`.",
        "",
        f"Link order: {link_order_coverage()} functions listed in `bench/protomesh.order` are in the binary "
        "(fewer means the file is stale: regenerate it with `bench/link_order.py`).",
        "",
        f"Medians of {options.rounds} rounds of {options.seconds} s loads, all on one machine over loopback. "
        "Unary calls carry a 7-byte message; the streaming case answers each call with 10 messages. "
        "Saturation: h2load, 8 connections x 32 streams (JSON: 32 HTTP/1.1 connections). Fixed rate: 1,000 calls/s on 4 connections. "
        "CPU per call: user+system time of each proxy over the saturation run, divided by the calls the backend served.",
        "",
        "| path | unary calls/s | streaming calls/s | p50 / p90 / p99 at 1k/s (ms) | serial p50 / p99 (ms) "
        "| CPU µs per call (server + client proxy) | RSS under load (MiB, server / client) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cpu = "-" if not row["cpu_each"] else f"{row['cpu']:.0f} ({' + '.join(f'{c:.0f}' for c in row['cpu_each'])})"
        rss = "-" if not row["rss"] else " / ".join(f"{r:.1f}" for r in row["rss"])
        lines.append(f"| {row['path']} | {row['rps']:,.0f} | {row['stream_rps']:,.0f} | "
                     f"{row['p50']:.2f} / {row['p90']:.2f} / {row['p99']:.2f} | "
                     f"{row['serial50']:.2f} / {row['serial99']:.2f} | {cpu} | {rss} |")
    added = lambda row: row["p50"] - direct_p50
    lines += [
        "",
        f"Ratios from the same run, each proxy at its setting with more calls/s ({mesh['path']}; {envoy_best['path']}):",
        "",
        f"- calls/s, share of direct: protomesh {mesh['rps'] / direct['rps']:.1%}, "
        f"Envoy {envoy_best['rps'] / direct['rps']:.1%}",
        f"- calls/s, protomesh / Envoy: {mesh['rps'] / envoy_best['rps']:.2f}x (target 2.5x); "
        f"one worker each: {mesh_one['rps'] / by['envoy --concurrency 1']['rps']:.2f}x, "
        f"two each: {by[MESH_TWO]['rps'] / envoy['rps']:.2f}x",
        f"- CPU per call, protomesh / Envoy: {mesh['cpu'] / envoy_best['cpu']:.2f} (target 0.4)",
        f"- added p50 latency at 1k/s, protomesh / Envoy: {added(mesh):.3f} / {added(envoy_best):.3f} ms "
        f"= {added(mesh) / added(envoy_best):.2f} (target 0.4)" if added(envoy_best) > 0 else "",
        f"- protomesh memory per sidecar: idle RSS {fmt_mem(extra['protomesh idle'])} MiB "
        f"(private {fmt_mem(extra['protomesh idle'], 2)}; target 8; with two workers "
        f"{fmt_mem(extra[MESH_TWO + ' idle'])}), "
        f"under load RSS {max(mesh['rss']):.1f} MiB (private {max(mesh['private']):.1f}), "
        f"peak {max(mesh['peak']):.1f} MiB (target 15); "
        f"Envoy idle RSS {fmt_mem(extra['envoy idle'])} MiB (private {fmt_mem(extra['envoy idle'], 2)}), "
        f"under load {max(envoy['rss']):.1f} MiB (private {max(envoy['private']):.1f})",
        f"- protomesh ready after start: {median(extra['protomesh ready_ms']):.1f} ms "
        f"(two workers: {median(extra[MESH_TWO + ' ready_ms']):.1f} ms; target 50)",
        f"- 10,000 streams held at once: memory per stream {fmt_kib(extra['protomesh held'])} KiB "
        f"per protomesh sidecar, {fmt_kib(extra['envoy held'])} KiB per Envoy",
        f"- JSON calls (HTTP/1.1, 32 connections, one call at a time each), transcoded by the server sidecar: "
        f"{by[MESH_JSON]['rps']:,.0f} calls/s; the server sidecar's CPU per call "
        f"{by[MESH_JSON]['cpu_each'][0]:.1f} µs, against {mesh_one['cpu_each'][0]:.1f} µs for a gRPC call "
        f"on the protomesh path ({by[MESH_JSON]['cpu_each'][0] / mesh_one['cpu_each'][0]:.2f}x)",
    ]
    text = "\n".join(line for line in lines) + "\n\n" + extra["discovery"]
    options.out.write_text(text)
    print(text)


def fmt_mem(memory, field=0):
    return " / ".join(f"{m[field]:.1f}" for m in memory)


def fmt_kib(values):
    return " / ".join(f"{v:.1f}" for v in values)


def binary_functions(binary):
    output = subprocess.run(["nm", "--defined-only", str(binary)], capture_output=True, text=True, check=True).stdout
    return {fields[2] for fields in map(str.split, output.splitlines()) if len(fields) == 3 and fields[1] in "tTwW"}


def link_order_coverage():
    listed = (REPO / "bench" / "protomesh.order").read_text().split()
    return f"{len(binary_functions(RELEASE / 'protomesh').intersection(listed)):,} of {len(listed):,}"


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def version(command):
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=10)
        text = (output.stdout + output.stderr).strip()
        return text.splitlines()[0] if text else command[0]
    except OSError:
        return f"{command[0]} missing"


def envoy_version():
    match = re.search(r"version: \S*?/(\d+\.\d+\.\d+)/", version(["envoy", "--version"]))
    return match.group(1) if match else "unknown"


def git_rev():
    output = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return output.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
