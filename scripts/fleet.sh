#!/usr/bin/env bash
# A local fleet in one command: redis-server (or a Redis Cluster of three masters),
# tansu (a Kafka-protocol broker), N verve release instances sharing them, and
# haproxy in front, all on loopback.
#
#   scripts/fleet.sh [instances] [--window-secs N] [--port P] [--workers W]
#                    [--cluster] [--no-kafka] [--run-dir DIR]
#
# instances      verve processes (default 2), each with its own port, operations
#                port and count log
# --window-secs  window length (default 10, so that counts show up quickly)
# --port         the balancer's port (default 8080); every other port is a free one
# --workers      worker threads per instance (default 1)
# --cluster      a Redis Cluster of three masters (no replicas) instead of one
#                redis-server; the instances get VERVE_REDIS_MODE=cluster and the
#                three nodes as VERVE_REDIS_URL, and spread each window's ids over
#                VERVE_REDIS_SHARDS sets (48 unless set), so over the masters
# --no-kafka     no broker: the instances write their count logs only
# --run-dir      where the logs, haproxy.cfg and fleet.env go
#                (default target/fleet/<UTC date and time>)
#
# Prints where each part listens and how to send traffic and read the counts,
# then runs until Ctrl-C or SIGTERM and stops everything in order: the balancer,
# the instances (the last one to leave publishes the window in progress), the
# broker, Redis (every node). Once everything is up it writes <run dir>/fleet.env
# (ports and process ids), which loadtest/run.py --fleet reads. VERVE_* variables
# in the environment reach every instance (those the fleet sets itself excepted),
# e.g. VERVE_CALLBACK_DENY_PRIVATE=false for a callback receiver on loopback.

# shellcheck disable=SC2317  # the stop functions run from traps, the checks from wait_until
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# The comment at the top, up to the first blank line.
usage() {
  local text
  text=$(awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0")
  if [ "${1:-2}" -eq 0 ]; then echo "$text"; else echo "$text" >&2; fi
  exit "${1:-2}"
}

instances=2
window_secs=10
balancer_port=8080
workers=1
kafka=1
cluster=0
run_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --window-secs) window_secs=${2:?--window-secs needs a value}; shift 2 ;;
    --port) balancer_port=${2:?--port needs a value}; shift 2 ;;
    --workers) workers=${2:?--workers needs a value}; shift 2 ;;
    --run-dir) run_dir=${2:?--run-dir needs a value}; shift 2 ;;
    --no-kafka) kafka=0; shift ;;
    --cluster) cluster=1; shift ;;
    -h|--help) usage 0 ;;
    [0-9]*) instances=$1; shift ;;
    *) echo "fleet.sh: unknown argument $1" >&2; usage ;;
  esac
done
for value in "$instances" "$window_secs" "$balancer_port" "$workers"; do
  [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "fleet.sh: '$value' is not a positive number" >&2; exit 2; }
done

# --- what the fleet needs, installed when missing (as scripts/test.sh does) ---
# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
install_packages redis-server=redis-server haproxy=haproxy curl=curl
if [ "$kafka" -eq 1 ]; then install_tansu; fi
binary=$PWD/target/release/verve
if [ ! -x "$binary" ]; then
  cargo build --release --bin verve
fi

# --- ports and the run directory ---
# A balancer port someone already listens on is refused here: haproxy and verve both
# bind with SO_REUSEPORT, so a second listener of the same user would silently
# share the port instead of failing.
if (exec 3<>"/dev/tcp/127.0.0.1/$balancer_port") 2>/dev/null; then
  echo "fleet.sh: something already listens on 127.0.0.1:$balancer_port; pick another with --port" >&2
  exit 1
fi
# Every other port is one the kernel hands out as free, all taken in one go so that
# none repeats: redis, kafka, haproxy's stats page, then a public and an operations
# port per instance; with --cluster, the two other nodes' ports and each node's
# cluster bus port (Redis's default bus port, its port + 10000, may be taken or
# past 65535 for a port the kernel picked).
extra_ports=0
if [ "$cluster" -eq 1 ]; then extra_ports=5; fi
mapfile -t ports < <(python3 - $((3 + 2 * instances + extra_ports)) <<'EOF'
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print("\n".join(str(s.getsockname()[1]) for s in held))
EOF
)
redis_port=${ports[0]}
kafka_port=${ports[1]}
stats_port=${ports[2]}
redis_ports=("$redis_port")
bus_ports=()
if [ "$cluster" -eq 1 ]; then
  next=$((3 + 2 * instances))
  redis_ports+=("${ports[$next]}" "${ports[$((next + 1))]}")
  bus_ports=("${ports[@]:$((next + 2)):3}")
fi
topic=${VERVE_KAFKA_TOPIC:-verve-unique-requests}

run_dir=${run_dir:-target/fleet/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)

# --- starting and stopping ---
# Every part runs in a session of its own (setsid), so that Ctrl-C in the terminal
# reaches this script only and the parts stop in order: the balancer first, then
# the instances while Redis and the broker are still there for their last window.
names=()
pids=()

alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $state != Z* ]]
}

# Sends SIGTERM to the given parts (indexes into names/pids) and waits for them, up
# to $1 seconds, then SIGKILLs what is left.
stop_parts() {
  local limit=$1 i deadline
  shift
  for i in "$@"; do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  deadline=$((SECONDS + limit))
  for i in "$@"; do
    while alive "${pids[$i]}" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    if alive "${pids[$i]}"; then
      echo "${names[$i]} did not stop within ${limit}s; killing it" >&2
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
    wait "${pids[$i]}" 2>/dev/null || true
  done
}

stopped=0
stop_all() {
  [ "$stopped" -eq 0 ] || return 0
  stopped=1
  # A second Ctrl-C must not cut the stop short and leave parts running.
  trap '' INT TERM
  local i balancer=() verve=() rest=()
  for i in "${!names[@]}"; do
    case "${names[$i]}" in
      haproxy) balancer+=("$i") ;;
      verve-*) verve+=("$i") ;;
      *) rest+=("$i") ;;
    esac
  done
  [ ${#names[@]} -gt 0 ] || return 0
  echo "stopping the fleet"
  [ ${#balancer[@]} -eq 0 ] || stop_parts 5 "${balancer[@]}"
  # verve's shutdown ends within VERVE_SHUTDOWN_DRAIN_MS (2 s) plus one second.
  [ ${#verve[@]} -eq 0 ] || stop_parts 10 "${verve[@]}"
  # The broker before Redis, in the reverse order of their start.
  for ((i = ${#rest[@]} - 1; i >= 0; i--)); do stop_parts 5 "${rest[$i]}"; done
  echo "stopped; logs in $run_dir"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

# start NAME LOG COMMAND...: runs COMMAND in its own session, output to LOG.
start() {
  local name=$1 log=$2
  shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  names+=("$name")
  pids+=("$!")
}

# wait_until WHAT SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_until() {
  local what=$1 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "fleet.sh: $what did not come up; see $run_dir" >&2
      exit 1
    fi
    local i
    for i in "${!pids[@]}"; do
      alive "${pids[$i]}" || { echo "fleet.sh: ${names[$i]} exited; see $run_dir/${names[$i]}.log" >&2; exit 1; }
    done
    sleep 0.1
  done
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
join() { local IFS=,; echo "$*"; }

# Redis: fresh and in memory only (no snapshot, no AOF), and noeviction, which
# the fleet protocol needs: an evicted window set would be counted short.
redis_args=(--bind 127.0.0.1 --save "" --appendonly no --maxmemory-policy noeviction --set-max-intset-entries 8192 --dir "$run_dir")
if [ "$cluster" -eq 0 ]; then
  redis_mode=single
  redis_url="redis://127.0.0.1:$redis_port/0"
  start redis "$run_dir/redis.log" redis-server --port "$redis_port" "${redis_args[@]}"
  wait_until "redis-server on port $redis_port" 10 redis-cli -p "$redis_port" ping
else
  # Three masters, each with the slots redis-cli gives it (a third each), no
  # replicas: a node that stops takes its slots down, as one redis-server would.
  redis_mode=cluster
  urls=()
  for n in 1 2 3; do
    port=${redis_ports[$((n - 1))]}
    urls+=("redis://127.0.0.1:$port")
    start "redis-$n" "$run_dir/redis-$n.log" redis-server --port "$port" "${redis_args[@]}" \
      --cluster-enabled yes --cluster-port "${bus_ports[$((n - 1))]}" \
      --cluster-config-file "$run_dir/nodes-$port.conf" --cluster-node-timeout 2000
  done
  redis_url=$(join "${urls[@]}")
  for port in "${redis_ports[@]}"; do
    wait_until "redis-server on port $port" 10 redis-cli -p "$port" ping
  done
  if ! redis-cli --cluster create "${redis_ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes \
    >"$run_dir/cluster-create.log" 2>&1; then
    echo "fleet.sh: redis-cli --cluster create failed; see $run_dir/cluster-create.log" >&2
    exit 1
  fi
  # Every node must see every slot served before an instance asks it for one.
  cluster_ok() { [[ $(redis-cli -p "$1" cluster info) == *cluster_state:ok* ]]; }
  for port in "${redis_ports[@]}"; do
    wait_until "the cluster on port $port (cluster_state:ok)" 20 cluster_ok "$port"
  done
fi

# tansu in memory, as tests/common/tansu.rs runs it, with the topic made up front
# (one partition, as the tests make it) so that the first record does not race
# its creation.
kafka_env=()
if [ "$kafka" -eq 1 ]; then
  start tansu "$run_dir/tansu.log" tansu broker \
    --listener-url "tcp://127.0.0.1:$kafka_port" --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
    --storage-engine memory://tansu/
  wait_until "tansu on port $kafka_port" 20 listening "$kafka_port"
  tansu topic create --broker "tcp://127.0.0.1:$kafka_port" --partitions 1 "$topic" >/dev/null
  kafka_env=("VERVE_SINKS=log,kafka" "VERVE_KAFKA_BROKERS=127.0.0.1:$kafka_port" "VERVE_KAFKA_TOPIC=$topic")
else
  kafka_env=(VERVE_SINKS=log)
fi

# The instances. Pinning is off: each instance would pin its worker i to the same
# CPU i, stacking every instance's first worker on one core.
verve_ports=()
admin_ports=()
count_logs=()
for ((i = 1; i <= instances; i++)); do
  port=${ports[$((1 + 2 * i))]}
  admin=${ports[$((2 + 2 * i))]}
  verve_ports+=("$port")
  admin_ports+=("$admin")
  count_logs+=("$run_dir/verve-$i.counts.log")
  start "verve-$i" "$run_dir/verve-$i.log" env \
    "VERVE_ADDR=127.0.0.1:$port" "VERVE_ADMIN_ADDR=127.0.0.1:$admin" \
    "VERVE_INSTANCE=verve-$i" "VERVE_WORKERS=$workers" VERVE_PIN_WORKERS=false \
    "VERVE_WINDOW_SECS=$window_secs" "VERVE_COUNT_LOG=$run_dir/verve-$i.counts.log" \
    "VERVE_DATA_DIR=$run_dir/verve-$i.data" \
    "VERVE_REDIS_MODE=$redis_mode" "VERVE_REDIS_URL=$redis_url" "${kafka_env[@]}" \
    "$binary"
done
for ((i = 1; i <= instances; i++)); do
  wait_until "verve-$i" 15 curl -fsS "http://127.0.0.1:${admin_ports[$((i - 1))]}/healthz"
done

# haproxy: round robin over the instances, keep-alive on both sides, and a health
# check on each operations port's /healthz (a request to the public port would
# count an id). Its stats page shows each instance's state and share.
servers=""
for ((i = 1; i <= instances; i++)); do
  servers+="    server verve-$i 127.0.0.1:${verve_ports[$((i - 1))]} check port ${admin_ports[$((i - 1))]}"$'\n'
done
cat >"$run_dir/haproxy.cfg" <<EOF
# Written by scripts/fleet.sh; deploy/haproxy.cfg is the same for compose.yaml.
global
    maxconn 4096
    # Fail on a port in use instead of sharing it through SO_REUSEPORT.
    noreuseport

defaults
    mode http
    option http-keep-alive
    # Connections to the instances serve any client's requests: verve keeps no
    # state per connection.
    http-reuse always
    timeout connect 2s
    timeout client 30s
    # Shorter than verve's VERVE_IDLE_TIMEOUT_MS (60 s), so that haproxy, not verve,
    # closes an idle connection and never sends a request on one being closed.
    timeout server 30s
    timeout http-keep-alive 30s
    # A request whose instance refuses the connection (stopped, not yet marked down
    # by the health check) goes to another one; haproxy retries only failed
    # connects, so no request reaches two instances.
    retries 2
    option redispatch 1

frontend front
    bind 127.0.0.1:$balancer_port
    default_backend verve

backend verve
    balance roundrobin
    option httpchk
    http-check send meth GET uri /healthz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
$servers
frontend stats
    bind 127.0.0.1:$stats_port
    stats enable
    stats uri /
    stats refresh 5s
EOF
haproxy -c -q -f "$run_dir/haproxy.cfg"
start haproxy "$run_dir/haproxy.log" haproxy -db -f "$run_dir/haproxy.cfg"
wait_until "haproxy on port $balancer_port" 10 listening "$balancer_port"
# Every instance UP in haproxy's eyes (its stats as CSV: field 18 is the status).
all_up() {
  [ "$(curl -fsS "http://127.0.0.1:$stats_port/;csv" | awk -F, '$1 == "verve" && $2 ~ /^verve-/ && $18 == "UP"' | wc -l)" -eq "$instances" ]
}
wait_until "the health checks of haproxy" 10 all_up

# --- ready: what runs where ---
verve_pids=()
redis_pids=()
for i in "${!names[@]}"; do
  case "${names[$i]}" in
    verve-*) verve_pids+=("${pids[$i]}") ;;
    redis | redis-*) redis_pids+=("${pids[$i]}") ;;
  esac
done
pid_of() {
  local i
  for i in "${!names[@]}"; do
    if [ "${names[$i]}" = "$1" ]; then echo "${pids[$i]}"; fi
  done
}
{
  echo "FLEET_RUN_DIR=$run_dir"
  echo "FLEET_URL=http://127.0.0.1:$balancer_port"
  echo "FLEET_WINDOW_SECS=$window_secs"
  echo "FLEET_INSTANCES=$instances"
  # REDIS_PORT and REDIS_PID name the one redis-server, so they are empty with
  # --cluster: a reader of one server's figures would see a third of the cluster's.
  echo "REDIS_MODE=$redis_mode"
  echo "REDIS_URL=$redis_url"
  echo "REDIS_PORT=$([ "$cluster" -eq 0 ] && echo "$redis_port")"
  echo "REDIS_PID=$(pid_of redis)"
  echo "REDIS_PORTS=$(join "${redis_ports[@]}")"
  echo "REDIS_PIDS=$(join "${redis_pids[@]}")"
  echo "KAFKA_BROKERS=$([ "$kafka" -eq 1 ] && echo "127.0.0.1:$kafka_port")"
  echo "KAFKA_TOPIC=$topic"
  echo "TANSU_PID=$(pid_of tansu)"
  echo "HAPROXY_PID=$(pid_of haproxy)"
  echo "HAPROXY_STATS=http://127.0.0.1:$stats_port/"
  echo "VERVE_PIDS=$(join "${verve_pids[@]}")"
  echo "VERVE_PORTS=$(join "${verve_ports[@]}")"
  echo "VERVE_ADMIN_PORTS=$(join "${admin_ports[@]}")"
  echo "VERVE_COUNT_LOGS=$(join "${count_logs[@]}")"
} >"$run_dir/fleet.env.tmp"
# Renamed into place, so a reader never sees half of it.
mv "$run_dir/fleet.env.tmp" "$run_dir/fleet.env"

url="http://127.0.0.1:$balancer_port"
echo
echo "verve fleet: $instances instances × $workers worker(s), ${window_secs} s windows; run directory $run_dir"
echo
printf '  %-9s %s\n' balancer "$url  (haproxy, round robin; stats page http://127.0.0.1:$stats_port/)"
for ((i = 1; i <= instances; i++)); do
  printf '  %-9s %s\n' "verve-$i" "http://127.0.0.1:${verve_ports[$((i - 1))]}  operations http://127.0.0.1:${admin_ports[$((i - 1))]}/healthz and /metrics"
done
if [ "$cluster" -eq 0 ]; then
  printf '  %-9s %s\n' redis "$redis_url  (no persistence, noeviction)"
else
  for n in 1 2 3; do
    port=${redis_ports[$((n - 1))]}
    slots=$(redis-cli -p "$port" cluster nodes | tr -d '\r' |
      awk '$3 ~ /myself/ { for (i = 9; i <= NF; i++) printf "%s%s", (i > 9 ? "," : ""), $i }')
    printf '  %-9s %s\n' "redis-$n" "redis://127.0.0.1:$port  (cluster master, slots $slots, bus port ${bus_ports[$((n - 1))]}; no persistence, noeviction)"
  done
fi
if [ "$kafka" -eq 1 ]; then
  printf '  %-9s %s\n' kafka "127.0.0.1:$kafka_port  (tansu, in memory), topic $topic"
fi
cat <<EOF

Send traffic through the balancer:
  curl '$url/api/verve/accept?id=42'
  wrk -t1 -c32 -d10s -s loadtest/accept.lua $url

Read the counts: every instance logs each record of the fleet (scope=global, one
per window; a higher revision if the count was revised):
  tail -f $run_dir/verve-1.counts.log
EOF
if [ "$cluster" -eq 0 ]; then
  echo "  redis-cli -p $redis_port --scan --pattern 'verve:{*}*'     # the open windows' keys"
else
  # Each node scans its own keys only.
  echo "  for p in ${redis_ports[*]}; do redis-cli -p \$p --scan --pattern 'verve:{*}*'; done   # the open windows' keys, per master"
fi
if [ "$kafka" -eq 1 ]; then
  cat <<EOF
The topic (one record per window and revision, key = window start; one JSON array
per batch):
  tansu cat consume --broker tcp://127.0.0.1:$kafka_port --max-wait-time-ms 500 $topic
EOF
fi
echo
echo "Logs of every part: $run_dir/*.log. Ctrl-C stops everything."

# Runs until a signal (the traps above). An instance that exits on its own (a
# crash, or a kill -9 to watch the fleet publish without it) is reported and the
# rest goes on, as a fleet would: haproxy's health check takes it out of rotation.
# Redis, the broker or the balancer exiting takes everything down, since the
# fleet described above would no longer exist.
watched=("${!pids[@]}")
while [ ${#watched[@]} -gt 0 ]; do
  exited=""
  status=0
  watched_pids=()
  for i in "${watched[@]}"; do watched_pids+=("${pids[$i]}"); done
  wait -n -p exited "${watched_pids[@]}" || status=$?
  still=()
  for i in "${watched[@]}"; do
    if [ "${pids[$i]}" != "$exited" ] && alive "${pids[$i]}"; then still+=("$i"); continue; fi
    echo "fleet.sh: ${names[$i]} exited (status $status); see $run_dir/${names[$i]}.log" >&2
    [[ ${names[$i]} == verve-* ]] || exit 1
  done
  watched=("${still[@]}")
  instances_left=0
  for i in "${watched[@]}"; do
    if [[ ${names[$i]} == verve-* ]]; then instances_left=$((instances_left + 1)); fi
  done
  if [ "$instances_left" -eq 0 ]; then echo "fleet.sh: no instance left" >&2; exit 1; fi
done
exit 1
