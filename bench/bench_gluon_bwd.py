"""The dK/dV pass of the backward: the Triton (tl) kernel that :mod:`fa_backward.launch` runs vs the Hopper
Gluon kernel (:mod:`fa_backward.gluon_dkdv`), on the same lse2 / delta (computed as the tl dQ pass writes
them: ``lse * log2(e)`` and ``rowsum(dout * out)``).

Shapes: FlashAttention-paper sweep (batch * seqlen = 16k tokens, hidden 2048, nheads = 2048 / headdim),
headdim 64/128, seqlen 2k/8k/16k, causal and not, bf16. ``triton.testing.do_bench`` median of the dK/dV
launch alone (the tl one through ``fa_backward.launch._launches`` with the dQ launch skipped, autotuned as in
training); TFLOP/s of the pass = 8 * b * h * s^2 * d (4 matmuls; halved when causal) / t. Each gluon row
carries ``rel_err``: max |dk_gluon - dk_tl| and |dv_gluon - dv_tl| over max |dk_tl|, |dv_tl|.
Writes bench/results/<device>-gluon-backward.{json,md}.

    PYTHONPATH=packages/fa-core/src:packages/fa-backward/src python bench/bench_gluon_bwd.py
    PYTHONPATH=... python bench/bench_gluon_bwd.py --headdims 128 --seqlens 16384 --causal 1
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, bench_ms, flops, try_provider, write_results  # noqa: E402

KIND = "gluon-backward"
LOG2E = 1.4426950408889634


@contextlib.contextmanager
def _dq_skipped() -> Iterator[Any]:
    """``fa_backward.launch`` with its dQ launch replaced by a no-op: ``_launches`` then runs dK/dV alone."""
    from fa_backward import launch

    saved = launch.dq_launch
    launch.dq_launch = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        yield launch
    finally:
        launch.dq_launch = saved


def _inputs(batch: int, seqlen: int, nheads: int, d: int, causal: bool, dtype: torch.dtype) -> dict[str, Any]:
    from fa_core.forward import flash_attn_forward

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(batch, seqlen, nheads, d, device="cuda", generator=gen).to(dtype) for _ in range(4)
    )
    scale = 1.0 / math.sqrt(d)
    fwd = flash_attn_forward(q, k, v, softmax_scale=scale, causal=causal)
    # delta = rowsum(dout * out) and the lse in log2 units, as the dQ pass writes them (computed here: the dQ
    # launch is switched off while the dK/dV passes are timed)
    delta = (dout.float() * fwd.out.float()).sum(-1).transpose(1, 2).contiguous()
    return dict(
        q=q, k=k, v=v, dout=dout, out=fwd.out, lse=fwd.lse, scale=scale, causal=causal,
        lse2=(fwd.lse * LOG2E).contiguous(), delta=delta, dq=torch.empty_like(q),
        dk=torch.empty_like(k), dv=torch.empty_like(v),
    )  # fmt: skip


def _tl_dkdv(x: dict[str, Any], launch: Any) -> None:
    q = x["q"]
    launch._launches(
        x["dout"], q, x["k"], x["v"], x["out"], x["lse"], x["dq"], x["dk"], x["dv"], x["delta"], x["lse2"], None,
        varlen=False, batch=q.shape[0], max_seqlen_q=q.shape[1], max_seqlen_k=x["k"].shape[1], cu_seqlens_q=None,
        cu_seqlens_k=None, seqused_k=None, softmax_scale=x["scale"], causal=x["causal"], window=(-1, -1),
        softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_state=None, attention_chunk=0, score_mod=None,
        score_mod_grad=None, mask_mod=None, block_mask=None,
    )  # fmt: skip


def _gluon_dkdv(x: dict[str, Any], dk: torch.Tensor, dv: torch.Tensor) -> None:
    from fa_backward import gluon_dkdv

    gluon_dkdv.dkdv(
        x["q"], x["k"], x["v"], x["dout"], x["lse2"], x["delta"], dk, dv, causal=x["causal"],
        softmax_scale=x["scale"],
    )  # fmt: skip


def _one(cfg: Row, flop: float, launch: Any) -> list[Row]:
    """The two rows (triton, gluon) of one shape."""
    from fa_backward import gluon_dkdv

    x = _inputs(
        cfg["batch"],
        cfg["seqlen"],
        cfg["nheads"],
        cfg["headdim"],
        cfg["causal"],
        getattr(torch, cfg["dtype"]),
    )
    row = try_provider(dict(cfg, provider="triton"), lambda: bench_ms(lambda: _tl_dkdv(x, launch)), flop)
    dk, dv = torch.empty_like(x["k"]), torch.empty_like(x["v"])
    grow: Row = dict(cfg, provider="gluon")
    if not gluon_dkdv.supports(x["q"], x["k"], x["v"], x["dout"], x["lse2"], x["delta"], dk, dv):
        grow.update(ms=None, tflops=None, error="gluon_dkdv.supports: False")
        return [row, grow]
    grow = try_provider(grow, lambda: bench_ms(lambda: _gluon_dkdv(x, dk, dv)), flop)
    if not grow.get("error"):
        _tl_dkdv(x, launch)
        _gluon_dkdv(x, dk, dv)
        den = max(x["dk"].abs().max().item(), x["dv"].abs().max().item(), 1e-30)
        err = max((dk - x["dk"]).abs().max().item(), (dv - x["dv"]).abs().max().item())
        grow["rel_err"] = float(f"{err / den:.3g}")
    return [row, grow]


def run(headdims: list[int], seqlens: list[int], causals: list[bool], dtype: torch.dtype) -> list[Row]:
    rows: list[Row] = []
    with _dq_skipped() as launch:
        for d in headdims:
            for seqlen in seqlens:
                for causal in causals:
                    batch, nheads = max(1, 16384 // seqlen), 2048 // d
                    cfg: Row = dict(bench="dkdv", dtype=str(dtype).replace("torch.", ""), headdim=d, seqlen=seqlen,
                                    batch=batch, nheads=nheads, causal=causal)  # fmt: skip
                    flop = 2.0 * flops(batch, seqlen, seqlen, nheads, d, causal, "fwd")
                    for row in _one(cfg, flop, launch):
                        rows.append(row)
                        print(row, flush=True)
                    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--seqlens", default="2048,8192,16384")
    ap.add_argument("--causal", default="0,1", help="comma list of 0/1")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (sm_90 for the Gluon kernel)")
    dtype = getattr(torch, args.dtype)
    rows = run(
        [int(x) for x in args.headdims.split(",")],
        [int(x) for x in args.seqlens.split(",")],
        [bool(int(x)) for x in args.causal.split(",")],
        dtype,
    )
    path = write_results(
        KIND, rows, table_kw={"title": f"dK/dV pass, Triton vs Gluon ({args.dtype})", "ours": "gluon"}
    )
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
