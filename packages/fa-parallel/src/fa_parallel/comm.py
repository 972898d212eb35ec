"""Communication helpers: ring point-to-point exchange, all-gather and reduce-scatter along the sequence.

NCCL gets the fused collectives (``all_gather_into_tensor``, ``reduce_scatter_tensor``); gloo (the CPU tests)
lacks reduce-scatter, so it falls back to ``all_reduce`` + a slice, which gives the same sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from fa_parallel.documents import DocumentSharding
from fa_parallel.sharding import chunk_ids, num_chunks, unshard_sequence

__all__ = [
    "RingComm",
    "all_gather_documents",
    "all_gather_seq",
    "group_info",
    "rank_major",
    "reduce_scatter_documents",
    "reduce_scatter_seq",
]

Group = dist.ProcessGroup | None


def group_info(group: Group) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group when None)."""
    return dist.get_rank(group), dist.get_world_size(group)


def _is_nccl(group: Group) -> bool:
    return "nccl" in str(dist.get_backend(group)).lower()


class RingComm:
    """Send to the next rank of the ring, receive from the previous one, asynchronously.

    Every rank posts its sends and receives in the same order, so matching is unambiguous for NCCL and gloo
    alike; ``tag`` separates the K/V stream from the dK/dV stream (gloo matches by tag, NCCL by order).
    """

    def __init__(self, group: Group) -> None:
        self.group = group
        self.rank, self.world_size = group_info(group)
        # P2POp takes global ranks
        self.next = self._global((self.rank + 1) % self.world_size)
        self.prev = self._global((self.rank - 1) % self.world_size)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, tag: int = 0) -> list:
        """Start sending ``send`` to the next rank and receiving the previous rank's into ``recv``.

        Returns the requests; call :meth:`wait` before reading ``recv`` or writing ``send``.
        """
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(reqs: list) -> None:
        for r in reqs:
            r.wait()


def all_gather_seq(x: torch.Tensor, group: Group, layout: str, dim: int = 1) -> torch.Tensor:
    """The global sequence from every rank's shard ``x`` (sequence along ``dim``), in position order."""
    _, world = group_info(group)
    x = x.contiguous()
    if _is_nccl(group):
        flat = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(flat, x, group=group)
        shards: Sequence[torch.Tensor] = flat.chunk(world, dim=0)
    else:
        shards = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(list(shards), x, group=group)
    if layout == "contiguous":
        if dim == 0 and _is_nccl(group):
            return flat  # already in order: no copy
        return torch.cat(list(shards), dim=dim)
    return unshard_sequence(shards, layout, dim)


def rank_major(x: torch.Tensor, world: int, layout: str, dim: int = 1) -> torch.Tensor:
    """The global-sequence tensor ``x`` rearranged to ``(world, *shard shape)``: entry r is rank r's shard.

    One gather of the chunks (``index_select``); moving the rank dim to the front is free when the dims
    before ``dim`` have size 1 (batch 1), else one more copy.
    """
    n = num_chunks(world, layout)
    per = n // world
    order = [c for r in range(world) for c in chunk_ids(r, world, layout)]
    xu = x.unflatten(dim, (n, x.shape[dim] // n))
    if order != list(range(n)):
        xu = xu.index_select(dim, torch.tensor(order, device=x.device))
    # (..., world, per, chunk, ...) -> (world, ..., per * chunk, ...)
    shards = xu.unflatten(dim, (world, per)).movedim(dim, 0).flatten(dim + 1, dim + 2)
    return shards.contiguous()


def reduce_scatter_seq(x: torch.Tensor, group: Group, layout: str, dim: int = 1) -> torch.Tensor:
    """Sum the global-sequence tensor ``x`` over ranks and return this rank's shard (``layout``) of the sum."""
    rank, world = group_info(group)
    stacked = rank_major(x, world, layout, dim)  # (world, *shard shape)
    if _is_nccl(group):
        out = torch.empty_like(stacked[0])
        dist.reduce_scatter_tensor(out, stacked.flatten(0, 1), group=group)
        return out
    dist.all_reduce(stacked, group=group)
    return stacked[rank].clone()


def all_gather_documents(x: torch.Tensor, group: Group, layout: DocumentSharding) -> torch.Tensor:
    """The packed ``(total, ...)`` tensor, in global order, from every rank's per-document zig-zag shard ``x``.

    Shards differ in length: each is padded to ``layout.max_length`` for the collective, then one
    ``index_select`` puts the rows back in packed order.
    """
    rank, world = group_info(group)
    m = layout.max_length
    pad = x.new_zeros((m, *x.shape[1:]))
    pad[: x.shape[0]] = x
    if _is_nccl(group):
        flat = torch.empty((world * m, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(flat, pad, group=group)
    else:
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad, group=group)
        flat = torch.cat(parts)
    return flat.index_select(0, layout.src.to(x.device))


def reduce_scatter_documents(x: torch.Tensor, group: Group, layout: DocumentSharding) -> torch.Tensor:
    """Sum the packed ``(total, ...)`` tensor ``x`` over ranks; return this rank's per-document zig-zag shard."""
    rank, world = group_info(group)
    padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])  # row ``total``: the padding
    stacked = padded.index_select(0, layout.rows.reshape(-1).to(x.device))
    stacked = stacked.unflatten(0, (world, layout.max_length))
    if _is_nccl(group):
        out = torch.empty_like(stacked[0])
        dist.reduce_scatter_tensor(out, stacked.flatten(0, 1), group=group)
    else:
        dist.all_reduce(stacked, group=group)
        out = stacked[rank]
    return out[: layout.lengths[rank]].clone()
