#!/usr/bin/env bash
# Runs the fleet's seeded chaos test (tests/chaos.rs) for any number of seeds, each
# longer than `cargo test` runs it, and reports per seed: windows with ids, faults,
# ids lost and why they were allowed, pass or fail; then a summary.
#
#   scripts/chaos.sh [SEEDS] [SECONDS]
#
# SEEDS: a count (20: seeds 1 to 20), a range (5-9) or a list (3,17,42); default
# $VERVE_CHAOS_SEEDS, else 20. SECONDS: each run's length; default
# $VERVE_CHAOS_SECS, else 90. A failing seed replays with `scripts/chaos.sh S,` (its
# schedule is the seed's; the timing is the machine's).
#
# Per seed: the test's output in target/chaos/seed-<S>.log, and its report, every
# record and every instance's stderr in target/chaos/seed-<S>/. Exits 1 if any
# seed failed.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
install_packages cc=build-essential redis-server=redis-server
install_tansu

seeds=${1:-${VERVE_CHAOS_SEEDS:-20}}
secs=${2:-${VERVE_CHAOS_SECS:-90}}
case $seeds in
  *,*) list=$(tr ',' ' ' <<<"$seeds") ;;
  *-*) list=$(seq "${seeds%-*}" "${seeds#*-}") ;;
  *) list=$(seq 1 "$seeds") ;;
esac

cargo test -q --test chaos --no-run
out=${CARGO_TARGET_DIR:-target}/chaos
mkdir -p "$out"

passed=0 failed=0
totals="windows=0 faults=0 kills=0 ok_ids=0 allowed=0 lost=0"
for seed in $list; do
  log=$out/seed-$seed.log
  started=$(date +%s)
  VERVE_CHAOS_SEED=$seed VERVE_CHAOS_SECS=$secs \
    cargo test -q --test chaos seeds_from_the_environment -- --ignored --exact --nocapture \
    >"$log" 2>&1 && status=0 || status=$?
  took=$(($(date +%s) - started))
  # The report's last lines (printed twice on a failure: once is enough).
  result=$(grep -E '^chaos seed=[0-9]+ (secs=[0-9]+ result=|lost window=)' "$log" | awk '!seen[$0]++' || true)
  if [ "$status" -eq 0 ] && [ -n "$result" ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    [ -n "$result" ] || result="chaos seed=$seed secs=$secs result=FAIL (no report: the harness failed; see $log)"
  fi
  echo "$result (${took} s)"
  line=$(head -1 <<<"$result")
  totals=$(awk -v totals="$totals" -v line="$line" 'BEGIN {
    n = split(totals, t, " "); split(line, l, " ");
    for (i in l) { split(l[i], kv, "="); got[kv[1]] = kv[2] }
    for (i = 1; i <= n; i++) { split(t[i], kv, "="); printf "%s%s=%d", (i > 1 ? " " : ""), kv[1], kv[2] + got[kv[1]] }
  }')
done

echo
echo "chaos: $passed of $((passed + failed)) seeds passed, ${secs} s each; in all: $totals"
[ "$failed" -eq 0 ]
