#!/bin/sh
# The whole test suite, set-up included (the README's test command; CI runs it).
#   fast: unit tests of builder, agent and harness (seconds)
#   slow: builds images for real and boots them under QEMU (tens of minutes)
# Slow tests fail, never skip, when something they need is missing.
set -eu
cd "$(dirname "$0")/.."
started=$(date +%s)
[ "$(id -u)" = 0 ] || { echo "run-all.sh: run as root (image builds need it)" >&2; exit 1; }
builder/setup-host.sh --tests
# Disk is the scarce thing on CI: show it at every section.
disk() {
    echo "   (disk free: cache $(df -h --output=avail "${AIWIMG_CACHE_DIR:-/var/cache/aiwimg}" | tail -1 | tr -d ' '), workspace $(df -h --output=avail . | tail -1 | tr -d ' '))"
}
disk

echo "== fast: unit tests"
cargo test --workspace --exclude qemu-tests
cargo test -p qemu-tests --lib

echo "== slow: the builder end to end"
cargo build --release -p aiwimg
AIWIMG_BIN="$PWD/target/release/aiwimg"
export AIWIMG_BIN
cargo test --release -p qemu-tests --test build -- --test-threads=1 --nocapture
disk

echo "== slow: every output format, and publish aws against moto"
cargo test --release -p qemu-tests --test formats -- --nocapture
cargo test --release -p qemu-tests --test publish_aws -- --test-threads=1 --nocapture
rm -rf target/qemu-tests/publish-aws   # passed: its image copies are not needed
disk

echo "== slow: QEMU harness and image boot tests (one VM at a time)"
cargo test --release -p qemu-tests --test harness -- --test-threads=1
cargo test --release -p qemu-tests --test boot -- --test-threads=1 --nocapture
disk
cargo test --release -p qemu-tests --test modes -- --test-threads=1 --nocapture
disk
cargo test --release -p qemu-tests --test clouds -- --test-threads=1 --nocapture
disk

echo "== slow: a three-node cluster (controller + two engines on one private LAN)"
cargo test --release -p qemu-tests --test cluster -- --nocapture
disk
"$AIWIMG_BIN" cache list | tail -1
echo "== all tests passed in $(( $(date +%s) - started )) s"
