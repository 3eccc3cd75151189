#!/usr/bin/env bash
# Runs the framing fuzz target for a bounded time: scripts/fuzz.sh [seconds].
# Needs a nightly toolchain (for the sanitizer) and installs cargo-fuzz if missing.
# New corpus entries go to fuzz/corpus/framing (ignored by git), crashes to
# fuzz/artifacts/framing; the seeds in fuzz/seeds/framing are read, never written.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-600}"

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi
mkdir -p fuzz/corpus/framing

cargo +nightly fuzz run framing fuzz/corpus/framing fuzz/seeds/framing -- \
    -max_total_time="$seconds" -timeout=10 -max_len=16384 -print_final_stats=1
