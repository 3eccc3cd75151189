#!/usr/bin/env python3
"""Where a server's CPU goes, thread by thread, under wrk: the aggregator's wake-ups.

    loadtest/threads.py BINARY [BINARY ...] [--rounds 3] [--duration 10]
                        [--pipeline 16] [--connections 64] [--rate 0]

Starts each binary in turn (one worker, pinned with every other thread of it to
--server-cpu), drives it with wrk from --load-cpu (or wrk2 at --rate requests per
second when --rate is given), and reads from /proc, per thread: CPU time per
request and context switches per 1,000 requests, voluntary (the thread blocked:
for the aggregator, each is a wait for an empty channel and so one wake-up later)
and involuntary (preempted). Binaries alternate within each round, so that a
change of the machine's mood hits all of them alike; the table gives each
figure's median over the rounds.

This answers the question the instruction counts cannot: what the threads cost
one another when they share a core (a wake-up is a futex call, a context switch
and cold caches, none of which callgrind sees).
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from procs import free_port, verve_env, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "loadtest" / "accept.lua"
TICKS = os.sysconf("SC_CLK_TCK")


def thread_stats(pid):
    """{thread name: (cpu seconds, voluntary, involuntary switches)} of process `pid`,
    summed over threads of the same name."""
    stats = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / TICKS
        vol = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
        invol = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
        name = re.sub(r"-\d+$", "", name)
        old = stats.get(name, (0.0, 0, 0))
        stats[name] = (old[0] + cpu, old[1] + vol, old[2] + invol)
    return stats


def measure(binary, args, round_no):
    port = free_port()
    log = Path("/tmp") / f"threads-{os.getpid()}-{round_no}.log"
    env = verve_env(port, log, tempfile.mkdtemp(prefix="verve-threads-data-"))
    proc = subprocess.Popen(["taskset", "-c", str(args.server_cpu), str(binary)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, str(binary), limit=30, proc=proc)
        before = thread_stats(proc.pid)
        url = f"http://127.0.0.1:{port}"
        tool = ["wrk2", "-R", str(args.rate)] if args.rate else ["wrk"]
        out = subprocess.run(
            ["taskset", "-c", str(args.load_cpu), *tool, "-t1", f"-c{args.connections}",
             f"-d{args.duration}s", "-s", str(SCRIPT), url, "--", "1000000", "0",
             str(args.pipeline), "0", str(args.duration)],
            check=True, capture_output=True, text=True).stdout
        after = thread_stats(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.unlink(missing_ok=True)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    figures = {}
    for name, (cpu, vol, invol) in after.items():
        cpu0, vol0, invol0 = before.get(name, (0.0, 0, 0))
        figures[name] = ((cpu - cpu0) / requests * 1e6, (vol - vol0) / requests * 1e3,
                         (invol - invol0) / requests * 1e3)
    return requests / args.duration, figures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("binaries", nargs="+", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--pipeline", type=int, default=16)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rate", type=int, default=0, help="fixed rate with wrk2; 0: wrk at maximum")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    args = p.parse_args()

    runs = {binary: [] for binary in args.binaries}
    for round_no in range(args.rounds):
        for binary in args.binaries:
            rate, figures = measure(binary, args, round_no)
            runs[binary].append((rate, figures))
            print(f"round {round_no + 1} {binary.name}: {rate:,.0f} req/s", file=sys.stderr)

    print(f"\n{args.rounds} rounds, wrk {args.connections} connections, pipeline "
          f"{args.pipeline}, {'rate ' + str(args.rate) if args.rate else 'maximum rate'}, "
          f"medians\n")
    print("| binary | thread | µs CPU/req | voluntary switches /1K req | involuntary /1K req |")
    print("|---|---|---|---|---|")
    for binary, results in runs.items():
        rate = statistics.median(r for r, _ in results)
        print(f"| {binary.name} | (req/s) | {rate:,.0f} | | |")
        names = sorted({n for _, figures in results for n in figures})
        for name in names:
            rows = [figures.get(name, (0.0, 0.0, 0.0)) for _, figures in results]
            med = [statistics.median(col) for col in zip(*rows)]
            print(f"| | {name} | {med[0]:.3f} | {med[1]:.2f} | {med[2]:.2f} |")


if __name__ == "__main__":
    main()
