"""``flash_attn.modules.mha``: flash-attn 2.8.x's multi-head attention modules.

* :class:`FlashSelfAttention` / :class:`FlashCrossAttention`: the attention core on packed projections
  (``qkv (B, S, 3, H, D)`` / ``q (B, Sq, H, D)`` with ``kv (B, Sk, 2, H_k, D)``, or the varlen forms with
  ``cu_seqlens``), running :mod:`flash_attn.flash_attn_interface`'s kernels.
* :class:`SelfAttention` / :class:`CrossAttention`: the same computation in plain PyTorch (einsum + softmax),
  with a boolean ``key_padding_mask`` instead of varlen.
* :class:`MHA`: projections + optional rotary embedding / depthwise convolution / GQA + one of the cores +
  output projection, with a KV cache for generation (``inference_params``, duck-typed like flash-attn's
  ``flash_attn.utils.generation.InferenceParams``).
* :class:`ParallelMHA`: :class:`MHA`'s self-attention split over a ``torch.distributed`` process group by heads
  (column-parallel ``Wqkv``, row-parallel ``out_proj`` from :mod:`flash_attn.ops.fused_dense`, optional
  sequence parallelism), with the same cores, rotary embedding, GQA and KV cache; defined in
  ``flash_attn.modules._parallel_mha`` (see there for its differences from flash-attn).

Parameter names, constructor and forward signatures and defaults are flash-attn's, so state dicts and call
sites carry over. Differences from flash-attn, all supersets:

* no dtype / device assertions in the flash cores: the kernels check their inputs (and run fp32 / CPU tensors
  through Triton's interpreter);
* ``FlashCrossAttention`` takes ``cu_seqlens_k`` / ``max_seqlen_k`` from ``cu_seqlens`` / ``max_seqlen`` when
  they are not given (self-attention with GQA in varlen form);
* decoding through ``flash_attn_with_kvcache`` also applies the cores' ``window_size``, so a sliding-window
  model decodes as its full forward computes; without fa-kvcache installed, decoding falls back to the
  cache update + ``inner_cross_attn`` path (as flash-attn does without its kvcache kernel);
* ``dwconv`` with GQA / cross-attention convolves the flat projections (flash-attn's code path there fails on
  the head-split tensors).

``fused_bias_fc`` is accepted and, as in flash-attn 2.8.x, has no effect: the projections are ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flash_attn.flash_attn_interface import flash_attn_with_kvcache
from flash_attn.modules._cores import (
    CrossAttention,
    FlashCrossAttention,
    FlashSelfAttention,
    LinearResidual,
    SelfAttention,
    get_alibi_slopes,
)
from flash_attn.modules._mha_common import (
    InferenceParamsLike,
    KVCacheSteps,
    _attend,
    _attention_cores,
    _check_flash_only,
    _empty_kv_cache,
    _rotary_embedding,
)
from flash_attn.modules._parallel_mha import ParallelMHA

__all__ = [
    "MHA",
    "CrossAttention",
    "FlashCrossAttention",
    "FlashSelfAttention",
    "LinearResidual",
    "ParallelMHA",
    "SelfAttention",
    "get_alibi_slopes",
]


def _dwconv(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """Causal depthwise convolution over the sequence: ``(B, S, C)`` -> ``(B, S, C)``."""
    return conv(x.transpose(1, 2))[..., :-2].transpose(1, 2).contiguous()


class MHA(KVCacheSteps, nn.Module):
    """Multi-head self-attention and cross-attention: ``out_proj(attention(Wq x, Wkv x_kv))``.

    Self-attention with ``num_heads_kv == num_heads`` projects with one ``Wqkv`` to
    ``(..., 3, H, D)``; GQA / MQA (``num_heads_kv < num_heads``) uses the same ``Wqkv`` of width
    ``(H + 2 H_k) D`` split into ``q (..., H, D)`` and ``kv (..., 2, H_k, D)``; cross-attention has ``Wq`` and
    ``Wkv``. The attention core is :class:`FlashSelfAttention` / :class:`FlashCrossAttention` with
    ``use_flash_attn=True``, else :class:`SelfAttention` / :class:`CrossAttention` (``inner_attn`` /
    ``inner_cross_attn``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_heads_kv: int | None = None,
        cross_attn: bool = False,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        layer_idx: int | None = None,
        dwconv: bool = False,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_scale_base: float | None = None,
        rotary_emb_interleaved: bool = False,
        use_alibi: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        fused_bias_fc: bool = False,
        use_flash_attn: bool = False,
        return_residual: bool = False,
        checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            embed_dim: model width ``H * D``.
            num_heads: query heads H; ``num_heads_kv``: key / value heads H_k (GQA / MQA), default H.
            cross_attn: separate ``Wq`` / ``Wkv`` projections and ``forward(x, x_kv)``.
            qkv_proj_bias, out_proj_bias: biases of the input / output projections.
            dropout: attention dropout (training mode only). softmax_scale: default ``1 / sqrt(D)``.
            causal: causal mask (bottom-right aligned). layer_idx: key of this layer's KV cache in
                ``inference_params.key_value_memory_dict`` (required for generation).
            dwconv: causal depthwise convolution (kernel 3) over the sequence after the projections.
            rotary_emb_dim: rotary embedding on the first ``rotary_emb_dim`` channels of each q / k head
                (:class:`flash_attn.layers.rotary.RotaryEmbedding` with ``rotary_emb_base``,
                ``rotary_emb_scale_base`` (XPos) and ``rotary_emb_interleaved``); 0 = none; self-attention only.
            use_alibi: ALiBi biases with :func:`get_alibi_slopes` (needs ``use_flash_attn``).
            window_size: ``(left, right)`` sliding window (needs ``use_flash_attn``).
            fused_bias_fc: accepted for compatibility; no effect (flash-attn 2.8.x uses ``nn.Linear`` too).
            use_flash_attn: flash kernels for the attention core, else the PyTorch cores.
            return_residual: ``forward`` returns ``(out, x)``.
            checkpointing: recompute the attention core in the backward (``torch.utils.checkpoint``).
            device, dtype: of the parameters.
        """
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.cross_attn = cross_attn
        self.causal = causal
        self.layer_idx = layer_idx
        self.dwconv = dwconv
        self.rotary_emb_dim = rotary_emb_dim
        self.use_flash_attn = use_flash_attn
        self.return_residual = return_residual
        self.checkpointing = checkpointing
        _check_flash_only("MHA", use_alibi, window_size, use_flash_attn)
        alibi_slopes = torch.tensor(get_alibi_slopes(num_heads), device=device) if use_alibi else None

        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        if num_heads % self.num_heads_kv != 0:
            raise ValueError(
                f"MHA: num_heads {num_heads} must be divisible by num_heads_kv {self.num_heads_kv}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"MHA: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.head_dim = embed_dim // num_heads
        qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        kv_dim = 2 * self.head_dim * self.num_heads_kv

        if rotary_emb_dim > 0:
            if cross_attn:
                raise ValueError(
                    "MHA: rotary embedding (rotary_emb_dim > 0) is not supported with cross_attn"
                )
            self.rotary_emb = _rotary_embedding(
                rotary_emb_dim, rotary_emb_base, rotary_emb_scale_base, rotary_emb_interleaved, device
            )

        if not cross_attn:
            self.Wqkv = nn.Linear(embed_dim, qkv_dim, bias=qkv_proj_bias, **factory_kwargs)
        else:
            self.Wq = nn.Linear(embed_dim, embed_dim, bias=qkv_proj_bias, **factory_kwargs)
            self.Wkv = nn.Linear(embed_dim, kv_dim, bias=qkv_proj_bias, **factory_kwargs)
        if dwconv:

            def conv(channels: int) -> nn.Conv1d:
                return nn.Conv1d(
                    channels, channels, kernel_size=3, padding=2, groups=channels, **factory_kwargs
                )

            if self.num_heads_kv == self.num_heads and not cross_attn:
                self.dwconv_qkv = conv(qkv_dim)
            else:
                self.dwconv_q = conv(embed_dim)
                self.dwconv_kv = conv(kv_dim)
        self.inner_attn, self.inner_cross_attn = _attention_cores(
            use_flash_attn, alibi_slopes, window_size, causal, softmax_scale, dropout
        )
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_proj_bias, **factory_kwargs)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None
    ) -> Tensor:
        """An empty KV cache ``(batch_size, max_seqlen, 2, H_k, D)`` on ``out_proj``'s device, of ``dtype``
        (default ``out_proj``'s), to put in ``inference_params.key_value_memory_dict[layer_idx]``."""
        return _empty_kv_cache(self.out_proj, batch_size, max_seqlen, self.num_heads_kv, self.head_dim, dtype)

    def _kvcache_fn(self) -> Any:
        return flash_attn_with_kvcache  # looked up per call: tests patch this module's name

    def _project_qkv(self, x: Tensor) -> Tensor:
        qkv = self.Wqkv(x)
        if self.dwconv:
            qkv = _dwconv(self.dwconv_qkv, qkv)
        return qkv.unflatten(-1, (3, self.num_heads, self.head_dim))

    def _project_q_kv(self, x: Tensor, x_kv: Tensor | None, mixer_subset: Any) -> tuple[Tensor, Tensor]:
        if self.cross_attn:
            q = self.Wq(x if mixer_subset is None else x[:, mixer_subset])
            kv = self.Wkv(x_kv if x_kv is not None else x)
        else:
            qkv = self.Wqkv(x)
            q, kv = qkv.split([self.num_heads * self.head_dim, 2 * self.num_heads_kv * self.head_dim], dim=-1)
        if self.dwconv:
            q, kv = _dwconv(self.dwconv_q, q), _dwconv(self.dwconv_kv, kv)
        return (
            q.unflatten(-1, (self.num_heads, self.head_dim)),
            kv.unflatten(-1, (2, self.num_heads_kv, self.head_dim)),
        )

    def forward(
        self,
        x: Tensor,
        x_kv: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        mixer_subset: Any = None,
        inference_params: InferenceParamsLike | None = None,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """
        Arguments:
            x: ``(B, S, embed_dim)``, or ``(total, embed_dim)`` with ``cu_seqlens`` (total = sum of the
                sequence lengths; flash cores only, no dwconv / rotary).
            x_kv: ``(B, Sk, embed_dim)``, cross-attention only: the keys' source (default x).
            key_padding_mask: ``(B, S)`` bool, True = keep; PyTorch cores only (with the flash cores unpad
                with :func:`flash_attn.bert_padding.unpad_input` and pass ``cu_seqlens``).
            cu_seqlens: int32 ``(B + 1,)`` cumulative sequence lengths of the varlen form; max_seqlen: int.
            mixer_subset: cross-attention only: index of x's sequence dimension selecting the queries (e.g. a
                ViT's CLS token).
            inference_params: generation state (see :class:`InferenceParamsLike`): the new keys / values go to
                the cache and the queries attend over everything cached; rotary positions start at
                ``lengths_per_sample`` or ``seqlen_offset``.
            kwargs: passed on to the attention core (e.g. ``causal``).
        Return:
            ``(B, S, embed_dim)`` (``(total, embed_dim)`` in the varlen form), or ``(out, x)`` with
            ``return_residual``.
        """
        if cu_seqlens is not None:
            if max_seqlen is None or key_padding_mask is not None:
                raise ValueError("MHA: cu_seqlens needs max_seqlen and excludes key_padding_mask")
            if not self.use_flash_attn or self.dwconv or self.rotary_emb_dim > 0:
                raise ValueError(
                    "MHA: cu_seqlens needs use_flash_attn=True, dwconv=False and rotary_emb_dim=0"
                )
        if key_padding_mask is not None:
            if max_seqlen is not None:
                raise ValueError("MHA: key_padding_mask excludes max_seqlen")
            if self.use_flash_attn:
                raise ValueError(
                    "MHA: key_padding_mask needs use_flash_attn=False; with the flash cores unpad the input "
                    "(flash_attn.bert_padding.unpad_input) and pass cu_seqlens / max_seqlen"
                )
        if inference_params is not None:
            if key_padding_mask is not None or cu_seqlens is not None or max_seqlen is not None:
                raise ValueError("MHA: inference_params excludes key_padding_mask, cu_seqlens and max_seqlen")
            if self.dwconv:
                raise ValueError("MHA: generation (inference_params) does not support dwconv")

        core_kwargs: dict[str, Any] = (
            {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, **kwargs}
            if self.use_flash_attn
            else {"key_padding_mask": key_padding_mask, **kwargs}
        )
        qkv_or_q: Tensor
        kv: Tensor | None = None
        if not self.cross_attn and self.num_heads_kv == self.num_heads:
            if x_kv is not None or mixer_subset is not None:
                raise ValueError("MHA: x_kv and mixer_subset are for cross_attn=True only")
            qkv_or_q = self._project_qkv(x)
        else:
            qkv_or_q, kv = self._project_q_kv(x, x_kv, mixer_subset)
        context = _attend(self, qkv_or_q, kv, inference_params, core_kwargs)
        out = self.out_proj(context.flatten(-2))
        return (out, x) if self.return_residual else out
