# shellcheck shell=bash
# Installs what verve's tests and local fleet need, when it is missing. Sourced by
# scripts/test.sh and scripts/fleet.sh.
#
#   install_packages COMMAND=PACKAGE ...   apt packages for the commands not on PATH
#   install_tansu                          the Kafka-protocol broker, built once

install_packages() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || need+=("${pair#*=}")
  done
  [ ${#need[@]} -gt 0 ] || return 0
  echo "installing ${need[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
  # The packages start system-wide services on the default ports; the tests and
  # the fleet run their own.
  if command -v systemctl >/dev/null; then
    $sudo systemctl stop redis-server haproxy 2>/dev/null || true
  fi
}

# tansu, built once and reused from ~/.cargo/bin. A broker for tests needs no
# optimisation: its debug profile without debug info built in 498 CPU seconds
# (6 minutes on 2 cores shared with a chaos run), where the release profile
# took 12 of a first test run's 17.5 minutes on 2 cores.
install_tansu() {
  export PATH="$HOME/.cargo/bin:$PATH"
  command -v tansu >/dev/null && return 0
  echo "installing tansu 0.6.0 (a Kafka-protocol broker), unoptimised: it only serves tests"
  CARGO_PROFILE_DEV_DEBUG=0 cargo install tansu --version 0.6.0 --locked --features dynostore --debug
}
