#!/usr/bin/env python3
"""Load-test verve against the bare baseline, in one run, on this machine.

    loadtest/run.py [--rate 20000] [--duration 15] [--connections 64] [--redis]
                    [--compare GIT_REF]
    loadtest/run.py --fleet [--cluster] [--instances 2] [--window-secs 20] [--duration 15]

Builds release, then for each server (the baseline, verve, and with --redis verve
in Redis mode) starts it with one worker pinned to --server-cpu and drives it from
--load-cpu:

  1. at a fixed rate (wrk2 when on PATH, else `oha -q RATE --latency-correction`,
     both of which correct for coordinated omission);
  2. at maximum throughput with wrk, without pipelining and 16 deep.

wrk's Lua script limits the 16-deep phase to about a tenth of the server's
capacity, so its ratio is that of two servers mostly waiting: for the pipelined
path at full load, and a figure that can see a change of 5 %, use
loadtest/pipelined.py.

It records the achieved rate, p50/p99/p99.9 latency, server CPU seconds per request
(/proc/<pid>/stat, all threads: the aggregator and, in Redis mode, redis-server
too), and peak RSS; checks that verve's count log holds exactly the number of
distinct ids wrk sent; prints every figure beside the baseline's with the ratio;
and writes loadtest/results/results.md and loadtest/results/latency.png.

--compare GIT_REF also builds verve as it was at GIT_REF and measures it in the same
run, right before the current verve, so that a change is judged against the code
it changes under the same conditions (the table gains a verve / verve@REF column;
with --redis, Redis mode is compared the same way).

In Redis mode the report also gives the commands redis-server ran (INFO
commandstats), per 1,000 requests.

--fleet measures the fleet scripts/fleet.sh starts instead (redis-server, tansu,
--instances verve instances of one worker each, haproxy in front), driving the
script itself so that what is measured is what people run. Once a window starts
it sends random ids through the balancer with wrk for --duration seconds (within
that one window), waits for the fleet to publish the window, and reports
requests/s, verve's CPU per request over all instances, haproxy's, redis-server's
CPU per new id (SCARD of the window's sets), Redis commands per 1,000 requests, and
whether the window's count in Redis, in every count log and on the topic equals
the distinct ids wrk sent. Nothing is pinned: every process shares the machine,
so on a small VM this is a functional measurement, not a scaling one. It writes
loadtest/results/fleet.md.

--fleet --cluster runs the fleet on a Redis Cluster of three masters instead
(scripts/fleet.sh --cluster): the same figures, Redis's summed over the masters,
and per master the window's sets it holds (`verve:{W/k}`, read with SCAN and SCARD
on that master, which owns them), its share of the window's ids, its CPU seconds
and its commands. It writes loadtest/results/fleet-cluster.md.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from procs import cpu_seconds, free_port, verve_env, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "loadtest" / "accept.lua"


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def ensure_tools(need_oha):
    """Installs what the runner needs and is missing: wrk, oha, matplotlib."""
    if not shutil.which("wrk"):
        prefix = [] if os.geteuid() == 0 else ["sudo"]
        sh(prefix + ["apt-get", "update", "-qq"])
        sh(prefix + ["apt-get", "install", "-y", "-qq", "wrk"])
    if need_oha and not shutil.which("oha"):
        sh(["cargo", "install", "oha", "--locked"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sh([sys.executable, "-m", "pip", "install", "-q", "matplotlib"])


def peak_rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """A server under test, pinned, with the processes whose CPU it is charged."""

    def __init__(self, name, binary, env, cpu, redis=False):
        self.name, self.binary, self.env, self.cpu, self.redis = name, binary, env, cpu, redis
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"verve-{name}-"))
        self.count_log = self.dir / "counts.log"

    def start(self):
        env = verve_env(self.port, self.count_log, self.dir / "data", VERVE_WINDOW_SECS="86400")
        self.redis_proc = None
        if self.redis:
            redis_port = free_port()
            self.redis_proc = subprocess.Popen(
                ["taskset", "-c", str(self.cpu), "redis-server", "--port", str(redis_port),
                 "--save", "", "--appendonly", "no",
                 # What docs/operations.md asks of a fleet's Redis.
                 "--set-max-intset-entries", "8192"], stdout=subprocess.DEVNULL)
            wait_for_port(redis_port, "redis-server")
            env["VERVE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            self.redis_port = redis_port
        env.update(self.env)
        self.proc = subprocess.Popen(["taskset", "-c", str(self.cpu), str(self.binary)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "w"))
        wait_for_port(self.port, self.name)

    def cpu_used(self):
        total = cpu_seconds(self.proc.pid)
        if self.redis_proc:
            total += cpu_seconds(self.redis_proc.pid)
        return total

    def stop(self):
        """SIGTERM; returns verve's peak RSS, its last count log line (the partial
        window) if any, and the calls per Redis command (empty without Redis)."""
        rss = peak_rss_mib(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        commands = {}
        if self.redis_proc:
            stats = sh(["redis-cli", "-p", str(self.redis_port), "INFO", "commandstats"],
                       capture_output=True).stdout
            commands = {name: int(calls) for name, calls in re.findall(r"cmdstat_([\w|]+):calls=(\d+)", stats)}
            for own in ("info", "command", "command|docs"):
                commands.pop(own, None)
            self.redis_proc.terminate()
            self.redis_proc.wait()
        lines = self.count_log.read_text().splitlines() if self.count_log.exists() else []
        return rss, (lines[-1] if lines else None), commands


def run_wrk(server, args, duration, pipeline, base, connections):
    """wrk for `duration` seconds; requests are sent during all but the last two, so
    that every id wrk counts as sent has reached the server when it stops."""
    url = f"http://127.0.0.1:{server.port}"
    sending = duration - 2
    cmd = ["taskset", "-c", str(args.load_cpu), "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
           "-s", str(SCRIPT), url, "--", str(args.ids), "0", str(pipeline), str(base), str(sending)]
    before = server.cpu_used()
    out = sh(cmd, capture_output=True).stdout
    used = server.cpu_used() - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = dict(re.findall(r"(p[\d.]+)=(\d+)", out))
    return {
        "rate": requests / sending,
        "p50": int(lat["p50"]), "p99": int(lat["p99"]), "p99.9": int(lat["p99.9"]),
        "cpu_us": used / requests * 1e6, "requests": requests,
        "failed": int(non2xx.group(1)) if non2xx else 0,
        "distinct": int(re.search(r"distinct_ids=(\d+)", out).group(1)),
    }


def run_fixed_rate(server, args):
    url = f"http://127.0.0.1:{server.port}"
    before = server.cpu_used()
    if shutil.which("wrk2"):
        out = sh(["taskset", "-c", str(args.load_cpu), "wrk2", "-t1", f"-c{args.connections}",
                  f"-d{args.duration}s", f"-R{args.rate}", "--latency", "-s", str(SCRIPT), url,
                  "--", str(args.ids), "0", "1", "900000000000"], capture_output=True).stdout
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        lat = {k: int(v) for k, v in re.findall(r"(p[\d.]+)=(\d+)", out)}
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    else:
        out = sh(["taskset", "-c", str(args.load_cpu), "oha", "--no-tui", "--output-format", "json", "-z", f"{args.duration}s",
                  "-c", str(args.connections), "-q", str(args.rate), "--latency-correction",
                  "--rand-regex-url", f"{url}/api/verve/accept\\?id=[1-9][0-9]{{0,5}}"],
                 capture_output=True).stdout
        import json
        result = json.loads(out)
        pct = result["latencyPercentiles"]
        lat = {"p50": pct["p50"] * 1e6, "p99": pct["p99"] * 1e6, "p99.9": pct["p99.9"] * 1e6}
        requests = sum(result["statusCodeDistribution"].values())
        rate = result["summary"]["requestsPerSec"]
    used = server.cpu_used() - before
    return {"rate": rate, "cpu_us": used / requests * 1e6, **lat}


def build_at(ref):
    """Builds verve as of git `ref` (once per commit) and returns the binary's path."""
    commit = sh(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT,
                capture_output=True).stdout.strip()
    out = ROOT / "target" / "compare" / f"verve-{commit}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tree:
        sh(["git", "worktree", "add", "--detach", tree, ref], cwd=ROOT)
        try:
            # The shared target directory keeps the dependencies' builds.
            sh(["cargo", "build", "--release", "--bin", "verve"], cwd=tree,
               env={**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target")})
            shutil.copy2(ROOT / "target" / "release" / "verve", out)
        finally:
            sh(["git", "worktree", "remove", "--force", tree], cwd=ROOT)
    return out


def measure(name, binary, env, args, redis=False):
    print(f"== {name}", flush=True)
    results = {}
    server = Server(name, binary, env, args.server_cpu, redis)
    server.start()
    run_wrk(server, args, 4, 1, 800000000000, args.connections)  # warm-up, ids of their own
    results["fixed"] = run_fixed_rate(server, args)
    server.stop()

    server = Server(name, binary, env, args.server_cpu, redis)
    server.start()
    sent = 0
    for label, pipeline, base in [("max", 1, 0), ("max16", 16, 100000000000)]:
        results[label] = run_wrk(server, args, args.duration, pipeline, base, args.connections)
        sent += results[label]["distinct"]
    rss, last_line, commands = server.stop()
    results["rss"] = rss
    if commands:
        requests = sum(results[k]["requests"] for k in ("max", "max16"))
        results["redis_commands"] = (commands, requests)
    if last_line is not None:
        counted = int(re.search(r"unique_requests=(\d+)", last_line).group(1))
        failed = sum(results[k]["failed"] for k in ("max", "max16"))
        results["exact"] = (counted, sent, failed)
    for phase in ("fixed", "max", "max16"):
        r = results[phase]
        print(f"   {phase:6} {r['rate']:>11,.0f} req/s  p50 {r['p50']:>7,.0f} µs  p99 {r['p99']:>7,.0f} µs  "
              f"p99.9 {r['p99.9']:>7,.0f} µs  {r['cpu_us']:.3f} µs CPU/req", flush=True)
    return results


def table(all_results, args):
    rows = [
        ("fixed", "rate", "req/s", "{:,.0f}"), ("fixed", "p50", "p50 µs", "{:,.0f}"),
        ("fixed", "p99", "p99 µs", "{:,.0f}"), ("fixed", "p99.9", "p99.9 µs", "{:,.0f}"),
        ("fixed", "cpu_us", "µs CPU/req", "{:.3f}"),
        ("max", "rate", "req/s", "{:,.0f}"), ("max", "p99", "p99 µs", "{:,.0f}"),
        ("max", "cpu_us", "µs CPU/req", "{:.3f}"),
        ("max16", "rate", "req/s", "{:,.0f}"), ("max16", "cpu_us", "µs CPU/req", "{:.3f}"),
    ]
    phase_names = {"fixed": f"fixed {args.rate:,} req/s", "max": "max, no pipelining", "max16": "max, 16 deep"}
    names = list(all_results)
    # (numerator, denominator) of each ratio column.
    pairs = [(n, "baseline") for n in names[1:]]
    pairs += [("verve", n) for n in names if n.startswith("verve@")]
    pairs += [("verve-redis", n) for n in names if n.startswith("verve-redis@")]
    head = "| phase | figure | " + " | ".join(names) + " | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |"
    lines = [head, "|" + "---|" * (2 + len(names) + len(pairs))]
    for phase, key, label, fmt in rows:
        cells = [fmt.format(all_results[n][phase][key]) for n in names]
        ratios = [f"{all_results[a][phase][key] / all_results[b][phase][key]:.2f}" for a, b in pairs]
        lines.append(f"| {phase_names[phase]} | {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    rss = " | ".join(f"{all_results[n]['rss']:.1f}" for n in names)
    lines.append(f"| all | peak RSS MiB | {rss} | " + " | ".join("" for _ in pairs) + " |")
    return "\n".join(lines)


def plot(all_results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase, title in [(axes[0], "fixed", f"fixed rate {args.rate:,} req/s"),
                             (axes[1], "max", "maximum rate, no pipelining")]:
        for name, results in all_results.items():
            r = results[phase]
            ax.plot(["p50", "p99", "p99.9"], [r["p50"], r["p99"], r["p99.9"]], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_ylabel("latency (µs)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"verve vs baseline, one worker on CPU {args.server_cpu}, load on CPU {args.load_cpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- --fleet: the fleet of scripts/fleet.sh, through its balancer ---

def read_fleet_env(path):
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def start_fleet(args, run_dir):
    """Starts scripts/fleet.sh and waits for its fleet.env; returns (process, env)."""
    cmd = [str(ROOT / "scripts" / "fleet.sh"), str(args.instances), "--port", str(free_port()),
           "--window-secs", str(args.window_secs), "--run-dir", str(run_dir)]
    if args.cluster:
        cmd.append("--cluster")
    out = open(run_dir / "fleet.out", "w")
    fleet = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    env_file = run_dir / "fleet.env"
    # Generous: the script may first build the release binary or install tansu.
    deadline = time.time() + 900
    while not env_file.exists():
        if fleet.poll() is not None or time.time() > deadline:
            # SIGTERM, not SIGKILL: the script's trap stops what it started.
            fleet.terminate()
            fleet.wait(timeout=60)
            raise SystemExit(f"scripts/fleet.sh did not come up:\n{(run_dir / 'fleet.out').read_text()}")
        time.sleep(0.2)
    return fleet, read_fleet_env(env_file)


def stop_fleet(fleet, env):
    """SIGTERM to the script, which stops its parts in order; then checks none is left."""
    fleet.send_signal(signal.SIGTERM)
    fleet.wait(timeout=60)
    pids = [env.get("TANSU_PID"), env.get("HAPROXY_PID")]
    pids += env.get("REDIS_PIDS", "").split(",") + env.get("VERVE_PIDS", "").split(",")
    return [pid for pid in pids if pid and running(pid)]


def running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def log_records(path, window):
    """The count log's records (text format) of `window`, as dicts of their fields."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        if fields.get("window_start") == window:
            records.append(fields)
    return records


def topic_records(env, window):
    """The topic's records of `window` (values as dicts), read with tansu's consumer."""
    if not env.get("KAFKA_BROKERS"):
        return None
    out = sh(["tansu", "cat", "consume", "--broker", f"tcp://{env['KAFKA_BROKERS']}",
              "--max-wait-time-ms", "500", env["KAFKA_TOPIC"]], capture_output=True).stdout
    records = []
    for line in out.splitlines():
        for record in json.loads(line):  # one JSON array per fetched batch
            value = record["value"]
            if isinstance(value, str):
                value = json.loads(value)
            # tansu cat prints keys as JSON, and the key (the window start, bare)
            # is not JSON, so it shows null; the value names the window too.
            if value.get("window_start") == window:
                records.append(value)
    return records


def admin_metric(port, series):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(int(float(v)) for v in re.findall(rf"^{re.escape(series)} (\S+)$", text, re.M))


def redis_cli(port, *args):
    return sh(["redis-cli", "-p", port, *args], capture_output=True).stdout


def commandstats(port):
    """Calls per command on one Redis node since its last CONFIG RESETSTAT, less
    this script's own."""
    stats = redis_cli(port, "INFO", "commandstats")
    commands = {name: int(calls) for name, calls in re.findall(r"cmdstat_([\w|]+):calls=(\d+)", stats)}
    for own in ("info", "config|resetstat"):
        commands.pop(own, None)
    return commands


def window_sets(port, window):
    """The sizes of `window`'s id sets one Redis node holds: `verve:{W}`, or the
    shards `verve:{W/k}` (VERVE_REDIS_SHARDS > 1), each maybe split into sets
    `…:<sets>/<set>`. SCAN sees only the node's own keys, so in a cluster each
    set is read on the master that owns its slot. (Sets a refused round wrote,
    of another count than the window's, are counted too: a handful at most.)"""
    keys = set()
    for pattern in (f"verve:{{{window}}}", f"verve:{{{window}/*}}", f"verve:{{{window}}}:*/*",
                    f"verve:{{{window}/*}}:*/*"):
        keys.update(redis_cli(port, "--scan", "--pattern", pattern).split())
    return {key: int(redis_cli(port, "SCARD", key)) for key in sorted(keys)}


def measure_fleet(args):
    if args.duration + 2 > args.window_secs:
        raise SystemExit("--duration must leave at least 2 s of the window (--window-secs) free")
    run_dir = ROOT / "target" / "fleet" / time.strftime("loadtest-%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir.mkdir(parents=True)
    fleet, env = start_fleet(args, run_dir)
    try:
        result = drive_fleet(args, env)
    finally:
        left = stop_fleet(fleet, env)
    result["left"] = left
    result["run_dir"] = run_dir
    return result


def drive_fleet(args, env):
    w = args.window_secs
    verve_pids = env["VERVE_PIDS"].split(",")
    admin_ports = env["VERVE_ADMIN_PORTS"].split(",")
    # The load starts just after a window begins, so that it lies in that window
    # alone (an id sent in two windows counts in each) and the fleet, up before the
    # window, publishes it whole: partial=false, in steady state.
    start = (time.time() // w + 1) * w
    time.sleep(start - time.time() + 0.3)
    window = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    # Anything else running on the machine shows up in every figure below.
    load = os.getloadavg()[0]
    # One redis-server, or the cluster's masters, in the order of fleet.sh.
    redis_ports = env["REDIS_PORTS"].split(",")
    redis_pids = env["REDIS_PIDS"].split(",")
    for port in redis_ports:
        redis_cli(port, "CONFIG", "RESETSTAT")
    accepted_before = [admin_metric(p, "verve_ids_accepted_total") for p in admin_ports]
    verve_before = sum(cpu_seconds(pid) for pid in verve_pids)
    haproxy_before = cpu_seconds(env["HAPROXY_PID"])
    redis_before = [cpu_seconds(pid) for pid in redis_pids]

    sending = args.duration - 2
    out = sh(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "-s", str(SCRIPT),
              env["FLEET_URL"], "--", str(args.ids), "0", "1", "0", str(sending)],
             capture_output=True).stdout
    verve_cpu = sum(cpu_seconds(pid) for pid in verve_pids) - verve_before
    haproxy_cpu = cpu_seconds(env["HAPROXY_PID"]) - haproxy_before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    lat = dict(re.findall(r"(p[\d.]+)=(\d+)", out))
    distinct = int(re.search(r"distinct_ids=(\d+)", out).group(1))
    accepted = [admin_metric(p, "verve_ids_accepted_total") - b for p, b in zip(admin_ports, accepted_before)]

    # Every instance logs the fleet's record once it is published: at the latest
    # the fleet wait (5 s) after the window's end.
    logs = env["VERVE_COUNT_LOGS"].split(",")
    deadline = start + w + 15
    while not all(log_records(log, window) for log in logs):
        if time.time() > deadline:
            break
        time.sleep(0.2)
    published = time.time()
    masters = []
    for port, pid, before in zip(redis_ports, redis_pids, redis_before):
        cpu = cpu_seconds(pid) - before
        # The commands before this script's own SCAN and SCARD.
        masters.append({"port": port, "cpu": cpu, "commands": commandstats(port)})
    for master in masters:
        master["sets"] = window_sets(master["port"], window)
    commands = {}
    for master in masters:
        for name, calls in master["commands"].items():
            commands[name] = commands.get(name, 0) + calls
    redis_cpu = sum(m["cpu"] for m in masters)
    scard = sum(sum(m["sets"].values()) for m in masters)
    return {
        "window": window, "requests": requests, "rate": requests / sending, "sending": sending,
        "p50": int(lat["p50"]), "p99": int(lat["p99"]), "failed": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(0) if errors else None, "distinct": distinct,
        "accepted": accepted, "verve_cpu": verve_cpu, "haproxy_cpu": haproxy_cpu,
        "redis_cpu": redis_cpu, "scard": scard, "commands": commands, "masters": masters,
        "cluster": env.get("REDIS_MODE") == "cluster",
        "logs": [log_records(log, window) for log in logs], "topic": topic_records(env, window),
        "published_after": published - (start + w), "load": load,
    }


def fleet_report(args, r):
    """The figures and the exactness verdict, as Markdown; and whether all was exact."""
    n = args.instances
    sent = r["distinct"]
    checks = []
    # Redis: the window's set, or its shards on every master.
    keys = [key for m in r["masters"] for key in m["sets"]]
    if keys == [f"verve:{{{r['window']}}}"]:
        where = f"`SCARD verve:{{{r['window']}}}`"
    else:
        where = f"`SCARD` of the window's {len(keys)} sets `verve:{{{r['window']}/k}}`"
        if r["cluster"]:
            where += f", summed over {len(r['masters'])} masters"
    checks.append((f"Redis {where}: {r['scard']:,}", r["scard"] == sent))
    # The count logs: every instance logs the fleet's records; the highest revision counts.
    for i, records in enumerate(r["logs"], 1):
        if not records:
            checks.append((f"verve-{i}'s count log: no record of the window", False))
            continue
        last = max(records, key=lambda f: int(f["revision"]))
        fine = (int(last["unique_requests"]) == sent and last["scope"] == "global"
                and last["complete"] == "true")
        checks.append((f"verve-{i}'s count log: {int(last['unique_requests']):,} (scope={last['scope']}, "
                       f"revision={last['revision']}, complete={last['complete']}, partial={last['partial']}, "
                       f"instances={last['instances']}; {len(records)} record(s))", fine))
    if r["topic"] is not None:
        if r["topic"]:
            last = max(r["topic"], key=lambda v: v["revision"])
            fine = last["unique_requests"] == sent and last["complete"] is True
            checks.append((f"topic: {last['unique_requests']:,} (revision {last['revision']}, "
                           f"complete={str(last['complete']).lower()}; {len(r['topic'])} record(s) of the window)",
                           fine))
        else:
            checks.append(("topic: no record of the window", False))
    exact = all(fine for _, fine in checks) and r["failed"] == 0
    total = sum(r["commands"].values())
    top = ", ".join(f"{c} {k / r['requests'] * 1000:.2f}" for c, k in
                    sorted(r["commands"].items(), key=lambda kv: -kv[1])[:8])
    split = ", ".join(f"verve-{i} {a:,}" for i, a in enumerate(r["accepted"], 1))
    masters = len(r["masters"])
    redis = f"a Redis Cluster of {masters} masters" if r["cluster"] else "redis-server"
    lines = [
        f"# Fleet load test{' on a Redis Cluster' if r['cluster'] else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"`loadtest/run.py --fleet{' --cluster' if r['cluster'] else ''} --instances {n} "
        f"--window-secs {args.window_secs} --duration {args.duration}"
        f" --connections {args.connections}`: scripts/fleet.sh with {n} instances of one worker each "
        f"(unpinned), {redis}, tansu and haproxy (round robin); wrk -t1 -c{args.connections} through "
        f"haproxy, random ids from {args.ids:,}, requests sent for {r['sending']} s within the window "
        f"starting {r['window']}.",
        "",
        f"{os.cpu_count()} CPUs ({os.uname().release}), load average {r['load']:.2f} just before the load, "
        "shared by every process of the fleet and wrk: a "
        "functional measurement of the fleet's path (balancer, instances, Redis, broker), not a scaling "
        "one. With more instances than free cores, more instances only divide the same CPU.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests/s through haproxy | {r['rate']:,.0f} |",
        f"| latency p50 / p99 (wrk, through haproxy) | {r['p50']:,} / {r['p99']:,} µs |",
        f"| requests | {r['requests']:,} (ids accepted: {split}) |",
        f"| non-2xx answers | {r['failed']} |",
        f"| verve CPU per request, all instances | {r['verve_cpu'] / r['requests'] * 1e6:.2f} µs |",
        f"| haproxy CPU per request | {r['haproxy_cpu'] / r['requests'] * 1e6:.2f} µs |",
        f"| redis-server CPU per new id{f', all {masters} masters' if r['cluster'] else ''} | "
        f"{r['redis_cpu'] / max(r['scard'], 1) * 1e6:.2f} µs "
        f"({r['redis_cpu']:.2f} s for {r['scard']:,} ids) |",
        f"| Redis commands per 1,000 requests | {total / r['requests'] * 1000:.2f} ({top}) |",
        f"| the window's record in every count log | {r['published_after']:.1f} s after the window's end "
        "(polled every 0.2 s) |",
        "",
    ]
    if r["cluster"]:
        lines += [
            "Per master: the window's sets it holds (SCAN and SCARD on the master itself), its share of "
            "the window's ids, its CPU and its commands.",
            "",
            "| master | sets | ids | share of ids | CPU | commands per 1,000 requests |",
            "|---|---|---|---|---|---|",
        ]
        for i, m in enumerate(r["masters"], 1):
            ids = sum(m["sets"].values())
            lines.append(f"| redis-{i} (port {m['port']}) | {len(m['sets'])} | {ids:,} | "
                         f"{ids / max(r['scard'], 1):.1%} | {m['cpu']:.2f} s | "
                         f"{sum(m['commands'].values()) / r['requests'] * 1000:.2f} |")
        lines.append("")
    lines += [
        f"Exactness: wrk sent {sent:,} distinct ids.",
        "",
    ]
    lines += [f"- {text}: {'exact' if fine else 'MISMATCH'}" for text, fine in checks]
    if r["socket_errors"]:
        lines.append(f"- wrk: {r['socket_errors']}")
    lines.append("")
    lines.append(f"Fleet stopped: {'nothing left running' if not r['left'] else 'STILL RUNNING: ' + ', '.join(r['left'])}"
                 f"; its logs are in {r['run_dir']}.")
    return "\n".join(lines) + "\n", exact and not r["left"]


def fleet_main(args):
    if not shutil.which("wrk"):
        ensure_tools(need_oha=False)
    if not args.skip_build:
        sh(["cargo", "build", "--release", "--bin", "verve"], cwd=ROOT)
    redis = ", a Redis Cluster of 3 masters" if args.cluster else ""
    print(f"== fleet of {args.instances} behind haproxy{redis} (scripts/fleet.sh)", flush=True)
    r = measure_fleet(args)
    report, fine = fleet_report(args, r)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / ("fleet-cluster.md" if args.cluster else "fleet.md")
    out.write_text(report)
    print("\n" + report)
    print(f"wrote {out}")
    if not fine:
        sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=20000)
    p.add_argument("--duration", type=int, default=15)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--ids", type=int, default=1000000, help="id range per wrk thread")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--redis", action="store_true", help="also measure verve in Redis mode")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--compare", metavar="GIT_REF", help="also measure verve as of this git ref")
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results")
    p.add_argument("--fleet", action="store_true",
                   help="measure the fleet of scripts/fleet.sh through its balancer instead")
    p.add_argument("--instances", type=int, default=2, help="with --fleet: verve instances")
    p.add_argument("--window-secs", type=int, default=20,
                   help="with --fleet: the window, which must hold --duration and 2 s more")
    p.add_argument("--cluster", action="store_true",
                   help="with --fleet: a Redis Cluster of three masters instead of one redis-server")
    args = p.parse_args()
    if args.cluster and not args.fleet:
        p.error("--cluster goes with --fleet")
    if args.fleet:
        fleet_main(args)
        return

    ensure_tools(need_oha=not shutil.which("wrk2"))
    earlier = build_at(args.compare) if args.compare else None
    if not args.skip_build:
        sh(["cargo", "build", "--release", "--bin", "verve", "--example", "baseline"], cwd=ROOT)
    release = ROOT / "target" / "release"
    all_results = {"baseline": measure("baseline", release / "examples" / "baseline", {}, args)}
    if earlier:
        name = f"verve@{args.compare}"
        all_results[name] = measure(name, earlier, {}, args)
    all_results["verve"] = measure("verve", release / "verve", {}, args)
    if args.redis and earlier:
        name = f"verve-redis@{args.compare}"
        all_results[name] = measure(name, earlier, {}, args, redis=True)
    if args.redis:
        all_results["verve-redis"] = measure("verve-redis", release / "verve", {}, args, redis=True)

    args.out.mkdir(parents=True, exist_ok=True)
    md = table(all_results, args)
    tool = "wrk2" if shutil.which("wrk2") else "oha --latency-correction"
    checks = []
    for name, results in all_results.items():
        if "exact" in results:
            counted, sent, failed = results["exact"]
            verdict = "exact" if counted == sent and failed == 0 else "MISMATCH"
            checks.append(f"- {name}: count log {counted:,} distinct ids, wrk sent {sent:,} "
                          f"(non-2xx answers: {failed}): {verdict}")
    redis_lines = []
    for name, results in all_results.items():
        if "redis_commands" in results:
            commands, requests = results["redis_commands"]
            total = sum(commands.values())
            top = ", ".join(f"{c} {n / requests * 1000:.2f}" for c, n in
                            sorted(commands.items(), key=lambda kv: -kv[1]))
            redis_lines.append(f"- {name}: {total / requests * 1000:.2f} commands per 1,000 requests "
                               f"({total:,} for {requests:,} requests; {top})")
    report = (f"# Load test, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
              f"{os.cpu_count()} CPUs ({os.uname().release}); servers: one worker pinned to CPU {args.server_cpu}; "
              f"load generator on CPU {args.load_cpu}; {args.connections} connections; fixed rate with {tool}, "
              f"maximum rate with wrk, {args.duration} s per phase.\n\n{md}\n\nCounts:\n" + "\n".join(checks) + "\n")
    if redis_lines:
        report += "\nRedis commands (maximum-rate phases, INFO commandstats):\n" + "\n".join(redis_lines) + "\n"
    (args.out / "results.md").write_text(report)
    plot(all_results, args, args.out / "latency.png")
    print("\n" + report)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'latency.png'}")
    if any("MISMATCH" in c for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
