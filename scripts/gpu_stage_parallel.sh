#!/usr/bin/env bash
# fa-parallel on a multi-GPU machine, in one stage: (a) the correctness check, then (b) the benchmark.
#
#   scripts/gpu_run.sh parallel@530                  (through the runner: wheels, PYTHONPATH, logs, packing)
#   bash scripts/gpu_stage_parallel.sh [--quick]     (directly; PYTHONPATH must name the packages' src dirs)
#
# (a) packages/fa-parallel/tests/gpu_parallel_check.py via torchrun on every GPU (at most 4): NCCL, bf16,
#     32k and 128k tokens, ring and all-gather, causal and not, GQA, windows, packed documents, against one
#     GPU. Its own --budget stops starting configurations in time; results also in
#     bench/results/<device>-parallel-check.json.
# (b) bench/bench_parallel.py via torchrun: fwd+bwd tokens/s at 64k and 128k (d128, 16 heads, batch 1, bf16,
#     causal and not) of the 1-GPU baselines and fa-plus-ring / fa-plus-allgather / torch-cp on all GPUs;
#     bench/results/<device>-parallel.{json,md,png} (json and md rewritten after every row).
# Both use one tile config per kernel (FA_PLUS_AUTOTUNE=0): the Triton cache the check fills serves the bench.
# --quick: 32k checks only and the 64k benchmark (about half the time).
#
# Environment: PARALLEL_BUDGET (seconds for the whole stage, default 520), CHECK_TIMEOUT (default 200),
# BENCH_TIMEOUT (default 300; cut to what the budget leaves), PYTHON (default python3), OUT (logs go to
# $OUT/logs when set, else to logs/ here). Exit status: 0 when both parts passed.
set -u -o pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
BUDGET="${PARALLEL_BUDGET:-520}"
START=$(date +%s)
LOGS="${OUT:+$OUT/logs}"
LOGS="${LOGS:-logs}"
mkdir -p "$LOGS" bench/results
# NVLink multicast stays off (shared machines); the runner's environment has these, a plain shell may not
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export FA_PLUS_AUTOTUNE="${FA_PLUS_AUTOTUNE:-0}" PYTHONUNBUFFERED=1 BENCH_TRACEBACK=1
if [ -z "${PYTHONPATH:-}" ] || [[ "$PYTHONPATH" != *fa-parallel* ]]; then
    SRC="packages/fa-core/src:packages/fa-backward/src:packages/fa-kvcache/src:packages/fa-compat/src:packages/fa-parallel/src"
    export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
fi

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC=$((NGPU > 4 ? 4 : NGPU))
SLUG=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from common import device_slug; print(device_slug())" 2>/dev/null || echo gpu)
echo "[parallel] $NGPU GPU(s), $NPROC ranks, device $SLUG, budget ${BUDGET}s, quick=$QUICK"
if ((NPROC < 2)); then
    echo "[parallel] needs at least 2 GPUs: nothing run"
    exit 1
fi
left() { echo $((BUDGET - ($(date +%s) - START))); }
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
STATUS=0

# ------------------------------------------------------------------------------------------ (a) check
CHECK_TIMEOUT="${CHECK_TIMEOUT:-200}"
((QUICK)) && CHECK_TIMEOUT=$((CHECK_TIMEOUT < 110 ? CHECK_TIMEOUT : 110))
CHECK_ARGS=(--json "bench/results/$SLUG-parallel-check.json" --budget $((CHECK_TIMEOUT - 60)))
((QUICK)) && CHECK_ARGS+=(--quick --seqlens 32768)
echo "===== [parallel/check] timeout ${CHECK_TIMEOUT}s: ${TORCHRUN[*]} packages/fa-parallel/tests/gpu_parallel_check.py ${CHECK_ARGS[*]}"
t0=$(date +%s)
timeout -k 10 "$CHECK_TIMEOUT" "${TORCHRUN[@]}" packages/fa-parallel/tests/gpu_parallel_check.py "${CHECK_ARGS[@]}" \
    2>&1 | tee "$LOGS/parallel-check.log"
rc=${PIPESTATUS[0]}
echo "[parallel/check] rc=$rc ($(($(date +%s) - t0))s): $(grep -cE '^PASS' "$LOGS/parallel-check.log") pass," \
    "$(grep -cE '^FAIL' "$LOGS/parallel-check.log") fail, $(grep -cE '^SKIPPED' "$LOGS/parallel-check.log") skipped"
((rc != 0)) && STATUS=1

# ------------------------------------------------------------------------------------------ (b) bench
BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"
((QUICK)) && BENCH_TIMEOUT=$((BENCH_TIMEOUT < 150 ? BENCH_TIMEOUT : 150))
avail=$(($(left) - 5))
((BENCH_TIMEOUT > avail)) && BENCH_TIMEOUT=$avail
if ((BENCH_TIMEOUT < 60)); then
    echo "[parallel/bench] SKIPPED: ${BENCH_TIMEOUT}s left of the stage budget"
    exit 1
fi
BENCH_ARGS=()
((QUICK)) && BENCH_ARGS+=(--quick)
echo "===== [parallel/bench] timeout ${BENCH_TIMEOUT}s: ${TORCHRUN[*]} bench/bench_parallel.py ${BENCH_ARGS[*]}"
t0=$(date +%s)
timeout -k 10 "$BENCH_TIMEOUT" "${TORCHRUN[@]}" bench/bench_parallel.py "${BENCH_ARGS[@]}" 2>&1 | tee "$LOGS/parallel-bench.log"
rc=${PIPESTATUS[0]}
echo "[parallel/bench] rc=$rc ($(($(date +%s) - t0))s)"
((rc != 0)) && STATUS=1
if ((rc != 0)) && [ -f "bench/results/$SLUG-parallel.json" ]; then
    # cut short: the rows written so far get their table and plot
    "$PY" - "bench/results/$SLUG-parallel.json" <<'EOF2' 2>&1 | tail -3
import json, sys
sys.path.insert(0, "bench")
import bench_parallel as b
b._write(json.load(open(sys.argv[1]))["rows"], False)
EOF2
fi
[ -f "bench/results/$SLUG-parallel.md" ] && cat "bench/results/$SLUG-parallel.md"
echo "[parallel] total $(($(date +%s) - START))s, status $STATUS"
exit "$STATUS"
