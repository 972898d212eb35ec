"""CPU checks of the training-comparison helpers (the training itself runs on the GPU: test_gpu.py and
bench/train_compare.py)."""

from __future__ import annotations

import pytest
import torch

from fa_backward.training_check import (
    GAP_FLOOR,
    TinyLM,
    TrainingComparison,
    compare_training,
    corpus,
    max_relative_gap,
    smooth,
)


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], w=2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0], w=20) == [2.0]


def test_gap_of_the_smoothed_curves():
    ref = [4.0] * 30
    assert max_relative_gap(ref, ref) == 0.0
    # a single 2x spike is diluted by the 20-step mean: 1/20 of +100 %
    spiky = [4.0] * 29 + [8.0]
    assert max_relative_gap(spiky, ref) == pytest.approx(0.05)
    assert max_relative_gap([4.4] * 30, ref) == pytest.approx(0.1)


def test_tiny_lm_names_its_attention():
    with pytest.raises(ValueError, match="attn"):
        TinyLM("flex")
    model = TinyLM("sdpa", dim=32, nheads=2, layers=1)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.emb.weight.shape == (256, 32)
    assert isinstance(model.blocks[0].qkv, torch.nn.Linear)


def test_verdict_uses_the_reference_spread():
    curves = {"ours": [[1.0] * 30], "sdpa": [[1.0] * 30, [1.0] * 30]}
    # no spread in the reference: the floor decides
    assert TrainingComparison(curves, {}, gap=0.049, noise=0.0).ok
    assert not TrainingComparison(curves, {}, gap=0.051, noise=0.0).ok
    # SDPA 4 % apart from itself: ours may be up to 8 % from it, not more
    cmp = TrainingComparison(curves, {}, gap=0.079, noise=0.04)
    assert cmp.bar == pytest.approx(0.08) and cmp.ok
    assert not TrainingComparison(curves, {}, gap=0.081, noise=0.04).ok
    assert GAP_FLOOR == 0.05


def test_compare_training_needs_two_reference_runs():
    data = torch.zeros(1, 1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="repeats"):
        compare_training(1, data, repeats={"ours": 1, "sdpa": 1})
    with pytest.raises(ValueError, match="repeats"):
        compare_training(1, data, repeats={"ours": 0, "sdpa": 3})


def test_corpus_is_fixed_by_its_seed():
    a, b = corpus(123, device="cpu"), corpus(123, device="cpu")
    assert a.shape == (8, 8, 513) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, corpus(124, device="cpu"))
    assert int(a.min()) >= 0 and int(a.max()) < 256
