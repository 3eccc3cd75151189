#!/usr/bin/env bash
# Runs verve's whole test suite on a fresh machine.
#
# Installs what the tests need when it is missing, then runs every test target
# (unit, integration over real sockets, the docs check, and each criterion bench
# once as a smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
# The Redis tests start their own redis-server on a free loopback port, the fleet
# tests put haproxy in front of two instances (and move an instance's clock with
# libfaketime, which the faketime package brings), and the Kafka tests run tansu.
install_packages cc=build-essential redis-server=redis-server haproxy=haproxy faketime=faketime
install_tansu

cargo test --all-targets "$@"
