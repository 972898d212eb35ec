"""A paged KV-cache manager for serving loops (host-side bookkeeping; the data stays on the device).

The cache is two tensors ``k_cache``/``v_cache`` of shape ``(num_blocks, page_size, nheads_k, headdim)``,
exactly what :func:`fa_kvcache.flash_attn_with_kvcache` takes with a ``block_table``. Each sequence owns
an ordered list of blocks; token ``t`` of a sequence lives in block ``blocks[t // page_size]`` at row
``t % page_size``. Blocks are reference counted so that :meth:`PagedKVCache.fork` can share a prefix
between sequences (beam search, parallel sampling, prompt caching); a shared block is copied before it is
written (copy-on-write), so a sequence never writes into a block another sequence can see.

Typical decode step::

    block_table, cache_seqlens = cache.prepare_append(seq_ids, 1)  # allocate / copy-on-write, no sync
    out = flash_attn_with_kvcache(
        q,
        cache.k_cache,
        cache.v_cache,
        k_new,
        v_new,
        cache_seqlens=cache_seqlens,
        block_table=block_table,
        causal=True,
    )

:meth:`prepare_append` advances the recorded lengths: the kernel call that follows writes the tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from fa_core.errors import FlashAttnValueError

__all__ = ["CacheFullError", "PagedKVCache"]


class CacheFullError(RuntimeError):
    """Not enough free blocks for the request; the cache is left unchanged."""


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    length: int = 0


class PagedKVCache:
    """Block allocator + block tables over preallocated paged K/V tensors.

    Args:
        num_blocks: number of blocks (pages) in the pool.
        page_size: tokens per block (any size >= 1; the kernels accept any page size).
        nheads_k, headdim: K/V heads and head dim; ``headdim_v`` defaults to ``headdim``.
        dtype, device: of the cache tensors.
        max_blocks_per_seq: optional cap; also the fixed width of the block tables returned (handy for
            CUDA graphs, whose input shapes must not change between replays).
    """

    def __init__(
        self,
        num_blocks: int,
        page_size: int,
        nheads_k: int,
        headdim: int,
        *,
        headdim_v: int | None = None,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cuda",
        max_blocks_per_seq: int | None = None,
    ) -> None:
        if num_blocks < 1 or page_size < 1 or nheads_k < 1 or headdim < 1:
            raise FlashAttnValueError("num_blocks, page_size, nheads_k and headdim must all be >= 1")
        self.num_blocks = int(num_blocks)
        self.page_size = int(page_size)
        self.max_blocks_per_seq = max_blocks_per_seq
        dv = headdim if headdim_v is None else headdim_v
        self.k_cache = torch.zeros(num_blocks, page_size, nheads_k, headdim, dtype=dtype, device=device)
        self.v_cache = torch.zeros(num_blocks, page_size, nheads_k, dv, dtype=dtype, device=device)
        # pop() from the end hands out low block ids first
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._ref: list[int] = [0] * self.num_blocks
        self._seqs: dict[Hashable, _Seq] = {}

    # ------------------------------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._seqs)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def seq_len(self, seq_id: Hashable) -> int:
        return self._get(seq_id).length

    def blocks_of(self, seq_id: Hashable) -> tuple[int, ...]:
        return tuple(self._get(seq_id).blocks)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def free_blocks(self) -> tuple[int, ...]:
        return tuple(self._free)

    # --------------------------------------------------------------------------------------- lifecycle
    def add_sequence(self, seq_id: Hashable) -> None:
        """Register an empty sequence (no block is taken until tokens are appended)."""
        if seq_id in self._seqs:
            raise FlashAttnValueError(f"sequence {seq_id!r} already exists")
        self._seqs[seq_id] = _Seq()

    def free_sequence(self, seq_id: Hashable) -> None:
        """Drop a sequence; blocks no other sequence shares go back to the free list."""
        seq = self._get(seq_id)
        for b in reversed(seq.blocks):
            self._release(b)
        del self._seqs[seq_id]

    def fork(self, src_id: Hashable, dst_id: Hashable) -> None:
        """New sequence ``dst_id`` sharing all of ``src_id``'s blocks (no copy until one of them writes)."""
        src = self._get(src_id)
        if dst_id in self._seqs:
            raise FlashAttnValueError(f"sequence {dst_id!r} already exists")
        for b in src.blocks:
            self._ref[b] += 1
        self._seqs[dst_id] = _Seq(list(src.blocks), src.length)

    # ------------------------------------------------------------------------------------------ writes
    def prepare_append(
        self, seq_ids: Sequence[Hashable], num_new: int = 1, width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for ``num_new`` tokens in each sequence, advance their lengths, and return
        ``(block_table (batch, width) int32, cache_seqlens (batch,) int32)`` on the cache's device, with
        the lengths *before* the append: what ``flash_attn_with_kvcache(..., k, v)`` needs to write them.

        All-or-nothing: raises :class:`CacheFullError` (cache unchanged) if the blocks do not suffice.
        """
        if len(set(seq_ids)) != len(seq_ids):
            raise FlashAttnValueError("seq_ids must be distinct")
        self._reserve_all([(s, num_new) for s in seq_ids])
        lens = [self._seqs[s].length - num_new for s in seq_ids]
        return self.block_table(seq_ids, width), self._lens_tensor(lens)

    def append(self, seq_id: Hashable, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write ``k (n, nheads_k, headdim)`` and ``v (n, nheads_k, headdim_v)`` after the sequence's
        tokens (plain PyTorch indexing; for prompts / tests). Returns the position of the first token."""
        n = k.shape[0]
        if v.shape[0] != n or k.shape[1:] != self.k_cache.shape[2:] or v.shape[1:] != self.v_cache.shape[2:]:
            raise FlashAttnValueError(
                f"k/v must be (n, {self.k_cache.shape[2]}, {self.k_cache.shape[3]}) and "
                f"(n, {self.v_cache.shape[2]}, {self.v_cache.shape[3]}); got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        self._reserve_all([(seq_id, n)])
        seq = self._seqs[seq_id]
        start = seq.length - n
        if n:
            blk, off = self._slots(seq, start, n)
            self.k_cache[blk, off] = k.to(self.k_cache.dtype)
            self.v_cache[blk, off] = v.to(self.v_cache.dtype)
        return start

    # -------------------------------------------------------------------------------------- tensors
    def block_table(self, seq_ids: Sequence[Hashable], width: int | None = None) -> torch.Tensor:
        """``(batch, width)`` int32; unused entries are 0 (never read: beyond each sequence's length)."""
        seqs = [self._get(s) for s in seq_ids]
        need = max((len(s.blocks) for s in seqs), default=0)
        if width is None:
            width = self.max_blocks_per_seq if self.max_blocks_per_seq is not None else max(need, 1)
        if need > width:
            raise FlashAttnValueError(
                f"a sequence has {need} blocks, more than the block-table width {width}"
            )
        rows = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32).reshape(len(seqs), width).to(self.k_cache.device)

    def cache_seqlens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        return self._lens_tensor([self._get(s).length for s in seq_ids])

    def gather(self, seq_id: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's contents ``(length, nheads_k, headdim[_v])`` (a copy; for tests / debugging)."""
        seq = self._get(seq_id)
        blk, off = self._slots(seq, 0, seq.length)
        return self.k_cache[blk, off], self.v_cache[blk, off]

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (used by the property tests)."""
        counts = [0] * self.num_blocks
        for sid, seq in self._seqs.items():
            assert len(set(seq.blocks)) == len(seq.blocks), f"{sid!r} lists a block twice"
            expected = -(-seq.length // self.page_size)
            assert len(seq.blocks) == expected, f"{sid!r}: {len(seq.blocks)} blocks for {seq.length} tokens"
            for b in seq.blocks:
                counts[b] += 1
        assert counts == self._ref, "refcounts differ from the block lists"
        assert len(set(self._free)) == len(self._free), "free list has duplicates"
        assert set(self._free) == {b for b in range(self.num_blocks) if self._ref[b] == 0}, "free list wrong"

    # -------------------------------------------------------------------------------------- internals
    def _get(self, seq_id: Hashable) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _lens_tensor(self, lens: list[int]) -> torch.Tensor:
        return torch.tensor(lens, dtype=torch.int32).to(self.k_cache.device)

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._free.append(b)

    def _slots(self, seq: _Seq, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + n)
        blocks = torch.tensor(seq.blocks, dtype=torch.long)
        dev = self.k_cache.device
        return blocks[pos // self.page_size].to(dev), (pos % self.page_size).to(dev)

    def _reserve_all(self, requests: list[tuple[Hashable, int]]) -> None:
        """Plan every request first (blocks to copy / allocate), then apply; nothing changes on failure."""
        ref: dict[int, int] = {}
        need = 0
        for sid, n in requests:
            seq = self._get(sid)
            if n < 0:
                raise FlashAttnValueError(f"num_new must be >= 0, got {n}")
            if n == 0:
                continue
            total_blocks = -(-(seq.length + n) // self.page_size)
            if self.max_blocks_per_seq is not None and total_blocks > self.max_blocks_per_seq:
                raise CacheFullError(
                    f"sequence {sid!r} would need {total_blocks} blocks, more than max_blocks_per_seq "
                    f"({self.max_blocks_per_seq})"
                )
            need += total_blocks - len(seq.blocks)
            if seq.length % self.page_size and self._shared(seq.blocks[-1], ref):
                need += 1
                last = seq.blocks[-1]
                ref[last] = ref.get(last, self._ref[last]) - 1
        if need > len(self._free):
            raise CacheFullError(
                f"out of KV-cache blocks: need {need}, {len(self._free)} free of {self.num_blocks} "
                f"(page size {self.page_size}); free finished sequences or allocate a larger cache"
            )
        for sid, n in requests:
            if n:
                self._grow(self._seqs[sid], n)

    def _shared(self, b: int, ref: dict[int, int]) -> bool:
        return ref.get(b, self._ref[b]) > 1

    def _grow(self, seq: _Seq, n: int) -> None:
        if seq.length % self.page_size and self._ref[seq.blocks[-1]] > 1:
            # copy-on-write: the partially filled last block is shared, and we are about to write into it
            old = seq.blocks[-1]
            new = self._free.pop()
            self.k_cache[new].copy_(self.k_cache[old])
            self.v_cache[new].copy_(self.v_cache[old])
            self._ref[new] = 1
            self._release(old)
            seq.blocks[-1] = new
        total_blocks = -(-(seq.length + n) // self.page_size)
        while len(seq.blocks) < total_blocks:
            b = self._free.pop()
            self._ref[b] = 1
            seq.blocks.append(b)
        seq.length += n
