#!/bin/sh
# The figures of this machine side by side: builds, sizes, a boot under QEMU,
# the agent on the guide's user-data, cloud-init on the same cloud-config.
#   qemu-tests/bench.sh [builds] [boot] [tasks] [agent] [cloud-init]   (default: all)
# Not a test: it prints figures. Needs root and the test set-up (the suite's
# set-up is run first, idempotently). Never run it beside a QEMU test suite:
# two cores cannot time two VMs.
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench.sh: run as root (image builds need it)" >&2; exit 1; }
builder/setup-host.sh --tests >/dev/null
cargo build --quiet --release -p aiwimg -p qemu-tests --bin aiwimg --bin bench
AIWIMG_BIN="$PWD/target/release/aiwimg" exec target/release/bench "$@"
