#!/usr/bin/env bash
# GPU stage (scripts/gpu_run.sh pending@240): what session 4 added after its last GPU call, in one call.
#   1. GPU tests of the new paths: FastLaunch for the kvcache kernels (bitwise vs Triton's path), the opt-in
#      fused split combine (eager and CUDA-graph replays), the device guard (needs 2 GPUs: nvidia-h200-x2),
#      and the forward/backward fast-launch tests again (host trims changed the launchers);
#   2. bench/host_overhead.py: host us per call, Triton's path vs ours vs Python alone, forward without TMA;
#   3. bench/profile_step.py at issue #3's last miss (d128 causal 512): GPU idle gaps + a chrome trace in $OUT.
# Expected: ~90 s tests + ~20 s host + ~60 s profile on an H200.
set -uo pipefail
PY="${PYTHON:-python3}"
rc=0
FA_PLUS_AUTOTUNE=0 timeout -k 5 120 "$PY" -m pytest packages/fa-kvcache/tests/test_gpu.py \
    packages/fa-backward/tests/test_fast_launch_gpu.py -m gpu -q -rfs -p no:cacheprovider \
    -k "fast_launch or fused or device" || rc=1
timeout -k 5 60 "$PY" bench/host_overhead.py || rc=1
timeout -k 5 150 "$PY" bench/profile_step.py --shapes 32x512x16x128 --causal 1 --trace "${OUT:-/tmp}" || rc=1
exit $rc
