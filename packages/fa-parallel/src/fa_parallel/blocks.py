"""Block planning and partial-result merging: the pieces shared by the ring and all-gather strategies.

A *block* is a pair (q range, k range) with known global positions. The global mask is the one of
flash-attn on the whole sequence (``seqlen_q == seqlen_k``, so bottom-right alignment is plain alignment):
key ``j`` is visible from query ``i`` iff ``-left <= j - i <= right`` (causal: ``right = 0``).
:func:`plan_block` turns that into one kernel call on a sub-block (or none), expressed with the kernels' own
bottom-right-aligned ``(causal, window_size)``: a block fully below the diagonal is plain attention, one
on the diagonal is causal, one above is skipped, and a band that does not cross the sub-block's diagonal
is brought back to it by trimming rows / keys that see nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fa_core.forward import flash_attn_forward
from fa_parallel.sharding import Chunk

__all__ = [
    "INF",
    "BlockCall",
    "Coverage",
    "coalesce",
    "finalize",
    "forward_calls",
    "merge_partial",
    "plan_block",
    "plan_chunks",
    "window_bounds",
]

#: An unbounded window side in the planner's integer arithmetic (larger than any sequence).
INF = 1 << 40


class BlockCall(NamedTuple):
    """Attend local rows ``[q0, q1)`` to local keys ``[k0, k1)`` with the kernel's ``causal`` flag and
    ``window_size`` (``-1`` = unbounded side)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    window: tuple[int, int]

    @property
    def full(self) -> bool:
        return not self.causal and self.window == (-1, -1)


def window_bounds(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """flash-attn's ``(causal, window_size)`` as the band ``j - i in [-left, right]`` (:data:`INF` unbounded)."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return (INF if left < 0 else left), (INF if right < 0 else right)


def plan_block(q_start: int, q_len: int, k_start: int, k_len: int, left: int, right: int) -> BlockCall | None:
    """The one kernel call that computes queries ``[q_start, q_start + q_len)`` against keys
    ``[k_start, k_start + k_len)`` (global positions) under the band ``j - i in [-left, right]``.

    Returns ranges relative to the two blocks, or None when no query of the block sees a key of it.
    Rows left out of the call see no key of this block; keys left out are seen by no row.
    """
    # rows with at least one visible key: i + right >= k_start and i - left <= k_end - 1
    qs, qe = max(q_start, k_start - right), min(q_start + q_len, k_start + k_len + left)
    if qs >= qe:
        return None
    # keys seen by at least one of those rows
    ks, ke = max(k_start, qs - left), min(k_start + k_len, qe + right)
    nq, nk = qe - qs, ke - ks
    diag = nk - nq  # the kernel's bottom-right diagonal on the sub-block
    # the band relative to that diagonal (derivation: j' - i' in [qs - ks - left, qs - ks + right])
    wl, wr = ke - qe + left, qe + right - ke
    if diag - wl <= -(nq - 1):  # the lower edge cuts nothing off
        wl = -1
    if diag + wr >= nk - 1:  # the upper edge cuts nothing off
        wr = -1
    causal = wr == 0 and wl == -1  # same mask; the causal path compiles the window code out
    window = (-1, -1) if causal else (wl, wr)
    return BlockCall(qs - q_start, qe - q_start, ks - k_start, ke - k_start, causal, window)


def plan_chunks(q_chunks: list[Chunk], k_chunks: list[Chunk], left: int, right: int) -> list[BlockCall]:
    """Kernel calls (in local offsets) for every (q chunk, k chunk) pair, coalesced.

    When q and k hold the same chunks (the ring's first step) under a plain causal mask, one causal call
    over the whole local sequence is exact: positions increase with the local index, so ``j_local <=
    i_local`` iff ``j <= i``.
    """
    if q_chunks == k_chunks and left == INF and right == 0:
        n = sum(c.length for c in q_chunks)
        return [BlockCall(0, n, 0, n, True, (-1, -1))]
    calls = []
    for qc in q_chunks:
        for kc in k_chunks:
            c = plan_block(qc.start, qc.length, kc.start, kc.length, left, right)
            if c is not None:
                calls.append(
                    BlockCall(
                        c.q0 + qc.local, c.q1 + qc.local, c.k0 + kc.local, c.k1 + kc.local, c.causal, c.window
                    )
                )
    return coalesce(calls)


def coalesce(calls: list[BlockCall]) -> list[BlockCall]:
    """Merge full (unmasked) calls that share a key range and touch along q, or share a q range and touch
    along k: fewer, larger launches, and fewer partial results to merge."""
    calls = list(calls)
    changed = True
    while changed:
        changed = False
        for a in range(len(calls)):
            for b in range(len(calls)):
                x, y = calls[a], calls[b]
                if a == b or not (x.full and y.full):
                    continue
                merged = None
                if (x.k0, x.k1) == (y.k0, y.k1) and x.q1 == y.q0:
                    merged = BlockCall(x.q0, y.q1, x.k0, x.k1, False, (-1, -1))
                elif (x.q0, x.q1) == (y.q0, y.q1) and x.k1 == y.k0:
                    merged = BlockCall(x.q0, x.q1, x.k0, y.k1, False, (-1, -1))
                if merged is not None:
                    calls = [c for i, c in enumerate(calls) if i not in (a, b)] + [merged]
                    changed = True
                    break
            if changed:
                break
    return sorted(calls)


def merge_partial(
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    out_blk: torch.Tensor,
    lse_blk: torch.Tensor,
    fresh: bool = False,
) -> None:
    """Fold one partial attention result into the running one, in place.

    Args:
        out_acc: float32 ``(batch, seqlen, nheads, headdim_v)`` (a view is fine).
        lse_acc: float32 ``(batch, nheads, seqlen)``; ``-inf`` = no key seen yet.
        out_blk, lse_blk: the kernel's result on the same rows; its ``lse = +inf`` marks a row that saw no key
            in the block (out 0), which must weigh nothing, hence the mapping to ``-inf``.
        fresh: the caller knows no earlier result touched these rows (``out_acc`` 0, ``lse_acc`` -inf): the
            merge is then a copy (one pass over the output instead of three).
    """
    lse_blk = lse_blk.masked_fill(lse_blk == float("inf"), float("-inf"))
    if fresh:
        out_acc.copy_(out_blk)
        lse_acc.copy_(lse_blk)
        return
    new = torch.logaddexp(lse_acc, lse_blk)
    # rows still empty after the merge: both weights must be 0 (not exp(-inf + inf) = nan)
    safe = new.masked_fill(new == float("-inf"), 0.0)
    w_acc = torch.exp(lse_acc - safe).transpose(1, 2).unsqueeze(-1)
    w_blk = torch.exp(lse_blk - safe).transpose(1, 2).unsqueeze(-1)
    # out_acc = out_acc * w_acc + out_blk * w_blk in two passes, without a float32 copy of out_blk
    out_acc.mul_(w_acc).addcmul_(out_blk, w_blk)
    lse_acc.copy_(new)


class Coverage:
    """Host-side record of the local row ranges that already hold a partial result (so that the first
    result of a row is copied, not merged)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def claim(self, q0: int, q1: int) -> bool:
        """Mark ``[q0, q1)`` covered; True when none of it was covered before."""
        fresh = all(q1 <= a or b <= q0 for a, b in self.ranges)
        self.ranges.append((q0, q1))
        return fresh


def forward_calls(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    calls: list[BlockCall],
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    softmax_scale: float,
    softcap: float,
    coverage: Coverage | None = None,
) -> None:
    """Run ``calls`` of q ``(b, sq, h, d)`` against k, v ``(b, sk, hk, d)`` and merge into the accumulators."""
    for c in calls:
        res = flash_attn_forward(
            q[:, c.q0 : c.q1],
            k[:, c.k0 : c.k1],
            v[:, c.k0 : c.k1],
            softmax_scale=softmax_scale,
            causal=c.causal,
            window_size=c.window,
            softcap=softcap,
        )
        fresh = coverage.claim(c.q0, c.q1) if coverage is not None else False
        merge_partial(out_acc[:, c.q0 : c.q1], lse_acc[:, :, c.q0 : c.q1], res.out, res.lse, fresh)


def finalize(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulators to the kernels' conventions: out in ``dtype``, ``lse = +inf`` for rows that saw nothing."""
    lse = lse_acc.masked_fill(lse_acc == float("-inf"), float("inf"))
    return out_acc.to(dtype), lse
