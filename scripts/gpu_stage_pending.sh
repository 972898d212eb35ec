#!/usr/bin/env bash
# GPU stage (scripts/gpu_run.sh pending@330): what session 5 added after its last GPU call, in one call.
#   1. GPU tests of the forward (its right-edge loop is now compiled out when keys fill whole tiles and no rule
#      cuts the band), of the decode kernel (its left-edge loop likewise unless a window bounds the keys) and of
#      the backward (the training comparison now lives in fa_backward.training_check);
#   2. bench/train_compare.py: the loss curves of ours vs SDPA flash, written to bench/results (issue #3 asks
#      for the training comparison's results in the repository);
#   3. bench/host_overhead.py: host us per call after the launch-key and fused-delta changes.
# Then run the forward sweep (bench-forward@420 on another lane): the non-causal kernel changed.
# Expected: ~180 s tests + ~40 s training + ~40 s host on an H200.
set -uo pipefail
PY="${PYTHON:-python3}"
rc=0
FA_PLUS_AUTOTUNE=0 timeout -k 5 230 "$PY" -m pytest packages/fa-core/tests/test_forward_gpu.py \
    packages/fa-backward/tests/test_gpu.py packages/fa-backward/tests/test_fast_launch_gpu.py \
    packages/fa-kvcache/tests/test_gpu.py -m gpu -q -rfs \
    -p no:cacheprovider -n 3 || rc=1
timeout -k 5 90 "$PY" bench/train_compare.py || rc=1
timeout -k 5 60 "$PY" bench/host_overhead.py || rc=1
exit $rc
