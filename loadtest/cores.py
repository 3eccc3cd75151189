#!/usr/bin/env python3
"""verve against the bare baseline at several worker counts, every id new, in one run.

    loadtest/cores.py [--workers 1,2,4,8,12] [--pipeline 1,16] [--duration 60]
                      [--threads 8] [--connections 256] [--server-cpus LIST]
                      [--load-cpus LIST] [--verve PATH] [--baseline PATH] [--env K=V ...]

For each worker count and pipeline depth it starts the baseline (examples/baseline:
answers `ok`, counts nothing) and then verve with that many workers, drives each
with wrk for --duration seconds with ids that are all new (loadtest/accept.lua with
ids=0) into one window (VERVE_WINDOW_SECS=86400), and reports requests/s, requests
answered other than 200 (503s), CPU per request (/proc/<pid>/stat, all threads),
verve's peak RSS per id counted, the aggregator queue's peak depth
(verve_channel_depth_peak of VERVE_QUEUE_BATCHES) and the longest batch insert
(verve_aggregator_batch_longest_microseconds), and checks that the window's count
(the record verve writes at SIGTERM) equals the ids answered `ok`.

Without --verve/--baseline it builds both in release first. For the device machine,
build here, copy the two binaries (and wrk with the libraries `ldd wrk` names) into
an ignored folder, and pass --verve/--baseline. --server-cpus/--load-cpus pin the
servers and wrk with taskset (on a 2-core machine: --server-cpus 1 --load-cpus 0);
unpinned by default, as on a many-core machine where wrk shares the cores. Writes
loadtest/results/cores.md.
"""

import argparse
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from procs import cpu_seconds, free_port, verve_env, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "loadtest" / "accept.lua"


def pinned(cpus, cmd):
    return (["taskset", "-c", cpus] if cpus else []) + cmd


def peak_rss_bytes(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{name} (\d+)", text, re.M)
    return int(found.group(1)) if found else None


def run(args, name, binary, workers, pipeline):
    port, admin = free_port(), free_port()
    run_dir = Path(tempfile.mkdtemp(prefix=f"verve-cores-{name}-"))
    count_log = run_dir / "counts.log"
    env = verve_env(port, count_log, run_dir / "data", VERVE_WORKERS=str(workers),
                    VERVE_ADMIN_ADDR=f"127.0.0.1:{admin}", VERVE_WINDOW_SECS="86400")
    env.update(dict(kv.split("=", 1) for kv in args.env))
    proc = subprocess.Popen(pinned(args.server_cpus, [str(binary)]), env=env, cwd=run_dir,
                            stdout=subprocess.DEVNULL, stderr=open(run_dir / "stderr.log", "w"))
    try:
        wait_for_port(port, name, proc=proc)
        sending = args.duration - 2
        cmd = pinned(args.load_cpus, [
            "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "-s", str(SCRIPT),
            f"http://127.0.0.1:{port}", "--", "0", "0", str(pipeline), "0", str(sending)])
        before = cpu_seconds(proc.pid)
        out = subprocess.run(cmd, check=True, text=True, capture_output=True).stdout
        used = cpu_seconds(proc.pid) - before
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        failed = int(non2xx.group(1)) if non2xx else 0
        sent = int(re.search(r"distinct_ids=(\d+)", out).group(1))
        result = {"rate": requests / sending, "failed": failed, "cpu_ns": used / requests * 1e9,
                  "ok": sent - failed, "rss": peak_rss_bytes(proc.pid)}
        if name == "verve":
            result["queue_peak"] = metric(admin, "verve_channel_depth_peak")
            result["longest_us"] = metric(admin, "verve_aggregator_batch_longest_microseconds")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    if name == "verve":
        lines = count_log.read_text().splitlines() if count_log.exists() else []
        counted = sum(int(re.search(r"unique_requests=(\d+)", line).group(1)) for line in lines)
        result["counted"] = counted
        result["bytes_per_id"] = result["rss"] / max(counted, 1)
    return result


def shown(value):
    """A metric an older build does not export is shown as a dash."""
    return "-" if value is None else f"{value:,}"


def build():
    subprocess.run(["cargo", "build", "--release", "--bin", "verve", "--example", "baseline"],
                   cwd=ROOT, check=True)
    release = ROOT / "target" / "release"
    return release / "verve", release / "examples" / "baseline"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8,12")
    parser.add_argument("--pipeline", default="1,16")
    parser.add_argument("--duration", type=int, default=60)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--server-cpus", default="")
    parser.add_argument("--load-cpus", default="")
    parser.add_argument("--verve", type=Path)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--env", action="append", default=[], help="K=V for verve and the baseline")
    args = parser.parse_args()
    verve, baseline = (args.verve.resolve(), args.baseline.resolve()) if args.verve and args.baseline else build()

    rows = []
    for pipeline in [int(p) for p in args.pipeline.split(",")]:
        for workers in [int(w) for w in args.workers.split(",")]:
            bare = run(args, "baseline", baseline, workers, pipeline)
            ours = run(args, "verve", verve, workers, pipeline)
            exact = "yes" if ours["counted"] == ours["ok"] else f"NO ({ours['counted']:,} of {ours['ok']:,})"
            row = (f"| {pipeline} | {workers} | {bare['rate']:,.0f} | {ours['rate']:,.0f} | "
                   f"{ours['ok'] / (args.duration - 2):,.0f} | {ours['ok'] / (args.duration - 2) / bare['rate']:.2f} | "
                   f"{ours['failed']:,} | {bare['cpu_ns']:,.0f} | {ours['cpu_ns']:,.0f} | "
                   f"{ours['bytes_per_id']:.1f} | {shown(ours['queue_peak'])} | {shown(ours['longest_us'])} | "
                   f"{ours['counted']:,} | {exact} |")
            print(row, flush=True)
            rows.append(row)
    head = ("| depth | workers | baseline req/s | verve req/s | verve ok/s | ok/s ÷ baseline | verve non-200 | "
            "baseline ns CPU/req | verve ns CPU/req | verve peak RSS bytes/id | queue peak (batches) | "
            "longest batch µs | ids counted | count exact |")
    table = "\n".join([head, "|" + "---|" * 14] + rows)
    out = ROOT / "loadtest" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cores.md").write_text(
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, wrk -t{args.threads} -c{args.connections}, "
        f"{args.duration} s per run, every id new, one window\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
