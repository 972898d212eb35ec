#!/usr/bin/env bash
# GPU stage (scripts/gpu_run.sh fp8@240): the FP8 forward's tests and benchmark in one call.
#   1. FP8 accuracy + forward GPU tests (one tile per kernel, no autotune timing), xdist when carried;
#   2. bench/bench_fp8.py: FP8 vs our bf16 forward at seqlen 4k/8k/16k, d128/d64, causal and not, with the
#      ratio per point and the worst one against the 1.3x bar.
# Expected: ~60 s tests + ~70 s timing = ~130 s on an H200 (budget 150 s; give the stage 240 s).
set -uo pipefail
PY="${PYTHON:-python3}"
rc=0
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"
FA_PLUS_AUTOTUNE=0 timeout -k 5 110 "$PY" -m pytest packages/fa-core/tests/test_fp8.py \
    packages/fa-core/tests/test_forward_gpu.py -m gpu -q $xdist -p no:cacheprovider -rs --durations=8 \
    ${FP8_PYTEST_ARGS:-} || rc=1
timeout -k 5 120 "$PY" bench/bench_fp8.py ${FP8_BENCH_ARGS:-} || rc=1
exit $rc
