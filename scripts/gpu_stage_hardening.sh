#!/usr/bin/env bash
# GPU stage "hardening", for scripts/gpu_run.sh:   scripts/gpu_run.sh hardening@430
#
# Five parts run CONCURRENTLY on the one GPU (their compiles are CPU-bound and overlap), each under its own
# timeout (<= 400 s) so a hang cannot eat the others; the whole stage ends within ~410 s:
#   graphs     pytest packages/fa-compat/tests/test_gpu_graphs.py            (CUDA graphs vs eager, bitwise)
#   numerics   pytest packages/fa-compat/tests/test_numerics.py              (extremes, NaN/Inf, empty rows)
#   large      pytest packages/fa-compat/tests/test_gpu_large.py, ONE PROCESS PER TEST (an int32 overflow ends in
#              an illegal address that poisons the CUDA context)
#   soak       scripts/soak.py --calls $SOAK_CALLS (default 10000), stopped at its own time limit
#   sanitizer  scripts/sanitize_kernels.py plain (warms the Triton cache), then under compute-sanitizer memcheck
#              (PYTORCH_NO_CUDA_MEMORY_CACHING=1) and racecheck (--subset race)
#   oob        out-of-range index values with value checks off (cache_seqlens, block_table, cache_batch_idx,
#              leftpad_k, cu_seqlens, seqused_k): scripts/sanitize_kernels.py --subset oob plain, then under
#              compute-sanitizer memcheck (0 errors required), then the GPU fuzzers
#              test_fuzz.py -k out_of_range_values (FA_FUZZ_EXAMPLES=${OOB_FUZZ_EXAMPLES:-25}), fa-kvcache's
#              test_memory_safety.py (NaN guard regions) and the CUDA-graph replay with bad values (test_gpu.py)
# One part alone: scripts/gpu_stage_hardening.sh oob   (or graphs / numerics / large / soak / sanitizer)
# Logs: reports/gpu-hardening/*.log; summary: reports/<device>-hardening.md, copied to bench/results/ (packed by
# gpu_run.sh) and the logs to $OUT/logs/hardening/ when $OUT is set.
set -u -o pipefail
ONLY="${1:-}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export FA_PLUS_AUTOTUNE=0 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=reports/gpu-hardening
mkdir -p "$R"
rm -f "$R"/*.log "$R"/*.rc "$R"/*.xml
START=$(date +%s)

DEVICE=$("$PY" -c "import torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; \
print(next((g.lower() for g in ('H200', 'H100', 'A100', 'B200', 'L40S') if g in n), n.split()[-1].lower()))" 2>/dev/null)
DEVICE="${DEVICE:-gpu}"
NX=""
"$PY" -c "import xdist" 2>/dev/null && NX="-n 4"
PT="-q -p no:cacheprovider -rfEsx --durations=5"

# part NAME SECONDS COMMAND...: background job, log in $R/NAME.log, exit status in $R/NAME.rc
part() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [ "$ONLY" != "$name" ]; then return; fi
    (
        t0=$(date +%s)
        timeout -k 10 "$limit" bash -c "$*" >"$R/$name.log" 2>&1
        rc=$?
        echo "$rc $(($(date +%s) - t0))" >"$R/$name.rc"
    ) &
}

# ---------------------------------------------------------------------------------------------- parts
part graphs 240 "$PY -m pytest packages/fa-compat/tests/test_gpu_graphs.py $PT --junitxml=$R/graphs.xml"
part numerics 300 "$PY -m pytest packages/fa-compat/tests/test_numerics.py $PT $NX --junitxml=$R/numerics.xml"

large_tests="test_rows_past_int32_forward[tma] test_rows_past_int32_forward[pointers] test_rows_past_int32_backward \
test_batch_offset_past_int32 test_varlen_offset_past_int32 test_kvcache_past_int32[contiguous] test_kvcache_past_int32[paged]"
large_cmd=""
for t in $large_tests; do
    large_cmd+="echo '=== $t'; timeout -k 5 110 $PY -m pytest 'packages/fa-compat/tests/test_gpu_large.py::$t' $PT; echo \"=== rc \$? $t\"; "
done
part large 390 "$large_cmd"

part soak 330 "$PY scripts/soak.py --calls ${SOAK_CALLS:-10000} --max-seconds 300 --out $R"

SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
    san_cmd="echo '=== plain'; $PY scripts/sanitize_kernels.py; echo \"=== rc \$?\"; \
echo '=== memcheck'; PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 200 $SAN --tool memcheck --target-processes application-only \
--print-limit 50 $PY scripts/sanitize_kernels.py; echo \"=== rc \$?\"; \
echo '=== racecheck'; timeout -k 5 120 $SAN --tool racecheck --target-processes application-only --print-limit 50 \
$PY scripts/sanitize_kernels.py --subset race; echo \"=== rc \$?\""
else
    san_cmd="echo 'compute-sanitizer not found (PATH, /usr/local/cuda*/bin): plain run only'; $PY scripts/sanitize_kernels.py; echo \"=== rc \$?\""
fi
part sanitizer 400 "$san_cmd"

FZ="env FA_FUZZ_EXAMPLES=${OOB_FUZZ_EXAMPLES:-25} $PY -m pytest packages/fa-compat/tests/test_fuzz.py \
packages/fa-kvcache/tests/test_memory_safety.py packages/fa-kvcache/tests/test_gpu.py \
-k 'out_of_range or capacity_error or checks_off or value_checks or clamped' $PT"
if [ -n "$SAN" ]; then
    oob_cmd="echo '=== plain'; $PY scripts/sanitize_kernels.py --subset oob; echo \"=== rc \$?\"; \
echo '=== memcheck'; PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 160 $SAN --tool memcheck --target-processes application-only \
--print-limit 50 $PY scripts/sanitize_kernels.py --subset oob; echo \"=== rc \$?\"; \
echo '=== fuzz'; timeout -k 5 170 $FZ; echo \"=== rc \$?\""
else
    oob_cmd="echo 'compute-sanitizer not found (PATH, /usr/local/cuda*/bin): plain run and fuzz only'; \
$PY scripts/sanitize_kernels.py --subset oob; echo \"=== rc \$?\"; echo '=== fuzz'; timeout -k 5 170 $FZ; echo \"=== rc \$?\""
fi
part oob 400 "$oob_cmd"

# every part has its own timeout (all <= 400 s): the stage ends within ~410 s
wait

# ---------------------------------------------------------------------------------------------- summary
verdict() {  # NAME -> "ok (Ns)" / "FAILED rc=R (Ns)" / "TIMEOUT (Ns)" / "did not finish"
    [ -f "$R/$1.rc" ] || { echo "did not finish"; return; }
    read -r rc secs <"$R/$1.rc"
    case $rc in 0) echo "ok (${secs}s)" ;; 124 | 137) echo "TIMEOUT (${secs}s)" ;; *) echo "FAILED rc=$rc (${secs}s)" ;; esac
}
pytest_line() { grep -E "[0-9]+ (passed|failed|error|skipped)|no tests ran" "$1" 2>/dev/null | tail -1; }
MD="reports/${DEVICE}-hardening.md"
{
    echo "# Hardening on the GPU ($("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null), $(date -u +%F))"
    echo
    echo "Stage \`scripts/gpu_stage_hardening.sh\`, FA_PLUS_AUTOTUNE=0, $(( $(date +%s) - START ))s in all; logs in \`$R/\`."
    echo
    echo "| part | verdict | result |"
    echo "|---|---|---|"
    echo "| CUDA graphs (fwd, fwd+bwd, varlen, decode contiguous/paged; bitwise vs eager) | $(verdict graphs) | $(pytest_line $R/graphs.log) |"
    echo "| numerics extremes (test_numerics.py on the GPU) | $(verdict numerics) | $(pytest_line $R/numerics.log) |"
    echo "| > 2^31 elements (one process per test) | $(verdict large) | $(grep -c '=== rc 0 ' $R/large.log 2>/dev/null) of $(echo $large_tests | wc -w) passed |"
    echo "| soak | $(verdict soak) | $(grep -E '^- calls' $R/soak.log 2>/dev/null | sed 's/^- //') |"
    echo "| sanitizer | $(verdict sanitizer) | $(grep -E 'ERROR SUMMARY' $R/sanitizer.log 2>/dev/null | tr '\n' ';') |"
    echo "| out-of-range index values, checks off (memcheck + GPU fuzz) | $(verdict oob) | $(grep -E 'ERROR SUMMARY|launch set|[0-9]+ (passed|failed)' $R/oob.log 2>/dev/null | tr '\n' ';') |"
    echo
    echo "## > 2^31 elements"
    echo
    echo '```'
    grep -E "^=== rc|^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|error)|Error:|error:" "$R/large.log" 2>/dev/null | head -60
    echo '```'
    echo
    echo "## Soak"
    echo
    sed "s/^# /### /" "$R/soak.md" 2>/dev/null || echo "(no soak.md)"
    echo
    echo "## Sanitizer"
    echo
    echo "compute-sanitizer: ${SAN:-not found}"
    echo
    echo '```'
    grep -E "^=== |ERROR SUMMARY|RACECHECK SUMMARY|launch set|Invalid|Race reported|FAILED" "$R/sanitizer.log" 2>/dev/null | head -40
    echo '```'
    echo
    echo "## Out-of-range index values (value checks off)"
    echo
    echo '```'
    grep -E "^=== |ERROR SUMMARY|launch set|Invalid|FAILED|refused|[0-9]+ (passed|failed|skipped)" "$R/oob.log" 2>/dev/null | head -40
    echo '```'
    echo
    echo "## Failures (pytest)"
    echo
    echo '```'
    grep -hE "^(FAILED|ERROR|XPASS) " "$R"/graphs.log "$R"/numerics.log "$R"/large.log "$R"/oob.log 2>/dev/null | head -40
    echo '```'
} >"$MD"
cat "$MD"
mkdir -p bench/results
cp "$MD" "bench/results/${DEVICE}-hardening.md"
[ -f "$R/soak.json" ] && cp "$R/soak.json" "bench/results/${DEVICE}-soak.json"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/logs/hardening" && cp "$R"/*.log "$R"/*.xml "$OUT/logs/hardening/" 2>/dev/null
fi
# exit status: every part finished with 0
for p in graphs numerics large soak sanitizer oob; do
    if [ -n "$ONLY" ] && [ "$ONLY" != "$p" ]; then continue; fi
    [ -f "$R/$p.rc" ] && [ "$(cut -d' ' -f1 "$R/$p.rc")" = 0 ] || exit 1
done
for p in large sanitizer oob; do
    grep -q "=== rc [^0]" "$R/$p.log" 2>/dev/null && exit 1
done
grep -qE "(ERROR|RACECHECK) SUMMARY: [1-9]" "$R/sanitizer.log" "$R/oob.log" 2>/dev/null && exit 1
exit 0
