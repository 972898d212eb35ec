"""GPU forward tests at realistic sizes (bf16/fp16), both load paths (TMA descriptors and pointers)."""

from __future__ import annotations

import pytest
import torch

from fa_core import attention_ref, attention_varlen_ref, flash_attn_forward, flash_attn_varlen_forward
from fa_core.testing import assert_close_2x, poisoned

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CASES = [
    # batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, kwargs
    (2, 2048, 2048, 16, 16, 128, {"causal": True}),
    (1, 8192, 8192, 8, 2, 128, {}),
    (4, 1024, 1024, 32, 8, 64, {"causal": True, "window_size": (255, 0)}),
    (2, 1500, 3000, 8, 1, 64, {"softcap": 30.0, "alibi": True}),
    (2, 3000, 1500, 8, 4, 96, {"causal": True}),
    (1, 2048, 2048, 4, 4, 256, {"causal": True, "softcap": 10.0}),
    (2, 777, 777, 6, 2, 200, {"window_size": (100, 100), "alibi": True}),
]


@pytest.mark.parametrize("tma", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_dense_gpu(case, dtype, tma, monkeypatch):
    monkeypatch.setenv("FA_PLUS_TMA", tma)
    b, sq, sk, h, hk, d, kw = CASES[case]
    kw = dict(kw)
    torch.manual_seed(case)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    slopes = torch.rand(h, device="cuda") * 0.1 if kw.pop("alibi", False) else None
    res = flash_attn_forward(q, k, v, alibi_slopes=slopes, out=poisoned(q.shape, dtype, "cuda"), **kw)
    ref, ref_lse = attention_ref(q, k, v, alibi_slopes=slopes, **kw)
    low, low_lse = attention_ref(q, k, v, alibi_slopes=slopes, upcast=False, **kw)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=2e-2)


@pytest.mark.parametrize("tma", ["1", "0"])
def test_varlen_gpu(tma, monkeypatch):
    monkeypatch.setenv("FA_PLUS_TMA", tma)
    torch.manual_seed(7)
    lens = [1, 300, 2048, 17, 999, 4000]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    h, hk, d = 16, 4, 128
    q = torch.randn(sum(lens), h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens), hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(lens), hk, d, device="cuda", dtype=torch.bfloat16)
    res = flash_attn_varlen_forward(
        q, k, v, cu, cu, max(lens), max(lens), causal=True, out=poisoned(q.shape, q.dtype, "cuda")
    )
    ref, ref_lse = attention_varlen_ref(q, k, v, cu, cu, causal=True)
    low, low_lse = attention_varlen_ref(q, k, v, cu, cu, causal=True, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=2e-2)


def test_dropout_gpu():
    torch.manual_seed(8)
    p = 0.1
    q, k, v = (torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    res = flash_attn_forward(q, k, v, dropout_p=p, causal=True, return_probs=True)
    keep = res.probs >= 0
    vis = res.probs != 0
    assert abs((keep & vis).sum().item() / vis.sum().item() - (1 - p)) < 0.01
    ref, _ = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep)
    low, _ = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
