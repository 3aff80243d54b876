#!/bin/sh
# The whole test suite, set-up included (the README's test command; CI runs it).
#   fast: unit tests of builder, agent and harness (seconds)
#   slow: builds images for real and boots them under QEMU (tens of minutes)
# Slow tests fail, never skip, when something they need is missing.
set -eu
cd "$(dirname "$0")/.."
started=$(date +%s)
[ "$(id -u)" = 0 ] || { echo "run-all.sh: run as root (image builds need it)" >&2; exit 1; }

# Each section's time, printed at the end (and on failure, up to where it
# stopped), so the CI budget (60 min warm cache, 85 min empty) is watched.
times=""
current=""
section_started=$started
close_section() {
    [ -n "$current" ] || return 0
    times="$times$(printf '%6d s  %s' $(( $(date +%s) - section_started )) "$current")
"
    current=""
}
section() {
    close_section
    current="$1"
    section_started=$(date +%s)
    echo "== $1"
}
report_times() {
    status=$?
    close_section
    echo "== section times"
    printf '%s' "$times"
    printf '%6d s  total (%s)\n' $(( $(date +%s) - started )) "$( [ $status = 0 ] && echo passed || echo FAILED)"
    if [ -s target/qemu-tests/.pool/summary ]; then
        echo "== VM tests of the pool, each (two ran at a time)"
        cat target/qemu-tests/.pool/summary
    fi
}
trap report_times EXIT
rm -rf target/qemu-tests/.pool   # the VM pool's table is this run's only

section "set-up: builder/setup-host.sh --tests"
builder/setup-host.sh --tests
# Disk is the scarce thing on CI: show it at every section.
disk() {
    echo "   (disk free: cache $(df -h --output=avail "${AIWIMG_CACHE_DIR:-/var/cache/aiwimg}" | tail -1 | tr -d ' '), workspace $(df -h --output=avail . | tail -1 | tr -d ' '))"
}
disk

section "set-up check: the README's commands in fresh Debian 12 roots, in either order"
cargo test --profile suite -p qemu-tests --test setup_host -- --nocapture

section "fast: unit tests"
cargo test --profile suite --workspace --exclude qemu-tests
cargo test --profile suite -p qemu-tests --lib

section "slow: the builder end to end"
cargo build --release -p aiwimg
AIWIMG_BIN="$PWD/target/release/aiwimg"
export AIWIMG_BIN
cargo test --profile suite -p qemu-tests --test build -- --test-threads=1 --nocapture
cargo test --profile suite -p qemu-tests --test registry_pull -- --nocapture
disk

section "slow: every output format, and publish aws against moto"
cargo test --profile suite -p qemu-tests --test formats -- --nocapture
cargo test --profile suite -p qemu-tests --test publish_aws -- --test-threads=1 --nocapture
rm -rf target/qemu-tests/publish-aws   # passed: its image copies are not needed
disk

section "slow: QEMU harness"
cargo test --profile suite -p qemu-tests --test harness -- --test-threads=1
section "slow: VM tests (image boots, Secure Boot, run modes, every datasource), two at a time"
# Two VM tests at a time, one vCPU each: a TCG boot is mostly one chain of
# work, so two side by side finish sooner than one after the other with two
# vCPUs each (qemu-tests/src/case.rs, vm_slots). One pool over the four test
# binaries, longest test first, so no slot idles between binaries. Every test
# still runs.
AIWIMG_VM_SLOTS=2 qemu-tests/vm-pool.sh boot secure_boot modes clouds
disk

section "slow: a three-node cluster (controller + two engines on one private LAN)"
cargo test --profile suite -p qemu-tests --test cluster -- --nocapture
disk
"$AIWIMG_BIN" cache list | tail -1
close_section
echo "== all tests passed in $(( $(date +%s) - started )) s"
