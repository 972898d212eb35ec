"""GPU forward tests at realistic sizes (bf16/fp16), both load paths (TMA descriptors and pointers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs it visible to @triton.jit functions)

from fa_core import (
    attention_ref,
    attention_varlen_ref,
    flash_attn_forward,
    flash_attn_varlen_forward,
    forward_launch,
)
from fa_core.testing import assert_close_2x, poisoned, use_settings

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
    use_settings(monkeypatch, tma=tma == "1")
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
    use_settings(monkeypatch, tma=tma == "1")
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


@pytest.mark.parametrize("tma", ["1", "0"])
@pytest.mark.parametrize("varlen", [False, True])
def test_fp8_layout_gpu(varlen, tma, monkeypatch):
    """The FP8 path's layout (V transposed on the host, read through TMA or pointers) with bf16 inputs."""
    use_settings(monkeypatch, tma=tma == "1")
    monkeypatch.setattr(forward_launch, "FP8_LAYOUT_FOR_16BIT", True)
    torch.manual_seed(9)
    dt = torch.bfloat16
    if varlen:
        lens = [1, 300, 1029, 17, 2000]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        q, k, v = (torch.randn(sum(lens), h, 128, device="cuda", dtype=dt) for h in (16, 4, 4))
        res = flash_attn_varlen_forward(
            q, k, v, cu, cu, max(lens), max(lens), causal=True, out=poisoned(q.shape, dt, "cuda")
        )
        ref, ref_lse = attention_varlen_ref(q, k, v, cu, cu, causal=True)
        low, low_lse = attention_varlen_ref(q, k, v, cu, cu, causal=True, upcast=False)
    else:
        q = torch.randn(2, 1000, 16, 128, device="cuda", dtype=dt)
        k, v = (torch.randn(2, 1531, 4, 128, device="cuda", dtype=dt) for _ in range(2))
        res = flash_attn_forward(q, k, v, causal=True, out=poisoned(q.shape, dt, "cuda"))
        ref, ref_lse = attention_ref(q, k, v, causal=True)
        low, low_lse = attention_ref(q, k, v, causal=True, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=2e-2)


@triton.jit
def _stripes(b, h, q_idx, kv_idx):
    return ((q_idx + kv_idx + h) % 3) != 0


@pytest.mark.parametrize("tma", ["1", "0"])
def test_block_sparse_full_blocks_gpu(tma, monkeypatch):
    """Block-sparse mask with partial (mask_mod evaluated) and full (mask_mod skipped) blocks, causal, at
    128 x 128 blocks; against the reference on the equivalent dense mask."""
    use_settings(monkeypatch, tma=tma == "1")
    torch.manual_seed(10)
    b, s, h, hk, d, bs = 2, 1000, 8, 2, 128, 128
    nb = -(-s // bs)
    cls = torch.randint(0, 3, (b, h, nb, nb), device="cuda")  # 0 skipped, 1 partial, 2 full
    part, full = cls == 1, cls == 2

    def compact(blocks):
        num = blocks.sum(-1, dtype=torch.int32).contiguous()
        idx = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
        return num, idx

    (pn, pi), (fn, fi) = compact(part), compact(full)
    bm = SimpleNamespace(
        kv_num_blocks=pn, kv_indices=pi, block_size=(bs, bs), full_kv_num_blocks=fn, full_kv_indices=fi
    )
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def expand(blocks):
        return blocks.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :s, :s]

    ar = torch.arange(s, device="cuda")
    stripes = ((ar[:, None] + ar[None, :] + torch.arange(h, device="cuda").view(1, -1, 1, 1)) % 3) != 0
    dense = (expand(part) & stripes) | expand(full)

    def mask_ref(b_, h_, q_, k_):
        return dense[b_, h_, q_, k_]

    res = flash_attn_forward(
        q, k, v, causal=True, block_mask=bm, mask_mod=_stripes, out=poisoned(q.shape, q.dtype, "cuda")
    )
    ref, ref_lse = attention_ref(q, k, v, causal=True, mask_mod=mask_ref)
    low, low_lse = attention_ref(q, k, v, causal=True, mask_mod=mask_ref, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=2e-2)
