"""Tensor-descriptor (TMA) loads in the backward: the same gradients as the pointer loads.

On a Hopper GPU the backward loads its streamed tiles through tensor descriptors (``fa_backward.launch.bwd_tma``);
Triton's interpreter implements descriptors too, so here the descriptor path is forced on the CPU and compared with
the pointer path: ragged lengths and a head dim that is not a power of two (rows and columns the descriptor must
zero-fill), GQA, varlen (one descriptor per sequence), a score_mod and a block-sparse mask.
"""

from __future__ import annotations

import pytest
import torch
from fa_backward_testutils import DEVICE, FP, check_2x, rand, ref_grads

import fa_backward.launch as bl
from fa_backward import flash_attn_func, flash_attn_varlen_func

CPU_ONLY = pytest.mark.skipif(
    DEVICE != "cpu", reason="forces descriptors under the interpreter; GPU tests: Hopper"
)


def _grads(fn, leaves, dout):
    out = fn()
    return torch.autograd.grad(out, leaves, dout)


def _both(monkeypatch, fn, leaves, dout):
    monkeypatch.setattr(bl, "bwd_tma", lambda *t: False)
    plain = _grads(fn, leaves, dout)
    calls = []

    def forced(*t):
        calls.append(1)
        return True

    monkeypatch.setattr(bl, "bwd_tma", forced)
    tma = _grads(fn, leaves, dout)
    assert calls, "the launcher did not ask for the descriptor path"
    return plain, tma


@CPU_ONLY
@pytest.mark.parametrize(
    "shape,kw",
    [
        ((2, 45, 70, 4, 2, 40), {"causal": True}),
        ((1, 64, 33, 2, 1, 16), {"window_size": (9, 3)}),
        ((1, 33, 33, 2, 2, 24), {"softcap": 2.0}),
    ],
)
def test_dense_tma_matches_pointer_loads(monkeypatch, shape, kw):
    torch.manual_seed(3)
    b, sq, sk, h, hk, d = shape
    q = rand(b, sq, h, d).requires_grad_()
    k = rand(b, sk, hk, d).requires_grad_()
    v = rand(b, sk, hk, d).requires_grad_()
    dout = rand(b, sq, h, d)
    plain, tma = _both(monkeypatch, lambda: flash_attn_func(q, k, v, **kw), (q, k, v), dout)
    for a, t in zip(plain, tma):
        torch.testing.assert_close(t, a, rtol=0, atol=1e-6)
    _, _, truth = ref_grads(q, k, v, dout, **kw)
    _, _, lowp = ref_grads(q, k, v, dout, upcast=False, **kw)
    check_2x(tma, truth, lowp, FP)


@CPU_ONLY
def test_varlen_tma_matches_pointer_loads(monkeypatch):
    torch.manual_seed(4)
    cu = torch.tensor([0, 17, 50, 64], dtype=torch.int32)
    q = rand(64, 2, 40).requires_grad_()
    k = rand(64, 1, 40).requires_grad_()
    v = rand(64, 1, 40).requires_grad_()
    dout = rand(64, 2, 40)

    def fn():
        return flash_attn_varlen_func(q, k, v, cu, cu, 33, 33, causal=True)

    plain, tma = _both(monkeypatch, fn, (q, k, v), dout)
    for a, t in zip(plain, tma):
        torch.testing.assert_close(t, a, rtol=0, atol=1e-6)


@CPU_ONLY
def test_programmable_tma_matches_pointer_loads(monkeypatch):
    from fa_backward.programmable import attention
    from fa_core import score_mods as sm
    from fa_core.block_sparse import block_mask_from_dense

    torch.manual_seed(5)
    q = rand(1, 64, 2, 16).requires_grad_()
    k = rand(1, 64, 2, 16).requires_grad_()
    v = rand(1, 64, 2, 16).requires_grad_()
    dout = rand(1, 64, 2, 16)
    dense = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool).view(1, 1, 2, 2)
    bm = block_mask_from_dense(dense, (32, 32), full_blocks=dense)
    for kw in (
        {"causal": True, "score_mod": sm.relative_position_bias, "score_mod_grad": sm.additive_grad},
        {"block_mask": bm},
    ):
        plain, tma = _both(monkeypatch, lambda kw=kw: attention(q, k, v, **kw)[0], (q, k, v), dout)
        for a, t in zip(plain, tma):
            torch.testing.assert_close(t, a, rtol=0, atol=1e-6)
