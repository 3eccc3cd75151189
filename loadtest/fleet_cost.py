#!/usr/bin/env python3
"""What the fleet protocol costs Redis: commands per instance and window.

    loadtest/fleet_cost.py [--instances 2] [--window-secs 1] [--duration 30]
                           [--connections 2] [--binary target/release/verve]
                           [--env KEY=VALUE ...]

Starts a redis-server and N release instances sharing it (one worker each) on
loopback, loads each with wrk (random ids, --connections connections each) for
--duration seconds, stops everything, and reads INFO commandstats: the calls of
every command (those a script or a MULTI runs included), per instance and window,
per instance and second, and per 1,000 requests; and redis-server's CPU time per
new id (user and system, /proc). Short windows make the per-window part visible
next to the per-id part.
"""

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from procs import cpu_seconds, free_port, verve_env, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "loadtest" / "accept.lua"


def run_fleet(args, procs):
    """Runs the fleet under load; returns INFO commandstats, requests and seconds."""
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    procs.append(redis)
    wait_for_port(redis_port, "redis-server", limit=15)
    work = Path(tempfile.mkdtemp(prefix="verve-fleet-cost-"))
    instances = []
    for i in range(args.instances):
        port = free_port()
        env = verve_env(port, work / f"i{i}.log", work / f"i{i}.data",
                        VERVE_WINDOW_SECS=str(args.window_secs), VERVE_INSTANCE=f"i{i}",
                        VERVE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
        env.update(item.split("=", 1) for item in args.env)
        proc = subprocess.Popen([str(args.binary)], env=env, stdout=subprocess.DEVNULL,
                                stderr=open(work / f"i{i}.err", "w"))
        procs.append(proc)
        wait_for_port(port, f"verve i{i}", limit=15)
        instances.append((proc, port))
    subprocess.run(["redis-cli", "-p", str(redis_port), "CONFIG", "RESETSTAT"], check=True,
                   stdout=subprocess.DEVNULL)

    cpu_before = cpu_seconds(redis.pid)
    started = time.time()
    loads = []
    for i, (_, port) in enumerate(instances):
        # Half of each instance's ids are also sent to the next one.
        base = i * 500000
        cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "-s", str(SCRIPT),
               f"http://127.0.0.1:{port}", "--", "1000000", "0", "1", str(base)]
        loads.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    requests = 0
    for load in loads:
        out = load.communicate()[0]
        requests += int(re.search(r"(\d+) requests in", out).group(1))
    elapsed = time.time() - started

    redis_cpu = cpu_seconds(redis.pid) - cpu_before
    stats = subprocess.run(["redis-cli", "-p", str(redis_port), "INFO", "commandstats"],
                           capture_output=True, text=True, check=True).stdout
    # The window sets: the keys ending in their hash tag, verve:{<window start>},
    # or split, verve:{<window start>}:<sets>/<set>.
    keys = subprocess.run(["redis-cli", "-p", str(redis_port), "--scan", "--pattern", "verve:{*}*"],
                          capture_output=True, text=True, check=True).stdout.split()
    new_ids = sum(int(subprocess.run(["redis-cli", "-p", str(redis_port), "SCARD", key],
                                     capture_output=True, text=True, check=True).stdout)
                  for key in keys if key.endswith("}") or re.search(r"\}:\d+/\d+$", key))
    return stats, requests, elapsed, redis_cpu, new_ids


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--window-secs", type=int, default=1)
    p.add_argument("--duration", type=int, default=30)
    p.add_argument("--connections", type=int, default=2, help="wrk connections per instance")
    p.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "verve")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="more environment for the instances (e.g. an older build's knobs)")
    args = p.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (apt-get install wrk)")

    procs = []
    try:
        stats, requests, elapsed, redis_cpu, new_ids = run_fleet(args, procs)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)

    commands = {name: int(calls) for name, calls in re.findall(r"cmdstat_([\w|]+):calls=(\d+)", stats)}
    commands.pop("info", None)
    windows = elapsed / args.window_secs
    instance_windows = windows * args.instances
    print(f"{args.instances} instances, {args.window_secs} s windows, {elapsed:.1f} s, "
          f"{requests:,} requests ({requests / elapsed:,.0f}/s), about {windows:.0f} windows")
    print(f"{'command':>18} {'calls':>9} {'per instance-window':>20} {'per instance-second':>20} {'per 1,000 req':>14}")
    for name, calls in sorted(commands.items(), key=lambda kv: -kv[1]):
        print(f"{name:>18} {calls:>9,} {calls / instance_windows:>20.2f} "
              f"{calls / (elapsed * args.instances):>20.2f} {calls / requests * 1000:>14.2f}")
    total = sum(commands.values())
    print(f"{'all':>18} {total:>9,} {total / instance_windows:>20.2f} "
          f"{total / (elapsed * args.instances):>20.2f} {total / requests * 1000:>14.2f}")
    print(f"redis-server CPU: {redis_cpu:.2f} s for {new_ids:,} ids in the window sets: "
          f"{redis_cpu / max(new_ids, 1) * 1e6:.2f} µs per id, {redis_cpu / requests * 1e6:.2f} µs per request")


if __name__ == "__main__":
    main()
