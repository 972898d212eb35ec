"""Per-document head-tail (zig-zag) sharding of packed documents (varlen, ``cu_seqlens``).

Sharding the packed sequence contiguously leaves, under a causal mask, most of the work on the ranks that
hold the ends of long documents. Here every document of length ``L`` is cut into ``2W`` near-equal chunks
(``W`` = world size; chunk ``c`` covers document positions ``[c * L // 2W, (c + 1) * L // 2W)``, so sizes
differ by at most 1 and a document shorter than ``2W`` leaves some chunks empty) and rank ``r`` holds chunks
``r`` and ``2W - 1 - r`` of EVERY document. A rank's local tensor is, document after document, its two
chunks of that document: local rows are in increasing global order and each document's local rows are
contiguous (described by :attr:`LocalDocuments.cu_seqlens`).

Ranks hold different numbers of tokens (up to about one token per document apart): the collectives pad to
the longest shard. Everything is computed with torch ops on ``cu_seqlens``' device; the few host integers
the kernels and the padding need (shard lengths, maxima) are read with ONE ``.tolist()`` of a small tensor,
a device sync when ``cu_seqlens`` lives on the GPU (pass it on the host to avoid it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DocumentSharding",
    "LocalDocuments",
    "document_pairs_per_rank",
    "document_shard",
    "document_sharding",
    "document_unshard",
]


def _excl_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """``[0, cumsum(x)]`` as int32 (a ``cu_seqlens``)."""
    return torch.cat([x.new_zeros(1), torch.cumsum(x, 0)]).to(torch.int32)


def _segments(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a loop (``total = sum(lengths)``)."""
    shift = starts - _excl_cumsum(lengths)
    return torch.repeat_interleave(shift, lengths, output_size=total) + torch.arange(
        total, device=starts.device
    )


@dataclass(frozen=True)
class LocalDocuments:
    """One rank's share of the packed documents, and what the attention kernels need.

    ``index``: int64 ``(n,)`` global packed position of every local row (local order; increasing).
    ``positions``: int64 ``(n,)`` position of every local row inside its document (e.g. for RoPE).
    ``cu_seqlens``: int32 ``(ndocs + 1,)`` local prefix sums per document (a document's local rows are
    contiguous). Kernel view: the local rows reordered by ``perm`` are first the "first" chunks (chunk ``r``)
    of every document (``n_first`` rows, prefix sums ``cu_q[0]``), then the "second" chunks (``2W-1-r``,
    ``cu_q[1]``); ``kv_end[j]`` int32 ``(ndocs,)`` is the end (position inside the document) of each
    document's chunk of kind ``j``: its causal keys are the document's first ``kv_end[j]`` keys.
    """

    rank: int
    n: int
    n_first: int
    index: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    perm: torch.Tensor
    inv_perm: torch.Tensor
    cu_q: tuple[torch.Tensor, torch.Tensor]
    kv_end: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DocumentSharding:
    """The per-document zig-zag layout of ``cu_seqlens`` over ``world_size`` ranks (all ranks at once).

    ``bounds``: int64 ``(ndocs, 2W + 1)`` global chunk boundaries; ``lengths[r]`` rank r's number of tokens
    (host ints; ``first_lengths[r]`` of them in its first chunks), ``max_length`` their maximum (the padded length of the collectives); ``rows``: int64
    ``(W, max_length)`` global position of every local row of every rank, padded with ``total``;
    ``src``: int64 ``(total,)`` where global row p lives in the rank-major padded ``(W * max_length)`` rows.
    ``max_chunk`` / ``max_doc``: the largest chunk / document (the kernels' ``max_seqlen_q`` / ``_k``).
    """

    world_size: int
    total: int
    cu_seqlens: torch.Tensor
    bounds: torch.Tensor
    lengths: tuple[int, ...]
    first_lengths: tuple[int, ...]
    max_length: int
    max_chunk: int
    max_doc: int
    rows: torch.Tensor
    src: torch.Tensor

    def chunk_ids(self, rank: int) -> tuple[int, int]:
        return rank, 2 * self.world_size - 1 - rank

    def local(self, rank: int) -> LocalDocuments:
        """Rank ``rank``'s rows and the kernel index maps (torch ops, no sync)."""
        c0, c1 = self.chunk_ids(rank)
        b, starts = self.bounds, self.bounds[:, 0]
        a0 = b[:, c0 + 1] - b[:, c0]  # size of each document's first chunk on this rank
        a1 = b[:, c1 + 1] - b[:, c1]
        n, n_first = self.lengths[rank], self.first_lengths[rank]
        index = self.rows[rank, :n]
        doc_local = _excl_cumsum(a0 + a1)  # local offset of each document's rows
        perm = torch.cat(
            [_segments(doc_local, a0, n_first), _segments(doc_local + a0, a1, n - n_first)]
        )  # fmt: skip
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n, device=perm.device)
        doc_of_row = torch.repeat_interleave(
            torch.arange(a0.numel(), device=index.device), a0 + a1, output_size=n
        )
        return LocalDocuments(
            rank=rank,
            n=n,
            n_first=n_first,
            index=index,
            positions=index - starts[doc_of_row],
            cu_seqlens=_prefix(a0 + a1),
            perm=perm,
            inv_perm=inv,
            cu_q=(_prefix(a0), _prefix(a1)),
            kv_end=((b[:, c0 + 1] - starts).to(torch.int32), (b[:, c1 + 1] - starts).to(torch.int32)),
        )


def document_sharding(cu_seqlens: torch.Tensor | Sequence[int], world_size: int) -> DocumentSharding:
    """The per-document zig-zag layout of the packed documents ``cu_seqlens`` (int prefix sums, global).

    Torch ops on ``cu_seqlens``' device, plus one ``.tolist()`` of ``2 * world_size + 5`` integers (a device
    sync if ``cu_seqlens`` is on the GPU).
    """
    cu = torch.as_tensor(cu_seqlens).to(torch.int64)
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be a 1-D prefix sum with at least one entry, got shape {tuple(cu.shape)}"
        )
    w, n = int(world_size), 2 * int(world_size)
    if w < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    dev = cu.device
    starts, lens = cu[:-1], cu[1:] - cu[:-1]
    cidx = torch.arange(n + 1, device=dev)
    bounds = starts[:, None] + (cidx[None, :] * lens[:, None]) // n  # (ndocs, 2W + 1)
    sizes = bounds[:, 1:] - bounds[:, :-1]  # (ndocs, 2W)
    ranks = torch.arange(w, device=dev)
    order = torch.stack([ranks, n - 1 - ranks], 1)  # (W, 2) chunk ids per rank
    first = sizes[:, order[:, 0]].sum(0)  # (W,)
    per_rank = first + sizes[:, order[:, 1]].sum(0)
    zero = cu.new_zeros(1)

    def red(x: torch.Tensor, fn) -> torch.Tensor:
        return fn(x).reshape(1) if x.numel() else zero

    host = torch.cat(
        [per_rank, first, cu[-1:], red(sizes, torch.max), red(lens, torch.max), cu[:1], red(lens, torch.min)]
    ).tolist()  # the one sync
    if host[2 * w + 3] != 0 or host[2 * w + 4] < 0:
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    lengths, first_lengths = tuple(host[:w]), tuple(host[w : 2 * w])
    total, max_chunk, max_doc = host[2 * w], host[2 * w + 1], host[2 * w + 2]
    m = max(lengths) if lengths else 0
    # every rank's rows at once: segments (rank, document, first/second) in local order
    seg_start = bounds[:, order].permute(1, 0, 2).reshape(-1)  # (W * ndocs * 2,)
    seg_len = sizes[:, order].permute(1, 0, 2).reshape(-1)
    seg = torch.repeat_interleave(torch.arange(seg_len.numel(), device=dev), seg_len, output_size=total)
    within = torch.arange(total, device=dev) - _excl_cumsum(seg_len)[seg]
    glob = seg_start[seg] + within
    per_seg = max(seg_len.numel() // max(w, 1), 1)
    rank_of = seg // per_seg
    rank_base = _excl_cumsum(per_rank)
    local = torch.arange(total, device=dev) - rank_base[rank_of]
    rows = torch.full((w, m), total, dtype=torch.int64, device=dev)
    rows[rank_of, local] = glob
    src = torch.empty(total, dtype=torch.int64, device=dev)
    src[glob] = rank_of * m + local
    return DocumentSharding(
        world_size=w, total=total, cu_seqlens=cu, bounds=bounds, lengths=lengths, first_lengths=first_lengths,
        max_length=m,
        max_chunk=max_chunk, max_doc=max_doc, rows=rows, src=src,
    )  # fmt: skip


def _as_layout(cu_seqlens, world_size: int) -> DocumentSharding:
    if isinstance(cu_seqlens, DocumentSharding):
        return cu_seqlens
    return document_sharding(cu_seqlens, world_size)


def document_shard(
    x: torch.Tensor, cu_seqlens: torch.Tensor | DocumentSharding, rank: int, world_size: int, dim: int = 0
) -> torch.Tensor:
    """Rank ``rank``'s local tensor of the packed ``x`` (``(total, ...)`` with ``total = cu_seqlens[-1]``
    along ``dim``) under the per-document zig-zag layout. ``cu_seqlens`` may be a prebuilt
    :class:`DocumentSharding`."""
    layout = _as_layout(cu_seqlens, world_size)
    if x.shape[dim] != layout.total:
        raise ValueError(
            f"the packed tensor must hold cu_seqlens[-1] = {layout.total} rows along dim {dim}, "
            f"got {x.shape[dim]}"
        )
    return x.index_select(dim, layout.rows[rank, : layout.lengths[rank]].to(x.device))


def document_unshard(
    shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor | DocumentSharding, dim: int = 0
) -> torch.Tensor:
    """Inverse of :func:`document_shard`: ``shards[r]`` is rank r's local tensor; returns the packed tensor."""
    layout = _as_layout(cu_seqlens, len(shards))
    cat = torch.cat(list(shards), dim=dim)
    # position of global row p in the concatenation of the (unpadded) shards
    base = torch.tensor([0, *layout.lengths[:-1]], device=layout.src.device).cumsum(0)
    rank_of, local = layout.src // max(layout.max_length, 1), layout.src % max(layout.max_length, 1)
    return cat.index_select(dim, (base[rank_of] + local).to(cat.device))


def document_pairs_per_rank(
    cu_seqlens: torch.Tensor | Sequence[int], world_size: int, layout: str = "zigzag", causal: bool = True
) -> list[int]:
    """Visible (query, key) pairs each rank computes for packed documents (the attention work per rank).

    ``layout="zigzag"``: the per-document zig-zag of :func:`document_sharding`; ``"contiguous"``: equal
    contiguous shards of the packed sequence (its length must divide by ``world_size``). A query at
    position ``p`` of a document of length ``L`` sees ``p + 1`` keys (causal) or ``L`` (not).
    """
    cu = torch.as_tensor(cu_seqlens).to(torch.int64).cpu()
    starts, ends = cu[:-1], cu[1:]
    w = int(world_size)

    def work(lo: torch.Tensor, hi: torch.Tensor) -> int:
        """Pairs of the rows [lo, hi) (global, clipped per document)."""
        s = torch.maximum(lo, starts) - starts
        e = torch.minimum(hi, ends) - starts
        e = torch.maximum(e, s)
        if causal:
            return int(((e * (e + 1) - s * (s + 1)) // 2).sum())
        return int(((e - s) * (ends - starts)).sum())

    if layout == "contiguous":
        total = int(cu[-1])
        if total % w:
            raise ValueError(f"contiguous shards need the packed length {total} divisible by {w}")
        t = total // w
        return [work(torch.tensor(r * t), torch.tensor((r + 1) * t)) for r in range(w)]
    if layout != "zigzag":
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    b = document_sharding(cu, w).bounds
    out = []
    for r in range(w):
        tot = 0
        for c in (r, 2 * w - 1 - r):
            tot += work(b[:, c], b[:, c + 1]) if b.numel() else 0
        out.append(tot)
    return out
