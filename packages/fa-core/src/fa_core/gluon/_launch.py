"""Host side of the Gluon Hopper forward: tile configurations, TMA descriptors, launch.

Imported only where Gluon's Hopper modules import (see :func:`fa_core.gluon.available`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fa_core.forward_launch import _ensure_allocator
from fa_core.gluon import _hopper

__all__ = ["CONFIGS", "UNBOUNDED", "launch", "prepare", "shared_layout", "window_bounds"]

LOG2E = 1.4426950408889634
#: "unbounded" side of a window, as fa_core.masking encodes it for kernels
UNBOUNDED = 2**30

_WS = dict(num_warps=4, CONSUMER_REGS=232, PRODUCER_REGS=40)
# (kind, head_dim) -> tile configuration. "pipelined": num_warps warps, BLOCK_M query rows per CTA;
# "ws"/"ws3": NCONS 4-warp consumers of BLOCK_M rows each + a 1-warp TMA producer, registers split by
# setmaxnreg. Chosen on an H100 (bench/results/h100-gluon-forward-sweep.json, and the "sweep" rows of
# bench/results/h100-gluon-forward.json: the 240/24 register split for ws d128 and 3 stages for ws3 gave
# 641/647 and 521/493 TFLOP/s at seqlen 16k, non-causal/causal, with outputs identical to the other tiles).
CONFIGS: dict[tuple[str, int], dict[str, int]] = {
    ("pipelined", 64): dict(BLOCK_M=64, BLOCK_N=128, STAGES=2, num_warps=4),
    ("pipelined", 128): dict(BLOCK_M=64, BLOCK_N=64, STAGES=3, num_warps=4),
    ("ws", 64): dict(_WS, BLOCK_M=64, BLOCK_N=128, STAGES=4, PINGPONG=1, NCONS=2),
    ("ws", 128): dict(
        num_warps=4,
        CONSUMER_REGS=240,
        PRODUCER_REGS=24,
        BLOCK_M=64,
        BLOCK_N=128,
        STAGES=3,
        PINGPONG=1,
        NCONS=2,
    ),
    # three consumers (192 query rows per CTA) with FlashAttention-3's d64 register split
    ("ws3", 64): dict(
        num_warps=4,
        CONSUMER_REGS=160,
        PRODUCER_REGS=24,
        BLOCK_M=64,
        BLOCK_N=128,
        STAGES=3,
        PINGPONG=1,
        NCONS=3,
    ),
}

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@functools.lru_cache(maxsize=128)
def shared_layout(block: tuple[int, ...], dtype: torch.dtype) -> Any:
    """The default NVMMA shared-memory layout of a TMA block of ``dtype`` elements, cached: Gluon derives it
    in Python (~20 us per call on a fast host CPU, once per descriptor of every launch without the cache).
    The layout is a frozen dataclass, shared by every descriptor of that block."""
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype])


def _desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """Rank-4 descriptor over ``(batch, seqlen, nheads, headdim)`` with block ``[1, rows, 1, headdim]``."""
    block = [1, rows, 1, t.shape[-1]]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, shared_layout(tuple(block), t.dtype))


def _cache_desc(t: torch.Tensor, rows: int, box_d: int) -> TensorDescriptor:
    """Rank-4 descriptor over a paged cache ``(num_pages, page, nheads_k, headdim)`` seen as rows ``(1,
    num_pages * page, nheads_k, headdim)`` (pages contiguous rows), block ``[1, rows, 1, box_d]``."""
    num_pages, page, nheads_k, head_dim = t.shape
    block = [1, rows, 1, box_d]
    layout = shared_layout(tuple(block), t.dtype)
    shape = [1, num_pages * page, nheads_k, head_dim]
    return TensorDescriptor(
        t, shape, [num_pages * page * t.stride(1), t.stride(1), t.stride(2), 1], block, layout
    )


def window_bounds(causal: bool, window_size: tuple[int, int]) -> tuple[int, int, bool]:
    """``(left, right, has_window)``: -1 sides become :data:`UNBOUNDED`, causal sets ``right = 0``;
    ``has_window`` is False for plain or purely causal attention (the kernels' cheaper range rule)."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    left = UNBOUNDED if left < 0 else left
    right = UNBOUNDED if right < 0 else right
    has_window = left != UNBOUNDED or (right != UNBOUNDED and not (causal and right == 0))
    return left, right, has_window


def prepare(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    config: dict[str, int] | None = None,
    varlen: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    paged: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any], int, tuple[int, int, int]]:
    """Build (kernel, runtime args by name, constexprs by name, num_warps, grid) for one call.

    Dense: q ``(b, s_q, h, d)``, k/v ``(b, s_k, h_k, d)``, lse ``(b, h, s_q)``. Varlen (``varlen`` =
    ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)``): q ``(total_q, h, d)``, k/v
    ``(total_k, h_k, d)``, lse ``(h, total_q)``; the kernels build one descriptor per sequence on the device.
    Paged varlen (``paged`` = ``(block_table (b, max_pages) int32, seqused_k (b,) int32 or None)``, with
    ``varlen``): k/v are caches ``(num_pages, page, h_k, d)`` whose pages are contiguous rows (``stride(0) ==
    page * stride(1)``), page a power of two >= 16; one host descriptor per cache over all its rows.
    """
    head_dim = q.shape[-1]
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    cfg = dict(config or CONFIGS[(kind, head_dim)])
    num_warps = cfg.pop("num_warps")
    rows_per_cta = cfg["BLOCK_M"] * cfg.get("NCONS", 1)
    left, right, has_window = window_bounds(causal, window_size)
    if softcap > 0:
        qk_scale, softcap_in = float(softcap) * LOG2E, float(softmax_scale) / float(softcap)
    else:
        qk_scale, softcap_in = float(softmax_scale) * LOG2E, 1.0
    common = dict(
        group=nheads // nheads_k,
        qk_scale=qk_scale,
        softcap_in=softcap_in,
        left=left,
        right=right,
    )
    page = 0
    pa: tuple[Any, ...] = (0,)
    if paged is not None:
        if varlen is None:
            raise ValueError("a paged K/V cache needs the varlen arguments")
        block_table, seqused_k = paged
        page = k.shape[1]
        if page < 16 or page & (page - 1):
            raise ValueError(f"the page size must be a power of two >= 16, got {page}")
        # (without seqused_k its slot holds the table: any pointer, never read)
        used = seqused_k if seqused_k is not None else block_table
        pa = (block_table, block_table.stride(0), block_table.shape[1], k.shape[0], used, v)
    if varlen is None:
        batch, seqlen_q = q.shape[0], q.shape[1]
        args: dict[str, Any] = dict(
            q_arg=_desc(q, cfg["BLOCK_M"]),
            k_arg=_desc(k, cfg["BLOCK_N"]),
            v_arg=_desc(v, cfg["BLOCK_N"]),
            o_arg=_desc(out, cfg["BLOCK_M"]),
            lse_ptr=lse,
            stride_lb=lse.stride(0),
            stride_lh=lse.stride(1),
            seqlen_q=seqlen_q,
            seqlen_k=k.shape[1],
            **common,
            vl=(0,),
        )
    else:
        cu_q, cu_k, seqlen_q, max_seqlen_k = varlen
        batch = cu_q.shape[0] - 1
        k_arg: Any = k
        v_arg: Any = v
        k_strides, v_strides = k.stride()[:2], v.stride()[:2]
        total_k = k.shape[0]
        if page:
            # blocks of min(page, BLOCK_N) rows; below BLOCK_N, the kernel splits each page load into
            # 128-byte column chunks itself (see _hopper._load_kv_paged)
            rows = min(page, cfg["BLOCK_N"])
            box_d = head_dim if page >= cfg["BLOCK_N"] else 128 // q.element_size()
            k_arg, v_arg = _cache_desc(k, rows, box_d), _cache_desc(v, rows, box_d)
            if config is None and "PRODUCER_REGS" in cfg:
                # the producer warp holds a tile's page rows: 32 registers (the most the 512-per-thread budget
                # of the consumers' 240 x 2 / 160 x 3 leaves) instead of 24 avoid its spills
                cfg["PRODUCER_REGS"] = max(cfg["PRODUCER_REGS"], 32)
            k_strides, v_strides = k.stride()[1:3], v.stride()[1:3]
            total_k = k.shape[0] * page
        args = dict(
            q_arg=q,
            k_arg=k_arg,
            v_arg=v_arg,
            o_arg=out,
            lse_ptr=lse,
            stride_lb=0,
            stride_lh=lse.stride(0),
            seqlen_q=seqlen_q,
            seqlen_k=max_seqlen_k,
            **common,
            vl=(
                cu_q,
                cu_k,
                *q.stride()[:2],
                *k_strides,
                *v_strides,
                *out.stride()[:2],
                nheads,
                nheads_k,
                q.shape[0],
                total_k,
            ),
        )
    args["pa"] = pa
    constexprs: dict[str, Any] = dict(
        HEAD_DIM=head_dim,
        CAUSAL=bool(causal),
        WINDOW=has_window,
        SOFTCAP=softcap > 0,
        VARLEN=varlen is not None,
        PAGE=page,
        SEQUSED=paged is not None and paged[1] is not None,
        num_warps=num_warps,
        **cfg,
    )
    kernel = _hopper.attn_fwd_pipelined if kind == "pipelined" else _hopper.attn_fwd_ws
    grid = (max(1, math.ceil(seqlen_q / rows_per_cta)), nheads, batch)
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
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    config: dict[str, int] | None = None,
    varlen: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    paged: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> None:
    """Launch one forward; ``out`` (like q) and ``lse`` (float32, see :func:`prepare`) are written."""
    kernel, args, constexprs, _, grid = prepare(
        kind, q, k, v, out, lse, softmax_scale, causal, window_size, softcap, config, varlen, paged
    )
    if varlen is not None:
        _ensure_allocator()  # the per-sequence descriptors live in a global scratch buffer
    kernel[grid](**args, **constexprs)
