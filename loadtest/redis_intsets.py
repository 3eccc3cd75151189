#!/usr/bin/env python3
"""What one window's ids cost redis-server, by how they are spread over sets (issue 26).

    loadtest/redis_intsets.py [--ids 2000000] [--sizes 0,256,512,2048,4096]
                              [--rounds 1024,16384,131072] [--small]

For each set size S (0: one set for the whole window, today's layout with
VERVE_REDIS_SHARDS=1) and each round size R: a fresh redis-server on a free
loopback port, with `set-max-intset-entries` high enough for sets of about S
ids to stay intsets; --ids distinct random ids (63-bit, or below 2^32 with
--small) spread over ceil(ids / S) sets by a hash of the id, sent in rounds of R
ids, each round one pipelined `SADD` per set it touches (what a round of
verve's would be); then one `EXPIRE` per set, as verve gives every key a TTL.
Reports redis-server's CPU (user + system, from /proc) per id and its
`used_memory` growth per id. The commands are written in RESP beforehand and
fed through `redis-cli --pipe`, so the client's cost stays out of redis-server's
figures.
"""

import argparse
import hashlib
import math
import os
import random
import socket
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def cli(port, *args):
    return subprocess.run(
        ["redis-cli", "-p", str(port), *map(str, args)],
        check=True, capture_output=True, text=True,
    ).stdout


def info(port, field):
    for line in cli(port, "INFO", "memory").splitlines():
        if line.startswith(field + ":"):
            return int(line.split(":")[1])
    raise RuntimeError(field)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# One call per round: the ids grouped by set, each group one SADD from Lua,
# and an EXPIRE for the sets the SADD created (what verve's round.lua does).
ROUND_LUA = b"""
local at = 2 + 2 * tonumber(ARGV[1])
for g = 0, tonumber(ARGV[1]) - 1 do
  local key = KEYS[1] .. ARGV[2 + 2 * g]
  local last = at + tonumber(ARGV[3 + 2 * g]) - 1
  local added = 0
  for first = at, last, 4000 do
    added = added + redis.call('SADD', key, unpack(ARGV, first, math.min(first + 3999, last)))
  end
  if added == redis.call('SCARD', key) then redis.call('EXPIRE', key, 300) end
  at = last + 1
end
return 0"""


def commands(ids, size, round_ids, lua):
    """The RESP of every round's SADDs, then the EXPIREs; or with `lua`, of
    every round's one call of ROUND_LUA."""
    sets = 1 if size == 0 else math.ceil(len(ids) / size)
    key = lambda s: b"v:{%d}:600" % s
    chunks = []
    sha = hashlib.sha1(ROUND_LUA).hexdigest().encode()
    if lua:
        chunks.append(resp(b"SCRIPT", b"LOAD", ROUND_LUA))
    for start in range(0, len(ids), round_ids):
        by_set = {}
        for id_ in ids[start:start + round_ids]:
            by_set.setdefault(hash(id_) % sets, []).append(id_)
        if lua:
            head = [len(by_set)]
            for s, members in by_set.items():
                head += [b"}:600/%d" % s, len(members)]
            body = [m for members in by_set.values() for m in members]
            chunks.append(resp(b"EVALSHA", sha, 1, b"v:{w", *head, *body))
            continue
        for s, members in by_set.items():
            chunks.append(resp(b"SADD", key(s), *members))
    if not lua:
        for s in range(sets):
            chunks.append(resp(b"EXPIRE", key(s), 300))
    return b"".join(chunks), sets


def measure(ids, size, round_ids, lua):
    payload, sets = commands(ids, size, round_ids, lua)
    port = free_port()
    per_set = len(ids) / sets
    # Room for the largest set: a hash spreads ids about evenly (binomial).
    entries = max(512, int(per_set + 8 * math.sqrt(per_set) + 64)) if size else 512
    with tempfile.TemporaryDirectory() as d:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", d,
             "--set-max-intset-entries", str(entries)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 10
            while True:
                try:
                    cli(port, "PING")
                    break
                except subprocess.CalledProcessError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
            memory = info(port, "used_memory")
            cpu = cpu_seconds(server.pid)
            subprocess.run(["redis-cli", "-p", str(port), "--pipe"], input=payload,
                           check=True, capture_output=True)
            cpu = cpu_seconds(server.pid) - cpu
            memory = info(port, "used_memory") - memory
            intsets = 0
            if size:
                sample = random.Random(1).sample(range(sets), min(sets, 20))
                name = (lambda s: f"v:{{w}}:600/{s}") if lua else (lambda s: f"v:{{{s}}}:600")
                intsets = sum(cli(port, "OBJECT", "ENCODING", name(s)).strip() == "intset"
                              for s in sample) / len(sample)
        finally:
            server.kill()
            server.wait()
    return sets, cpu * 1e6 / len(ids), memory / len(ids), intsets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=2_000_000)
    parser.add_argument("--sizes", default="0,256,512,2048,4096")
    parser.add_argument("--rounds", default="1024,16384,131072")
    parser.add_argument("--small", action="store_true", help="ids below 2^32")
    parser.add_argument("--lua", action="store_true",
                        help="each round one script call, as verve's round.lua (not a SADD per set)")
    args = parser.parse_args()
    top = 2**32 if args.small else 2**63
    ids = random.Random(7).sample(range(1, top), args.ids)
    print(f"{args.ids} ids below 2^{int(math.log2(top))}")
    print(f"{'set size':>9} {'round':>7} {'sets':>7} {'cpu us/id':>10} {'bytes/id':>9} {'intset':>7}")
    for size in map(int, args.sizes.split(",")):
        for round_ids in map(int, args.rounds.split(",")):
            sets, cpu, memory, intsets = measure(ids, size, round_ids, args.lua)
            label = "one" if size == 0 else str(size)
            print(f"{label:>9} {round_ids:>7} {sets:>7} {cpu:>10.3f} {memory:>9.1f} {intsets:>7.0%}",
                  flush=True)


if __name__ == "__main__":
    main()
