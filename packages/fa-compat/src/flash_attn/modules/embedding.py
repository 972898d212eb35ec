"""``flash_attn.modules.embedding``: flash-attn 2.8.x's token / position embeddings.

* :class:`GPT2Embeddings`: word embeddings (optionally of a smaller width projected up by ``project_in``, as
  OPT-350m) plus learned absolute position embeddings;
* :class:`BertEmbeddings`: word + position + token type embeddings;
* :class:`VocabParallelEmbedding`: an ``nn.Embedding`` holding this rank's ``1 / world_size`` of the
  vocabulary; ids of other ranks' rows embed to zeros (the sum over the ranks is the full embedding);
* :class:`ColumnParallelEmbedding`: an ``nn.Embedding`` holding this rank's ``1 / world_size`` of the columns;
* :class:`ParallelGPT2Embeddings`: :class:`GPT2Embeddings` over the two, finished by a reduce-scatter
  (``sequence_parallel``) or an all-reduce over the process group.

Parameter names (``word_embeddings``, ``project_in``, ``position_embeddings``, ``token_type_embeddings``),
constructor and forward signatures and defaults are flash-attn's, so state dicts load either way. A
``max_position_embeddings`` (``type_vocab_size``) of 0 or less means no position (token type) embeddings.

With ``process_group=None`` the parallel classes are their plain counterparts on one process (no
communication); in flash-attn, ``ParallelGPT2Embeddings`` then asks the default process group for its size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flash_attn.utils.distributed import all_reduce, reduce_scatter

__all__ = [
    "BertEmbeddings",
    "ColumnParallelEmbedding",
    "GPT2Embeddings",
    "ParallelGPT2Embeddings",
    "VocabParallelEmbedding",
]


def _add_positions(embeddings: Tensor, table: nn.Embedding, position_ids: Tensor | None) -> Tensor:
    """``embeddings`` (B, S, D) plus ``table(position_ids)``; positions default to ``0 .. S - 1``."""
    if position_ids is None:
        position_ids = torch.arange(embeddings.shape[1], dtype=torch.long, device=embeddings.device)
    return embeddings + table(position_ids)


def _world_size(process_group: dist.ProcessGroup | None) -> int:
    return 1 if process_group is None else dist.get_world_size(process_group)


class GPT2Embeddings(nn.Module):
    """``input_ids`` (B, S) -> ``project_in(word_embeddings(input_ids)) + position_embeddings(position_ids)``,
    (B, S, embed_dim)."""

    def __init__(
        self,
        embed_dim: int,
        vocab_size: int,
        max_position_embeddings: int,
        padding_idx: int | None = None,
        word_embed_proj_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            embed_dim: output width.
            vocab_size: rows of ``word_embeddings``; ``padding_idx`` as in ``nn.Embedding``.
            max_position_embeddings: rows of ``position_embeddings``; <= 0: no position embeddings.
            word_embed_proj_dim: if given, ``word_embeddings`` has this width and ``project_in`` (a bias-free
                ``nn.Linear``) maps it to ``embed_dim``; else ``project_in`` is None.
            device, dtype: of the parameters.
        """
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        word_dim = embed_dim if word_embed_proj_dim is None else word_embed_proj_dim
        self.word_embeddings = nn.Embedding(vocab_size, word_dim, padding_idx=padding_idx, **factory_kwargs)
        self.project_in: nn.Linear | None = (
            None
            if word_embed_proj_dim is None
            else nn.Linear(word_embed_proj_dim, embed_dim, bias=False, **factory_kwargs)
        )
        self.max_position_embeddings = max_position_embeddings
        if max_position_embeddings > 0:
            self.position_embeddings = nn.Embedding(max_position_embeddings, embed_dim, **factory_kwargs)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """
        Arguments:
            input_ids: (B, S) token ids.
            position_ids: (B, S) or (S,); default ``0 .. S - 1``.
        Return:
            (B, S, embed_dim).
        """
        embeddings = self.word_embeddings(input_ids)
        if self.project_in is not None:
            embeddings = self.project_in(embeddings)
        if self.max_position_embeddings > 0:
            embeddings = _add_positions(embeddings, self.position_embeddings, position_ids)
        return embeddings


class BertEmbeddings(nn.Module):
    """``input_ids`` (B, S) -> ``word_embeddings(input_ids) + position_embeddings(position_ids) +
    token_type_embeddings(token_type_ids)``, (B, S, embed_dim)."""

    def __init__(
        self,
        embed_dim: int,
        vocab_size: int,
        max_position_embeddings: int,
        type_vocab_size: int,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            embed_dim: width of every table.
            vocab_size: rows of ``word_embeddings``; ``padding_idx`` as in ``nn.Embedding``.
            max_position_embeddings: rows of ``position_embeddings``; <= 0: no position embeddings.
            type_vocab_size: rows of ``token_type_embeddings``; <= 0: no token type embeddings.
            device, dtype: of the parameters.
        """
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.word_embeddings = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx, **factory_kwargs)
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        if max_position_embeddings > 0:
            self.position_embeddings = nn.Embedding(max_position_embeddings, embed_dim, **factory_kwargs)
        if type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(type_vocab_size, embed_dim, **factory_kwargs)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """
        Arguments:
            input_ids: (B, S) token ids.
            position_ids: (B, S) or (S,); default ``0 .. S - 1``.
            token_type_ids: (B, S) or (S,); default all 0.
        Return:
            (B, S, embed_dim).
        """
        embeddings = self.word_embeddings(input_ids)
        if self.max_position_embeddings > 0:
            embeddings = _add_positions(embeddings, self.position_embeddings, position_ids)
        if self.type_vocab_size > 0:
            if token_type_ids is None:
                token_type_ids = torch.zeros(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return embeddings


class VocabParallelEmbedding(nn.Embedding):
    """An ``nn.Embedding`` of ``num_embeddings // world_size`` rows: rank ``r`` holds the vocabulary rows
    ``r * n : (r + 1) * n`` (``n = num_embeddings // world_size``).

    With a process group, ``forward`` takes ids of the full vocabulary and returns this rank's partial
    embedding: the row for ids in its range, zeros for the others (sum over the ranks for the embedding).
    Without one it is a plain ``nn.Embedding(num_embeddings, ...)``.
    """

    def __init__(
        self,
        num_embeddings: int,
        *args: Any,
        process_group: dist.ProcessGroup | None = None,
        padding_idx: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Arguments:
            num_embeddings: the full vocabulary size, divisible by the group's size.
            args, kwargs: the other arguments of ``nn.Embedding`` (``embedding_dim``, ``device``, ...).
            process_group: the tensor-parallel group; None: no parallelism.
            padding_idx: as in ``nn.Embedding``, only on a group of one process (or without a group).
        """
        self.process_group = process_group
        world_size = _world_size(process_group)
        if num_embeddings % world_size != 0:
            raise ValueError(
                f"num_embeddings ({num_embeddings}) must be divisible by world_size ({world_size})"
            )
        if world_size > 1 and padding_idx is not None:
            raise RuntimeError("ParallelEmbedding does not support padding_idx")
        # padding_idx is keyword-only here, so args cannot hold it too
        super().__init__(num_embeddings // world_size, *args, padding_idx=padding_idx, **kwargs)  # type: ignore[misc]

    def forward(self, input: Tensor) -> Tensor:
        """input: token ids of the full vocabulary (any shape) -> (*input.shape, embedding_dim)."""
        if self.process_group is None:
            return super().forward(input)
        start = dist.get_rank(self.process_group) * self.num_embeddings
        outside = (input < start) | (input >= start + self.num_embeddings)
        local_ids = (input - start).masked_fill(outside, 0)
        return super().forward(local_ids).masked_fill(outside.unsqueeze(-1), 0.0)


class ColumnParallelEmbedding(nn.Embedding):
    """An ``nn.Embedding`` of ``embedding_dim // world_size`` columns (this rank's slice of the width); the
    forward is ``nn.Embedding``'s."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *args: Any,
        process_group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Arguments:
            num_embeddings: rows.
            embedding_dim: the full width, divisible by the group's size.
            args, kwargs: the other arguments of ``nn.Embedding``.
            process_group: the tensor-parallel group; None: the full width.
        """
        self.process_group = process_group
        world_size = _world_size(process_group)
        if embedding_dim % world_size != 0:
            raise ValueError(
                f"embedding_dim ({embedding_dim}) must be divisible by world_size ({world_size})"
            )
        super().__init__(num_embeddings, embedding_dim // world_size, *args, **kwargs)


class ParallelGPT2Embeddings(nn.Module):
    """:class:`GPT2Embeddings` split over a process group: vocabulary-parallel word embeddings
    (:class:`VocabParallelEmbedding`) and column-parallel position embeddings (:class:`ColumnParallelEmbedding`,
    each rank adding its columns), summed over the ranks by a reduce-scatter along dim 0
    (``sequence_parallel``) or an all-reduce."""

    def __init__(
        self,
        embed_dim: int,
        vocab_size: int,
        max_position_embeddings: int,
        process_group: dist.ProcessGroup | None,
        padding_idx: int | None = None,
        sequence_parallel: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            embed_dim: output width (divisible by the group's size with position embeddings).
            vocab_size: full vocabulary size (divisible by the group's size).
            max_position_embeddings: <= 0: no position embeddings.
            process_group: the tensor-parallel group; None: one process, no communication.
            padding_idx: only on a group of one process.
            sequence_parallel: reduce-scatter the output along dim 0 instead of all-reducing it.
            device, dtype: of the parameters.
        """
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size, embed_dim, padding_idx=padding_idx, process_group=process_group, **factory_kwargs
        )
        self.max_position_embeddings = max_position_embeddings
        if max_position_embeddings > 0:
            self.position_embeddings = ColumnParallelEmbedding(
                max_position_embeddings, embed_dim, process_group=process_group, **factory_kwargs
            )

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None = None, combine_batch_seqlen_dim: bool = False
    ) -> Tensor:
        """
        Arguments:
            input_ids: (B, S) token ids.
            position_ids: (B, S) or (S,); default ``0 .. S - 1``.
            combine_batch_seqlen_dim: flatten the output to (B * S, embed_dim) before the reduction.
        Return:
            with a group of ``W > 1`` ranks: ``sequence_parallel``: this rank's ``1 / W`` of the rows of dim 0
            ((B / W, S, embed_dim), or (B * S / W, embed_dim) with ``combine_batch_seqlen_dim``); else the full
            (B, S, embed_dim) / (B * S, embed_dim) on every rank. On one process the full output.
        """
        world_size = _world_size(self.process_group)
        embeddings = self.word_embeddings(input_ids)
        if self.max_position_embeddings > 0:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
            positions = self.position_embeddings(position_ids)
            if world_size <= 1:
                embeddings = embeddings + positions
            else:
                width = self.position_embeddings.embedding_dim
                start = dist.get_rank(self.process_group) * width
                embeddings[..., start : start + width] += positions
        if combine_batch_seqlen_dim:
            embeddings = embeddings.reshape(-1, embeddings.shape[-1])
        if world_size <= 1:
            return embeddings
        reduce = reduce_scatter if self.sequence_parallel else all_reduce
        return reduce(embeddings, self.process_group)
