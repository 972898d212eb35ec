"""Per-document head-tail (zig-zag) sharding of packed documents: layout, round trips, index maps, balance."""

from __future__ import annotations

import pytest
import torch

from fa_parallel import (
    document_pairs_per_rank,
    document_shard,
    document_sharding,
    document_unshard,
)

# lengths 0, 1, 2W - 1 (for W = 2, 3, 4) and longer ones
LENS = [5, 0, 1, 3, 7, 13, 2, 40]


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layout_and_round_trip(world):
    cu = _cu(LENS)
    total = int(cu[-1])
    layout = document_sharding(cu, world)
    x = torch.arange(total * 3).reshape(total, 3)
    shards = [document_shard(x, layout, r, world) for r in range(world)]
    assert [s.shape[0] for s in shards] == list(layout.lengths)
    assert sum(layout.lengths) == total
    assert torch.equal(document_unshard(shards, cu), x)
    assert torch.equal(document_unshard([s.T for s in shards], layout, dim=1), x.T)  # another dim
    n = 2 * world
    for d, length in enumerate(LENS):
        start = int(cu[d])
        sizes = [int(layout.bounds[d, c + 1] - layout.bounds[d, c]) for c in range(n)]
        assert sum(sizes) == length and max(sizes) - min(sizes) <= 1  # near-equal chunks
    for r in range(world):
        loc = layout.local(r)
        idx = loc.index.tolist()
        assert idx == sorted(idx) and torch.equal(shards[r][:, 0] // 3, loc.index)
        expect, first, second = [], [], []
        for d in range(len(LENS)):
            start = int(cu[d])
            chunks = [
                list(range(int(layout.bounds[d, c]), int(layout.bounds[d, c + 1]))) for c in (r, n - 1 - r)
            ]
            expect += chunks[0] + chunks[1]
            first.append(chunks[0])
            second.append(chunks[1])
            # local rows of document d are contiguous: cu_seqlens
            lo, hi = int(loc.cu_seqlens[d]), int(loc.cu_seqlens[d + 1])
            assert idx[lo:hi] == chunks[0] + chunks[1]
            assert loc.positions[lo:hi].tolist() == [p - start for p in chunks[0] + chunks[1]]
            # causal keys of each chunk end at the chunk's end
            for j, c in enumerate((r, n - 1 - r)):
                end = int(layout.bounds[d, c + 1]) - start
                assert int(loc.kv_end[j][d]) == end
        assert idx == expect
        # kernel view: perm puts the first chunks (document order) before the second ones
        reordered = loc.index[loc.perm].tolist()
        flat_first = [p for ch in first for p in ch]
        assert reordered == flat_first + [p for ch in second for p in ch]
        assert loc.n_first == len(flat_first)
        assert torch.equal(loc.perm[loc.inv_perm], torch.arange(loc.n))
        assert loc.cu_q[0].tolist() == torch.tensor([0, *[len(c) for c in first]]).cumsum(0).tolist()
        assert loc.cu_q[1].tolist() == torch.tensor([0, *[len(c) for c in second]]).cumsum(0).tolist()
    assert torch.equal(
        layout.rows.flatten()[layout.src] if layout.max_length else layout.src, torch.arange(total)
    )


def test_shard_checks():
    cu = _cu([4, 4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        document_shard(torch.zeros(9), cu, 0, 2)
    with pytest.raises(ValueError, match="non-decreasing"):
        document_sharding(torch.tensor([0, 5, 3]), 2)


def _brute_pairs(lens: list[int], world: int, layout: str, causal: bool) -> list[int]:
    """Visible pairs per rank by enumerating rows (the mask of each row: p + 1 or L keys)."""
    cu = _cu(lens)
    total = int(cu[-1])
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    pos = torch.arange(total) - cu[doc]
    seen = pos + 1 if causal else torch.tensor(lens)[doc]
    if layout == "contiguous":
        return [int(s.sum()) for s in seen.chunk(world)]
    return [int(document_shard(seen, cu, r, world).sum()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_pairs_per_rank_matches_brute_force(world, causal):
    lens = [1, 2 * world - 1, 37, 12, 60]
    lens[-1] += (-sum(lens)) % 12  # contiguous shards: the total divides by 2, 3 and 4
    for layout in ("zigzag", "contiguous"):
        assert document_pairs_per_rank(_cu(lens), world, layout, causal) == _brute_pairs(
            lens, world, layout, causal
        )


# a realistic packing (32768 tokens); the numbers are quoted in the README
PACKING = [4681, 7607, 4101, 9097, 7282]


@pytest.mark.parametrize("world", [2, 4])
def test_causal_documents_are_balanced(world):
    cu = _cu(PACKING)
    zig = document_pairs_per_rank(cu, world, "zigzag")
    con = document_pairs_per_rank(cu, world, "contiguous")
    assert sum(zig) == sum(con)  # the same work, distributed differently
    ratio_zig, ratio_con = max(zig) / min(zig), max(con) / min(con)
    print(f"W={world}: zig-zag {zig} (max/min {ratio_zig:.3f}), contiguous {con} (max/min {ratio_con:.3f})")
    assert ratio_zig <= 1.1 and ratio_con > 1.3
    # tokens per rank differ by at most a few tokens per document
    lengths = document_sharding(cu, world).lengths
    assert max(lengths) - min(lengths) <= len(PACKING)
