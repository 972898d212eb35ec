"""``flash_attn_with_kvcache`` behind one custom op, ``flash_attn_plus::kvcache`` (fa-kvcache's function).

Eager calls run fa-kvcache directly (no torch.library dispatch on the decode path); while ``torch.compile``
traces (:func:`fa_core.ops.tracing`) the call is this op: one opaque node that mutates ``k_cache`` /
``v_cache`` (the append), described by its fake implementation, so a decode step compiles with
``fullgraph=True``.

This module does not use ``from __future__ import annotations``: ``custom_op`` infers the schema from the
evaluated annotations.
"""

import torch

from fa_core.ops import NS
from flash_attn import _extras

Tensor = torch.Tensor


@torch.library.custom_op(f"{NS}::kvcache", mutates_args=("k_cache", "v_cache"))
def kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    rotary_cos: Tensor | None,
    rotary_sin: Tensor | None,
    cache_seqlens: Tensor | None,
    cache_seqlens_int: int | None,
    cache_batch_idx: Tensor | None,
    cache_leftpad: Tensor | None,
    block_table: Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    rotary_interleaved: bool,
    alibi_slopes: Tensor | None,
    num_splits: int,
    attention_chunk: int = 0,
    learnable_sink: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """fa-kvcache's ``flash_attn_with_kvcache`` (always returns ``(out (b, sq, h, dv), lse (b, h, sq))``).
    ``cache_seqlens`` is split in a tensor and an int argument because an op schema has no union type."""
    fak = _extras.require_kvcache()
    seqlens = cache_seqlens if cache_seqlens is not None else cache_seqlens_int
    with torch.no_grad():
        out, lse = fak.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx, cache_leftpad,
            block_table, softmax_scale, causal, (window_size_left, window_size_right), softcap,
            rotary_interleaved, alibi_slopes, num_splits, True, attention_chunk=attention_chunk,
            learnable_sink=learnable_sink, k_descale=k_descale, v_descale=v_descale,
        )  # fmt: skip
    return out, lse


@kvcache.register_fake
def _kvcache_fake(q, k_cache, v_cache, *args, **kwargs):
    b, sq, h = q.shape[:3]
    return q.new_empty((b, sq, h, v_cache.shape[-1])), q.new_empty((b, h, sq), dtype=torch.float32)
