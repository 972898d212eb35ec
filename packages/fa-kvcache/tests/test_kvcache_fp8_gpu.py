"""flash_attn_with_kvcache over FP8 (float8_e4m3fn) caches on a GPU: bf16 q, batch 8, contexts up to 8k,
paged (pages 16 / 64 / 256) and contiguous, decode and a chunk of new rows appended (quantised with
``k_descale`` / ``v_descale``).

    PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-kvcache/src:packages/fa-compat/src \
        python -m pytest -q packages/fa-kvcache/tests/test_kvcache_fp8_gpu.py

Accuracy asserted: against the float32 reference on the dequantised cache (``k_cache.float() * k_descale``,
read back after the append), bf16 outputs within 2e-2 absolute / relative, lse within 1e-2 (the bounds of
test_unified_gpu.py: a bf16 output rounding is 2^-8 relative and the P @ V dot takes P in bf16).
"""

from __future__ import annotations

import math

import pytest
import torch

import fa_kvcache
from fa_core.reference import attention_ref
from fa_kvcache.unified import append_paged_kv

pytestmark = pytest.mark.gpu

DEV = "cuda"
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
BATCH, NHEADS, NHEADS_K, D = 8, 32, 8, 128
CONTEXT = 8192
#: rows already in each sequence's cache (the new rows come on top, up to CONTEXT)
OLD = [8176, 8000, 5000, 8100, 1, 4096, 7777, 6000]


def _scales(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k_scale = torch.rand(BATCH, NHEADS_K, device=DEV, generator=g) * 0.02 + 0.01
    v_scale = torch.rand(BATCH, NHEADS_K, device=DEV, generator=g) * 0.02 + 0.01
    return k_scale, v_scale


def _paged(page: int, seed: int) -> dict:
    """An FP8 paged cache (shuffled pages, capacity CONTEXT per sequence) filled by append_paged_kv."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    cols = math.ceil(CONTEXT / page)
    nb = BATCH * cols + 3
    kc = torch.zeros(nb, page, NHEADS_K, D, dtype=FP8, device=DEV)
    vc = torch.zeros_like(kc)
    perm = torch.randperm(nb, device=DEV, generator=g)[: BATCH * cols]
    bt = perm.view(BATCH, cols).to(torch.int32)
    k_scale, v_scale = _scales(g)
    cu = torch.tensor([0, *torch.tensor(OLD).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    k_old = (torch.randn(sum(OLD), NHEADS_K, D, device=DEV, generator=g) * 2).to(BF16)
    v_old = (torch.randn(sum(OLD), NHEADS_K, D, device=DEV, generator=g) * 2).to(BF16)
    zeros = torch.zeros(BATCH, dtype=torch.int32, device=DEV)
    append_paged_kv(k_old, v_old, kc, vc, bt, zeros, cu, max(OLD), k_scale=k_scale, v_scale=v_scale)
    return dict(k_cache=kc, v_cache=vc, block_table=bt, k_descale=k_scale, v_descale=v_scale)


def _rows(c: dict, name: str, b: int, n: int) -> torch.Tensor:
    cache = c[name]
    scale = c["k_descale" if name == "k_cache" else "v_descale"][b]
    bt = c.get("block_table")
    raw = cache[bt[b].long()].reshape(-1, *cache.shape[2:])[:n] if bt is not None else cache[b, :n]
    return raw.float() * scale[None, :, None]


def _check(q, c, lens, out, lse, causal) -> None:
    assert torch.isfinite(out).all()
    for b, n in enumerate(lens):
        k, v = _rows(c, "k_cache", b, n), _rows(c, "v_cache", b, n)
        ro, rl = attention_ref(q[b : b + 1].float(), k[None], v[None], causal=causal)
        torch.testing.assert_close(out[b : b + 1].float(), ro, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse[b : b + 1], rl, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("page", [16, 64, 256])
@pytest.mark.parametrize("new", [0, 1, 16])
def test_paged_fp8_8k(page, new):
    c = _paged(page, seed=page + new)
    g = torch.Generator(device=DEV).manual_seed(new)
    sq = max(new, 1)
    q = torch.randn(BATCH, sq, NHEADS, D, device=DEV, generator=g).to(BF16)
    seqlens = torch.tensor(OLD, dtype=torch.int32, device=DEV)
    kw: dict = {}
    if new:
        kw = dict(
            k=(torch.randn(BATCH, new, NHEADS_K, D, device=DEV, generator=g) * 2).to(BF16),
            v=(torch.randn(BATCH, new, NHEADS_K, D, device=DEV, generator=g) * 2).to(BF16),
        )
    out, lse = fa_kvcache.flash_attn_with_kvcache(
        q, c["k_cache"], c["v_cache"], cache_seqlens=seqlens, block_table=c["block_table"], causal=True,
        k_descale=c["k_descale"], v_descale=c["v_descale"], return_softmax_lse=True, **kw,
    )  # fmt: skip
    assert out.dtype == BF16 and out.shape == (BATCH, sq, NHEADS, D)
    _check(q, c, [o + new for o in OLD], out, lse, causal=True)


def test_contiguous_fp8_8k_through_flash_attn():
    """A contiguous ``(8, 8192, 8, 128)`` FP8 cache (one page per sequence) through the flash_attn namespace."""
    from flash_attn import flash_attn_with_kvcache

    g = torch.Generator(device=DEV).manual_seed(3)
    k_scale, v_scale = _scales(g)
    kc = (torch.randn(BATCH, CONTEXT, NHEADS_K, D, device=DEV, generator=g) * 50).clamp(-448, 448).to(FP8)
    vc = (torch.randn(BATCH, CONTEXT, NHEADS_K, D, device=DEV, generator=g) * 50).clamp(-448, 448).to(FP8)
    q = torch.randn(BATCH, 1, NHEADS, D, device=DEV, generator=g).to(BF16)
    k = torch.randn(BATCH, 1, NHEADS_K, D, device=DEV, generator=g).to(BF16)
    v = torch.randn(BATCH, 1, NHEADS_K, D, device=DEV, generator=g).to(BF16)
    seqlens = torch.tensor(OLD, dtype=torch.int32, device=DEV)
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=seqlens, causal=True, k_descale=k_scale, v_descale=v_scale,
        return_softmax_lse=True,
    )  # fmt: skip
    c = dict(k_cache=kc, v_cache=vc, k_descale=k_scale, v_descale=v_scale)
    _check(q, c, [o + 1 for o in OLD], out, lse, causal=True)
