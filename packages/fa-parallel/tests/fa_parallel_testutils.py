"""Rank worker of the multi-process CPU tests: every rank compares its shard with the full-sequence reference.

Run by ``torch.multiprocessing.spawn`` over gloo. Each rank builds the same global q, k, v, dout (same seed),
computes the float64 reference (``fa_core.reference``, autograd) and the float32 plain-PyTorch baseline of the
2x rule, runs the context-parallel function on its shard, and checks out, lse, dq, dk, dv of its shard.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
import torch.distributed as dist

from fa_core.reference import attention_ref, attention_varlen_ref
from fa_core.testing import assert_close_2x
from fa_parallel import (
    context_parallel_attn_func,
    context_parallel_varlen_attn_func,
    document_shard,
    shard_sequence,
)

Case = dict[str, Any]


def _ref(q, k, v, dout, case: Case, dtype: torch.dtype, upcast: bool):
    """Reference out, lse and grads, computed in ``dtype`` from the float32 inputs."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    kw = dict(
        causal=case["causal"], window_size=case["window"], softcap=case["softcap"], upcast=upcast, dtype=dtype
    )
    if case.get("varlen"):
        out, lse = attention_varlen_ref(*leaves, case["cu"], case["cu"], **kw)
    else:
        out, lse = attention_ref(*leaves, **kw)
    out.backward(dout.to(dtype))
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def run_case(rank: int, world: int, case: Case) -> None:
    g = torch.Generator().manual_seed(case.get("seed", 0))
    b, s, h, hk, d = case["batch"], case["seqlen"], case["nheads"], case["nheads_k"], case["headdim"]
    varlen = case.get("varlen", False)
    shape_q, shape_k = ((s, h, d), (s, hk, d)) if varlen else ((b, s, h, d), (b, s, hk, d))
    q, k, v = (torch.randn(sh, generator=g) for sh in (shape_q, shape_k, shape_k))
    dout = torch.randn(shape_q, generator=g)
    ref = _ref(q, k, v, dout, case, torch.float64, True)
    low = _ref(q, k, v, dout, case, torch.float32, False)

    layout = case.get("varlen_layout", "contiguous") if varlen else case["layout"]
    seq_dim = 0 if varlen else 1

    def shard(x: torch.Tensor, dim: int = seq_dim) -> torch.Tensor:
        if varlen and layout == "zigzag":  # per-document head-tail
            return document_shard(x, case["cu"], rank, world, dim)
        return shard_sequence(x, rank, world, layout, dim)

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    kw = dict(
        causal=case["causal"], window_size=case["window"], softcap=case["softcap"], return_attn_probs=True
    )
    if varlen:
        out, lse, _ = context_parallel_varlen_attn_func(
            ql, kl, vl, case["cu"], int(case["cu"].diff().max()), layout=layout, **kw
        )
    else:
        out, lse, _ = context_parallel_attn_func(ql, kl, vl, strategy=case["strategy"], layout=layout, **kw)
    out.backward(shard(dout))
    lse_dim = 1 if varlen else 2
    tag = f"rank {rank}/{world} {case}"
    try:
        assert_close_2x(out, shard(ref[0]), shard(low[0]), "out")
        assert_close_2x(lse, shard(ref[1], lse_dim), shard(low[1], lse_dim), "lse")
        for name, ours, r, lo in zip(("dq", "dk", "dv"), (ql.grad, kl.grad, vl.grad), ref[2:], low[2:]):
            assert_close_2x(ours, shard(r), shard(lo), name)
    except AssertionError as exc:
        raise AssertionError(f"{tag}: {exc}") from None


def worker(rank: int, world: int, store: str, cases: list[Case]) -> None:
    """``mp.spawn`` entry point: one process group for all the cases (process start-up dominates)."""
    torch.set_num_threads(1)  # ranks share the CI's two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for case in cases:
            run_case(rank, world, case)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn(world: int, cases: list[Case], tmp_dir: str) -> None:
    import torch.multiprocessing as mp

    store = os.path.join(tmp_dir, "store")
    mp.spawn(worker, args=(world, store, cases), nprocs=world, join=True)
