#!/usr/bin/env python3
"""What one busy window costs redis-server, with verve in front (issue 26).

    loadtest/redis_window_cost.py [--seconds 20] [--pipeline 16] [--connections 16]
                                  [--intset-entries 8192] [--compare GIT_REF]
                                  [--server-cpu 0] [--load-cpu 1]

For this build (and, with --compare, verve as of GIT_REF, in the same run): a
fresh redis-server with `set-max-intset-entries` at --intset-entries (what
docs/operations.md tells operators to set), one verve in Redis mode (one
worker, one window of a day, journal off) pinned with it to --server-cpu, and
wrk on --load-cpu sending every id new, --pipeline deep, for --seconds. Once
verve has handed Redis every id: redis-server's `used_memory` growth and CPU
(user + system, /proc) per id the window's sets hold, verve's CPU per request,
how the window is split (sets, and how many of them are intsets), the
protocol's share of Redis's time in commands (INFO commandstats: all but the
ids' own SADD and EXPIRE), and what a survey of the window's sets costs Redis.
"""

import argparse
import random
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


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *map(str, args)],
                          check=True, capture_output=True, text=True).stdout


def used_memory(port):
    return int(re.search(r"^used_memory:(\d+)", cli(port, "INFO", "memory"), re.M).group(1))


def metric(port, series):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(int(float(v)) for v in re.findall(rf"^{re.escape(series)} (\S+)$", text, re.M))


def window_sets(port):
    """Every id set in Redis: `verve:{W}` or `verve:{W/k}`, and their split
    sets `…:<sets>/<set>` (not the bookkeeping: `:rounds`, `:marks`, …)."""
    keys = cli(port, "--scan", "--pattern", "verve:{*}*").split()
    return [k for k in keys if not k.startswith("verve:{fleet}")
            and (k.endswith("}") or re.search(r"\}:\d+/\d+$", k))]


# What tally.lua does per set: renew its time to live, add its size.
SURVEY = "local n = 0 for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, 600) n = n + redis.call('SCARD', k) end return n"


def time_survey(port, sets):
    """The median over 5 of redis-server's own time (INFO commandstats) for a
    script that does to every set of the window what a survey does."""
    times = []
    for _ in range(5):
        cli(port, "CONFIG", "RESETSTAT")
        cli(port, "EVAL", SURVEY, len(sets), *sets)
        stats = cli(port, "INFO", "commandstats")
        times.append(int(re.search(r"cmdstat_eval:calls=\d+,usec=(\d+)", stats).group(1)) / 1000)
    return sorted(times)[2]


def measure(name, binary, args):
    work = Path(tempfile.mkdtemp(prefix=f"verve-window-cost-{name}-"))
    redis_port, port, admin = free_port(), free_port(), free_port()
    procs = []
    try:
        redis = subprocess.Popen(
            ["taskset", "-c", str(args.server_cpu), "redis-server", "--port", str(redis_port),
             "--save", "", "--appendonly", "no", "--set-max-intset-entries", str(args.intset_entries)],
            stdout=subprocess.DEVNULL)
        procs.append(redis)
        wait_for_port(redis_port, "redis-server")
        env = verve_env(port, work / "counts.log", work / "data",
                        VERVE_ADMIN_ADDR=f"127.0.0.1:{admin}", VERVE_WINDOW_SECS="86400",
                        VERVE_JOURNAL="false", VERVE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
        verve = subprocess.Popen(["taskset", "-c", str(args.server_cpu), str(binary)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=open(work / "stderr.log", "w"))
        procs.append(verve)
        wait_for_port(port, name, proc=verve)
        cli(redis_port, "CONFIG", "RESETSTAT")
        memory, redis_cpu, verve_cpu = used_memory(redis_port), cpu_seconds(redis.pid), cpu_seconds(verve.pid)
        # Below 10^14: wrk's Lua prints larger numbers in exponent form.
        base = random.Random(name).randrange(10**12, 9 * 10**12)
        out = subprocess.run(
            ["taskset", "-c", str(args.load_cpu), "wrk", "-t1", f"-c{args.connections}",
             f"-d{args.seconds + 2}s", "-s", str(SCRIPT), f"http://127.0.0.1:{port}", "--",
             "0", "0", str(args.pipeline), str(base), str(args.seconds)],
            check=True, capture_output=True, text=True).stdout
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if refused:
            raise SystemExit(f"{name}: {refused.group(1)} of {requests:,} requests were not answered ok")
        deadline = time.time() + 120
        while metric(admin, "verve_redis_buffered_ids") > 0:
            if time.time() > deadline:
                raise SystemExit(f"{name}: Redis never took every id")
            time.sleep(0.1)
        redis_cpu = cpu_seconds(redis.pid) - redis_cpu
        verve_cpu = cpu_seconds(verve.pid) - verve_cpu
        memory = used_memory(redis_port) - memory
        # Time inside commands, by command: the ids' (SADD, and EXPIRE, which
        # every round sends per set it writes) against the protocol's (the
        # scripts: the round's count, heartbeats, surveys, settles; MULTI/EXEC).
        usec = {name: int(us) for name, us in
                re.findall(r"cmdstat_([\w|]+):calls=\d+,usec=(\d+)", cli(redis_port, "INFO", "commandstats"))}
        # EXEC's time is that of the commands it ran, each counted too.
        for own in ("info", "config|resetstat", "exec"):
            usec.pop(own, None)
        for_ids = usec.get("sadd", 0) + usec.get("expire", 0)
        protocol = sum(usec.values()) - for_ids
        sets = window_sets(redis_port)
        ids = sum(int(cli(redis_port, "SCARD", k)) for k in sets)
        survey_ms = time_survey(redis_port, sets)
        sample = random.Random(1).sample(sets, min(len(sets), 50))
        intsets = sum(cli(redis_port, "OBJECT", "ENCODING", k).strip() == "intset" for k in sample)
        return {"requests": requests, "ids": ids, "sets": len(sets),
                "intsets": intsets / max(len(sample), 1),
                "protocol_share": protocol / max(for_ids + protocol, 1),
                "survey_ms": survey_ms,
                "bytes_per_id": memory / max(ids, 1), "redis_us_per_id": redis_cpu / max(ids, 1) * 1e6,
                "verve_us_per_request": verve_cpu / max(requests, 1) * 1e6,
                "us_per_request": (redis_cpu + verve_cpu) / max(requests, 1) * 1e6}
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--pipeline", type=int, default=16)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--intset-entries", type=int, default=8192)
    p.add_argument("--compare", metavar="GIT_REF")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--skip-build", action="store_true")
    args = p.parse_args()
    from run import build_at, sh
    if not args.skip_build:
        sh(["cargo", "build", "--release", "--bin", "verve"], cwd=ROOT)
    builds = [("verve", ROOT / "target" / "release" / "verve")]
    if args.compare:
        builds.insert(0, (args.compare, build_at(args.compare)))
    results = {}
    for name, binary in builds:
        results[name] = r = measure(name, binary, args)
        print(f"{name:>12}: {r['requests']:,} requests, {r['ids']:,} ids in {r['sets']:,} sets "
              f"({r['intsets']:.0%} intsets): redis-server {r['bytes_per_id']:.1f} bytes and "
              f"{r['redis_us_per_id']:.3f} µs per id; verve {r['verve_us_per_request']:.3f} µs, "
              f"both {r['us_per_request']:.3f} µs per request; the protocol's scripts "
              f"{r['protocol_share']:.1%} of Redis's time in commands; a survey of the window "
              f"{r['survey_ms']:.2f} ms", flush=True)
    if args.compare:
        old, new = results[args.compare], results["verve"]
        for key in ("bytes_per_id", "redis_us_per_id", "verve_us_per_request", "us_per_request"):
            print(f"{key:>22}: {new[key] / old[key]:.2f}x of {args.compare}")


if __name__ == "__main__":
    main()
