"""Public context-parallel attention functions (flash-attn-like arguments plus a process group)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fa_core import validation as V
from fa_parallel.allgather import AllGatherAttnFunc, AllGatherDocumentsAttnFunc, AllGatherVarlenAttnFunc
from fa_parallel.blocks import INF, window_bounds
from fa_parallel.comm import group_info
from fa_parallel.documents import DocumentSharding, document_sharding
from fa_parallel.ring import RingAttnFunc
from fa_parallel.sharding import LAYOUTS, num_chunks

__all__ = ["STRATEGIES", "context_parallel_attn_func", "context_parallel_varlen_attn_func"]

STRATEGIES = ("ring", "allgather")


def _common(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, q) -> float:
    V.check_window(window_size)
    V.check_scalars(dropout_p, softcap, softmax_scale)
    if dropout_p > 0:
        raise NotImplementedError("context-parallel attention does not support dropout (dropout_p must be 0)")
    if alibi_slopes is not None:
        raise NotImplementedError(
            "context-parallel attention does not support ALiBi (alibi_slopes must be None)"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context-parallel attention needs torch.distributed initialised (init_process_group)"
        )
    return float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5


def context_parallel_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: dist.ProcessGroup | None = None,
    *,
    strategy: str = "ring",
    layout: str = "zigzag",
):
    """Attention over a sequence sharded across the ranks of ``group``; returns this rank's output.

    Every rank calls it with its shard (see :func:`fa_parallel.shard_sequence`); the result equals
    ``flash_attn_func`` on the whole sequence, sharded the same way, and is differentiable.

    Args:
        q: ``(batch, seqlen_local, nheads, headdim)``; k: ``(batch, seqlen_local, nheads_k, headdim)``;
            v: ``(batch, seqlen_local, nheads_k, headdim_v)``. Same ``seqlen_local`` on every rank (even for
            ``layout="zigzag"``). GQA/MQA: ``nheads % nheads_k == 0``.
        causal, window_size, softcap, softmax_scale: as flash-attn, applied to GLOBAL positions (the
            whole sequence has ``seqlen_q == seqlen_k``). Blocks outside the window or above the causal
            diagonal are skipped.
        dropout_p, alibi_slopes: must be 0 / None (NotImplementedError otherwise).
        deterministic: accepted; results are always deterministic (fixed summation order, no atomics).
        return_attn_probs: also return ``softmax_lse (batch, nheads, seqlen_local)`` (+inf for rows that see
            no key) and ``None`` (flash-attn's ``S_dmask``, which only exists with dropout).
        group: the context-parallel process group (default: the world).
        strategy: ``"ring"`` (K/V rotate with point-to-point sends, overlapped with compute) or
            ``"allgather"`` (K/V gathered whole, as Llama 3 training does; more memory, fewer messages).
        layout: ``"zigzag"`` (head-tail, balanced under causal) or ``"contiguous"``.

    Returns:
        ``out (batch, seqlen_local, nheads, headdim_v)``, or ``(out, softmax_lse, None)``.
    """
    scale = _common(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, q)
    V.check_qkv(q, k, v, varlen=False)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"q and k must hold the same local sequence length, got {q.shape[1]} and {k.shape[1]}"
        )
    _, world = group_info(group)
    per_rank = num_chunks(world, layout) // world
    if q.shape[1] % per_rank:
        raise ValueError(f"layout {layout!r} needs an even local sequence length, got {q.shape[1]}")
    left, right = window_bounds(causal, window_size)
    fn = RingAttnFunc if strategy == "ring" else AllGatherAttnFunc
    out, lse = fn.apply(q, k, v, group, scale, left, right, float(softcap), layout, deterministic)
    return (out, lse, None) if return_attn_probs else out


def context_parallel_varlen_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | DocumentSharding,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    group: dist.ProcessGroup | None = None,
    *,
    layout: str = "contiguous",
):
    """Packed documents sharded across ``group`` (all-gather strategy).

    ``layout="contiguous"`` (default): the global packed sequence ``(world_size * total_local, ...)`` is cut
    into equal contiguous shards; rank ``r`` holds rows ``[r * total_local, (r + 1) * total_local)``.
    Documents may cross shard boundaries. Under a causal mask the ranks holding the ends of long documents
    do most of the work.

    ``layout="zigzag"`` (per-document head-tail, load balanced): every document is cut into
    ``2 * world_size`` near-equal chunks and rank ``r`` holds chunks ``r`` and ``2 * world_size - 1 - r`` of
    every document (see :mod:`fa_parallel.documents`; shard with :func:`fa_parallel.document_shard`, get
    the positions inside the documents from :func:`fa_parallel.document_sharding`). Ranks may hold slightly
    different numbers of tokens (``document_sharding(cu_seqlens, world_size).lengths``).

    Args:
        q: ``(total_local, nheads, headdim)``; k, v: ``(total_local, nheads_k, headdim[_v])``.
        cu_seqlens: int32 ``(ndocs + 1,)`` prefix sums over the GLOBAL packed sequence, identical on every
            rank (read on the host once per call: a device sync when it is on the GPU);
            contiguous: ``cu_seqlens[-1] <= world_size * total_local`` (rows past the last document get
            out 0, lse +inf); zigzag: the packed sequence is exactly ``cu_seqlens[-1]`` tokens. With
            ``layout="zigzag"`` a prebuilt :class:`fa_parallel.DocumentSharding` is accepted too (reuse it
            across layers: it skips the host read).
        max_seqlen: accepted for flash-attn compatibility (the per-rank pieces' maxima are computed).
        window_size: ``(-1, -1)``, causal, or ``(left, 0)``; other windows raise NotImplementedError.
        layout: ``"contiguous"`` or ``"zigzag"`` (per-document head-tail).
        Other arguments: as :func:`context_parallel_attn_func`.

    Returns:
        ``out (total_local, nheads, headdim_v)``, or ``(out, softmax_lse (nheads, total_local), None)``.
    """
    scale = _common(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, q)
    V.check_qkv(q, k, v, varlen=True)
    if k.shape[0] != q.shape[0]:
        raise ValueError(
            f"q and k must hold the same number of local tokens, got {q.shape[0]} and {k.shape[0]}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rank, world = group_info(group)
    if layout == "zigzag":
        if isinstance(cu_seqlens, DocumentSharding):
            docs = cu_seqlens
        else:
            V.check_tensor("cu_seqlens", cu_seqlens, 1)
            docs = document_sharding(cu_seqlens, world)
        if docs.world_size != world:
            raise ValueError(f"the DocumentSharding is for {docs.world_size} ranks, the group has {world}")
        if q.shape[0] != docs.lengths[rank]:
            raise ValueError(
                f"layout 'zigzag' (per document): rank {rank} holds {docs.lengths[rank]} tokens of the "
                f"documents cu_seqlens, got q with {q.shape[0]} (shard with fa_parallel.document_shard)"
            )
        left, right = window_bounds(causal, window_size)
        if right != 0 and not (left == INF and right == INF):
            raise NotImplementedError(
                "context-parallel varlen with layout='zigzag' supports window_size (-1, -1), causal, and "
                f"(left, 0) windows; got window_size={tuple(window_size)} with causal={causal}"
            )
        out, lse = AllGatherDocumentsAttnFunc.apply(
            q, k, v, docs, group, scale, left, right, float(softcap), deterministic
        )
        return (out, lse, None) if return_attn_probs else out
    if isinstance(cu_seqlens, DocumentSharding):
        raise TypeError("a DocumentSharding is the per-document layout: pass layout='zigzag' with it")
    V.check_tensor("cu_seqlens", cu_seqlens, 1)
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] > world * q.shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at most at {world * q.shape[0]} "
            f"(world_size * total_local), got {cu}"
        )
    left, right = window_bounds(causal, window_size)
    out, lse = AllGatherVarlenAttnFunc.apply(
        q, k, v, cu_seqlens, group, scale, left, right, float(softcap), deterministic
    )
    return (out, lse, None) if return_attn_probs else out
