"""GPU: paged varlen forward (K/V read through the block table) and leftpad_k at realistic sizes with the
autotuned tiles (pages smaller than, equal to and larger than the key tile), and garbage indices with value
checks off at those sizes (no fault, nothing written outside the outputs)."""

from __future__ import annotations

import pytest
import torch

from fa_core import attention_varlen_ref, settings
from fa_core.forward_configs import force_tile
from fa_core.forward_launch import launch_forward
from fa_core.testing import assert_close_2x, poisoned

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

H, HK, D = 16, 4, 128


def _lens(n: int, mean: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(1, 2 * mean, (n,), generator=g)]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def _launch(q, k, v, cu_q, cu_k, max_q, max_k, out, lse, **kw):
    args = dict(
        varlen=True,
        batch=cu_q.numel() - 1,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        seqused_k=None,
        softmax_scale=q.shape[-1] ** -0.5,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        dropout_p=0.0,
        rng_state=torch.zeros(2, dtype=torch.int64),
    )
    args.update(kw)
    launch_forward(q, k, v, out, lse, **args)


def _pages(k, v, lens, page, leftpad=None, seed=0, stale=None):
    """Packed K/V -> shuffled cache + block table; sequence b's key j at cache row leftpad[b] + j; the rows no
    sequence uses hold ``stale`` (NaN: a stale cache) when given."""
    pad = [0] * len(lens) if leftpad is None else leftpad
    need = [-(-(p + n) // page) for p, n in zip(pad, lens)]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sum(need) + 2, generator=g).cuda()
    kc = torch.randn(sum(need) + 2, page, *k.shape[1:], device="cuda", dtype=k.dtype)
    vc = torch.randn_like(kc)
    if stale is not None:
        kc.fill_(stale)
        vc.fill_(stale)
    table = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32, device="cuda")
    start = used = 0
    for b, n in enumerate(lens):
        pg = perm[used : used + need[b]]
        table[b, : need[b]] = pg.to(torch.int32)
        rows = torch.arange(n, device="cuda") + pad[b]
        kc[pg[rows // page], rows % page] = k[start : start + n]
        vc[pg[rows // page], rows % page] = v[start : start + n]
        start += n
        used += need[b]
    return kc, vc, table


@pytest.mark.parametrize("page", [16, 32, 64, 128, 256, 1024])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_paged_varlen_gpu(page, causal, dtype):
    torch.manual_seed(page)
    lens_k = _lens(6, 700, seed=page)
    lens_q = [max(1, n // 3) for n in lens_k]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = torch.randn(sum(lens_q), H, D, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), HK, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    kc, vc, table = _pages(k, v, lens_k, page, seed=page)
    out = poisoned(q.shape, dtype, "cuda")
    lse = poisoned((H, q.shape[0]), torch.float32, "cuda")
    _launch(q, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k), out, lse, causal=causal, block_table=table)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, dtype=torch.float32)
    low, low_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, upcast=False)
    assert_close_2x(out, ref, low, "out")
    assert_close_2x(lse, ref_lse, low_lse, "lse", slack=2e-3)


@pytest.mark.parametrize("page", [16, 64, 256])
@pytest.mark.parametrize(
    "tile", [(128, 64, 8, 3, True), (64, 64, 4, 3, True), (128, 128, 8, 3, False), (64, 32, 4, 2, False)]
)
def test_paged_forced_tiles_stale_cache_gpu(page, tile):
    """Each load path on its own (descriptors over the cache where a tile lies in one page, one table read
    per key for smaller pages), over a cache whose unused rows hold NaN."""
    torch.manual_seed(page)
    dtype = torch.bfloat16
    lens_k = _lens(5, 600, seed=page + 7)
    lens_q = [max(1, n // 2) for n in lens_k]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = torch.randn(sum(lens_q), H, D, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), HK, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    kc, vc, table = _pages(k, v, lens_k, page, seed=page, stale=float("nan"))
    out = poisoned(q.shape, dtype, "cuda")
    lse = poisoned((H, q.shape[0]), torch.float32, "cuda")
    with force_tile(tile):
        _launch(q, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k), out, lse, causal=True, block_table=table)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, dtype=torch.float32)
    low, low_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, upcast=False)
    assert_close_2x(out, ref, low, "out")
    assert_close_2x(lse, ref_lse, low_lse, "lse", slack=2e-3)


@pytest.mark.parametrize("page", [0, 16, 256])
def test_leftpad_gpu(page):
    torch.manual_seed(1)
    dtype = torch.bfloat16
    lens_k = _lens(5, 900, seed=3)
    pad = [int(x) % (n + 1) for x, n in zip(torch.randint(0, 400, (5,)), lens_k)]
    lens_q = [max(1, (n - p) // 2) for n, p in zip(lens_k, pad)]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = torch.randn(sum(lens_q), H, D, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), HK, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    leftpad = torch.tensor(pad, dtype=torch.int32, device="cuda")
    # the keys each sequence sees: its slice without the first pad[b] rows
    keep = torch.cat([torch.arange(s + p, s + n) for s, p, n in zip(cu_k[:-1].tolist(), pad, lens_k)]).cuda()
    k_eq, v_eq, cu_eq = k[keep], v[keep], _cu([n - p for n, p in zip(lens_k, pad)])
    out = poisoned(q.shape, dtype, "cuda")
    lse = poisoned((H, q.shape[0]), torch.float32, "cuda")
    if page:
        # the cache holds the used keys from row pad[b] on (what leftpad_k skips is never read)
        kc, vc, table = _pages(k_eq, v_eq, [n - p for n, p in zip(lens_k, pad)], page, leftpad=pad, seed=page)
        _launch(q, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k), out, lse, causal=True, leftpad_k=leftpad,
                block_table=table)  # fmt: skip
    else:
        _launch(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), out, lse, causal=True, leftpad_k=leftpad)
    ref, ref_lse = attention_varlen_ref(q, k_eq, v_eq, cu_q, cu_eq, causal=True, dtype=torch.float32)
    low, low_lse = attention_varlen_ref(q, k_eq, v_eq, cu_q, cu_eq, causal=True, upcast=False)
    assert_close_2x(out, ref, low, "out")
    assert_close_2x(lse, ref_lse, low_lse, "lse", slack=2e-3)


@pytest.mark.parametrize("paged", [False, True])
def test_garbage_indices_gpu(paged):
    """Out-of-range cu_seqlens / seqused_k / leftpad_k / block-table values with value checks off: the
    kernel finishes (no illegal address), and the guard regions around out and lse keep their sentinel."""
    g, total, dtype = 4096, 8192, torch.bfloat16
    q = torch.randn(total, H, D, device="cuda", dtype=dtype)
    k = torch.randn(total, HK, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    obuf = torch.full((total + 2 * g, H, D), 7.25, device="cuda", dtype=dtype)
    lbuf = torch.full((H, total + 2 * g), 7.25, device="cuda")
    out, lse = obuf[g : g + total], lbuf[:, g : g + total]
    cu_q = torch.tensor([0, 3000, -5000, 2**31 - 1, total], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([-(2**31), 100, 9000, 50, total + 10**6], dtype=torch.int32, device="cuda")
    seqused = torch.tensor([-7, 2**30, 4000, 10], dtype=torch.int32, device="cuda")
    leftpad = torch.tensor([2**30, -3, 100, -(2**31)], dtype=torch.int32, device="cuda")
    extra = {}
    if paged:
        kc, vc, _ = _pages(k, v, [2048] * 4, 64)
        table = torch.randint(-(2**31), 2**31 - 1, (4, 40), dtype=torch.int32, device="cuda")
        k, v = kc, vc
        extra = dict(block_table=table)
    with settings.override(value_checks=False):
        _launch(q, k, v, cu_q, cu_k, 4096, 4096, out, lse, causal=True, seqused_k=seqused, leftpad_k=leftpad,
                **extra)  # fmt: skip
    torch.cuda.synchronize()
    assert bool((obuf[:g] == 7.25).all()) and bool((obuf[g + total :] == 7.25).all())
    assert bool((lbuf[:, :g] == 7.25).all()) and bool((lbuf[:, g + total :] == 7.25).all())
