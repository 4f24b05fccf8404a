#!/bin/bash
# Gateway instructions per call, counted by valgrind's callgrind: the same figure whatever else
# the machine runs, so one lever can be compared with the next on a busy machine
# (docs/performance.md, "CPU per call"). User-space instructions only: the kernel's share (UDP,
# fsync, wake-ups) is not counted; CPU time on a quiet machine measures the whole.
#
#   cargo build --release -p didgate-tests --bin didgate-bench -p didgate-daemon --bin didgated -p didgate-client --bin didgate
#   D=$(mktemp -d) && cp target/release/{didgate-bench,didgated,didgate} $D/
#   tests/bench/callgrind-per-call.sh $D [OUT_DIR]
#
# Runs the call benchmark twice with the gateway under callgrind, with 1,000 and then 4,000
# calls at concurrency 64 (and the same 50 calls at concurrency 1, 5 handshakes and warm-up in
# both), and prints the difference divided by 3,000: the marginal instructions of one call,
# without start-up, store creation and warm-up. OUT_DIR keeps the callgrind files
# (callgrind_annotate them; the same functions in both runs subtract the same way).
set -euo pipefail
bin=${1:?usage: $0 BIN_DIR [OUT_DIR]}
out=${2:-$(mktemp -d)}
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }
total() { grep -h "^summary:\|^totals:" "$1" | head -1 | awk '{print $2}'; }
declare -A ir
for n in 1000 4000; do
  rm -f "$out"/gw.$n.*
  DIDGATE_BENCH_GATEWAY_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=$out/gw.$n.%p" \
    CARGO=false "$bin/didgate-bench" --calls-c1 50 --calls-c64 $n --handshakes 5 --no-nginx \
    --no-proxy --rss-samples 1 > "$out/bench.$n.log" 2>&1
  ir[$n]=$(total "$(ls "$out"/gw.$n.* | head -1)")
  echo "gateway instructions, whole run with $n calls at concurrency 64: ${ir[$n]}"
done
echo "gateway instructions per call (marginal): $(( (ir[4000] - ir[1000]) / 3000 ))"
echo "callgrind files: $out"
