"""What the load-test scripts need of the processes they start: a free loopback
port, the environment of a verve under test, waiting until one listens, and a
process's CPU time from /proc."""

import os
import socket
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def verve_env(port, count_log, data_dir, **settings):
    """The environment of one verve under test: listening on loopback `port`, one
    worker, no operations port, warnings only, its count log and data directory
    where given; `settings` add or override variables."""
    env = dict(os.environ, VERVE_ADDR=f"127.0.0.1:{port}", VERVE_ADMIN_ADDR="",
               VERVE_WORKERS="1", RUST_LOG="warn", VERVE_COUNT_LOG=str(count_log),
               VERVE_DATA_DIR=str(data_dir))
    env.update(settings)
    return env


def wait_for_port(port, name="a server", limit=10, proc=None):
    """Returns once something accepts on `port`; exits the script with a line
    saying what did not start if `limit` seconds pass, or if `proc` exits first."""
    deadline = time.time() + limit
    while True:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}) before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"{name} did not start listening on {port} within {limit} s")
            time.sleep(0.05)


def cpu_seconds(pid):
    """User and system time of a process so far, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS
