"""Programmable attention benchmark: block-sparse masks and score_mods vs FlexAttention, sinks and
chunking vs our own dense kernel. bf16, headdim 128, 16 heads, batch * seqlen = 32k tokens.

Patterns (rows ``"pattern"``, ``"density"`` = visible elements / all elements):

* ``random10`` / ``random30`` / ``random50``: random 128 x 128 block masks per head (every listed block full,
  the diagonal block always listed), non-causal;
* ``window_global``: causal sliding window of 1024 keys plus 64 global keys (partial blocks evaluate the
  mask_mod, the others are full);
* ``document``: causal document masking, documents of random lengths that are multiples of 128 tokens;
* ``relbias``: causal, ``score_mod`` = relative position bias (:func:`fa_core.score_mods.relative_position_bias`);
* ``sink``: causal with learnable sinks, ``"fa-plus"`` vs ``"fa-plus-dense"`` (same kernel, no sink);
* ``chunk``: ``attention_chunk=4096`` causal, vs ``"fa-plus-dense"`` (plain causal).

FlexAttention gets the same block sparsity (random patterns: the same whole blocks, as full blocks through
``BlockMask.from_kv_blocks``; the others: its ``create_block_mask`` from the same mask, broadcast over batch and
heads, causal inside its mask_mod since it has no built-in causal) and the same score_mod, through
``torch.compile(flex_attention)``. TFLOP/s are counted on the visible elements only: fwd = 4 * d * visible,
fwd+bwd = 3.5 x that (``common.flops`` convention). Rows go to ``bench/results/<device>-sparse.json`` with
``"bench": "sparse_fwd"`` / ``"sparse_fwd_bwd"``; ``rel_err`` = max |ours - flex| / max |flex| on the output.

Run on the GPU (FA_PLUS_AUTOTUNE=0 is set by default: one tile per kernel, compiles dominate otherwise; pass
``--autotune`` to tune). Full run (8k, 16k, 32k): ~250 s on an H200, compiles included; ``--budget`` seconds
stops measuring new rows (written as skipped), ``--quick``: 8k only. Without CUDA: a tiny smoke run under the
Triton interpreter (fp32, no timing value).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--autotune" not in sys.argv:
    os.environ.setdefault("FA_PLUS_AUTOTUNE", "0")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402,F401  (the jit mask_mod below needs it in scope)
from common import (  # noqa: E402
    bench_ms,
    install_sigterm_handler,
    results_path,
    try_provider,
    write_results,
)

from fa_backward.programmable import attention  # noqa: E402
from fa_core import score_mods as sm  # noqa: E402
from fa_core.block_sparse import block_mask_from_dense, create_block_mask  # noqa: E402

WINDOW, GLOBAL, CHUNK = 1024, 64, 4096


@triton.jit
def _window_global(b, h, q_idx, kv_idx):
    # causal is built in (causal=True): the window and the global keys only
    return (q_idx - kv_idx < 1024) | (kv_idx < 64)


def _window_global_torch(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx < WINDOW) | (kv_idx < GLOBAL)


def _causal_torch(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


class Case:
    """One (pattern, seqlen): our kwargs, flex's kwargs (None = no flex), visible elements, baseline kwargs."""

    def __init__(
        self, ours: dict[str, Any], flex: dict[str, Any] | None, visible: float, dense: dict | None = None
    ):
        self.ours, self.flex, self.visible, self.dense = ours, flex, visible, dense


def _count_visible(mask_fn: Callable[..., torch.Tensor], b: int, h: int, s: int, device: str) -> float:
    """Visible elements of ``mask_fn`` over (b, h, s, s), counted 1024 rows at a time on the device."""
    total = 0.0
    bi = torch.arange(b, device=device).view(-1, 1, 1, 1)
    hi = torch.arange(h, device=device).view(1, -1, 1, 1)
    kv = torch.arange(s, device=device).view(1, 1, 1, -1)
    for r in range(0, s, 1024):
        q = torch.arange(r, min(r + 1024, s), device=device).view(1, 1, -1, 1)
        total += float(torch.broadcast_to(mask_fn(bi, hi, q, kv), (b, h, q.shape[2], s)).sum())
    return total


def _flex_mask(spec, h, s, device, block):
    """FlexAttention's BlockMask for a case: ``("blocks", dense_blocks, ours)`` (``ours``: our BlockMask of
    the same whole blocks) becomes full blocks through
    ``BlockMask.from_kv_blocks`` (no element mask to evaluate, as flex's own builder would find for whole
    blocks); ``("mask", fn, per_head)`` goes through flex's ``create_block_mask``, broadcast over batch and,
    unless ``per_head``, over heads (a (batch, heads, s, s) build needs 128 GiB at 32k)."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    from torch.nn.attention.flex_attention import create_block_mask as flex_cbm

    if spec[0] == "blocks":
        _, blocks, ours = spec

        def lookup(bi, hi, qi, ki):  # flex evaluates it only in eager mode: its kernels skip full blocks
            return blocks[0][hi, qi // block, ki // block]

        assert ours.full_kv_num_blocks is not None and ours.full_kv_indices is not None
        return FlexBlockMask.from_kv_blocks(
            torch.zeros_like(ours.full_kv_num_blocks),
            torch.zeros_like(ours.full_kv_indices),
            ours.full_kv_num_blocks,
            ours.full_kv_indices,
            BLOCK_SIZE=block,
            mask_mod=lookup,
        )
    _, mask_fn, per_head = spec
    return flex_cbm(
        mask_fn, B=None, H=h if per_head else None, Q_LEN=s, KV_LEN=s, device=device, BLOCK_SIZE=block
    )


def build_case(pattern: str, b: int, h: int, s: int, device: str, block: int, gen: torch.Generator) -> Case:
    nb = s // block
    if pattern.startswith("random"):
        density = int(pattern[len("random") :]) / 100
        blocks = torch.rand(1, h, nb, nb, generator=gen) < density
        blocks |= torch.eye(nb, dtype=torch.bool)
        blocks = blocks.to(device)
        bm = block_mask_from_dense(blocks, (block, block), full_blocks=blocks)

        return Case(
            {"block_mask": bm},
            {"block_mask": ("blocks", blocks, bm)},
            float(blocks.sum()) * block * block * b,
        )
    if pattern == "window_global":
        bm = create_block_mask(
            lambda bi, hi, qi, ki: _causal_torch(bi, hi, qi, ki) & _window_global_torch(bi, hi, qi, ki),
            None, None, s, s, (block, block), device,
        )  # fmt: skip

        def both(bi, hi, qi, ki):
            return _causal_torch(bi, hi, qi, ki) & _window_global_torch(bi, hi, qi, ki)

        ours = {"block_mask": bm, "mask_mod": _window_global, "causal": True}
        return Case(
            ours, {"block_mask": ("mask", both, False)}, _count_visible(both, 1, 1, s, device) * b * h
        )
    if pattern == "document":
        lens, left = [], nb
        while left > 0:
            n = int(torch.randint(1, max(2, nb // 3), (1,), generator=gen))
            lens.append(min(n, left))
            left -= lens[-1]
        docs = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens) * block)[None].to(device)
        bm = sm.document_block_mask(docs, (block, block), causal=True)
        same = sm.document_mask_torch(docs)

        def both(bi, hi, qi, ki):
            return _causal_torch(bi, hi, qi, ki) & same(bi, hi, qi, ki)

        visible = float(sum(n * block * (n * block + 1) / 2 for n in lens)) * b * h
        return Case({"block_mask": bm, "causal": True}, {"block_mask": ("mask", both, False)}, visible)
    causal_visible = s * (s + 1) / 2 * b * h
    if pattern == "relbias":
        ours = {"score_mod": sm.relative_position_bias, "score_mod_grad": sm.additive_grad, "causal": True}
        flex = {"score_mod": sm.relative_position_bias_torch, "block_mask": ("mask", _causal_torch, False)}
        return Case(ours, flex, causal_visible)
    if pattern == "sink":
        return Case({"causal": True, "_sink": True}, None, causal_visible, dense={"causal": True})
    if pattern == "chunk":
        c = min(CHUNK, s)
        visible = (s // c) * c * (c + 1) / 2 * b * h
        return Case({"causal": True, "attention_chunk": c}, None, visible, dense={"causal": True})
    raise ValueError(f"unknown pattern {pattern}")


#: the PNG: fwd+bwd TFLOP/s vs seqlen, one panel per pattern
PLOT_KW: dict[str, Any] = {"panels": ("pattern",), "bench": "sparse_fwd_bwd"}


def _ours_fn(kw: dict[str, Any], q, k, v, h: int):
    kw = dict(kw)
    sink = torch.randn(h, device=q.device, requires_grad=True) if kw.pop("_sink", False) else None
    leaves = (q, k, v) if sink is None else (q, k, v, sink)

    def fwd():
        return attention(q, k, v, learnable_sink=sink, **kw)[0]

    return fwd, leaves


_FLEX: dict[str, Any] = {}


def _flex_fn(kw: dict[str, Any], q, k, v, b: int, h: int, s: int, block: int):
    import torch._dynamo as dynamo
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, 1000)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    bm = _flex_mask(kw["block_mask"], h, s, q.device.type, block)
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    gqa = {"enable_gqa": True} if kt.shape[1] != qt.shape[1] else {}
    score_mod = kw.get("score_mod")

    def fwd():
        return _FLEX["fn"](qt, kt, vt, score_mod=score_mod, block_mask=bm, **gqa).transpose(1, 2)

    return fwd, (qt, kt, vt)


def _timer(cuda: bool) -> Callable[[Callable[[], Any]], float]:
    if cuda:
        return lambda fn: bench_ms(fn, warmup=10, rep=40)

    def once(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return once


def run_case(
    rows: list[dict[str, Any]],
    pattern: str,
    case: Case,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dout: torch.Tensor,
    block: int,
    timer: Callable[[Callable[[], Any]], float],
    over_budget: Callable[[], bool],
    flex: bool,
) -> None:
    """Rows of one (pattern, seqlen) for every provider, fwd and fwd+bwd."""
    q, k, v = qkv
    b, s, h, d = q.shape
    density = round(case.visible / (b * h * s * s), 4)
    flop_fwd = 4.0 * d * case.visible
    makers: dict[str, Callable[[], tuple[Callable[[], Any], tuple]]] = {
        "fa-plus": lambda: _ours_fn(case.ours, q, k, v, h)
    }
    if case.flex is not None and flex:
        makers["flex"] = lambda: _flex_fn(case.flex or {}, q, k, v, b, h, s, block)
    if case.dense is not None:
        makers["fa-plus-dense"] = lambda: _ours_fn(case.dense or {}, q, k, v, h)
    outs: dict[str, torch.Tensor] = {}
    first = len(rows)
    for name, make in makers.items():
        base = {"batch": b, "seqlen": s, "nheads": h, "headdim": d, "pattern": pattern, "density": density}
        base.update(provider=name, dtype=str(q.dtype).replace("torch.", ""))
        built: list[tuple[Callable[[], Any], tuple]] = []
        for bench, mult in (("sparse_fwd", 1.0), ("sparse_fwd_bwd", 3.5)):
            row = dict(base, bench=bench)
            if over_budget():
                row.update(ms=None, tflops=None, error="skipped: time budget")
            else:

                def measure(bench: str = bench, name: str = name, make=make, built=built) -> float:
                    if not built:
                        fwd, leaves = make()
                        o = fwd()  # compiles (and autotunes when asked)
                        torch.autograd.grad(o, leaves, dout)
                        outs[name] = o.detach()
                        built.append((fwd, leaves))
                    fwd, leaves = built[0]
                    if bench == "sparse_fwd":
                        return timer(fwd)
                    return timer(lambda: torch.autograd.grad(fwd(), leaves, dout))

                try_provider(row, measure, flop_fwd * mult)
            rows.append(row)
            print(
                {k_: row.get(k_) for k_ in ("bench", "pattern", "seqlen", "provider", "tflops", "error")},
                flush=True,
            )
    if "flex" in outs and "fa-plus" in outs:
        err = float((outs["fa-plus"].float() - outs["flex"].float()).abs().max())
        ref = float(outs["flex"].float().abs().max()) or 1.0
        for r in rows[first:]:
            r["rel_err"] = round(err / ref, 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seqlen 8k only")
    ap.add_argument("--seqlens", type=int, nargs="*", default=None)
    ap.add_argument(
        "--patterns",
        nargs="*",
        default=["random10", "random30", "random50", "window_global", "document", "relbias", "sink", "chunk"],
    )
    ap.add_argument("--budget", type=float, default=280.0, help="seconds; later rows are written as skipped")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--autotune", action="store_true", help="autotune our kernels (slower compiles)")
    args = ap.parse_args()
    install_sigterm_handler()
    start = time.time()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        seqlens = args.seqlens or ([8192] if args.quick else [8192, 16384, 32768])
        h, d, block, tokens = 16, 128, 128, 32768
    else:  # smoke run of the plumbing under the interpreter
        seqlens = args.seqlens or [256]
        h, d, block, tokens = 2, 32, 128, 256
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    try:
        for s in seqlens:
            b = max(1, tokens // s)
            q, k, v = (
                torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
            )
            dout = torch.randn(b, s, h, d, device=device, dtype=dtype)
            for pattern in args.patterns:
                case = build_case(pattern, b, h, s, device, block, gen)
                run_case(
                    rows, pattern, case, (q, k, v), dout, block, _timer(cuda),
                    lambda: time.time() - start > args.budget, not args.no_flex,
                )  # fmt: skip
    finally:
        if cuda:
            path = write_results("sparse", rows, plot_kw=PLOT_KW)
            print(f"wrote {path} ({len(rows)} rows, {time.time() - start:.0f} s)")
        else:
            print(f"smoke run: {len(rows)} rows, not written ({results_path('sparse').name} is for GPU runs)")


if __name__ == "__main__":
    main()
