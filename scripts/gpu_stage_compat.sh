#!/usr/bin/env bash
# GPU stage: fa-compat's GPU tests (HF transformers included) against the INSTALLED wheels of .whl/fa
# (built by scripts/build_gpu_wheels.sh), so that transformers sees a `flash-attn` distribution.
set -uo pipefail
rm -rf /tmp/fa_site
python3 -m pip install -q --no-deps --no-compile --target /tmp/fa_site .whl/fa/*.whl || exit 1
# only the installed wheels (and the carried extras in /tmp/site), not the source trees
PYTHONPATH=/tmp/fa_site:/tmp/site FA_PLUS_AUTOTUNE=0 python3 -m pytest packages/fa-compat/tests -m gpu -q ${COMPAT_PYTEST_ARGS:-} \
    -p no:cacheprovider -rs --durations=10
status=$?
# model-level tests that run on whatever device there is (bf16 on the GPU): HF gpt-oss with our attention
PYTHONPATH=/tmp/fa_site:/tmp/site FA_PLUS_AUTOTUNE=0 python3 -m pytest packages/fa-compat/tests/test_gpt_oss.py -q \
    -p no:cacheprovider -rs || status=1
exit $status
