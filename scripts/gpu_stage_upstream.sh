#!/usr/bin/env bash
# GPU stage: flash-attn's own test modules (unmodified: tests/test_flash_attn.py, and the rotary, Triton layer
# norm and cross-entropy tests where the ref has them) of every ref in .upstream/ (copied there by
# scripts/fetch_upstream_tests.sh; copy .upstream to the GPU machine) against our flash_attn, a seeded sample
# of cases per test function (tests/upstream/conftest.py, docs/upstream-suite.md). UPSTREAM_MODULES (default:
# every test_*.py of the ref's folder but UPSTREAM_SKIP_MODULES, default test_rotary.py: it imports helpers
# that current transformers no longer has, see docs/upstream-suite.md) selects modules by file name.
#
# flash_attn comes from the installed wheels of .whl/fa when present (scripts/build_gpu_wheels.sh; installed
# into /tmp/fa_site, the flash-attn shim distribution included), else (or with UPSTREAM_FROM_SOURCE=1) from
# the source trees (PYTHONPATH).
#
# Environment: OUT (default /tmp/gpu_out): upstream-<ref>.json and upstream-<ref>.log go there;
#   UPSTREAM_SEED (default: drawn once and used for every ref), UPSTREAM_SAMPLE (cases per test function,
#   default 4; "all"), UPSTREAM_SAMPLE_OVERRIDES ("test_a=1,..."), UPSTREAM_REFS (default: every
#   .upstream/<ref>/ with a test_flash_attn.py), UPSTREAM_TIMEOUT (seconds per ref, default 240),
#   UPSTREAM_TEST_TIMEOUT (seconds per test with pytest-timeout, default 120), UPSTREAM_PYTEST_ARGS.
# Exit status: 0 when every ref's run passed (skips allowed), else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

if ! compgen -G ".upstream/*/test_flash_attn.py" >/dev/null; then
    echo "no .upstream/<ref>/test_flash_attn.py: run scripts/fetch_upstream_tests.sh and copy .upstream along" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------- flash_attn
SITE=""
if [ "${UPSTREAM_FROM_SOURCE:-0}" != 1 ] && compgen -G ".whl/fa/*.whl" >/dev/null; then
    rm -rf /tmp/fa_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa_site .whl/fa/*.whl || exit 1
    SITE=/tmp/fa_site
    echo "flash_attn: installed wheels of .whl/fa ($(ls .whl/fa | tr '\n' ' '))"
else
    SITE="$ROOT/packages/fa-core/src:$ROOT/packages/fa-backward/src:$ROOT/packages/fa-kvcache/src:$ROOT/packages/fa-compat/src"
    echo "flash_attn: source trees"
fi
EXTRA=""
if ! "$PY" -c "import einops" 2>/dev/null; then
    rm -rf /tmp/upstream_site
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/upstream_site .upstream/wheels/einops-*.whl || exit 1
    EXTRA=":/tmp/upstream_site"
fi
# the carried extras of scripts/gpu_run.sh (/tmp/site) stay last, as there
PYPATH="$SITE$EXTRA${PYTHONPATH:+:$PYTHONPATH}"

SEED="${UPSTREAM_SEED:-$("$PY" -c 'import secrets; print(secrets.randbits(31))')}"
TIMEOUT_ARGS=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS="--timeout=${UPSTREAM_TEST_TIMEOUT:-120}"

if [ -n "${UPSTREAM_REFS:-}" ]; then
    read -r -a REFS <<<"$UPSTREAM_REFS"
else
    REFS=()
    for f in .upstream/*/test_flash_attn.py; do REFS+=("$(basename "$(dirname "$f")")"); done
fi

status=0
for ref in "${REFS[@]}"; do
    dir=".upstream/$ref"
    # our plugin next to the module (pytest loads conftest.py from the test's folder); an empty ini there
    # makes that folder the rootdir, so the repository's own pytest settings do not apply
    cp tests/upstream/conftest.py "$dir/conftest.py"
    printf '[pytest]\n' >"$dir/pytest.ini"
    json="$OUT/upstream-$ref.json"
    log="$OUT/upstream-$ref.log"
    echo "===== upstream $ref (seed $SEED)"
    (
        cd "$dir" && PYTHONPATH="$PYPATH" UPSTREAM_SEED="$SEED" UPSTREAM_JSON="$json" FA_PLUS_AUTOTUNE=0 \
            timeout -k 10 "${UPSTREAM_TIMEOUT:-240}" "$PY" -m pytest ${UPSTREAM_MODULES:-$(ls test_*.py \
            | grep -vxF -f <(tr ' ' '\n' <<<"${UPSTREAM_SKIP_MODULES-test_rotary.py}"))} -q -rfEs \
            -p no:cacheprovider $TIMEOUT_ARGS ${UPSTREAM_PYTEST_ARGS:-}
    ) >"$log" 2>&1
    rc=$?
    tail -n 25 "$log"
    case $rc in
        0) echo "[upstream $ref] ok" ;;
        124 | 137) echo "[upstream $ref] TIMEOUT after ${UPSTREAM_TIMEOUT:-240}s (counts so far in $json)"; status=1 ;;
        *) echo "[upstream $ref] rc=$rc"; status=1 ;;
    esac
done
exit $status
