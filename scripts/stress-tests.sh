#!/usr/bin/env bash
# Runs the whole suite N times (default 10) with a CPU hog busy on one core, and
# reports every failure by test: a test that fails one run in ten shows up here
# before it blocks a landing.
#
#   scripts/stress-tests.sh [N]
#
# Logs of every run: target/stress/run-<i>.log. Exits 1 if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}

# Installs what the tests need and builds every target once.
./scripts/test.sh --no-run >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"

# The hog: a busy loop on the first CPU, so the suite shares the machine the way it
# does on a loaded CI runner.
hog_cpu=$( (cut -d, -f1 /sys/fs/cgroup/cpuset.cpus.effective | cut -d- -f1) 2>/dev/null || true)
hog_cpu=${hog_cpu:-0}
taskset -c "$hog_cpu" sh -c 'while :; do :; done' &
hog=$!
trap 'kill $hog 2>/dev/null || true' EXIT

mkdir -p target/stress
failed_runs=0
: > target/stress/failures
for i in $(seq 1 "$runs"); do
  log=target/stress/run-$i.log
  started=$(date +%s)
  if cargo test --all-targets --no-fail-fast >"$log" 2>&1; then
    echo "run $i/$runs: pass ($(( $(date +%s) - started )) s)"
  else
    failed_runs=$((failed_runs + 1))
    # "test <name> ... FAILED" lines, and the binary of any that did not finish.
    names=$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' || true)
    [ -n "$names" ] || names="(no test named: see $log)"
    echo "run $i/$runs: FAIL ($(( $(date +%s) - started )) s): $(echo "$names" | tr '\n' ' ')"
    echo "$names" | sed "s/^/run $i: /" >> target/stress/failures
  fi
done

echo
if [ "$failed_runs" -eq 0 ]; then
  echo "stress: $runs/$runs runs passed with a CPU hog on cpu $hog_cpu"
else
  echo "stress: $failed_runs of $runs runs failed; failures by test:"
  sed -E 's/^run [0-9]+: //' target/stress/failures | sort | uniq -c | sort -rn
  exit 1
fi
