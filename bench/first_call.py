"""First-call latency of the public forward and fwd+bwd per shape bucket: the compile cost a user pays once.

A kernel is compiled once per specialization (head dim, mask flags, sequence-length bucket, dtype, alignment) and
kept in Triton's on-disk cache; the first call of a process also autotunes the Triton (``tl``) kernels where
autotuning is on. For each bucket this script starts a fresh Python process twice:

* ``cold``: with an empty Triton cache directory (``TRITON_CACHE_DIR`` set to a new temporary folder): compile,
  autotune and run, as on a fresh machine;
* ``warm``: again with that now-filled cache: load the compiled kernels from disk and run, as every later
  process of the same user.

Each child times its first call (``flash_attn.flash_attn_func`` on bf16 inputs, batch * seqlen = 16k tokens,
hidden 2048; ``fwd``: inputs without grad, ``fwd_bwd``: forward + ``torch.autograd.grad``) and, for reference,
the steady-state time of the same call. Buckets: head dim 64 / 128, causal or not, seqlen 2k and 16k (the
Gluon forward takes both on sm_90: ``fa_core.ops.GLUON_MIN_FLOPS``). Rows
``{"bench": "first_call", "provider": "fa-plus", "call", "headdim", "causal", "seqlen", "cold_s", "warm_s", "steady_ms"}`` go to
``bench/results/<gpu>-first-call.{json,md}``.

    python bench/first_call.py
    python bench/first_call.py --headdims 128 --seqlens 16384 --calls fwd

Run from the repository root with
PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-kvcache/src:packages/fa-compat/src.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import install_sigterm_handler, progress, write_results  # noqa: E402

KIND = "first-call"
TOKENS, HIDDEN = 16384, 2048

_CHILD = rf"""
import json, sys, time, torch
from flash_attn import flash_attn_func
call, d, causal, s = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
b, h = max(1, {TOKENS} // s), {HIDDEN} // d
grad = call == "fwd_bwd"
q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
if grad:
    q, k, v = (t.requires_grad_() for t in (q, k, v))

def step():
    out = flash_attn_func(q, k, v, causal=causal)
    if grad:
        torch.autograd.grad(out, (q, k, v), do)

torch.cuda.synchronize()
t0 = time.perf_counter()
step()
torch.cuda.synchronize()
first = time.perf_counter() - t0
for _ in range(3):
    step()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(10):
    step()
torch.cuda.synchronize()
print(json.dumps({{"first_s": first, "steady_ms": (time.perf_counter() - t0) / 10 * 1e3}}))
"""


def _child(call: str, d: int, causal: bool, s: int, cache_dir: str, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, call, str(d), "1" if causal else "0", str(s)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--seqlens", default="2048,16384")
    ap.add_argument("--calls", default="fwd,fwd_bwd")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    ap.add_argument("--no-merge", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("first_call.py times compiles on a GPU; nothing to do without one")
        return 0
    install_sigterm_handler()
    points = [
        (call, int(d), causal, int(s))
        for call in args.calls.split(",")
        for d in args.headdims.split(",")
        for causal in (False, True)
        for s in args.seqlens.split(",")
    ]
    rows: list[dict[str, Any]] = []
    try:
        for call, d, causal, s in progress(points, desc="first call"):
            row: dict[str, Any] = dict(
                bench="first_call", provider="fa-plus", call=call, headdim=d, causal=causal, seqlen=s
            )
            with tempfile.TemporaryDirectory(prefix="fa-plus-triton-cache-") as cache_dir:
                cold = _child(call, d, causal, s, cache_dir, args.timeout)
                warm = _child(call, d, causal, s, cache_dir, args.timeout) if "error" not in cold else cold
            if "error" in cold or "error" in warm:
                row["error"] = cold.get("error") or warm.get("error")
            else:
                row.update(
                    cold_s=round(cold["first_s"], 2),
                    warm_s=round(warm["first_s"], 3),
                    steady_ms=round(warm["steady_ms"], 3),
                )
            rows.append(row)
            print(row, flush=True)
    finally:
        if rows:
            path = write_results(
                KIND, rows, merge=not args.no_merge,
                table_kw={"metric": "cold_s", "title": "first-call latency per shape bucket (s)"},
            )  # fmt: skip
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
