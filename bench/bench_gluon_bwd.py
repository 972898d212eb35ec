"""The backward's passes on Hopper: the Triton (tl) kernels that :mod:`fa_backward.launch` runs vs the Gluon
kernels (:mod:`fa_backward.gluon_dkdv`, :mod:`fa_backward.gluon_dq`), and the public fwd+bwd with the Gluon
passes dispatched.

Shapes: FlashAttention-paper sweep (batch * seqlen = 16k tokens, hidden 2048, nheads = 2048 / headdim),
headdim 64/128, seqlen 2k/8k/16k, causal and not, bf16. ``triton.testing.do_bench`` medians. Rows:

* ``bench: dkdv``: the dK/dV launch alone on the same lse2 / delta (computed as the tl dQ pass writes them:
  ``lse * log2(e)`` and ``rowsum(dout * out)``); the tl one through ``fa_backward.launch._launches`` with the dQ
  launch skipped (autotuned as in training). TFLOP/s of the pass = 8 * b * h * s^2 * d (4 matmuls; halved
  when causal) / t; gluon rows carry ``rel_err`` (max |d_gluon - d_tl| over max |d_tl|, dk and dv).
* ``bench: dq``: the dQ pass alone (it also writes delta and lse2); the tl one with the dK/dV launch skipped.
  TFLOP/s = 6 * b * h * s^2 * d (3 matmuls; halved when causal) / t; gluon rows carry ``rel_err`` of dq.
* ``bench: fwd_bwd``: ``flash_attn_func`` forward + ``torch.autograd.grad`` (inputs requiring grad, as in
  training), providers ``triton`` (both thresholds None), ``gluon-dkdv`` (``GLUON_DKDV_MIN_FLOPS = 0``) and
  ``gluon`` (both 0): the measurement that sets :data:`fa_backward.launch.GLUON_DQ_MIN_FLOPS` /
  ``GLUON_DKDV_MIN_FLOPS``. TFLOP/s = 3.5 x the forward's FLOPs / t.

Writes bench/results/<device>-gluon-backward.{json,md}.

    PYTHONPATH=packages/fa-core/src:packages/fa-backward/src python bench/bench_gluon_bwd.py
    PYTHONPATH=... python bench/bench_gluon_bwd.py --headdims 128 --seqlens 16384 --causal 1 --benches dq
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

from common import Row, bench_ms, flops, install_sigterm_handler, try_provider, write_results  # noqa: E402

KIND = "gluon-backward"
LOG2E = 1.4426950408889634


@contextlib.contextmanager
def _skipped(attr: str) -> Iterator[Any]:
    """``fa_backward.launch`` with one of its launches (``dq_launch`` / ``dkdv_launch``) replaced by a no-op:
    ``_launches`` then runs the other pass alone."""
    from fa_backward import launch

    saved = getattr(launch, attr)
    setattr(launch, attr, lambda *args, **kwargs: None)
    try:
        yield launch
    finally:
        setattr(launch, attr, saved)


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


def _tl_pass(x: dict[str, Any], launch: Any) -> None:
    """``launch._launches`` on the prepared buffers: the tl pass that is not skipped (see :func:`_skipped`)."""
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


def _one(cfg: Row, flop: float, x: dict[str, Any], launch: Any) -> list[Row]:
    """The two rows (triton, gluon) of the dK/dV pass of one shape (inputs ``x``, see :func:`_inputs`)."""
    from fa_backward import gluon_dkdv

    row = try_provider(dict(cfg, provider="triton"), lambda: bench_ms(lambda: _tl_pass(x, launch)), flop)
    dk, dv = torch.empty_like(x["k"]), torch.empty_like(x["v"])
    grow: Row = dict(cfg, provider="gluon")
    if not gluon_dkdv.supports(x["q"], x["k"], x["v"], x["dout"], x["lse2"], x["delta"], dk, dv):
        grow.update(ms=None, tflops=None, error="gluon_dkdv.supports: False")
        return [row, grow]
    grow = try_provider(grow, lambda: bench_ms(lambda: _gluon_dkdv(x, dk, dv)), flop)
    if not grow.get("error"):
        _tl_pass(x, launch)
        _gluon_dkdv(x, dk, dv)
        den = max(x["dk"].abs().max().item(), x["dv"].abs().max().item(), 1e-30)
        err = max((dk - x["dk"]).abs().max().item(), (dv - x["dv"]).abs().max().item())
        grow["rel_err"] = float(f"{err / den:.3g}")
    return [row, grow]


def _one_dq(cfg: Row, flop: float, x: dict[str, Any]) -> list[Row]:
    """The two rows (triton, gluon) of the dQ pass of one shape."""
    from fa_backward import gluon_dq

    with _skipped("dkdv_launch") as launch:
        row = try_provider(dict(cfg, provider="triton"), lambda: bench_ms(lambda: _tl_pass(x, launch)), flop)
        _tl_pass(x, launch)  # x["dq"]: the tl pass's
    dq = torch.empty_like(x["q"])
    args = (x["q"], x["k"], x["v"], x["out"], x["dout"], x["lse"], dq)
    grow: Row = dict(cfg, provider="gluon")
    if not gluon_dq.supports(*args, causal=x["causal"]):
        grow.update(ms=None, tflops=None, error="gluon_dq.supports: False")
        return [row, grow]

    def gluon() -> None:
        gluon_dq.dq_pass(*args, causal=x["causal"], softmax_scale=x["scale"])

    grow = try_provider(grow, lambda: bench_ms(gluon), flop)
    if not grow.get("error"):
        gluon()
        den = max(x["dq"].abs().max().item(), 1e-30)
        grow["rel_err"] = float(f"{(dq - x['dq']).abs().max().item() / den:.3g}")
    return [row, grow]


def _one_public(cfg: Row, flop: float, x: dict[str, Any]) -> list[Row]:
    """``flash_attn_func`` forward + backward with the tl passes, the Gluon dK/dV pass, and both Gluon passes."""
    from fa_backward import launch
    from flash_attn import flash_attn_func

    q, k, v = (x[n].detach().requires_grad_() for n in ("q", "k", "v"))

    def step() -> Any:
        return torch.autograd.grad(flash_attn_func(q, k, v, causal=x["causal"]), (q, k, v), x["dout"])

    rows = []
    saved = launch.GLUON_DQ_MIN_FLOPS, launch.GLUON_DKDV_MIN_FLOPS
    try:
        for provider, dq_min, dkdv_min in (
            ("triton", None, None),
            ("gluon-dkdv", None, 0.0),
            ("gluon", 0.0, 0.0),
        ):
            launch.GLUON_DQ_MIN_FLOPS, launch.GLUON_DKDV_MIN_FLOPS = dq_min, dkdv_min
            rows.append(try_provider(dict(cfg, provider=provider), lambda: bench_ms(step), flop))
    finally:
        launch.GLUON_DQ_MIN_FLOPS, launch.GLUON_DKDV_MIN_FLOPS = saved
    return rows


def run(
    headdims: list[int],
    seqlens: list[int],
    causals: list[bool],
    dtype: torch.dtype,
    benches: list[str],
    rows: list[Row],
) -> list[Row]:
    """Time every shape, appending its rows to ``rows`` as each shape finishes (a run stopped by its time limit
    keeps what it measured)."""
    for d in headdims:
        for seqlen in seqlens:
            for causal in causals:
                batch, nheads = max(1, 16384 // seqlen), 2048 // d
                shape: Row = dict(dtype=str(dtype).replace("torch.", ""), headdim=d, seqlen=seqlen, batch=batch,
                                  nheads=nheads, causal=causal)  # fmt: skip
                fwd = flops(batch, seqlen, seqlen, nheads, d, causal, "fwd")
                # one set of inputs (and one forward) for every bench of the shape; the tl dQ pass rewrites
                # delta / lse2 with the values _inputs computed, after the dK/dV rows have used them
                x = _inputs(batch, seqlen, nheads, d, causal, dtype)
                found: list[Row] = []
                if "dkdv" in benches:
                    with _skipped("dq_launch") as launch:
                        found += _one(dict(shape, bench="dkdv"), 2.0 * fwd, x, launch)
                if "dq" in benches:
                    found += _one_dq(dict(shape, bench="dq"), 1.5 * fwd, x)
                if "fwd_bwd" in benches:
                    found += _one_public(dict(shape, bench="fwd_bwd"), 3.5 * fwd, x)
                del x
                for row in found:
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
    ap.add_argument("--benches", default="dkdv,dq,fwd_bwd", help="comma list out of dkdv, dq, fwd_bwd")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (sm_90 for the Gluon kernel)")
    dtype = getattr(torch, args.dtype)
    install_sigterm_handler()
    rows: list[Row] = []
    try:
        run(
            [int(x) for x in args.headdims.split(",")],
            [int(x) for x in args.seqlens.split(",")],
            [bool(int(x)) for x in args.causal.split(",")],
            dtype,
            [b.strip() for b in args.benches.split(",") if b.strip()],
            rows,
        )
    finally:
        if rows:
            path = write_results(
                KIND,
                rows,
                table_kw={"title": f"backward passes, Triton vs Gluon ({args.dtype})", "ours": "gluon"},
            )
            print(f"wrote {path} and {path.with_suffix('.md')} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
