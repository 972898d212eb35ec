"""What :class:`flash_attn.modules.mha.MHA` and :class:`flash_attn.modules.mha.ParallelMHA` share: the
generation state they read (:class:`InferenceParamsLike`) and its KV cache, the construction of the rotary
embedding and the attention cores, and the attention of the projected heads (:func:`_attend`: rotary
embedding, then the KV cache or the attention core, with optional checkpointing).

The helpers take the attention module as ``module`` and read its attributes ``layer_idx``,
``rotary_emb_dim`` (and ``rotary_emb`` when > 0), ``use_flash_attn``, ``checkpointing``, ``inner_attn`` and
``inner_cross_attn``, and the decoding steps of :class:`KVCacheSteps` (its ``_step_name`` starts their error
messages, its ``_kvcache_fn()`` is the ``flash_attn_with_kvcache`` they call).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from flash_attn import _extras
from flash_attn.layers.rotary import RotaryEmbedding
from flash_attn.modules._cores import (
    CrossAttention,
    FlashCrossAttention,
    FlashSelfAttention,
    SelfAttention,
    _fp32,
)


class InferenceParamsLike(Protocol):
    """What :class:`~flash_attn.modules.mha.MHA` and :class:`~flash_attn.modules.mha.ParallelMHA` read and
    write of a generation state (flash-attn's ``InferenceParams``).

    ``key_value_memory_dict[layer_idx]`` holds each layer's cache ``(max_batch_size, max_seqlen, 2, H_k, D)``
    (created on the first call when missing); ``seqlen_offset`` is the number of tokens already in the cache
    (0 for the prompt), ``lengths_per_sample`` an optional int32 ``(batch,)`` per-sequence length that
    replaces it for rotary positions and cache lengths.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int
    batch_size_offset: int
    key_value_memory_dict: dict[Any, Any]
    lengths_per_sample: Tensor | None


def _update_kv_cache(kv: Tensor, inference_params: InferenceParamsLike, layer_idx: Any) -> Tensor:
    """Write ``kv`` into layer ``layer_idx``'s cache and return the cache's filled part.

    Arguments:
        kv: ``(B, S, 2, H_k, D)``, the new keys / values (the prompt, or one step's tokens).
        inference_params: the cache ``(max_batch_size, max_seqlen, 2, H_k, D)`` is created in
            ``key_value_memory_dict[layer_idx]`` when missing; ``kv`` goes to rows
            ``batch_size_offset : + B`` and positions ``seqlen_offset : + S``.
    Return:
        ``(B, seqlen_offset + S, 2, H_k, D)``: a view of the cache up to the last written position.
    """
    store = inference_params.key_value_memory_dict
    if layer_idx not in store:
        store[layer_idx] = torch.empty(
            inference_params.max_batch_size,
            inference_params.max_seqlen,
            2,
            *kv.shape[-2:],
            dtype=kv.dtype,
            device=kv.device,
        )
    kv_cache = store[layer_idx]
    b0 = inference_params.batch_size_offset
    b1 = b0 + kv.shape[0]
    s0 = inference_params.seqlen_offset
    s1 = s0 + kv.shape[1]
    if b1 > kv_cache.shape[0] or s1 > kv_cache.shape[1]:
        raise ValueError(
            f"KV cache of shape {tuple(kv_cache.shape)} too small for batch rows [{b0}, {b1}) and positions "
            f"[{s0}, {s1})"
        )
    kv_cache[b0:b1, s0:s1] = kv
    return kv_cache[b0:b1, :s1]


def _empty_kv_cache(
    out_proj: nn.Linear,
    batch_size: int,
    max_seqlen: int,
    num_heads_kv: int,
    head_dim: int,
    dtype: torch.dtype | None,
) -> Tensor:
    """An empty KV cache ``(batch_size, max_seqlen, 2, num_heads_kv, head_dim)`` on ``out_proj``'s device, of
    ``dtype`` (default ``out_proj``'s)."""
    dtype = out_proj.weight.dtype if dtype is None else dtype
    return torch.empty(
        batch_size, max_seqlen, 2, num_heads_kv, head_dim, dtype=dtype, device=out_proj.weight.device
    )


def _check_flash_only(name: str, use_alibi: bool, window_size: tuple[int, int], use_flash_attn: bool) -> None:
    """ALiBi and a sliding window exist in the flash cores only."""
    if use_alibi and not use_flash_attn:
        raise ValueError(f"{name}: use_alibi=True requires use_flash_attn=True")
    if tuple(window_size) != (-1, -1) and not use_flash_attn:
        raise ValueError(f"{name}: a sliding window_size requires use_flash_attn=True")


def _rotary_embedding(
    dim: int, base: float, scale_base: float | None, interleaved: bool, device: Any
) -> RotaryEmbedding:
    """The rotary embedding of the first ``dim`` channels of each q / k head (``rotary_emb_*`` arguments)."""
    return RotaryEmbedding(dim, base=base, scale_base=scale_base, interleaved=interleaved, device=device)


def _attention_cores(
    use_flash_attn: bool,
    alibi_slopes: Tensor | None,
    window_size: tuple[int, int],
    causal: bool,
    softmax_scale: float | None,
    dropout: float,
) -> tuple[nn.Module, nn.Module]:
    """``(inner_attn, inner_cross_attn)``: the flash cores with the ALiBi slopes and window, else the PyTorch
    cores."""
    inner_attn_cls: Any
    inner_cross_attn_cls: Any
    if use_flash_attn:
        inner_attn_cls = partial(FlashSelfAttention, alibi_slopes=alibi_slopes, window_size=window_size)
        inner_cross_attn_cls = partial(
            FlashCrossAttention, alibi_slopes=alibi_slopes, window_size=window_size
        )
    else:
        inner_attn_cls, inner_cross_attn_cls = SelfAttention, CrossAttention
    core_kwargs = {"causal": causal, "softmax_scale": softmax_scale, "attention_dropout": dropout}
    return inner_attn_cls(**core_kwargs), inner_cross_attn_cls(**core_kwargs)


def _kvcache_attention(
    module: Any,
    q: Tensor,
    kv: Tensor,
    inference_params: InferenceParamsLike,
    kvcache_fn: Callable[..., Any],
    **rotary: Any,
) -> Tensor:
    """One ``kvcache_fn`` (``flash_attn_with_kvcache``) call: append ``kv`` to the module's cache and attend
    ``q`` over it with ``inner_cross_attn``'s scale, mask, window and ALiBi slopes."""
    batch = q.shape[0]
    kv_cache = inference_params.key_value_memory_dict[module.layer_idx][:batch]
    cache_seqlens = (
        inference_params.lengths_per_sample[:batch]
        if inference_params.lengths_per_sample is not None
        else inference_params.seqlen_offset
    )
    core = module.inner_cross_attn
    return kvcache_fn(
        q,
        kv_cache[:, :, 0],
        kv_cache[:, :, 1],
        kv[:, :, 0],
        kv[:, :, 1],
        cache_seqlens=cache_seqlens,
        softmax_scale=core.softmax_scale,
        causal=core.causal,
        window_size=getattr(core, "window_size", (-1, -1)),
        alibi_slopes=_fp32(getattr(core, "alibi_slopes", None)),
        **rotary,
    )


def _kvcache_rotary(rotary_emb: RotaryEmbedding, q: Tensor, max_seqlen: int, name: str) -> dict[str, Any]:
    """The rotary arguments of ``kvcache_fn`` for a decoding step that rotates q and the new k inside the
    kernel: the cos / sin tables (built up to ``max_seqlen`` on q's device, in q's dtype) and the layout."""
    if rotary_emb.scale is not None:
        raise ValueError(f"{name}: the fused decoding path does not support XPos (rotary_emb_scale_base)")
    rotary_emb._update_cos_sin_cache(max_seqlen, device=q.device, dtype=q.dtype)
    return {
        "rotary_cos": rotary_emb._cos_cached,
        "rotary_sin": rotary_emb._sin_cached,
        "rotary_interleaved": rotary_emb.interleaved,
    }


def _q_kv(qkv_or_q: Tensor, kv: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(q, kv)`` of packed ``qkv (B, S, 3, H, D)`` (``kv`` None: its views ``qkv[:, :, 0]`` /
    ``qkv[:, :, 1:]``), else ``(qkv_or_q, kv)`` as given."""
    return (qkv_or_q[:, :, 0], qkv_or_q[:, :, 1:]) if kv is None else (qkv_or_q, kv)


def _attend(
    module: Any,
    qkv_or_q: Tensor,
    kv: Tensor | None,
    inference_params: InferenceParamsLike | None,
    core_kwargs: dict[str, Any],
) -> Tensor:
    """The attention of the projected heads: packed ``qkv (B, S, 3, H, D)`` (``kv`` None) through
    ``inner_attn``, or ``q (B, S, H, D)`` and ``kv (B, S, 2, H_k, D)`` through ``inner_cross_attn``.

    The rotary embedding (``rotary_emb_dim > 0``) rotates q and k first, at positions starting from
    ``lengths_per_sample`` or ``seqlen_offset`` with ``inference_params``. With ``inference_params`` the
    keys / values go to the cache and the queries attend over everything cached
    (:meth:`KVCacheSteps._update_kvcache_attention`; a decoding step with the flash cores and a rotary dim
    that is a multiple of 16 rotates q and k inside the kvcache kernel instead,
    :meth:`KVCacheSteps._apply_rotary_update_kvcache_attention`); otherwise the core runs with ``core_kwargs``,
    recomputed in the backward with ``checkpointing``. Returns ``(B, S, H, D)``.
    """
    seqlen_offset: int | Tensor = 0
    rotary_max_seqlen: int | None = None
    if inference_params is not None:
        lengths = inference_params.lengths_per_sample
        seqlen_offset = lengths if lengths is not None else inference_params.seqlen_offset
        rotary_max_seqlen = inference_params.max_seqlen
        if (
            inference_params.seqlen_offset > 0
            and module.rotary_emb_dim > 0
            and module.rotary_emb_dim % 16 == 0
            and module.use_flash_attn
            and _extras.KVCACHE is not None
        ):
            return module._apply_rotary_update_kvcache_attention(*_q_kv(qkv_or_q, kv), inference_params)
    if module.rotary_emb_dim > 0:
        rotated = module.rotary_emb(qkv_or_q, kv, seqlen_offset=seqlen_offset, max_seqlen=rotary_max_seqlen)
        qkv_or_q, kv = (rotated, None) if kv is None else rotated
    if inference_params is not None:
        return module._update_kvcache_attention(*_q_kv(qkv_or_q, kv), inference_params)
    core, args = (module.inner_attn, (qkv_or_q,)) if kv is None else (module.inner_cross_attn, (qkv_or_q, kv))
    if module.checkpointing:
        return torch.utils.checkpoint.checkpoint(core, *args, use_reentrant=False, **core_kwargs)
    return core(*args, **core_kwargs)


class KVCacheSteps:
    """flash-attn's decoding-step methods of ``MHA`` / ``ParallelMHA`` (private there, kept for code that
    calls them), as views of the helpers above. A class sets ``_step_name`` (its error-message prefix) and
    ``_kvcache_fn()`` (the ``flash_attn_with_kvcache`` its decoding steps call)."""

    _step_name = "MHA"
    layer_idx: Any
    use_flash_attn: bool
    inner_cross_attn: Any

    def _kvcache_fn(self) -> Callable[..., Any]:
        raise NotImplementedError

    def _update_kv_cache(self, kv: Tensor, inference_params: InferenceParamsLike) -> Tensor:
        """kv: ``(B, S, 2, H_k, D)`` -> this layer's cache ``(B, seqlen_offset + S, 2, H_k, D)`` after writing
        kv."""
        if self.layer_idx is None:
            raise ValueError(
                f"{self._step_name}: generation (inference_params) requires layer_idx in the constructor"
            )
        return _update_kv_cache(kv, inference_params, self.layer_idx)

    def _apply_rotary_update_kvcache_attention(
        self, q: Tensor, kv: Tensor, inference_params: InferenceParamsLike
    ) -> Tensor:
        """Decoding step in one kernel: rotate q and the new k (with a rotary embedding), append k / v to the
        cache, attend. q: ``(B, Sq, H, D)``, kv: ``(B, Sq, 2, H_k, D)`` -> ``(B, Sq, H, D)``."""
        rotary: dict[str, Any] = {}
        if getattr(self, "rotary_emb_dim", 0) > 0:
            rotary = _kvcache_rotary(
                self.rotary_emb,  # type: ignore[attr-defined]
                q,
                inference_params.max_seqlen,
                self._step_name,
            )
        return _kvcache_attention(self, q, kv, inference_params, self._kvcache_fn(), **rotary)

    def _update_kvcache_attention(
        self, q: Tensor, kv: Tensor, inference_params: InferenceParamsLike
    ) -> Tensor:
        """Write ``kv`` (already rotated) into the cache, then attend ``q`` over the cache.

        The prompt (``seqlen_offset == 0``), the PyTorch cores and installs without fa-kvcache go through
        :meth:`_update_kv_cache` + ``inner_cross_attn`` (positions from ``seqlen_offset``); decoding steps with
        the flash cores through ``_kvcache_fn()`` (lengths from ``lengths_per_sample`` when set).
        q: ``(B, Sq, H, D)``, kv: ``(B, Sq, 2, H_k, D)`` -> ``(B, Sq, H, D)``.
        """
        if inference_params.seqlen_offset == 0 or not self.use_flash_attn or _extras.KVCACHE is None:
            return self.inner_cross_attn(q, self._update_kv_cache(kv, inference_params))
        return _kvcache_attention(self, q, kv, inference_params, self._kvcache_fn())
