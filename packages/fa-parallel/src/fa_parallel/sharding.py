"""How a sequence is split across the ranks of a context-parallel group.

The global sequence of length ``S`` is cut into equal chunks:

* ``"contiguous"``: ``world_size`` chunks, rank ``r`` holds chunk ``r``. Simple, but with a causal mask the
  last rank does ``2 * world_size - 1`` times the work of the first.
* ``"zigzag"`` (head-tail, load balanced): ``2 * world_size`` chunks, rank ``r`` holds chunks ``r`` and
  ``2 * world_size - 1 - r`` concatenated. Under a causal mask every rank then does the same work.

A rank's local tensor is the concatenation of its chunks along the sequence dim, in increasing position
order (both layouts keep positions increasing inside a rank, which the ring's diagonal step relies on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "LAYOUTS",
    "Chunk",
    "chunk_ids",
    "local_chunks",
    "num_chunks",
    "shard_sequence",
    "unshard_sequence",
    "zigzag_shard",
    "zigzag_unshard",
]

LAYOUTS = ("zigzag", "contiguous")


class Chunk(NamedTuple):
    """One chunk of a rank's local sequence: ``local`` offset in the local tensor, ``start`` global position,
    ``length`` tokens."""

    local: int
    start: int
    length: int


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def num_chunks(world_size: int, layout: str) -> int:
    """Number of equal chunks the global sequence is cut into."""
    _check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def chunk_ids(rank: int, world_size: int, layout: str) -> list[int]:
    """Indices of the global chunks rank ``rank`` holds, in local order."""
    if layout == "zigzag":
        return [rank, 2 * world_size - 1 - rank]
    return [rank]


def local_chunks(rank: int, world_size: int, seqlen_local: int, layout: str) -> list[Chunk]:
    """The chunks of rank ``rank`` whose local tensor has ``seqlen_local`` tokens, in local order."""
    n = num_chunks(world_size, layout) // world_size
    if seqlen_local % n:
        raise ValueError(
            f"layout {layout!r} needs a local sequence length divisible by {n}, got {seqlen_local}"
        )
    size = seqlen_local // n
    return [Chunk(i * size, c * size, size) for i, c in enumerate(chunk_ids(rank, world_size, layout))]


def shard_sequence(
    x: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag", dim: int = 1
) -> torch.Tensor:
    """This rank's shard of the global ``x`` (sequence along ``dim``), contiguous.

    ``x``: e.g. ``(batch, seqlen, nheads, headdim)`` with ``dim=1``; the length must divide into
    :func:`num_chunks` equal chunks. Returns ``(batch, seqlen / world_size, ...)``.
    """
    n = num_chunks(world_size, layout)
    if x.shape[dim] % n:
        raise ValueError(f"sequence length {x.shape[dim]} (dim {dim}) is not divisible by {n} ({layout})")
    chunks = x.chunk(n, dim=dim)
    return torch.cat([chunks[c] for c in chunk_ids(rank, world_size, layout)], dim=dim).contiguous()


def unshard_sequence(shards: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: ``shards[r]`` is rank r's local tensor; returns the global tensor."""
    world_size = len(shards)
    n = num_chunks(world_size, layout)
    per_rank = n // world_size
    pieces: list[torch.Tensor | None] = [None] * n
    for r, shard in enumerate(shards):
        for c, piece in zip(chunk_ids(r, world_size, layout), shard.chunk(per_rank, dim=dim)):
            pieces[c] = piece
    return torch.cat(pieces, dim=dim)  # type: ignore[arg-type]


def zigzag_shard(x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """:func:`shard_sequence` with the load-balanced head-tail layout."""
    return shard_sequence(x, rank, world_size, "zigzag", dim)


def zigzag_unshard(shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """:func:`unshard_sequence` with the load-balanced head-tail layout."""
    return unshard_sequence(shards, "zigzag", dim)
