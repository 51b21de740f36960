#!/usr/bin/env bash
# Runs the fuzz targets one after another (the machines have 2 shared cores), each for
# SECONDS, and prints libFuzzer's execution count per target and in total. Exits non-zero
# if any target found a crash, after printing the crashing input's path.
#
#   fuzz/run.sh SECONDS [TARGET...]      (make fuzz / make fuzz-smoke call it)
#
# Needs cargo-fuzz (the Makefile installs it). `-s none`: no sanitizer, so stable Rust
# builds it; coverage comes from `-Cpasses=sancov-module`, which stable has. Overflow
# checks and debug assertions are on (fuzz/Cargo.toml). New corpus entries go to
# fuzz/corpus/TARGET (not committed); fuzz/seeds/TARGET holds a few hand-made inputs.
set -uo pipefail

seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$fuzz_dir/.." || exit 2
export CARGO_TARGET_DIR="$fuzz_dir/target"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode route cidr)
logs="$CARGO_TARGET_DIR/fuzz-logs"
mkdir -p "$logs"

# Build all targets at once, so that a compile error fails here and not mid-campaign.
cargo fuzz build -s none --fuzz-dir fuzz || exit 2

total=0
failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    dirs=("fuzz/corpus/$t")
    [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
    log="$logs/$t.log"
    echo "fuzzing $t for ${seconds}s (log: $log)"
    cargo fuzz run -s none --fuzz-dir fuzz "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    if [ -z "$runs" ]; then
        echo "$t: no execution count in $log (did it start?):" >&2
        tail -n 20 "$log" >&2
        failed+=("$t")
        continue
    fi
    total=$((total + runs))
    summary+=("$(printf '%-8s %14s executions  %s' "$t" "$runs" "$([ $rc = 0 ] && echo ok || echo CRASH)")")
    if [ $rc != 0 ]; then
        failed+=("$t")
        echo "$t: CRASH (exit $rc). libFuzzer's report:" >&2
        grep -E -m 1 -B 2 -A 25 'panicked at|==ERROR|deadly signal|ERROR: libFuzzer' "$log" >&2
        # libFuzzer says "Test unit written to fuzz/artifacts/TARGET/crash-…".
        echo "crashing input(s) of $t:" >&2
        sed -n "s|.*Test unit written to \(.*\)$|  $PWD/\1|p" "$log" >&2
        echo "reproduce: CARGO_TARGET_DIR=$CARGO_TARGET_DIR cargo fuzz run -s none --fuzz-dir fuzz $t PATH" >&2
    fi
done

echo "fuzz summary (${seconds}s per target):"
printf '  %s\n' "${summary[@]}"
printf '  %-8s %14s executions\n' total "$total"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
