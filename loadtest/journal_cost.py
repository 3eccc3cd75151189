#!/usr/bin/env python3
"""What the journal costs: verve with VERVE_JOURNAL=false against true, in one run.

    loadtest/journal_cost.py [--rounds 3] [--duration 20] [--pipeline 1,16]
                             [--server-cpus 1] [--load-cpus 0] [--verve PATH]
                             [--fsync second] [--recovery-ids 10000000]

For each pipeline depth it runs verve (one worker, pinned to --server-cpus) with the
journal off and on, alternating which goes first from round to round, and drives
each with wrk (pinned to --load-cpus) for --duration seconds with ids that are all
new (loadtest/accept.lua with ids=0) into one window: the journal's worst case,
every id written. It reports requests/s, CPU per request (/proc/<pid>/stat, all
threads), the CPU per request of the threads the journal runs on (the aggregator
and verve-journal-sync, from /proc/<pid>/task: what the journal changes, without
the kernel's network work that dominates the whole and swings with anything else
running), the median over rounds and the ratio on/off, the journal's bytes per id
(verve_journal_bytes_written_total / verve_journal_ids_written_total), and checks
that each window's count equals the ids answered `ok`.

Then it measures recovery: a journal of --recovery-ids ids (entries of 512, the
file a run would leave) is written for the current window, and verve is started on
it; the time from spawn to `verve listening` (the windows are read back before the
workers listen), less the same start on an empty directory, is the recovery time.

Without --verve it builds verve in release first. Writes
loadtest/results/journal.md.
"""

import argparse
import array
import os
import re
import signal
import statistics
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

from cores import metric, pinned
from procs import TICKS, cpu_seconds, free_port, verve_env, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "loadtest" / "accept.lua"
WINDOW_SECS = 86400


def start(args, binary, run_dir, journal, port, admin, log="warn"):
    env = verve_env(port, run_dir / "counts.log", run_dir / "data",
                    VERVE_ADMIN_ADDR=f"127.0.0.1:{admin}", VERVE_WINDOW_SECS=str(WINDOW_SECS),
                    VERVE_JOURNAL=journal, VERVE_JOURNAL_FSYNC=args.fsync, RUST_LOG=log)
    return subprocess.Popen(pinned(args.server_cpus, [str(binary)]), env=env, cwd=run_dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def journal_threads_cpu(pid):
    """CPU seconds of the aggregator and the journal's fsync thread so far."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name in ("verve-aggregat", "verve-journal-s"):  # comm is cut at 15 bytes
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def load(args, binary, journal, pipeline):
    port, admin = free_port(), free_port()
    run_dir = Path(tempfile.mkdtemp(prefix=f"verve-journal-{journal}-"))
    proc = start(args, binary, run_dir, journal, port, admin)
    try:
        wait_for_port(port, "verve", proc=proc)
        sending = args.duration - 2
        cmd = pinned(args.load_cpus, [
            "wrk", "-t2", "-c64", f"-d{args.duration}s", "-s", str(SCRIPT),
            f"http://127.0.0.1:{port}", "--", "0", "0", str(pipeline), "0", str(sending)])
        before, threads_before = cpu_seconds(proc.pid), journal_threads_cpu(proc.pid)
        out = subprocess.run(cmd, check=True, text=True, capture_output=True).stdout
        used = cpu_seconds(proc.pid) - before
        threads_used = journal_threads_cpu(proc.pid) - threads_before
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        failed = int(non2xx.group(1)) if non2xx else 0
        sent = int(re.search(r"distinct_ids=(\d+)", out).group(1))
        written = metric(admin, "verve_journal_bytes_written_total") or 0
        ids = metric(admin, "verve_journal_ids_written_total") or 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    lines = (run_dir / "counts.log").read_text().splitlines()
    counted = sum(int(re.search(r"unique_requests=(\d+)", line).group(1)) for line in lines)
    return {"rate": requests / sending, "cpu_ns": used / requests * 1e9,
            "aggregator_ns": threads_used / requests * 1e9, "ok": sent - failed,
            "counted": counted, "bytes_per_id": written / ids if ids else 0.0}


def journal_file(path, window, ids):
    """A journal of `ids` distinct ids for `window`, in entries of 512."""
    header = b"VERVEJNL" + struct.pack("<IQQI", 1, window, WINDOW_SECS, 1)
    with open(path, "wb") as out:
        out.write(header + struct.pack("<I", zlib.crc32(header)))
        for first in range(0, ids, 512):
            # An odd multiplier is a bijection of 64-bit integers: distinct, spread ids.
            batch = [((i * 0x9E3779B97F4A7C15) % 2**64) - 2**63 for i in range(first, min(first + 512, ids))]
            body = b"\x01" + array.array("q", batch).tobytes()
            out.write(struct.pack("<II", len(body), zlib.crc32(body)) + body)


def time_to_listen(args, binary, run_dir):
    port, admin = free_port(), free_port()
    started = time.monotonic()
    proc = start(args, binary, run_dir, "true", port, admin, log="info")
    for line in proc.stderr:
        if "verve listening" in line:
            took = time.monotonic() - started
            break
    else:
        raise SystemExit(f"verve exited before listening ({proc.wait()})")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    return took


def recovery(args, binary):
    window = int(time.time()) // WINDOW_SECS * WINDOW_SECS
    empty = Path(tempfile.mkdtemp(prefix="verve-recovery-empty-"))
    full = Path(tempfile.mkdtemp(prefix="verve-recovery-full-"))
    (full / "data").mkdir()
    journal_file(full / "data" / f"window-{window}.journal", window, args.recovery_ids)
    size = (full / "data" / f"window-{window}.journal").stat().st_size
    bare = min(time_to_listen(args, binary, empty) for _ in range(3))
    loaded = time_to_listen(args, binary, full)
    counted = (full / "counts.log").read_text().splitlines()[-1]
    exact = f"unique_requests={args.recovery_ids} " in counted
    return loaded - bare, size, exact


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--pipeline", default="1,16")
    parser.add_argument("--server-cpus", default="1")
    parser.add_argument("--load-cpus", default="0")
    parser.add_argument("--fsync", default="second", choices=["batch", "second", "never"])
    parser.add_argument("--recovery-ids", type=int, default=10_000_000)
    parser.add_argument("--verve", type=Path)
    args = parser.parse_args()
    if args.verve:
        binary = args.verve.resolve()
    else:
        subprocess.run(["cargo", "build", "--release", "--bin", "verve"], cwd=ROOT, check=True)
        binary = ROOT / "target" / "release" / "verve"

    rows = []
    for pipeline in [int(p) for p in args.pipeline.split(",")]:
        runs = {"false": [], "true": []}
        for round_no in range(args.rounds):
            order = ["false", "true"] if round_no % 2 == 0 else ["true", "false"]
            for journal in order:
                result = load(args, binary, journal, pipeline)
                assert result["counted"] == result["ok"], f"count {result['counted']} of {result['ok']} ok"
                runs[journal].append(result)
                print(f"depth {pipeline} journal={journal}: {result['rate']:,.0f} req/s, "
                      f"{result['cpu_ns']:,.0f} ns CPU/req, aggregator {result['aggregator_ns']:,.0f} ns/req, "
                      f"{result['bytes_per_id']:.2f} B/id", flush=True)
        off = statistics.median(r["cpu_ns"] for r in runs["false"])
        on = statistics.median(r["cpu_ns"] for r in runs["true"])
        rate_off = statistics.median(r["rate"] for r in runs["false"])
        rate_on = statistics.median(r["rate"] for r in runs["true"])
        per_id = statistics.median(r["bytes_per_id"] for r in runs["true"])
        agg_off = statistics.median(r["aggregator_ns"] for r in runs["false"])
        agg_on = statistics.median(r["aggregator_ns"] for r in runs["true"])
        spread = lambda rs: f"{min(r['cpu_ns'] for r in rs):,.0f}–{max(r['cpu_ns'] for r in rs):,.0f}"
        rows.append(f"| {pipeline} | {rate_off:,.0f} | {rate_on:,.0f} | {off:,.0f} ({spread(runs['false'])}) | "
                    f"{on:,.0f} ({spread(runs['true'])}) | {on / off:.3f} | {agg_off:,.0f} | {agg_on:,.0f} | "
                    f"{(agg_on - agg_off) / off:+.1%} | {per_id:.2f} |")
    took, size, exact = recovery(args, binary)
    head = ("| depth | req/s off | req/s on | ns CPU/req off (range) | ns CPU/req on (range) | on ÷ off | "
            "aggregator ns/req off | aggregator ns/req on | journal threads' extra ÷ all off | "
            "journal bytes per new id |")
    table = "\n".join([head, "|" + "---|" * 10] + rows)
    text = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, verve on CPU "
            f"{args.server_cpus}, wrk -t2 -c64 on CPU {args.load_cpus}, {args.duration} s per run, "
            f"{args.rounds} rounds, every id new, one window, VERVE_JOURNAL_FSYNC={args.fsync}\n\n{table}\n\n"
            f"Recovery of {args.recovery_ids:,} ids ({size / 1e6:.1f} MB of journal): {took:.2f} s "
            f"(start-up to `verve listening`, less an empty start); count exact: {'yes' if exact else 'NO'}\n")
    out = ROOT / "loadtest" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "journal.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
