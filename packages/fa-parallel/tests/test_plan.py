"""Pure host-side pieces: sharding round trips, the block planner against brute-force masks, the merge."""

from __future__ import annotations

import itertools

import pytest
import torch

from fa_core.reference import visible_mask
from fa_parallel import local_chunks, shard_sequence, unshard_sequence, zigzag_shard, zigzag_unshard
from fa_parallel.blocks import Coverage, merge_partial, plan_block, plan_chunks, window_bounds
from fa_parallel.comm import rank_major


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shard_round_trip(world, layout):
    x = torch.arange(2 * 48 * 3).reshape(2, 48, 3)
    shards = [shard_sequence(x, r, world, layout) for r in range(world)]
    assert all(s.shape == (2, 48 // world, 3) for s in shards)
    assert torch.equal(unshard_sequence(shards, layout), x)
    # the chunks describe where each local row comes from
    for r, s in enumerate(shards):
        for ch in local_chunks(r, world, 48 // world, layout):
            assert torch.equal(s[:, ch.local : ch.local + ch.length], x[:, ch.start : ch.start + ch.length])


def test_zigzag_layout():
    x = torch.arange(16)
    assert zigzag_shard(x, 0, 2, dim=0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_shard(x, 1, 2, dim=0).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert torch.equal(zigzag_unshard([zigzag_shard(x, r, 2, dim=0) for r in range(2)], dim=0), x)
    with pytest.raises(ValueError, match="divisible"):
        zigzag_shard(torch.arange(6), 0, 2, dim=0)


WINDOWS = [(-1, -1), (0, 0), (2, -1), (-1, 2), (1, 3), (5, 0), (3, 3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_plan_block_matches_global_mask(causal, window):
    left, right = window_bounds(causal, window)
    for qs, ks, (lq, lk) in itertools.product(range(0, 20, 3), range(0, 20, 3), [(4, 4), (5, 3), (3, 7)]):
        i = torch.arange(qs, qs + lq)[:, None]
        j = torch.arange(ks, ks + lk)[None]
        truth = (j - i >= -left) & (j - i <= right)
        got = torch.zeros(lq, lk, dtype=torch.bool)
        c = plan_block(qs, lq, ks, lk, left, right)
        if c is not None:
            assert min(c.window) >= -1
            got[c.q0 : c.q1, c.k0 : c.k1] = visible_mask(c.q1 - c.q0, c.k1 - c.k0, c.causal, c.window)
        assert torch.equal(got, truth), (qs, lq, ks, lk, c)


@pytest.mark.parametrize("world", [2, 4])
def test_zigzag_causal_steps_are_one_balanced_call(world):
    """Each ring step of the zig-zag causal layout is a single launch, and every rank does equal work."""
    left, right = window_bounds(True, (-1, -1))
    work = []
    for rank in range(world):
        total = 0
        for src in range(world):
            calls = plan_chunks(
                local_chunks(rank, world, 8, "zigzag"), local_chunks(src, world, 8, "zigzag"), left, right
            )
            assert len(calls) == 1, (rank, src, calls)
            total += sum(
                visible_mask(c.q1 - c.q0, c.k1 - c.k0, c.causal, c.window).sum().item() for c in calls
            )
        work.append(total)
    assert len(set(work)) == 1, work


def test_merge_partial_handles_empty_rows():
    """Two halves of the keys merged by lse give the full softmax; a +inf lse (row saw nothing) weighs 0."""
    torch.manual_seed(0)
    s = torch.randn(1, 1, 3, 8)
    v = torch.randn(1, 8, 1, 4)

    def part(cols):
        sc = s[..., cols]
        lse = torch.logsumexp(sc, -1)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(sc, -1), v[:, cols])
        return out, lse

    out_acc = torch.zeros(1, 3, 1, 4)
    lse_acc = torch.full((1, 1, 3), float("-inf"))
    empty_out, empty_lse = torch.zeros(1, 3, 1, 4), torch.full((1, 1, 3), float("inf"))
    merge_partial(out_acc, lse_acc, empty_out, empty_lse)
    assert torch.equal(out_acc, torch.zeros_like(out_acc)) and torch.isneginf(lse_acc).all()
    for cols in (slice(0, 5), slice(5, 8)):
        merge_partial(out_acc, lse_acc, *part(cols))
    merge_partial(out_acc, lse_acc, empty_out, empty_lse)
    full_out, full_lse = part(slice(0, 8))
    torch.testing.assert_close(out_acc, full_out)
    torch.testing.assert_close(lse_acc, full_lse)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("batch", [1, 3])
def test_rank_major_matches_shards(world, layout, batch):
    """The reduce-scatter input: entry r of the rank-major tensor is rank r's shard (dense dim 1, varlen dim 0)."""
    x = torch.randn(batch, 48, 3, 2)
    y = rank_major(x, world, layout, dim=1)
    assert y.is_contiguous() and y.shape == (world, batch, 48 // world, 3, 2)
    assert all(torch.equal(y[r], shard_sequence(x, r, world, layout)) for r in range(world))
    x0 = x[0]
    y0 = rank_major(x0, world, layout, dim=0)
    assert all(torch.equal(y0[r], shard_sequence(x0, r, world, layout, dim=0)) for r in range(world))


def test_fresh_merge_is_a_copy():
    """The first result of a row is copied (fresh), later ones merged: same as merging from empty."""
    torch.manual_seed(1)
    out_blk, lse_blk = torch.randn(1, 6, 2, 4), torch.randn(1, 2, 6)
    lse_blk[0, 0, 2] = float("inf")  # a row that saw nothing: the kernels write out 0 there
    out_blk[0, 2, 0] = 0.0
    acc = [(torch.zeros(1, 6, 2, 4), torch.full((1, 2, 6), float("-inf"))) for _ in range(2)]
    merge_partial(*acc[0], out_blk, lse_blk)
    merge_partial(*acc[1], out_blk, lse_blk, fresh=True)
    assert torch.equal(acc[0][0], acc[1][0]) and torch.equal(acc[0][1], acc[1][1])
    cov = Coverage()
    assert cov.claim(0, 4) and cov.claim(4, 6) and not cov.claim(3, 5)
