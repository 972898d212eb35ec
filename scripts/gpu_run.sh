#!/usr/bin/env bash
# One entry point for a run on a GPU machine: install the carried wheels, set PYTHONPATH, print the
# environment, run the selected stages (each under its own timeout and inside one overall budget), and pack
# everything into $OUT/results.tar.gz plus a short $OUT/summary.txt.
#
#   scripts/gpu_run.sh [STAGE[@SECONDS] ...]          (default: tests bench-forward)
#
# Stages:  tests            pytest -m gpu over fa-core, fa-backward, fa-kvcache (FA_REQUIRE_FLAGGEMS=1)
#          compat           scripts/gpu_stage_compat.sh: fa-compat GPU + HF tests on installed wheels
#          bench-forward    bench/bench_forward.py --check         bench-forward-quick: ... --quick --check
#          bench-backward   bench/bench_backward.py                bench-decode: bench/bench_decode.py
#          hf               scripts/hf_check.py (if present)
#          NAME             scripts/gpu_stage_NAME.sh if it exists
#          "any command"    an argument with a space runs as a shell command (stage cmd1, cmd2, ...)
# A trailing @SECONDS sets that stage's timeout (e.g. tests@240, "python3 x.py@60").
#
# Environment: OUT (default /tmp/gpu_out), GPU_RUN_BUDGET (seconds for the whole script, default 560: the
# runs are capped at 600 s there), PYTEST_ARGS (extra pytest arguments), MAXFAIL (default 30).
# Exit status: 0 when every stage passed, else 1 (see summary.txt).
set -u -o pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/gpu_out}"
BUDGET="${GPU_RUN_BUDGET:-560}"
START=$(date +%s)
LOGS="$OUT/logs"
mkdir -p "$LOGS"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 FA_REQUIRE_FLAGGEMS=1
PY="${PYTHON:-python3}"
STATUS=0

say() { echo "$*" | tee -a "$SUMMARY"; }
remaining() { echo $((BUDGET - ($(date +%s) - START))); }

pack() {
    # results + logs -> one tarball (few files come back from $OUT)
    trap - EXIT TERM INT
    local stage_dir
    stage_dir="$(mktemp -d)"  # unique: two runners may pack at once (one per GPU)
    rm -rf "$stage_dir" && mkdir -p "$stage_dir"
    cp -r "$LOGS" "$stage_dir/logs" 2>/dev/null
    [ -d bench/results ] && cp -r bench/results "$stage_dir/results" 2>/dev/null
    [ -d reports ] && cp -r reports "$stage_dir/reports" 2>/dev/null
    cp "$SUMMARY" "$stage_dir/" 2>/dev/null
    if tar -C "$stage_dir" -czf "$OUT/results.tar.gz" . 2>/dev/null; then
        rm -rf "$LOGS"
    fi
    say "total $(($(date +%s) - START))s; exit status $STATUS; files: results.tar.gz (logs/, results/), summary.txt"
    exit "$STATUS"
}
trap 'STATUS=1; say "interrupted"; pack' TERM INT
trap pack EXIT

# ------------------------------------------------------------------------------------------ wheels
# Install only distributions the machine lacks, so its own torch/numpy/packaging/... always win; /tmp/site
# goes at the END of PYTHONPATH.
if compgen -G ".whl/*.whl" >/dev/null; then
    missing=()
    for w in .whl/*.whl; do
        dist=$(basename "$w" | cut -d- -f1)
        if ! "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
            missing+=("$w")
        fi
    done
    if ((${#missing[@]})); then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${missing[@]}" >"$LOGS/install.log" 2>&1; then
            say "installed into /tmp/site: $(for w in "${missing[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
        else
            say "WARNING: wheel install failed (see logs/install.log)"; tail -5 "$LOGS/install.log"
        fi
    fi
fi
SRC="packages/fa-core/src:packages/fa-backward/src:packages/fa-kvcache/src:packages/fa-compat/src:packages/fa-parallel/src"
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}:/tmp/site"

# ------------------------------------------------------------------------------------------ environment
{
    nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF' 2>&1
import torch, triton
print(f"python {__import__('sys').version.split()[0]}  torch {torch.__version__}  triton {triton.__version__}  "
      f"cuda {torch.version.cuda}  gpu {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
try:
    import flag_gems
    print(f"flag_gems {flag_gems.__version__}")
except Exception as exc:
    print(f"flag_gems unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
EOF
} | tee "$LOGS/env.log" | tee -a "$SUMMARY"

# ------------------------------------------------------------------------------------------ stages
has_timeout_plugin() { "$PY" -c "import pytest_timeout" 2>/dev/null; }

stage_command() {  # NAME -> command line on stdout (empty: unknown)
    case "$1" in
        tests)
            local extra="-p no:cacheprovider --maxfail=${MAXFAIL:-30} --durations=15"
            has_timeout_plugin && extra="$extra --timeout=300"
            # one tile config per kernel (no autotune timing) keeps the many test shapes cheap
            echo "FA_PLUS_AUTOTUNE=0 $PY -m pytest packages/fa-core/tests packages/fa-backward/tests packages/fa-kvcache/tests -m gpu -q $extra --junitxml=$LOGS/junit-tests.xml ${PYTEST_ARGS:-}" ;;
        bench-forward) echo "$PY bench/bench_forward.py --check" ;;
        bench-forward-quick) echo "$PY bench/bench_forward.py --quick --check" ;;
        bench-backward) echo "$PY bench/bench_backward.py" ;;
        bench-decode) echo "$PY bench/bench_decode.py" ;;
        hf) echo "$PY scripts/hf_check.py" ;;
        *) [ -f "scripts/gpu_stage_$1.sh" ] && echo "bash scripts/gpu_stage_$1.sh" ;;
    esac
}

default_timeout() {
    case "$1" in
        tests) echo 300 ;; bench-forward) echo 300 ;; bench-forward-quick) echo 120 ;;
        bench-backward) echo 240 ;; bench-decode) echo 180 ;; *) echo 240 ;;
    esac
}

[ $# -eq 0 ] && set -- tests bench-forward
ncmd=0
for arg in "$@"; do
    limit=""
    spec="$arg"
    if [[ "$spec" =~ ^(.*)@([0-9]+)$ ]]; then spec="${BASH_REMATCH[1]}"; limit="${BASH_REMATCH[2]}"; fi
    if [[ "$spec" == *" "* ]]; then
        ncmd=$((ncmd + 1)); name="cmd$ncmd"; cmd="$spec"
    else
        name="$spec"; cmd="$(stage_command "$spec")"
    fi
    if [ -z "$cmd" ]; then
        say "[$name] SKIPPED: unknown stage (no built-in, no scripts/gpu_stage_$name.sh)"; STATUS=1; continue
    fi
    script=$(echo "$cmd" | awk '{print $2}')
    if [[ "$cmd" == "$PY "* && "$script" == *.py && ! -f "$script" ]]; then
        say "[$name] SKIPPED: $script does not exist"; continue
    fi
    limit="${limit:-$(default_timeout "$name")}"
    left=$(($(remaining) - 15))
    if ((left < 20)); then say "[$name] SKIPPED: overall budget of ${BUDGET}s used up"; STATUS=1; continue; fi
    ((limit > left)) && limit=$left
    echo "===== [$name] (timeout ${limit}s): $cmd" | tee "$LOGS/$name.log"
    t0=$(date +%s)
    timeout -k 10 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    dt=$(($(date +%s) - t0))
    case $rc in
        0) verdict="ok" ;; 124 | 137) verdict="TIMEOUT after ${limit}s" ;; *) verdict="FAILED rc=$rc" ;;
    esac
    ((rc != 0)) && STATUS=1
    say "[$name] $verdict (${dt}s)"
    if [ "$name" = tests ]; then  # pytest's last summary line
        grep -E "(passed|failed|error|skipped|no tests ran)" "$LOGS/$name.log" | tail -1 | sed 's/^/    /' | tee -a "$SUMMARY"
        grep -E "^(FAILED|ERROR) " "$LOGS/$name.log" | head -40 | sed 's/^/    /' >>"$SUMMARY"
    fi
done
exit "$STATUS"
