"""Host side of the Gluon Hopper forward: tile configurations, TMA descriptors, launch.

Imported only where Gluon's Hopper modules import (see :func:`fa_core.gluon.available`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fa_core.gluon import _hopper

__all__ = ["CONFIGS", "launch", "prepare"]

LOG2E = 1.4426950408889634

# (kind, head_dim) -> tile configuration. "pipelined": 8 warps, BLOCK_M query rows per CTA;
# "ws": two 4-warp consumers of BLOCK_M rows each + a 1-warp TMA producer.
CONFIGS: dict[tuple[str, int], dict[str, int]] = {
    ("pipelined", 64): dict(BLOCK_M=128, BLOCK_N=128, STAGES=3, num_warps=8),
    ("pipelined", 128): dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, num_warps=8),
    ("ws", 64): dict(
        BLOCK_M=64, BLOCK_N=128, STAGES=3, PINGPONG=1, num_warps=4, CONSUMER_REGS=232, PRODUCER_REGS=40
    ),
    ("ws", 128): dict(
        BLOCK_M=64, BLOCK_N=128, STAGES=2, PINGPONG=1, num_warps=4, CONSUMER_REGS=232, PRODUCER_REGS=40
    ),
}

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """Rank-4 descriptor over ``(batch, seqlen, nheads, headdim)`` with block ``[1, rows, 1, headdim]``."""
    block = [1, rows, 1, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def prepare(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    config: dict[str, int] | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any], int, tuple[int, int, int]]:
    """Build (kernel, runtime args by name, constexprs by name, num_warps, grid) for one call."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    cfg = dict(config or CONFIGS[(kind, head_dim)])
    num_warps = cfg.pop("num_warps")
    rows_per_cta = cfg["BLOCK_M"] * (2 if kind == "ws" else 1)
    args: dict[str, Any] = dict(
        q_desc=_desc(q, cfg["BLOCK_M"]),
        k_desc=_desc(k, cfg["BLOCK_N"]),
        v_desc=_desc(v, cfg["BLOCK_N"]),
        o_desc=_desc(out, cfg["BLOCK_M"]),
        lse_ptr=lse,
        stride_lb=lse.stride(0),
        stride_lh=lse.stride(1),
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        group=nheads // nheads_k,
        qk_scale=float(softmax_scale) * LOG2E,
    )
    constexprs: dict[str, Any] = dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), num_warps=num_warps, **cfg)
    kernel = _hopper.attn_fwd_ws if kind == "ws" else _hopper.attn_fwd_pipelined
    grid = (math.ceil(seqlen_q / rows_per_cta), nheads, batch)
    return kernel, args, constexprs, num_warps, grid


def launch(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    config: dict[str, int] | None = None,
) -> None:
    """Launch one forward; ``out`` ``(b, s_q, h, d)`` and ``lse`` ``(b, h, s_q)`` float32 are written."""
    kernel, args, constexprs, num_warps, grid = prepare(
        kind, q, k, v, out, lse, softmax_scale, causal, config
    )
    kernel[grid](**args, **constexprs)
