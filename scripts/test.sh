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
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}"
fi

cargo test --all-targets "$@"
