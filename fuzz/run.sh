#!/usr/bin/env bash
# Bounded fuzz pass: fuzz/run.sh TARGET [SECONDS] (default 60), or fuzz/run.sh all [SECONDS]
# for every target, one after another. Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). The committed seeds (fuzz/corpus/TARGET) are read; new inputs
# go to fuzz/work/TARGET; a crash is written to fuzz/artifacts/TARGET/ and the run fails.
# Prints the executions per target.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${2:-60}"
targets=("${1:?usage: fuzz/run.sh TARGET|all [SECONDS]}")
if [ "$1" = all ]; then
    targets=(frames envelope messages did_key entry export evidence)
fi
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t.log"
    status=0
    cargo +nightly fuzz run "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 \
        -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(grep -oE "Done [0-9]+ runs in [0-9]+ second" "$log" | tail -1 || true)
    if [ "$status" -ne 0 ] || [ -z "$runs" ]; then
        grep -E "ERROR|panicked|SUMMARY|Test unit written" "$log" | head -20 || true
        echo "$t: FAILED (exit $status; see $log and fuzz/artifacts/$t/)"
        exit 1
    fi
    echo "$t: ${runs}s, no crash"
done
