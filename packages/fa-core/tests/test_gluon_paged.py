"""The Gluon Hopper varlen forward with K/V in a paged cache (``block_table``).

On any machine: the support predicate's paged rules. On an sm_90 GPU with Triton 3.6 (marked ``gpu``): the
Gluon paged forward against the float32 reference on the equivalent packed keys and against the Triton
kernel's paged forward on the same inputs (pages 16 / 64 / 256, every kernel kind, causal, windows, softcap,
GQA, ragged lengths, shuffled pages, NaN-filled unused cache rows, ``seqused_k``, garbage indices), and the
dispatch of :func:`fa_core.flash_attn_varlen_forward`.
"""

from __future__ import annotations

import pytest
import torch

from fa_core import attention_varlen_ref, flash_attn_varlen_forward, settings
from fa_core import gluon as fg
from fa_core.forward_launch import launch_forward
from fa_core.testing import assert_close_2x, poisoned

_GPU = torch.cuda.is_available() and fg.available()


def _cu(lens: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def to_pages(k, v, lens_k, page, spare=3, seed=0, fill=float("nan")):
    """Scatter packed keys ``(total_k, hk, d)`` into a shuffled cache ``(num_pages, page, hk, d)``: returns
    ``(k_cache, v_cache, block_table)``. Every cache row no sequence uses holds ``fill`` (NaN: it must never
    reach the output) and the unused table slots hold -1 (never read for valid lengths)."""
    batch = len(lens_k)
    need = [-(-n // page) for n in lens_k]
    cols = max(max(need), 1) + 1
    n_pages = sum(need) + spare
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pages, generator=g).tolist()
    kc = torch.full((n_pages, page, *k.shape[1:]), fill, dtype=k.dtype, device=k.device)
    vc = torch.full((n_pages, page, *v.shape[1:]), fill, dtype=v.dtype, device=v.device)
    table = torch.full((batch, cols), -1, dtype=torch.int32)
    start = nxt = 0
    for b, n in enumerate(lens_k):
        for c in range(need[b]):
            table[b, c] = perm[nxt]
            nxt += 1
        rows = torch.arange(n)
        kc[table[b, rows // page].long(), rows % page] = k[start : start + n]
        vc[table[b, rows // page].long(), rows % page] = v[start : start + n]
        start += n
    return kc, vc, table.to(k.device)


# --------------------------------------------------------------------------------------------------------------
# The support predicate (any machine)
# --------------------------------------------------------------------------------------------------------------


def _paged_inputs(page=16, d=128, dtype=torch.bfloat16, device="cpu"):
    lens_q, lens_k = [5, 40], [37, 40]
    q = torch.randn(sum(lens_q), 4, d, dtype=dtype, device=device)
    kc = torch.randn(8, page, 2, d, dtype=dtype, device=device)
    vc = torch.randn_like(kc)
    table = torch.zeros(2, 4, dtype=torch.int32, device=device)
    kw = dict(
        cu_seqlens_q=_cu(lens_q, device),
        cu_seqlens_k=_cu(lens_k, device),
        max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k),
        block_table=table,
    )
    return q, kc, vc, kw


def _reason(q, k, v, **kw):
    return fg.unsupported_reason(q, k, v, check_device=False, **kw)


@pytest.mark.parametrize("page", [16, 32, 64, 128, 256, 512])
@pytest.mark.parametrize("d", [64, 128])
def test_paged_supported(page, d):
    q, kc, vc, kw = _paged_inputs(page, d)
    assert _reason(q, kc, vc, **kw) is None
    assert _reason(q, kc, vc, causal=True, window_size=(64, 0), softcap=5.0, **kw) is None
    used = torch.tensor([30, 40], dtype=torch.int32)
    assert _reason(q, kc, vc, seqused_k=used, **kw) is None


def test_paged_default_kind():
    for d in fg.HEAD_DIMS:
        for causal in (False, True):
            for seqlen in (1, 2048, 16384):
                for page in (16, 32, 64, 256):
                    kind = fg.default_kind(d, causal, seqlen, varlen=True, page_size=page)
                    assert kind in fg.KINDS and d in fg.head_dims(kind)
    assert fg.default_kind(128, False, 2048, varlen=True, page_size=16) == "ws"
    assert fg.default_kind(64, True, 2048, varlen=True, page_size=16) == "ws3"


def test_paged_refused():
    q, kc, vc, kw = _paged_inputs()
    # pages that are not contiguous rows (a cache sliced out of a wider one)
    wide = torch.randn(8, 32, 2, 128, dtype=torch.bfloat16)
    assert "contiguous rows" in _reason(q, wide[:, :16], wide[:, :16], **kw)
    # page sizes the kernels do not tile
    for page in (8, 48):
        k = torch.randn(8, page, 2, 128, dtype=torch.bfloat16)
        assert "power of two" in _reason(q, k, k, **kw)
    bad_table = dict(kw, block_table=kw["block_table"].long())
    assert "block_table" in _reason(q, kc, vc, **bad_table)
    assert "block_table" in _reason(q, kc, vc, **dict(kw, block_table=kw["block_table"][:1]))
    assert "seqused_k" in _reason(q, kc, vc, seqused_k=torch.zeros(2, dtype=torch.int64), **kw)
    assert "leftpad_k" in _reason(q, kc, vc, leftpad_k=torch.zeros(2, dtype=torch.int32), **kw)
    assert "dropout" in _reason(q, kc, vc, dropout_p=0.1, **kw)
    assert "ALiBi" in _reason(q, kc, vc, alibi_slopes=torch.ones(4), **kw)
    assert "head dim" in _reason(*_paged_inputs(d=96)[:3], **kw)
    # a packed (3-D) k with a block table, a block table without varlen, seqused_k without a block table
    q3 = q
    k3 = torch.randn(77, 2, 128, dtype=torch.bfloat16)
    assert _reason(q3, k3, k3, **kw) is not None
    assert "varlen" in _reason(q.unsqueeze(0), kc, vc, block_table=kw["block_table"])
    no_table = {n: x for n, x in kw.items() if n != "block_table"}
    assert "seqused_k" in _reason(q, k3, k3, seqused_k=torch.zeros(2, dtype=torch.int32), **no_table)


# --------------------------------------------------------------------------------------------------------------
# The kernels (sm_90 GPU)
# --------------------------------------------------------------------------------------------------------------

RULES = {
    "plain": dict(causal=False),
    "causal": dict(causal=True),
    "window": dict(causal=False, window_size=(100, 30)),
    "causal_window_softcap": dict(causal=True, window_size=(255, 0), softcap=10.0),
}
# key lengths: ragged, not multiples of any page, one shorter than a page, one of exactly 256, one empty
LENS_K = [1000, 7, 300, 0, 513, 256, 130]
LENS_Q = [1000, 7, 129, 0, 1, 256, 200]  # q <= k (prefill / chunked prefill) and q > k


def _kind_params():
    return [(kind, d) for kind in fg.KINDS for d in (64, 128) if d in fg.head_dims(kind)]


def _gpu_inputs(d, dtype, seed, h=8, hk=2, lens_q=LENS_Q, lens_k=LENS_K):
    torch.manual_seed(seed)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    return q, k, v, _cu(lens_q, "cuda"), _cu(lens_k, "cuda")


def _triton_paged(q, kc, vc, cu_q, cu_k, max_q, max_k, table, seqused=None, **rule):
    """The Triton kernel's paged forward on the same inputs: ``(out, lse)``."""
    out = poisoned(q.shape, q.dtype, q.device)
    lse = poisoned((q.shape[1], q.shape[0]), torch.float32, q.device)
    launch_forward(
        q, kc, vc, out, lse, varlen=True, batch=cu_q.numel() - 1, max_seqlen_q=max_q, max_seqlen_k=max_k,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused, softmax_scale=q.shape[-1] ** -0.5,
        causal=rule.get("causal", False), window_size=rule.get("window_size", (-1, -1)),
        softcap=rule.get("softcap", 0.0), alibi_slopes=None, dropout_p=0.0,
        rng_state=torch.zeros(2, dtype=torch.int64), block_table=table,
    )  # fmt: skip
    return out, lse


def _check(out, lse, q, k, v, cu_q, cu_k, tl_out, tl_lse, **rule):
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, dtype=torch.float32, **rule)
    low, low_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **rule)
    assert not bool(torch.isnan(out).any()), "NaN in out (a stale cache row reached P @ V)"
    assert_close_2x(out, ref, low, "out")
    assert_close_2x(lse, ref_lse, low_lse, "lse", slack=2e-3)
    # the Triton kernel on the same cache: the same error budget against the reference
    assert_close_2x(out, tl_out.float(), low, "out vs the Triton kernel", factor=3.0)
    finite = torch.isfinite(ref_lse)
    assert bool((torch.isinf(lse) == ~finite).all())
    torch.testing.assert_close(lse[finite], tl_lse[finite], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("page", [16, 64, 256])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("kind, d", _kind_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="fa_core.gluon needs an sm_90 GPU and Triton 3.6")
def test_paged_matches_reference(kind, d, rule, page, dtype):
    q, k, v, cu_q, cu_k = _gpu_inputs(d, dtype, seed=page + d)
    kc, vc, table = to_pages(k, v, LENS_K, page, seed=page)
    max_q, max_k = max(LENS_Q), max(LENS_K)
    out = poisoned(q.shape, dtype, "cuda")
    o, lse = fg.forward_varlen(
        q, kc, vc, cu_q, cu_k, max_q, max_k, out=out, kind=kind, block_table=table, **RULES[rule]
    )
    assert o.data_ptr() == out.data_ptr()
    tl_out, tl_lse = _triton_paged(q, kc, vc, cu_q, cu_k, max_q, max_k, table, **RULES[rule])
    _check(o, lse, q, k, v, cu_q, cu_k, tl_out, tl_lse, **RULES[rule])


@pytest.mark.parametrize("page", [16, 256])
@pytest.mark.parametrize("kind, d", _kind_params())
@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="fa_core.gluon needs an sm_90 GPU and Triton 3.6")
def test_paged_fp16_and_seqused(kind, d, page):
    """fp16; ``seqused_k`` shorter than the ``cu_seqlens_k`` lengths (the rest of the pages hold NaN)."""
    dtype = torch.float16
    lens_k_alloc = [900, 40, 300, 600]
    used = [777, 33, 0, 600]
    lens_q = [500, 33, 10, 600]
    q, k, v, cu_q, cu_k = _gpu_inputs(d, dtype, seed=3, h=4, hk=4, lens_q=lens_q, lens_k=lens_k_alloc)
    # the cache holds the used keys only: everything past seqused_k[b] is NaN
    keep = torch.cat([torch.arange(n) < u for n, u in zip(lens_k_alloc, used, strict=True)]).cuda()
    k_used, v_used = k[keep], v[keep]
    kc, vc, table = to_pages(k_used, v_used, used, page, seed=1)
    seqused = torch.tensor(used, dtype=torch.int32, device="cuda")
    max_q, max_k = max(lens_q), max(lens_k_alloc)
    for rule in ("plain", "causal"):
        o, lse = fg.forward_varlen(
            q,
            kc,
            vc,
            cu_q,
            cu_k,
            max_q,
            max_k,
            kind=kind,
            block_table=table,
            seqused_k=seqused,
            **RULES[rule],
        )
        tl_out, tl_lse = _triton_paged(q, kc, vc, cu_q, cu_k, max_q, max_k, table, seqused, **RULES[rule])
        _check(o, lse, q, k_used, v_used, cu_q, _cu(used, "cuda"), tl_out, tl_lse, **RULES[rule])


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="fa_core.gluon needs an sm_90 GPU and Triton 3.6")
@pytest.mark.parametrize("page", [16, 256])
def test_paged_garbage_indices_stay_inside(page):
    """Block-table entries outside [0, num_pages), lengths past the table's capacity and garbage
    ``seqused_k``: the cache sits between NaN guard pages, so a read outside it would show as NaN."""
    torch.manual_seed(5)
    d, h, hk, n_pages, cols, guard = 128, 4, 2, 6, 3, 4
    buf = torch.full((n_pages + 2 * guard, page, hk, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    vbuf = buf.clone()
    kc, vc = buf[guard : guard + n_pages], vbuf[guard : guard + n_pages]
    kc.copy_(torch.randn_like(kc))
    vc.copy_(torch.randn_like(vc))
    table = torch.tensor(
        [[-3, 7, 2], [5, n_pages, -2], [n_pages + 1, 0, 1], [1, -1, n_pages + 4]],
        dtype=torch.int32,
        device="cuda",
    )
    cu_q = torch.tensor([0, 5, 17, 17, 26], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 10**6, 90, 2**31 - 1, 5], dtype=torch.int32, device="cuda")
    seqused = torch.tensor([60, -5, 2**30, 7], dtype=torch.int32, device="cuda")
    q = torch.randn(26, h, d, dtype=torch.bfloat16, device="cuda")
    for used in (None, seqused):
        for kind in ("pipelined", "ws"):
            o, lse = fg.forward_varlen(
                q, kc, vc, cu_q, cu_k, 12, cols * page, kind=kind, block_table=table, seqused_k=used
            )
            torch.cuda.synchronize()
            assert not bool(torch.isnan(o).any()) and not bool(torch.isnan(lse).any())


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="fa_core.gluon needs an sm_90 GPU and Triton 3.6")
@pytest.mark.parametrize("page", [16, 256])
@pytest.mark.parametrize("d", [64, 128])
def test_public_function_takes_gluon(page, d, monkeypatch):
    """``flash_attn_varlen_forward(block_table=...)`` runs the Gluon kernel on sm_90 (the Triton kernel with
    ``settings.gluon`` off, or for pages that are not contiguous rows) and agrees with the packed layout."""
    import fa_core.ops

    monkeypatch.setattr(fa_core.ops, "GLUON_MIN_FLOPS", 0)
    calls = []
    real = fg.forward_varlen
    monkeypatch.setattr(fg, "forward_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, cu_q, cu_k = _gpu_inputs(d, torch.bfloat16, seed=9)
    kc, vc, table = to_pages(k, v, LENS_K, page, seed=2)
    max_q, max_k = max(LENS_Q), max(LENS_K)
    res = flash_attn_varlen_forward(q, kc, vc, cu_q, cu_k, max_q, max_k, causal=True, block_table=table)
    assert calls == [1]
    with settings.override(gluon=False):
        tl = flash_attn_varlen_forward(q, kc, vc, cu_q, cu_k, max_q, max_k, causal=True, block_table=table)
    assert calls == [1]
    _check(res.out, res.lse, q, k, v, cu_q, cu_k, tl.out, tl.lse, causal=True)
    # a cache whose pages are not contiguous rows stays on the Triton kernel
    wide = torch.cat([kc, kc], dim=1)[:, :page]
    wide_v = torch.cat([vc, vc], dim=1)[:, :page]
    res2 = flash_attn_varlen_forward(
        q, wide, wide_v, cu_q, cu_k, max_q, max_k, causal=True, block_table=table
    )
    assert calls == [1]
    torch.testing.assert_close(res2.out, tl.out, atol=2e-2, rtol=2e-2)
