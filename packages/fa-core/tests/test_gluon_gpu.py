"""The Gluon Hopper forward against the float32 reference (sm_90 + Triton 3.6 only)."""

from __future__ import annotations

import pytest
import torch

from fa_core import attention_ref
from fa_core import gluon as fg
from fa_core.errors import FlashAttnValueError
from fa_core.testing import assert_close_2x, poisoned

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not torch.cuda.is_available() or not fg.available(),
        reason="fa_core.gluon needs an sm_90 GPU and Triton 3.6",
    ),
]

CASES = [
    # batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal
    (2, 1000, 1000, 4, 2, 64, False),
    (2, 1000, 1000, 4, 2, 128, True),
    (1, 300, 777, 8, 1, 128, True),  # causal, seqlen_q < seqlen_k, MQA
    (1, 777, 300, 2, 2, 64, True),  # causal, seqlen_q > seqlen_k: the first rows see no key
    (3, 128, 128, 2, 1, 128, True),  # whole tiles
    (2, 256, 384, 2, 2, 64, False),
    (2, 1, 1000, 4, 4, 128, False),  # one query row
    (1, 4096, 4096, 2, 1, 128, True),
]


@pytest.mark.parametrize("kind", fg.KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_matches_reference(case, dtype, kind):
    b, sq, sk, h, hk, d, causal = CASES[case]
    torch.manual_seed(case)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    out = poisoned(q.shape, dtype, "cuda")
    o, lse = fg.forward(q, k, v, causal=causal, out=out, kind=kind)
    assert o.data_ptr() == out.data_ptr()
    ref_o, ref_lse = attention_ref(q, k, v, causal=causal)
    low_o, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_close_2x(o, ref_o, low_o, "out")
    assert_close_2x(lse, ref_lse, ref_lse, "lse", slack=1e-3)
    if causal and sq > sk:
        empty = sq - sk  # rows i < seqlen_q - seqlen_k see no key
        assert torch.isinf(lse[:, :, :empty]).all() and (o[:, :empty] == 0).all()


@pytest.mark.parametrize("kind", fg.KINDS)
@pytest.mark.parametrize("d", [64, 128])
def test_strided_views_and_scale(kind, d):
    torch.manual_seed(d)
    qkv = torch.randn(2, 517, 3, 3, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert fg.supports(q, k, v, causal=True, softmax_scale=0.3)
    o, lse = fg.forward(q, k, v, causal=True, softmax_scale=0.3, kind=kind)
    ref_o, ref_lse = attention_ref(q, k, v, causal=True, softmax_scale=0.3)
    low_o, _ = attention_ref(q, k, v, causal=True, softmax_scale=0.3, upcast=False)
    assert_close_2x(o, ref_o, low_o, "out")
    assert_close_2x(lse, ref_lse, ref_lse, "lse", slack=1e-3)


def test_unsupported_call_raises():
    q = torch.randn(1, 64, 2, 96, device="cuda", dtype=torch.bfloat16)
    assert not fg.supports(q, q, q)
    with pytest.raises(FlashAttnValueError, match="head dim"):
        fg.forward(q, q, q)
