"""Regenerates bench/protomesh.order, the order in which the release build lays
out protomesh's functions (build.rs hands it to the linker).

A sidecar pair runs under callgrind with two workers: it starts, becomes
ready, then carries unary, server-streaming and serial calls. The file lists
first the functions that ran only while starting, then those that ran both
while starting and under load, then those that ran only under load. Code run
at start sits together, so an idle sidecar maps few pages of text; code run
under load sits together, so a busy one touches few pages and TLB entries.
Within each load group the hottest functions come first.

Run it after changes to the hot path or to dependencies (symbol names carry a
hash of their crate and its features): `python3 bench/link_order.py` builds
the sidecar and the echo backend as `bench/run` does, then profiles them; the
next release build uses the new order. Needs valgrind (Debian `valgrind`) and
h2load (`nghttp2-client`). The linker skips functions the file names but the
binary lacks; `bench/RESULTS.md` reports how many of them it found.
"""

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import bench

ORDER = Path(__file__).resolve().parent / "protomesh.order"
# callgrind marks recursion depth with 'N; the symbol is the same.
RECURSION = re.compile(r"'\d+$")


def self_costs(profile):
    """{mangled function name: instructions executed in it} for the protomesh binary."""
    objects, functions, costs = {}, {}, {}
    current_object = current_function = None
    after_calls = in_binary = False
    for line in profile.read_text(errors="replace").splitlines():
        key, _, rest = line.partition("=")
        if key in ("ob", "cob", "fn", "cfn"):
            number, _, name = rest.partition(" ")
            table = objects if key.endswith("ob") else functions
            if name:
                table[number] = name
            if key == "ob":
                current_object = objects[number]
            elif key == "fn":
                current_function = RECURSION.sub("", functions[number])
                in_binary = current_object.endswith("/protomesh")
        elif key == "calls":
            after_calls = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_calls:
                after_calls = False
            elif current_function and in_binary:
                fields = line.split()
                if len(fields) > 1:
                    costs[current_function] = costs.get(current_function, 0) + int(fields[1])
    return costs


def profile_pair(work, backend_port, bodies):
    """Runs the pair under callgrind; returns (costs until ready, costs after)."""
    launcher = ["valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={work}/callgrind.%p"]
    port, procs, _ = bench.protomesh_pair(work, backend_port, workers=2, launcher=launcher)
    try:
        # Dump what ran until now (startup) to callgrind.<pid>.1; the rest goes to callgrind.<pid> at exit.
        for proc in procs:
            subprocess.run(["callgrind_control", "--dump=ready", str(proc.pid)], check=True, capture_output=True)
        for args, method, body in ((["-n", "20000", "-c", "8", "-m", "32"], "Unary", "unary"),
                                   (["-n", "2000", "-c", "4", "-m", "8"], "ServerStream", "stream"),
                                   (["-n", "500", "-c", "1", "-m", "1"], "Unary", "unary")):
            ok, _ = bench.h2load(args, port, f"/echo.v1.Echo/{method}", bodies[body])
            if ok == 0:
                sys.exit(f"no {method} call succeeded under callgrind")
    finally:
        for proc in procs:
            proc.stop()
    started, loaded = {}, {}
    for proc in procs:
        # Written as valgrind exits, which `stop` has waited for.
        if not (work / f"callgrind.{proc.pid}").exists():
            sys.exit(f"callgrind wrote no profile for {proc.name}: it did not exit within 10 s of SIGTERM")
        for costs, path in ((started, work / f"callgrind.{proc.pid}.1"), (loaded, work / f"callgrind.{proc.pid}")):
            for function, cost in self_costs(path).items():
                costs[function] = costs.get(function, 0) + cost
    return started, loaded


def build():
    # Apart, so the sidecar is built without the samples' features, as users build it.
    for target in (["-p", "protomesh", "--bin", "protomesh"], ["-p", "protomesh-samples", "--bin", "protomesh-samples"]):
        subprocess.run(["cargo", "build", "--release", *target], cwd=bench.REPO, check=True)


def main():
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install valgrind nghttp2-client")
    build()
    work = Path(tempfile.mkdtemp())
    try:
        bodies = bench.prepare(work)
        backend_port = bench.free_port()
        backend = bench.Backend(backend_port)
        try:
            started, loaded = profile_pair(work, backend_port, bodies)
        finally:
            backend.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Only the binary's own symbols: callgrind also names code it could not place, like "(below main)".
    present = bench.binary_functions(bench.RELEASE / "protomesh")
    hottest_first = lambda names: sorted(names, key=lambda name: (-loaded[name], name))
    run_at_start, run_under_load = present.intersection(started), present.intersection(loaded)
    order = (sorted(run_at_start - run_under_load) + hottest_first(run_at_start & run_under_load)
             + hottest_first(run_under_load - run_at_start))
    ORDER.write_text("".join(f"{name}\n" for name in order))
    print(f"{ORDER.name}: {len(order)} of the binary's {len(present)} functions, {len(run_at_start)} of them run while starting")


if __name__ == "__main__":
    main()
