"""FlashAttention-3's operator namespace ``torch.ops.flash_attn_3`` (``fwd``, ``bwd``, ``fwd_combine``,
``get_scheduler_metadata``) with the CUDA build's schemas, on the functions of :mod:`flash_attn_interface`.

Libraries that call the operators directly (rather than ``flash_attn_interface``'s functions) and exported
models find the same names, arguments, defaults and returns. ``fwd`` dispatches as FlashAttention-3's one
forward does: KV-cache attention when new keys, a page table, ``kv_batch_idx``, ``leftpad_k``, rotary tables or
``seqused_k`` without ``cu_seqlens_k`` are given, varlen with ``cu_seqlens``, dense otherwise. The split
accumulators it returns are empty (split results are combined inside the call). ``bwd`` writes ``dq`` / ``dk`` /
``dv`` (allocated when None) and returns ``(dq, dk, dv, softmax_d)`` followed by four empty tensors (FA3's
internal log2 lse and accumulators). The operators run without autograd, as FA3's do (its autograd Functions
wrap them).

Registered when :mod:`flash_attn_interface` is imported, unless an ``flash_attn_3::fwd`` operator exists
already (the CUDA build loaded first).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fa_core.errors import FlashAttnValueError

Tensor = torch.Tensor

SCHEMAS = {
    "fwd": (
        "fwd(Tensor q, Tensor k, Tensor v, Tensor(k_new!)? k_new=None, Tensor(v_new!)? v_new=None, "
        "Tensor? q_v=None, Tensor(out!)? out=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "Tensor? cu_seqlens_k_new=None, Tensor? seqused_q=None, Tensor? seqused_k=None, int? max_seqlen_q=None, "
        "int? max_seqlen_k=None, Tensor? page_table=None, Tensor? kv_batch_idx=None, Tensor? leftpad_k=None, "
        "Tensor? rotary_cos=None, Tensor? rotary_sin=None, Tensor? seqlens_rotary=None, Tensor? q_descale=None, "
        "Tensor? k_descale=None, Tensor? v_descale=None, float? softmax_scale=None, bool is_causal=False, "
        "int window_size_left=-1, int window_size_right=-1, int attention_chunk=0, float softcap=0., "
        "bool is_rotary_interleaved=False, Tensor? scheduler_metadata=None, int num_splits=0, "
        "bool? pack_gqa=None, int sm_margin=0) -> (Tensor(out!), Tensor, Tensor, Tensor)"
    ),
    "bwd": (
        "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, Tensor(dq!)? dq=None, "
        "Tensor(dk!)? dk=None, Tensor(dv!)? dv=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "Tensor? seqused_q=None, Tensor? seqused_k=None, int? max_seqlen_q=None, int? max_seqlen_k=None, "
        "float? softmax_scale=None, bool is_causal=False, int window_size_left=-1, int window_size_right=-1, "
        "float softcap=0., bool deterministic=False, int sm_margin=0) "
        "-> (Tensor(dq!), Tensor(dk!), Tensor(dv!), Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "fwd_combine": (
        "fwd_combine(Tensor out_partial, Tensor lse_partial, Tensor(out!)? out=None, ScalarType? out_dtype=None) "
        "-> (Tensor(out!), Tensor)"
    ),
    "get_scheduler_metadata": (
        "get_scheduler_metadata(int batch_size, int max_seqlen_q, int max_seqlen_k, int num_heads, "
        "int num_heads_k, int headdim, int headdim_v, ScalarType qkv_dtype, Tensor seqused_k, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, "
        "Tensor? seqused_q=None, Tensor? leftpad_k=None, int? page_size=None, int max_seqlen_k_new=0, "
        "bool is_causal=False, int window_size_left=-1, int window_size_right=-1, int attention_chunk=0, "
        "bool has_softcap=False, int num_splits=0, bool? pack_gqa=None, int sm_margin=0) -> Tensor"
    ),
}

_LIB: torch.library.Library | None = None


def _empty(like: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=like.device)


def _fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    q_v: Tensor | None = None,
    out: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    cu_seqlens_k_new: Tensor | None = None,
    seqused_q: Tensor | None = None,
    seqused_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    page_table: Tensor | None = None,
    kv_batch_idx: Tensor | None = None,
    leftpad_k: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    seqlens_rotary: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    softmax_scale: float | None = None,
    is_causal: bool = False,
    window_size_left: int = -1,
    window_size_right: int = -1,
    attention_chunk: int = 0,
    softcap: float = 0.0,
    is_rotary_interleaved: bool = False,
    scheduler_metadata: Tensor | None = None,
    num_splits: int = 0,
    pack_gqa: bool | None = None,
    sm_margin: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    import flash_attn_interface as fa3

    window = (window_size_left, window_size_right)
    common: dict[str, Any] = dict(
        softmax_scale=softmax_scale, causal=is_causal, qv=q_v, q_descale=q_descale, k_descale=k_descale,
        v_descale=v_descale, window_size=window, attention_chunk=attention_chunk, softcap=softcap,
        num_splits=num_splits, pack_gqa=pack_gqa, sm_margin=sm_margin,
    )  # fmt: skip
    cache = (
        k_new is not None
        or page_table is not None
        or kv_batch_idx is not None
        or leftpad_k is not None
        or rotary_cos is not None
        or (cu_seqlens_k is None and seqused_k is not None)
    )
    with torch.no_grad():
        if cache:
            if cu_seqlens_k is not None or seqused_q is not None:
                raise FlashAttnValueError(
                    "flash_attn_3::fwd over a KV cache takes cache lengths as seqused_k, not cu_seqlens_k / "
                    "seqused_q"
                )
            res, lse, _, _ = fa3.flash_attn_with_kvcache(
                q, k, v, k_new, v_new, rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_seqlens=seqused_k,
                cache_batch_idx=kv_batch_idx, cache_leftpad=leftpad_k, page_table=page_table,
                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k_new=cu_seqlens_k_new, max_seqlen_q=max_seqlen_q,
                rotary_seqlens=seqlens_rotary, rotary_interleaved=is_rotary_interleaved,
                scheduler_metadata=scheduler_metadata, return_softmax_lse=True, **common,
            )  # fmt: skip
        elif cu_seqlens_q is not None or cu_seqlens_k is not None:
            common.pop("num_splits")
            res, lse = fa3.flash_attn_varlen_func(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
                return_attn_probs=True, **common,
            )  # fmt: skip
        else:
            res, lse = fa3.flash_attn_func(q, k, v, return_attn_probs=True, **common)
    if out is not None:
        out.copy_(res)
        res = out
    return res, lse, _empty(q), _empty(q)


def _bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    dq: Tensor | None = None,
    dk: Tensor | None = None,
    dv: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    seqused_q: Tensor | None = None,
    seqused_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    is_causal: bool = False,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = False,
    sm_margin: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from flash_attn import _extras

    fab = _extras.require_backward()
    if seqused_q is not None:
        raise FlashAttnValueError("flash_attn_3::bwd: seqused_q is not supported (pass the used rows packed)")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    rng = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        if cu_seqlens_q is not None:
            if cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
                raise FlashAttnValueError(
                    "flash_attn_3::bwd: varlen needs cu_seqlens_q, cu_seqlens_k, max_seqlen_q and max_seqlen_k"
                )
            res = fab.flash_attn_varlen_backward(
                dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, 0.0, scale, is_causal, window_size_left, window_size_right, softcap, None, True, rng,
                False, seqused_k,
            )  # fmt: skip
        else:
            res = fab.flash_attn_backward(
                dout, q, k, v, out, softmax_lse, dq, dk, dv, 0.0, scale, is_causal, window_size_left,
                window_size_right, softcap, None, True, rng,
            )  # fmt: skip
    softmax_d = res.softmax_d
    e = _empty(q)
    return dq, dk, dv, softmax_d, e, e.clone(), e.clone(), e.clone()


def _fwd_combine(
    out_partial: Tensor, lse_partial: Tensor, out: Tensor | None = None, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    import flash_attn_interface as fa3

    with torch.no_grad():
        return fa3.flash_attn_combine(out_partial, lse_partial, out=out, out_dtype=out_dtype)


def _get_scheduler_metadata(
    batch_size: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_heads: int,
    num_heads_k: int,
    headdim: int,
    headdim_v: int,
    qkv_dtype: torch.dtype,
    seqused_k: Tensor,
    *args: Any,
    **kwargs: Any,
) -> Tensor:
    return torch.zeros(1, dtype=torch.int32, device=seqused_k.device)


_IMPLS = {
    "fwd": _fwd,
    "bwd": _bwd,
    "fwd_combine": _fwd_combine,
    "get_scheduler_metadata": _get_scheduler_metadata,
}


def _defined() -> bool:
    try:
        torch.ops.flash_attn_3.fwd.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def register() -> bool:
    """Define the ``flash_attn_3`` operators (once); False when they exist already (this module or the CUDA
    build registered them)."""
    global _LIB
    if _LIB is not None or _defined():
        return False
    lib = torch.library.Library("flash_attn_3", "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _IMPLS[name], "CompositeExplicitAutograd")
    _LIB = lib
    return True
