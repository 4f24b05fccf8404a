#!/usr/bin/env bash
# Bounded fuzz pass: fuzz/run.sh TARGET [SECONDS] (default 60), or fuzz/run.sh all [SECONDS]
# for every target, one after another. Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). The committed seeds (fuzz/corpus/TARGET) are read; new inputs
# go to fuzz/work/TARGET; a crash is written to fuzz/artifacts/TARGET/ and the run fails.
# Prints the executions per target.
#
# fuzz/run.sh ci [SECONDS] (default 7: libFuzzer stops at about SECONDS + 1, so the 7 targets
# fuzz under 60 s in all), the CI step: skipped (exit 0) where no nightly toolchain is installed;
# installs cargo-fuzz if missing; builds every target; replays each committed corpus once
# (-runs=0); then fuzzes every target SECONDS. Any crash fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
all=(frames envelope messages did_key entry export evidence)
toolchain="${DIDGATE_FUZZ_TOOLCHAIN:-nightly}"

if [ "${1:-}" = ci ]; then
    # the undated nightly if installed, else the newest dated one
    toolchain=$(rustup toolchain list 2>/dev/null | awk '$1 ~ /^nightly-/ {print $1}' | sort -r | head -1 || true)
    if [ -z "$toolchain" ]; then
        echo "SKIPPED: fuzzing needs a nightly toolchain (rustup toolchain install nightly)"
        exit 0
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "installing cargo-fuzz"
        cargo install cargo-fuzz --locked || cargo "+$toolchain" install cargo-fuzz --locked
    fi
    echo "fuzzing with $toolchain, $(cargo fuzz --version)"
    cargo "+$toolchain" metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null 2>&1 \
        || echo "note: fuzz/Cargo.lock is out of date with the fuzz crate's dependencies; cargo updates it (commit that)"
    cargo "+$toolchain" fuzz build
    for t in "${all[@]}"; do
        mkdir -p "fuzz/artifacts/$t"
        log="fuzz/artifacts/$t.replay.log"
        status=0
        # every committed input run once; a scratch output dir keeps fuzz/corpus unwritten
        rm -rf "fuzz/work/replay-$t" && mkdir -p "fuzz/work/replay-$t"
        cargo "+$toolchain" fuzz run "$t" "fuzz/work/replay-$t" "fuzz/corpus/$t" -- -runs=0 \
            -rss_limit_mb=2048 -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || status=$?
        inited=$(grep -oE "INITED .*" "$log" | head -1 || true)
        if [ "$status" -ne 0 ] || [ -z "$inited" ]; then
            grep -E "ERROR|panicked|SUMMARY|Test unit written" "$log" | head -20 || true
            echo "$t: corpus replay FAILED (exit $status; see $log and fuzz/artifacts/$t/)"
            exit 1
        fi
        rm -rf "fuzz/work/replay-$t"
        echo "$t: $(ls "fuzz/corpus/$t" | wc -l) corpus files replayed, no crash"
    done
    DIDGATE_FUZZ_TOOLCHAIN="$toolchain" exec "$0" all "${2:-7}"
fi

seconds="${2:-60}"
targets=("${1:?usage: fuzz/run.sh TARGET|all|ci [SECONDS]}")
if [ "$1" = all ]; then
    targets=("${all[@]}")
fi
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t.log"
    status=0
    cargo "+$toolchain" fuzz run "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
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
