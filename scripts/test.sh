#!/usr/bin/env bash
# Runs verve's whole test suite on a fresh machine.
#
# Installs what the tests need when it is missing, then runs every test target
# (unit, integration over real sockets, the docs check, and each criterion bench
# once as a smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
# The Redis tests start their own redis-server on a free loopback port, and the
# fleet tests put haproxy in front of two instances.
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v haproxy >/dev/null || need_apt+=(haproxy)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}"
  # The packages start system-wide services; the tests need none.
  if command -v systemctl >/dev/null; then $sudo systemctl stop redis-server haproxy 2>/dev/null || true; fi
fi

# The Kafka tests run a real Kafka-protocol broker: tansu, built once (about
# 8 minutes on 2 cores) and reused from ~/.cargo/bin afterwards.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v tansu >/dev/null; then
  echo "installing tansu 0.6.0 (a Kafka-protocol broker for the tests)"
  cargo install tansu --version 0.6.0 --locked --features dynostore
fi

cargo test --all-targets "$@"
