"""flash-attn 2.8.x's tensor-parallel attention :class:`ParallelMHA` (re-exported by :mod:`flash_attn.modules.mha`,
where flash-attn defines it).

Each rank holds whole heads: ``Wqkv`` is a :class:`flash_attn.ops.fused_dense.ColumnParallelLinear` whose rows
are this rank's q heads, then its k heads, then its v heads (``[q_r; k_r; v_r]`` of the full ``Wqkv``), split
in units of one kv head's group (``num_heads // num_heads_kv`` q heads + its k and v heads) with
:func:`flash_attn.utils.distributed.get_dim_for_local_rank`; ``out_proj`` is a
:class:`flash_attn.ops.fused_dense.RowParallelLinear` over the same heads' channels. The attention cores,
rotary embedding and KV cache are :class:`flash_attn.modules.mha.MHA`'s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flash_attn.flash_attn_interface import flash_attn_with_kvcache
from flash_attn.modules._cores import get_alibi_slopes
from flash_attn.modules._mha_common import (
    InferenceParamsLike,
    KVCacheSteps,
    _attend,
    _attention_cores,
    _check_flash_only,
    _empty_kv_cache,
    _rotary_embedding,
)
from flash_attn.ops.fused_dense import ColumnParallelLinear, RowParallelLinear
from flash_attn.utils.distributed import get_dim_for_local_rank

__all__ = ["ParallelMHA"]


class ParallelMHA(KVCacheSteps, nn.Module):
    """Multi-head self-attention split over a process group by heads: ``out_proj(attention(Wqkv x))`` with
    this rank's ``num_heads_per_rank`` q heads and ``num_heads_kv_per_rank`` k / v heads.

    With ``sequence_parallel`` the input is this rank's part of the rows of dim 0 (all-gathered inside
    ``Wqkv``) and the output is reduce-scattered back to this rank's rows; else the input is the full input on
    every rank and the output is all-reduced. ``forward(x, seqlen=S)`` takes ``x`` as ``(B * S, embed_dim)``
    flattened rows (so that sequence parallelism splits ``B * S`` rather than a small batch) and returns rows
    too. GQA / MQA (``num_heads_kv < num_heads``) splits the kv heads over the ranks, each keeping the q heads
    of its kv heads; the attention core is :class:`~flash_attn.modules.mha.FlashSelfAttention` /
    :class:`~flash_attn.modules.mha.FlashCrossAttention` with ``use_flash_attn=True``, else the PyTorch cores.
    Generation (``inference_params``) caches this rank's kv heads, as :class:`~flash_attn.modules.mha.MHA`
    does for all of them.

    Differences from flash-attn, all supersets: ``process_group=None`` means one process (no communication);
    ALiBi slopes follow the heads' split for any world size (flash-attn slices ``ceil(num_heads / world_size)``
    slopes per rank, which differs from the heads' split for some uneven splits); a GQA split in which the
    ranks' q heads would not be the q heads of their kv heads raises ``ValueError`` at construction (flash-attn
    fails in ``forward``); decoding with ``flash_attn_with_kvcache`` applies ``window_size`` as
    :class:`~flash_attn.modules.mha.MHA` does; invalid configurations raise ``ValueError`` instead of failing an
    ``assert``.
    """

    _step_name = "ParallelMHA"

    def _kvcache_fn(self) -> Any:
        return flash_attn_with_kvcache

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        process_group: dist.ProcessGroup | None,
        num_heads_kv: int | None = None,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        layer_idx: int | None = None,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_scale_base: float | None = None,
        rotary_emb_interleaved: bool = False,
        use_alibi: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        use_flash_attn: bool = False,
        checkpointing: bool = False,
        sequence_parallel: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            embed_dim: model width ``H * D``.
            num_heads: query heads H (all ranks together); ``num_heads_kv``: key / value heads H_k, default H.
            process_group: the tensor-parallel group; None: one process (no communication).
            qkv_proj_bias, out_proj_bias: biases of the projections (``out_proj``'s on the first rank only).
            dropout: attention dropout (training mode only). softmax_scale: default ``1 / sqrt(D)``.
            causal: causal mask (bottom-right aligned). layer_idx: key of this layer's KV cache in
                ``inference_params.key_value_memory_dict`` (required for generation).
            rotary_emb_dim, rotary_emb_base, rotary_emb_scale_base, rotary_emb_interleaved: rotary embedding
                of the first ``rotary_emb_dim`` channels of each q / k head, as in
                :class:`~flash_attn.modules.mha.MHA`; 0 = none.
            use_alibi: ALiBi with this rank's heads' slopes of
                :func:`~flash_attn.modules.mha.get_alibi_slopes` (needs ``use_flash_attn``).
            window_size: ``(left, right)`` sliding window (needs ``use_flash_attn``).
            use_flash_attn: flash kernels for the attention core, else the PyTorch cores.
            checkpointing: recompute the attention core in the backward (``torch.utils.checkpoint``).
            sequence_parallel: split the rows of dim 0 of the input and output over the ranks (see the class
                docstring).
            device, dtype: of the parameters.
        """
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.causal = causal
        self.layer_idx = layer_idx
        self.rotary_emb_dim = rotary_emb_dim
        self.use_flash_attn = use_flash_attn
        self.checkpointing = checkpointing
        self.process_group = process_group
        if process_group is None:
            self.world_size, self.local_rank = 1, 0
        else:
            self.world_size = dist.get_world_size(process_group)
            self.local_rank = dist.get_rank(process_group)
        _check_flash_only("ParallelMHA", use_alibi, window_size, use_flash_attn)

        self.num_heads = num_heads
        if embed_dim % num_heads != 0:
            raise ValueError(f"ParallelMHA: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        if num_heads % self.num_heads_kv != 0:
            raise ValueError(
                f"ParallelMHA: num_heads {num_heads} must be divisible by num_heads_kv {self.num_heads_kv}"
            )
        group_size = num_heads // self.num_heads_kv  # q heads per kv head
        q_split = [get_dim_for_local_rank(num_heads, self.world_size, r) for r in range(self.world_size)]
        kv_split = [
            get_dim_for_local_rank(self.num_heads_kv, self.world_size, r) for r in range(self.world_size)
        ]
        if q_split != [n * group_size for n in kv_split]:
            raise ValueError(
                f"ParallelMHA: splitting num_heads {num_heads} as {q_split} and num_heads_kv {self.num_heads_kv} "
                f"as {kv_split} over {self.world_size} ranks does not keep each rank's q heads with their kv "
                f"heads (with GQA / MQA the world size must divide num_heads_kv)"
            )
        self.num_heads_per_rank = q_split[self.local_rank]
        self.num_heads_kv_per_rank = kv_split[self.local_rank]
        self.head_dim = embed_dim // num_heads
        qkv_dim = self.head_dim * (num_heads + 2 * self.num_heads_kv)

        alibi_slopes = None
        if use_alibi:
            first = sum(q_split[: self.local_rank])
            alibi_slopes = torch.tensor(
                get_alibi_slopes(num_heads)[first : first + self.num_heads_per_rank], device=device
            )

        if rotary_emb_dim > 0:
            self.rotary_emb = _rotary_embedding(
                rotary_emb_dim, rotary_emb_base, rotary_emb_scale_base, rotary_emb_interleaved, device
            )

        self.Wqkv = ColumnParallelLinear(
            embed_dim,
            qkv_dim,
            process_group,
            bias=qkv_proj_bias,
            sequence_parallel=sequence_parallel,
            multiple_of=self.head_dim * (group_size + 2),
            **factory_kwargs,
        )
        self.inner_attn, self.inner_cross_attn = _attention_cores(
            use_flash_attn, alibi_slopes, window_size, causal, softmax_scale, dropout
        )
        self.out_proj = RowParallelLinear(
            embed_dim,
            embed_dim,
            process_group,
            bias=out_proj_bias,
            sequence_parallel=sequence_parallel,
            multiple_of=self.head_dim,
            **factory_kwargs,
        )

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None
    ) -> Tensor:
        """An empty KV cache of this rank's kv heads ``(batch_size, max_seqlen, 2, num_heads_kv_per_rank, D)``
        on ``out_proj``'s device, of ``dtype`` (default ``out_proj``'s)."""
        return _empty_kv_cache(
            self.out_proj, batch_size, max_seqlen, self.num_heads_kv_per_rank, self.head_dim, dtype
        )

    def forward(
        self,
        x: Tensor,
        seqlen: int | None = None,
        inference_params: InferenceParamsLike | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """
        Arguments:
            x: ``(B, S, embed_dim)`` when ``seqlen`` is None, else ``(B * S, embed_dim)`` rows with
                ``seqlen=S``; with ``sequence_parallel`` only this rank's part of dim 0 (``B / W`` batches or
                ``B * S / W`` rows on ``W`` ranks).
            seqlen: the sequence length of flattened ``(B * S, embed_dim)`` rows.
            inference_params: generation state, as for :class:`~flash_attn.modules.mha.MHA` (this rank's kv
                heads go to the cache).
            kwargs: passed on to the attention core (e.g. ``causal``, or ``cu_seqlens`` / ``max_seqlen`` of a
                varlen ``(total, embed_dim)`` input with the flash cores, or ``key_padding_mask`` with the
                PyTorch ones).
        Return:
            the same layout as ``x``: this rank's rows with ``sequence_parallel``, else the full output.
        """
        qkv = self.Wqkv(x)
        if seqlen is not None:
            qkv = qkv.unflatten(0, (-1, seqlen))
        heads, heads_kv, head_dim = self.num_heads_per_rank, self.num_heads_kv_per_rank, self.head_dim
        qkv_or_q: Tensor
        kv: Tensor | None = None
        if self.num_heads_kv == self.num_heads:
            qkv_or_q = qkv.unflatten(-1, (3, heads, head_dim))
        else:
            q_part, kv_part = qkv.split([heads * head_dim, 2 * heads_kv * head_dim], dim=-1)
            qkv_or_q = q_part.unflatten(-1, (heads, head_dim))
            kv = kv_part.unflatten(-1, (2, heads_kv, head_dim))
        context = _attend(self, qkv_or_q, kv, inference_params, kwargs).flatten(-2)
        if seqlen is not None:
            context = context.flatten(0, 1)
        return self.out_proj(context)
