#!/usr/bin/env python3
"""The pipelined path at full load: verve's CPU per request against the bare
baseline's, 16 deep, the servers taking turns, with an interval that says how
small a change the run can see.

    loadtest/pipelined.py [--seconds 20] [--slice-ms 500] [--depth 16] [--connections 64]
                          [--loads new,repeat] [--servers baseline,verve]
                          [--compare GIT_REF] [--skip-build]

Every server runs one worker pinned to --server-cpu (its other threads, the
aggregator's included, share that CPU and are charged to it); all are started
together and driven from --load-cpu by examples/pipelined_load.rs, which keeps
--connections connections to each, every one writing --depth requests at a time
and reading their answers before the next write. That client costs less per
request than a server does, so the server under load is busy all the time (the
`busy` column): what is measured is the most it can answer. wrk with a Lua
script cannot do that from one core: loadtest/run.py's 16-deep phase gets about
200,000 requests/s, which keeps the baseline busy a quarter of the time, so its
figure mixes the cost of a request with the cost of waking up for a few of them
(docs/performance.md, "Two benches of one path").

The servers take turns in slices of --slice-ms, round robin, one loaded at a
time, until each has had --seconds of load: a change of the machine's speed,
which on a shared VM comes and goes over seconds, hits them alike. A turn is
one slice of each server; the report gives, per load and server, the CPU per
request over all its slices, requests per second, and the median over turns of
the turn's ratio to the first server, with a 95 % interval (bootstrap of that
median). A change of 5 % shows when the interval is narrower than ±2.5 %.
`--servers baseline,baseline` measures the noise itself (an A/A run); a server
given as NAME=PATH is another binary, or a script that execs verve with settings
of its own.

Loads: `new`, every id new to the window (the set grows all the time: the
worst case for counting); `repeat`, ids cycling over 65,536 values that the
warm-up inserts, so that the measured requests find their ids in a set that
fits the cache (the request path, with the set's cheapest answer).

--compare GIT_REF also measures verve as of GIT_REF (built once, like
loadtest/run.py --compare), with its ratio to the current verve.
"""

import argparse
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from procs import free_port, verve_env, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
LOADS = {"new": 0, "repeat": 65_536}


def start(binary, cpu, tmp):
    """Starts one server (one worker) pinned to `cpu`; returns (process, port)."""
    port = free_port()
    env = verve_env(port, tmp / "counts.log", tmp / "data", VERVE_WINDOW_SECS="86400")
    proc = subprocess.Popen(["taskset", "-c", str(cpu), str(binary)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, binary.name, proc=proc)
    return proc, port


def measure(binaries, ids, args):
    """Starts every server, runs the turns; returns per server the list of its
    slices as (requests, seconds, cpu seconds)."""
    slices = {i: [] for i in range(len(binaries))}
    procs = []
    with tempfile.TemporaryDirectory(prefix="verve-pipelined-") as tmp:
        try:
            targets = []
            for i, binary in enumerate(binaries):
                Path(tmp, str(i)).mkdir()
                proc, port = start(binary, args.server_cpu, Path(tmp, str(i)))
                procs.append(proc)
                targets.append(f"127.0.0.1:{port}={proc.pid}")
            turns = max(1, round(args.seconds * 1000 / args.slice_ms))
            out = subprocess.run(
                ["taskset", "-c", str(args.load_cpu), str(RELEASE / "examples" / "pipelined_load"),
                 str(args.connections), str(args.depth), str(ids), "1000", str(args.slice_ms),
                 str(turns * len(binaries)), *targets],
                check=True, capture_output=True, text=True).stdout
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    for server, requests, seconds, cpu in re.findall(
            r"server=(\d+) requests=(\d+) seconds=([\d.]+) cpu_seconds=([\d.]+)", out):
        slices[int(server)].append((int(requests), float(seconds), float(cpu)))
    return slices


def median_interval(values, draws=2000):
    """The median of `values` and a 95 % bootstrap interval of it."""
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return statistics.median(values), medians[int(draws * 0.025)], medians[int(draws * 0.975)]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--slice-ms", type=int, default=500)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--loads", default="new,repeat")
    parser.add_argument("--servers", default="baseline,verve")
    parser.add_argument("--compare", metavar="GIT_REF")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()

    binaries = {"baseline": RELEASE / "examples" / "baseline", "verve": RELEASE / "verve"}
    names = []
    for server in args.servers.split(","):
        # NAME=PATH: another binary (or a script that execs one with settings of its own).
        name, _, path = server.partition("=")
        if path:
            binaries[name] = Path(path).resolve()
        names.append(name)
    if args.compare:
        from run import build_at
        # Built first: building the other commit reuses (and overwrites) target/release.
        binaries[f"verve@{args.compare}"] = build_at(args.compare)
        names.append(f"verve@{args.compare}")
    if not args.skip_build or args.compare:
        subprocess.run(["cargo", "build", "--release", "--bin", "verve", "--example", "baseline",
                        "--example", "pipelined_load"], cwd=ROOT, check=True)
    labels = [f"{name}#{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]

    print(f"each server {args.seconds:g} s in slices of {args.slice_ms} ms, {args.depth} deep, "
          f"{args.connections} connections; ratios are to {labels[0]}, per turn:")
    print("| load | server | µs CPU/req | req/s | busy | ratio (median) | 95 % interval |")
    print("|---|---|---|---|---|---|---|")
    for load in args.loads.split(","):
        slices = measure([binaries[name] for name in names], LOADS[load], args)

        def cost(rows):
            return sum(cpu for _, _, cpu in rows) / sum(n for n, _, _ in rows) * 1e6

        def turn_ratios(server, reference):
            return [(cpu / n) / (ref_cpu / ref_n) for (n, _, cpu), (ref_n, _, ref_cpu)
                    in zip(slices[server], slices[reference])]

        for i, label in enumerate(labels):
            rows = slices[i]
            seconds = sum(t for _, t, _ in rows)
            line = (f"| {load} | {label} | {cost(rows):.3f} | "
                    f"{sum(n for n, _, _ in rows) / seconds:,.0f} | "
                    f"{sum(cpu for _, _, cpu in rows) / seconds:.2f} |")
            if i == 0:
                print(line + " 1 | |")
            else:
                mid, low, high = median_interval(turn_ratios(i, 0))
                print(line + f" {mid:.3f} | {low:.3f} to {high:.3f} |")
        if args.compare:
            mid, low, high = median_interval(turn_ratios(names.index("verve"), len(names) - 1))
            print(f"| {load} | verve / verve@{args.compare} | | | | {mid:.3f} | {low:.3f} to {high:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
