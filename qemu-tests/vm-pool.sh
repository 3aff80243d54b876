#!/bin/sh
# Runs the VM tests of several test binaries as one pool of AIWIMG_VM_SLOTS
# workers (default 2), each worker taking the next test, longest expected
# first. Run binary after binary (`cargo test --test-threads=2` each), a slot
# sat idle at the end of each binary while its last test ran, and the longest
# tests of a binary could start last: about 4 min of a CI run.
#   qemu-tests/vm-pool.sh boot secure_boot modes clouds
# Every test the binaries list is run (a test missing from the table of
# expected times runs among the first: it may be long). A failed test does not
# stop the others; the pool fails at the end, naming it. Each test's output is
# printed whole when it ends, and every test's time in a summary.
set -eu
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: qemu-tests/vm-pool.sh TEST-BINARY..." >&2; exit 2; }
slots=${AIWIMG_VM_SLOTS:-2}
export AIWIMG_VM_SLOTS="$slots"
pool="$PWD/target/qemu-tests/.pool"
rm -rf "$pool"
mkdir -p "$pool/logs"

# Seconds each test took in a CI run with two at a time (2 cores, TCG). Only
# the order comes from here: a wrong figure costs time, never a test.
expected() {
    case "$1" in
    boot::engine_joins_over_https_runs_a_container_and_keeps_var_across_reboot) echo 830 ;;
    boot::engine_tpm_seals_var_to_its_own_tpm) echo 790 ;;
    boot::engine_data_disk_from_cloud_config) echo 390 ;;
    modes::anywhere_all_modes) echo 210 ;;
    modes::db_node_other_modes_closed) echo 185 ;;
    boot::coreless) echo 170 ;;
    secure_boot::*) echo 165 ;;
    boot::controller) echo 150 ;;
    boot::engine_gpu_without_a_gpu) echo 130 ;;
    clouds::no_user_data_at_all) echo 77 ;;
    clouds::kernel_command_line) echo 88 ;;
    clouds::*) echo 110 ;;
    boot::invalid_user_data_is_refused_with_every_reason) echo 107 ;;
    *) echo 1000 ;;
    esac
}

# Build each binary, then list its tests: "expected binary executable test".
for bin in "$@"; do
    if ! cargo test --profile suite -p qemu-tests --test "$bin" --no-run >"$pool/build-$bin.log" 2>&1; then
        cat "$pool/build-$bin.log"
        echo "vm-pool: building the $bin tests failed" >&2
        exit 1
    fi
    exe=$(sed -n 's/^ *Executable .*(\(.*\))$/\1/p' "$pool/build-$bin.log" | tail -1)
    [ -x "$exe" ] || { cat "$pool/build-$bin.log"; echo "vm-pool: no test executable for $bin" >&2; exit 1; }
    "$exe" --list --format terse >"$pool/list-$bin" || { echo "vm-pool: $exe --list failed" >&2; exit 1; }
    sed -n 's/: test$//p' "$pool/list-$bin" | while read -r name; do
        echo "$(expected "$bin::$name") $bin $PWD/$exe $name"
    done
done | sort -s -k1,1nr >"$pool/queue"
total=$(wc -l <"$pool/queue")
echo "vm-pool: $total tests from $*, $slots at a time, longest first"
[ "$total" -gt 0 ] || { echo "vm-pool: no tests found" >&2; exit 1; }

next_test() {
    flock "$pool/queue.lock" sh -c 'head -n 1 "$1"; sed -i 1d "$1"' _ "$pool/queue"
}

worker() {
    while job=$(next_test) && [ -n "$job" ]; do
        set -- $job
        bin=$2 exe=$3 name=$4
        log="$pool/logs/$bin.$name.log"
        started=$(date +%s)
        # Cargo runs test binaries from the package's folder; so do we.
        if (cd qemu-tests && "$exe" --exact "$name" --nocapture --test-threads=1) >"$log" 2>&1; then
            status=passed
        else
            status=FAILED
        fi
        took=$(($(date +%s) - started))
        echo "$took $status $bin::$name" >>"$pool/results"
        # One test's output at a time, whole.
        flock "$pool/print.lock" sh -c 'echo "== $1 ($2 in $3 s)"; cat "$4"' _ "$bin::$name" "$status" "$took" "$log"
    done
}

i=0
while [ "$i" -lt "$slots" ]; do
    worker &
    i=$((i + 1))
done
wait

echo "== vm-pool: test times"
sort -k1,1nr "$pool/results" | while read -r took status name; do
    printf '%6d s  %-6s %s\n' "$took" "$status" "$name"
done | tee "$pool/summary"
ran=$(wc -l <"$pool/results")
failed=$(grep -c ' FAILED ' "$pool/results" || true)
if [ "$ran" -ne "$total" ] || [ "$failed" -ne 0 ]; then
    echo "vm-pool: $failed of $total tests failed, $((total - ran)) did not run" >&2
    exit 1
fi
echo "vm-pool: all $total tests passed"
