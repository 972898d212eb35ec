"""Context-parallel attention over 2 and 4 gloo ranks (CPU, Triton interpreter, fp32) vs the full-sequence
float64 reference, with the 2x rule on out, lse, dq, dk, dv of every rank's shard."""

from __future__ import annotations

import pytest
import torch
from fa_parallel_testutils import spawn


def _case(**kw):
    base = dict(batch=1, seqlen=32, nheads=2, nheads_k=2, headdim=16, causal=False, window=(-1, -1), softcap=0.0,
                strategy="ring", layout="zigzag")  # fmt: skip
    base.update(kw)
    return base


def _varlen(lens: list[int], **kw):
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return _case(varlen=True, cu=cu, seqlen=int(cu[-1]), **kw)


CASES = {
    2: [
        _case(causal=True, nheads_k=1),  # zig-zag ring, causal, GQA
        _case(batch=2, seed=1),  # ring, not causal
        _case(strategy="allgather", causal=True, nheads_k=1, softcap=3.0, seed=2),
        _case(
            layout="contiguous", causal=True, window=(5, -1), softcap=2.0, seed=3
        ),  # blocks skipped / trimmed
        _case(strategy="allgather", layout="contiguous", window=(3, 6), seed=4),
        _case(window=(4, 5), nheads_k=1, seed=7),  # zig-zag ring, symmetric window: the band spans chunks
        _varlen([5, 19, 8], causal=True, nheads_k=1, seed=5),  # documents cross the shard boundary
        _varlen([14, 18], seed=6),
        # per-document head-tail (zig-zag) layout: document lengths 1, 2W - 1 and longer ones
        _varlen([1, 3, 13, 15], causal=True, nheads_k=1, varlen_layout="zigzag", seed=8),  # GQA
        _varlen([1, 3, 13, 15], varlen_layout="zigzag", seed=9),
        _varlen([6, 26], causal=True, window=(5, 0), softcap=2.0, varlen_layout="zigzag", seed=10),
    ],
    4: [
        _case(causal=True, nheads_k=1),
        _case(strategy="allgather", causal=True, window=(6, -1), seed=1),
        _varlen([3, 21, 8], causal=True, seed=2),
        _varlen([1, 7, 2, 22], causal=True, nheads_k=1, varlen_layout="zigzag", seed=11),
    ],
}


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world, tmp_path):
    spawn(world, CASES[world], str(tmp_path))
