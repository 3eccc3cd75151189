#!/usr/bin/env python3
"""Instructions per request, verve against the bare baseline, under callgrind.

    loadtest/instructions.py [--requests 100000] [--warmup 20000] [--gap-us 300] [--depths 1,16]
                             [--loads new,repeat] [--servers baseline,verve]
                             [--compare BINARY] [--top 15]
                             [--skip-build]
                             [--out loadtest/results/instructions]

Wall-clock CPU on a shared VM swings by more than the differences worth chasing;
an instruction count does not. For each server and pipelining depth, this starts
the server (one worker) under `valgrind --tool=callgrind`, sends a warm-up stream
with examples/request_stream.rs (one connection, `depth` requests per write, and
a pause of --gap-us after each group's answers, so that the server waits for every
group instead of sometimes finding it already read: which of the two happens
otherwise depends on how busy the machine is, and changes the count by a third),
zeroes callgrind's counters, sends the measured stream (same shape), dumps the counters, and divides the instructions the server executed (every
thread: workers, aggregator, timers) by the requests. Start-up and shutdown are
outside the dump; what is inside is the work the stream caused, plus the periodic
flush and sweep ticks that fell within it (a little, and it depends on how long
the run took, so counts repeat to within a fraction of a percent, not exactly).

Two loads, as in loadtest/pipelined.py: `new`, the measured stream's ids all
new to the window (the set grows, and every id goes into the journal: counting's
worst case), and `repeat`, the measured stream's ids all sent in the warm-up
(the set only looks them up: the request path, and the steady state of a client
that repeats its ids).

--servers may name `verve-nojournal`: verve with VERVE_JOURNAL=false, to see what
the journal costs (`--servers verve-nojournal,verve`); callgrind counts user-space
instructions only, so the journal's write(2) shows as its call, not the kernel's work.

--compare BINARY also measures another verve build (e.g. target/compare/verve-<sha>,
which `loadtest/run.py --compare` leaves behind) as `before`, for verve / before.

Prints a table (instructions per request, verve / baseline) and, for each run,
where the instructions went: summed by source file (a crate, a std module, or one
of verve's files) and by function (callgrind_annotate, own cost); the dumps stay
in --out for a closer look (`callgrind_annotate --inclusive=yes FILE`).
"""

import argparse
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from procs import free_port, verve_env, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
# Server and client on CPUs of their own, as in the wall-clock runs.
SERVER_CPU, CLIENT_CPU = "0", "1"


def stream(port, requests, depth, first, gap_us):
    subprocess.run(["taskset", "-c", CLIENT_CPU, str(RELEASE / "examples" / "request_stream"),
                    f"127.0.0.1:{port}", str(requests), str(depth), str(first), str(gap_us)],
                   check=True)


def callgrind_control(option, pid):
    subprocess.run(["callgrind_control", option, str(pid)], check=True,
                   stdout=subprocess.DEVNULL)


def total_instructions(dump):
    """The `totals:` (or `summary:`) line of a callgrind dump: instructions executed."""
    for line in Path(dump).read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {dump}")


def measure(server, depth, load, args, out):
    """Runs one server under callgrind; returns instructions per request and the dump."""
    port = free_port()
    binary = {"baseline": RELEASE / "examples" / "baseline", "verve": RELEASE / "verve",
              "verve-nojournal": RELEASE / "verve", "before": args.compare}[server]
    run = f"{server}-d{depth}-{load}"
    env = verve_env(port, out / f"{run}.log", out / f"{run}.data",
                    VERVE_WINDOW_SECS="86400",
                    # Batches fill before the flush tick, as under a high load; the
                    # ticks' own work depends on how long the run takes.
                    VERVE_FLUSH_MS="1000",
                    VERVE_JOURNAL=str(server != "verve-nojournal").lower())
    # A fresh journal and count log: a journal left by an earlier run in the same
    # (day-long) window would be read back at start, and its ids would make the
    # stream's look old to the set.
    shutil.rmtree(env["VERVE_DATA_DIR"], ignore_errors=True)
    Path(env["VERVE_COUNT_LOG"]).unlink(missing_ok=True)
    pattern = out / f"{run}.%p"
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, "valgrind", "--tool=callgrind", f"--callgrind-out-file={pattern}",
                             str(binary)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server, limit=60, proc=proc)
        if load == "new":
            stream(port, args.warmup, depth, 0, args.gap_us)
            first = args.warmup
        else:
            stream(port, max(args.warmup, args.requests), depth, 0, args.gap_us)
            first = 0
        callgrind_control("--zero", proc.pid)
        stream(port, args.requests, depth, first, args.gap_us)
        callgrind_control("--dump", proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    dump = out / f"{run}.{proc.pid}.1"
    return total_instructions(dump) / args.requests, dump


def own_costs(dump):
    """Each function's own instructions, as `(instructions, "file:function")`, largest
    first, read from the callgrind dump itself.

    With fat LTO most of verve is inlined into a few symbols; the file is that of
    the source line the instructions came from (callgrind's `fi=`/`fe=` for inlined
    code), which still says which part of the code they belong to. The cost line
    after a `calls=` line is a call's inclusive cost and is not counted."""
    names = {"fl": {}, "fn": {}}
    kinds = {"fl": "fl", "fi": "fl", "fe": "fl", "cfl": "fl", "cfi": "fl", "fn": "fn", "cfn": "fn"}

    def name(kind, value):
        table = names[kinds[kind]]
        match = re.match(r"\((\d+)\)(?: (.*))?", value)
        if not match:
            return value
        if match.group(2) is not None:
            table[match.group(1)] = match.group(2)
        return table.get(match.group(1), value)

    costs, file, inlined, function, skip_next = {}, "", None, "", False
    for line in Path(dump).read_text().splitlines():
        spec = re.match(r"(fl|fi|fe|fn|cfl|cfi|cfn|calls)=(.*)", line)
        if spec:
            kind, value = spec.groups()
            if kind == "calls":
                skip_next = True
            elif kind == "fl":
                file, inlined = name(kind, value), None
            elif kind in ("fi", "fe"):
                inlined = name(kind, value)
            elif kind == "fn":
                function, inlined = name(kind, value), None
            else:
                name(kind, value)
            continue
        cost = re.match(r"[+-]?\d+|\*", line)
        if not cost:
            continue
        if skip_next:
            skip_next = False
            continue
        fields = line.split()
        if len(fields) >= 2:
            key = f"{inlined or file}:{function}"
            costs[key] = costs.get(key, 0) + int(fields[1])
    return sorted(((cost, key) for key, cost in costs.items()), reverse=True)


def source_of(name):
    """Which part of the code a `file:function` row's instructions came from: a
    crate, a module of the standard library, libc, or one of the server's files."""
    path = name.split(":", 1)[0]
    crate = re.search(r"index\.crates\.io-[^/]+/([^/]+)/", path)
    if crate:
        return crate.group(1)
    if "/rustc/" in path:
        return "std " + path.split("/library/", 1)[-1]
    if path.startswith("./") or "sysdeps" in path:
        return "libc"
    return path


def by_source(rows):
    """Own instructions summed by source, largest first."""
    sources = {}
    for instructions, name in rows:
        source = source_of(name)
        sources[source] = sources.get(source, 0) + instructions
    return sorted(sources.items(), key=lambda item: -item[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--gap-us", type=int, default=300)
    parser.add_argument("--depths", default="1,16")
    parser.add_argument("--loads", default="new,repeat")
    parser.add_argument("--servers", default="baseline,verve")
    parser.add_argument("--compare", type=Path, metavar="BINARY")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "instructions")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--bin", "verve", "--example", "baseline",
                        "--example", "request_stream"], cwd=ROOT, check=True)

    depths = [int(d) for d in args.depths.split(",")]
    loads = args.loads.split(",")
    servers = args.servers.split(",") + (["before"] if args.compare else [])
    results = {}
    for load in loads:
        for depth in depths:
            for server in servers:
                per_request, dump = measure(server, depth, load, args, args.out)
                results[(server, depth, load)] = (per_request, dump)
                print(f"{server:>8}  depth {depth:>2}  {load:>6}: {per_request:,.0f} "
                      "instructions per request", flush=True)

    print(f"\n{args.requests:,} requests after {args.warmup:,} of warm-up, one connection, "
          "one worker, under callgrind\n")
    compared = "before" in servers
    print("| load | depth | " + " | ".join(servers) + " | verve / baseline |"
          + (" verve / before |" if compared else ""))
    print("|---|---|" + "---|" * (len(servers) + 1 + compared))
    for load in loads:
        for depth in depths:
            count = {s: results[(s, depth, load)][0] for s in servers}
            cells = [f"{count[s]:,.0f}" for s in servers]
            ratio = ""
            if "baseline" in count and "verve" in count:
                ratio = f"{count['verve'] / count['baseline']:.2f}"
            if compared:
                ratio += f" | {count['verve'] / count['before']:.3f}"
            print(f"| {load} | {depth} | " + " | ".join(cells) + f" | {ratio} |")
    for (server, depth, load), (_, dump) in results.items():
        rows = own_costs(dump)
        print(f"\n{server}, depth {depth}, {load}: instructions per request by source (own cost)")
        for label, instructions in by_source(rows)[:args.top]:
            print(f"  {instructions / args.requests:>9,.0f}  {label}")
        print(f"{server}, depth {depth}, {load}: by function")
        for instructions, name in rows[:args.top]:
            print(f"  {instructions / args.requests:>9,.0f}  {name[:120]}")


if __name__ == "__main__":
    sys.exit(main())
