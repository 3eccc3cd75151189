#!/usr/bin/env python3
"""Redis commands and redis-server CPU per instance and window, for comparing builds.

    loadtest/redis_commands.py BINARY [BINARY ...] [--ids 200] [--windows 10]

For each binary in turn: a fresh redis-server on a free loopback port, one verve
instance of that binary on it (one worker, 2 s windows, a 1.5 s fleet wait, so a
heartbeat every 375 ms), --ids new ids sent per window over one keep-alive
connection, for --windows windows. From a window boundary on, after `CONFIG
RESETSTAT`: `INFO commandstats` (every command, those scripts call included)
and `INFO cpu` (redis-server's user + system CPU, its own housekeeping included),
per window. Waits for conditions with deadlines: the instance answering `ok`,
then each boundary by the clock.
"""

import argparse
import http.client
import os
import re
import socket
import subprocess
import tempfile
import time

WINDOW_SECS = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what, check, limit=15.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"waited {limit} s for {what}")


def to_boundary():
    time.sleep(WINDOW_SECS - time.time() % WINDOW_SECS + 0.05)


def measure(binary, ids, windows):
    work = tempfile.mkdtemp()
    port, http_port, admin = free_port(), free_port(), free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cli(*args):
        return subprocess.run(["redis-cli", "-p", str(port), *args],
                              capture_output=True, text=True).stdout

    def cpu():
        info = cli("INFO", "cpu")
        return sum(float(re.search(k + r":([\d.]+)", info).group(1))
                   for k in ("used_cpu_user", "used_cpu_sys"))

    verve = None
    try:
        until("redis-server", lambda: cli("PING").strip() == "PONG")
        env = dict(PATH=os.environ["PATH"], RUST_LOG="warn", VERVE_WORKERS="1",
                   VERVE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
                   VERVE_WINDOW_SECS=str(WINDOW_SECS), VERVE_FLEET_WAIT_MS="1500",
                   VERVE_REDIS_TIMEOUT_MS="300", VERVE_ADDR=f"127.0.0.1:{http_port}",
                   VERVE_ADMIN_ADDR=f"127.0.0.1:{admin}",
                   VERVE_COUNT_LOG=os.path.join(work, "counts.log"),
                   VERVE_DATA_DIR=os.path.join(work, "data"))
        verve = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        conn = None

        def accepted():
            nonlocal conn
            try:
                conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
                conn.request("GET", "/api/verve/accept?id=-1")
                response = conn.getresponse()
                response.read()
                return response.status == 200
            except OSError:
                return False

        until("the instance answering ok", accepted)
        to_boundary()
        cli("CONFIG", "RESETSTAT")
        cpu_before = cpu()
        next_id = 0
        for _ in range(windows):
            for _ in range(ids):
                conn.request("GET", f"/api/verve/accept?id={next_id}")
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
                next_id += 1
            to_boundary()
        stats = cli("INFO", "commandstats")
        cpu_ms = (cpu() - cpu_before) * 1000
    finally:
        if verve:
            verve.terminate()
            verve.wait()
        redis.terminate()
        redis.wait()
    calls = {m.group(1): int(m.group(2))
             for m in re.finditer(r"cmdstat_(\S+):calls=(\d+)", stats)}
    for ours in ("config|resetstat", "info"):
        calls.pop(ours, None)
    print(f"{binary}: {sum(calls.values()) / windows:.1f} commands and "
          f"{cpu_ms / windows:.2f} ms of redis-server CPU per window")
    print("  " + " ".join(f"{name}={n / windows:.1f}"
                          for name, n in sorted(calls.items(), key=lambda kv: -kv[1])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--ids", type=int, default=200)
    parser.add_argument("--windows", type=int, default=10)
    args = parser.parse_args()
    for binary in args.binaries:
        measure(binary, args.ids, args.windows)


if __name__ == "__main__":
    main()
