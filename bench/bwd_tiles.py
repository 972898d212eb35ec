"""Backward tile tuner: every tile config of the dQ and dK/dV kernels timed alone, next to FlexAttention's backward.

The autotuner already times every config of each kernel; this script records those timings (Triton's
``Autotuner.configs_timings``, median ms of each config) for plain causal attention and for the relative-bias
score_mod, plus candidate tiles outside the shipped spaces (``--extra``), and times the whole backward (ours vs
flex, the forward done once outside the timed region) in the same process. The spaces in
``fa_backward.backward_configs`` are set from its results. bf16, headdim 128, 16 heads, batch * seqlen =
32k tokens (as ``bench_sparse.py``). Rows go to ``bench/results/<device>-bwd-tiles.json``.

    python bench/bwd_tiles.py --seqlens 8192 16384 --cases causal relbias --extra

GPU only (the timings are the point); ~60-90 s per (case, seqlen) with ``--extra``, compiles included.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from common import bench_ms, install_sigterm_handler, progress, write_json  # noqa: E402

from fa_backward import backward_kernel as bk  # noqa: E402
from fa_backward.programmable import attention  # noqa: E402
from fa_core import score_mods as sm  # noqa: E402
from fa_core import settings  # noqa: E402

#: candidate tiles outside the shipped spaces: mostly one warpgroup per program (4 warps), small enough that two
#: programs share an SM (registers <= 255 per thread, shared memory <= ~110 KB), so one program's softmax work
#: can run under the other's MMAs; plus a 3-stage 128 x 128 dQ tile (it did not launch on the H200: ms None)
EXTRA_DKDV = [(32, 64, 4, 3), (64, 64, 4, 3)]
EXTRA_DQ = [(64, 64, 4, 2), (128, 128, 8, 3)]


def _configs(space: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in space]


def _timings(kernel: Any) -> list[dict[str, Any]]:
    out = []
    for cfg, t in (getattr(kernel, "configs_timings", None) or {}).items():
        ms = t[0] if isinstance(t, (list, tuple)) else t
        kw = cfg.kwargs
        out.append(
            {
                "tile": f"{kw['BLOCK_M']}x{kw['BLOCK_N']}/{cfg.num_warps}w/{cfg.num_stages}s",
                "ms": None if ms is None or ms != ms or ms == float("inf") else round(float(ms), 4),
            }
        )
    return sorted(out, key=lambda r: r["ms"] if r["ms"] is not None else 1e9)


def _flex_backward(q, k, v, dout, score_mod):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    s = q.shape[1]
    bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, B=None, H=None, Q_LEN=s, KV_LEN=s, device=q.device)
    fn = torch.compile(flex_attention, dynamic=False)
    o = fn(qt, kt, vt, score_mod=score_mod, block_mask=bm).transpose(1, 2)
    return o, (qt, kt, vt)


def run_case(
    rows: list[dict[str, Any]], case: str, s: int, tma: list[str], h: int = 16, d: int = 128
) -> None:
    """Rows of one (case, seqlen): every config of both kernels, then our backward and flex's; our rows once
    per value in ``tma`` (``"1"`` / ``"0"``: tensor-descriptor loads on / off, the ``tma`` setting)."""
    b = max(1, 32768 // s)
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"
    )
    dout = torch.randn_like(q)
    kw: dict[str, Any] = {"causal": True}
    flex_mod = None
    if case == "relbias":
        kw.update(score_mod=sm.relative_position_bias, score_mod_grad=sm.additive_grad)
        flex_mod = sm.relative_position_bias_torch
    flop = 2.5 * 4.0 * d * b * h * s * (s + 1) / 2  # backward: 2.5x the forward's matmul FLOPs
    base = {"case": case, "batch": b, "seqlen": s, "nheads": h, "headdim": d}
    o = attention(q, k, v, **kw)[0]
    for t in tma:
        with settings.override(tma=t == "1"):
            torch.autograd.grad(o, (q, k, v), dout, retain_graph=True)  # autotunes both kernels for this key
            for name, kern in (("dq", bk.dq_kernel), ("dkdv", bk.dkdv_kernel)):
                for r in _timings(kern):
                    rows.append(dict(base, bench="kernel", kernel=name, tma=t, **r))
            ours = bench_ms(
                lambda: torch.autograd.grad(o, (q, k, v), dout, retain_graph=True), warmup=10, rep=40
            )
        rows.append(
            dict(base, bench="backward", provider="fa-plus", tma=t, ms=ours, tflops=flop / ours * 1e-9)
        )
    try:
        fo, leaves = _flex_backward(q, k, v, dout, flex_mod)
        torch.autograd.grad(fo, leaves, dout, retain_graph=True)
        fx = bench_ms(lambda: torch.autograd.grad(fo, leaves, dout, retain_graph=True), warmup=10, rep=40)
        rows.append(dict(base, bench="backward", provider="flex", ms=fx, tflops=flop / fx * 1e-9))
    except Exception as e:  # noqa: BLE001  (flex missing or failing: our rows still count)
        rows.append(dict(base, bench="backward", provider="flex", ms=None, error=repr(e)[:200]))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="*", default=[8192, 16384])
    ap.add_argument("--cases", nargs="*", default=["causal", "relbias"])
    ap.add_argument(
        "--extra", action="store_true", help="also time the candidate tiles EXTRA_DKDV / EXTRA_DQ"
    )
    ap.add_argument("--tma", nargs="*", default=["1"], help="tensor-descriptor loads off / on (0 1)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bwd_tiles.py times GPU kernels: no CUDA device here")
        return
    install_sigterm_handler()
    if args.extra:
        bk.dkdv_kernel.configs = list(bk.dkdv_kernel.configs) + _configs(EXTRA_DKDV)
        bk.dq_kernel.configs = list(bk.dq_kernel.configs) + _configs(EXTRA_DQ)
    rows: list[dict[str, Any]] = []
    for case, s in progress([(c, s) for s in args.seqlens for c in args.cases], desc="bwd tiles"):
        first = len(rows)
        run_case(rows, case, s, args.tma)
        for r in rows[first:]:
            keys = ("bench", "kernel", "provider", "tma", "tile", "ms", "tflops", "error")
            print({k_: r.get(k_) for k_ in keys})
        torch.cuda.empty_cache()
    print(write_json("bwd-tiles", rows))


if __name__ == "__main__":
    main()
