"""flash_attn_with_kvcache against fa_core.reference.attention_ref on the gathered cache.

Rule: err(ours vs float64 reference) <= 2 * err(reference in the low precision) + slack. Every case also
checks the cache after the in-place append: appended rows equal the (rotated) new k / v, every other
element of both caches is bit-identical to before.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

from fa_core.reference import attention_ref
from fa_core.rotary_ref import apply_rotary_ref
from fa_kvcache import flash_attn_with_kvcache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]
SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

if DEVICE == "cuda":
    pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter + CUDA")


def _make_case(
    *,
    batch=2,
    seqlen_q=1,
    nheads=6,
    nheads_k=2,
    d=32,
    dv=None,
    capacity=48,
    page=0,
    seqlen_new=0,
    dtype=torch.float32,
    rotary_dim=0,
    batch_idx=False,
    leftpad=False,
    seed=0,
    full=False,
):
    """Random inputs. ``page`` 0 = contiguous cache; else a shuffled paged pool (with spare blocks)."""
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q = rnd(batch, seqlen_q, nheads, d)
    k = rnd(batch, seqlen_new, nheads_k, d) if seqlen_new else None
    v = rnd(batch, seqlen_new, nheads_k, dv) if seqlen_new else None
    hi = capacity - seqlen_new - (seqlen_q if rotary_dim else 0)
    lens = torch.randint(0 if seqlen_new else 1, hi + 1, (batch,), generator=g)
    if full:
        lens[0] = capacity - seqlen_new
    case = dict(q=q, k=k, v=v, cache_seqlens=lens.to(torch.int32).to(DEVICE))
    if leftpad:
        pad = torch.stack([torch.randint(0, int(n) + 1, (1,), generator=g)[0] for n in lens])
        case["cache_leftpad"] = pad.to(torch.int32).to(DEVICE)
    if page:
        nb_seq = math.ceil(capacity / page)
        num_blocks = nb_seq * batch + 3
        perm = torch.randperm(num_blocks, generator=g)[: nb_seq * batch]
        case["block_table"] = perm.reshape(batch, nb_seq).to(torch.int32).to(DEVICE)
        case["k_cache"] = rnd(num_blocks, page, nheads_k, d)
        case["v_cache"] = rnd(num_blocks, page, nheads_k, dv)
    else:
        bc = batch * 2 if batch_idx else batch
        case["k_cache"] = rnd(bc, capacity, nheads_k, d)
        case["v_cache"] = rnd(bc, capacity, nheads_k, dv)
        if batch_idx:
            case["cache_batch_idx"] = torch.randperm(bc, generator=g)[:batch].to(torch.int32).to(DEVICE)
    if rotary_dim:
        angle = torch.rand(capacity + seqlen_q, rotary_dim // 2, generator=g) * 2 * math.pi
        case["rotary_cos"] = torch.cos(angle).to(dtype).to(DEVICE)
        case["rotary_sin"] = torch.sin(angle).to(dtype).to(DEVICE)
    return case


def _lens(case):
    cs = case["cache_seqlens"]
    batch = case["q"].shape[0]
    return (
        cs.long().cpu() if isinstance(cs, torch.Tensor) else torch.full((batch,), int(cs), dtype=torch.long)
    )


def _rows(case, b):
    """(cache tensor index, row index) lists addressing sequence b's logical cache rows 0..capacity-1."""
    kc = case["k_cache"]
    if "block_table" in case:
        page = kc.shape[1]
        bt = case["block_table"][b].long().cpu()
        pos = torch.arange(bt.numel() * page)
        return bt[pos // page], pos % page
    cb = int(case["cache_batch_idx"][b]) if "cache_batch_idx" in case else b
    pos = torch.arange(kc.shape[1])
    return torch.full_like(pos, cb), pos


def _expected_caches(case, interleaved):
    """Caches after the append, computed in plain PyTorch (float64 rotary, rounded once)."""
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    k, v = case.get("k"), case.get("v")
    if k is None:
        return kc, vc
    lens = _lens(case)
    k_ro = k
    if "rotary_cos" in case:
        k_ro = apply_rotary_ref(
            k.double(),
            case["rotary_cos"].double(),
            case["rotary_sin"].double(),
            seqlen_offsets=case["cache_seqlens"],
            interleaved=interleaved,
        ).to(k.dtype)
    for b in range(k.shape[0]):
        blk, row = _rows(case, b)
        sl = slice(int(lens[b]), int(lens[b]) + k.shape[1])
        kc[blk[sl], row[sl]] = k_ro[b]
        vc[blk[sl], row[sl]] = v[b]
    return kc, vc


def _reference(
    case,
    kc,
    vc,
    *,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    interleaved,
    upcast,
    softmax_scale,
    attention_chunk=0,
    learnable_sink=None,
):
    q = case["q"]
    batch, seqlen_q, nheads, d = q.shape
    lens = _lens(case) + (case["k"].shape[1] if case.get("k") is not None else 0)
    pads = (
        case["cache_leftpad"].long().cpu()
        if "cache_leftpad" in case
        else torch.zeros(batch, dtype=torch.long)
    )
    if "rotary_cos" in case:
        cos, sin = case["rotary_cos"].double(), case["rotary_sin"].double()
        local = window_size != (-1, -1)
        offs = case["cache_seqlens"]
        if causal or local:
            q = apply_rotary_ref(q.double(), cos, sin, seqlen_offsets=offs, interleaved=interleaved)
        else:
            q = apply_rotary_ref(
                q.double().reshape(batch, 1, seqlen_q * nheads, d),
                cos,
                sin,
                seqlen_offsets=offs,
                interleaved=interleaved,
            ).reshape(q.shape)
        q = q.to(case["q"].dtype)
    outs, lses = [], []
    for b in range(batch):
        blk, row = _rows(case, b)
        sl = slice(int(pads[b]), int(lens[b]))
        kb, vb = kc[blk[sl], row[sl]][None], vc[blk[sl], row[sl]][None]
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        o, l = attention_ref(
            q[b : b + 1],
            kb,
            vb,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=slopes,
            upcast=upcast,
            dtype=torch.float64,
            attention_chunk=attention_chunk,
            learnable_sink=learnable_sink,
        )
        outs.append(o.double() if upcast else o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _run_and_check(
    case,
    *,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    interleaved=True,
    num_splits=0,
    softmax_scale=None,
    attention_chunk=0,
    learnable_sink=None,
):
    kc_exp, vc_exp = _expected_caches(case, interleaved)
    args = {k: v for k, v in case.items() if k not in ("q",)}
    out, lse = flash_attn_with_kvcache(
        case["q"],
        rotary_interleaved=interleaved,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        num_splits=num_splits,
        softmax_scale=softmax_scale,
        return_softmax_lse=True,
        attention_chunk=attention_chunk,
        learnable_sink=learnable_sink,
        **args,
    )
    dtype = case["q"].dtype
    assert out.shape == (*case["q"].shape[:-1], case["v_cache"].shape[-1]) and out.dtype == dtype
    assert (
        lse.shape == (case["q"].shape[0], case["q"].shape[2], case["q"].shape[1])
        and lse.dtype == torch.float32
    )
    assert torch.isfinite(out).all()
    # cache contents: v bit-exact, k exact (no rotary) or within one rounding (rotary)
    assert torch.equal(case["v_cache"], vc_exp)
    if "rotary_cos" in case:
        torch.testing.assert_close(
            case["k_cache"], kc_exp, atol=2e-3 if dtype != torch.float32 else 1e-5, rtol=1e-3
        )
    else:
        assert torch.equal(case["k_cache"], kc_exp)
    kw = dict(
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        interleaved=interleaved,
        softmax_scale=softmax_scale,
        attention_chunk=attention_chunk,
        learnable_sink=learnable_sink,
    )
    # reference on the caches the kernel actually attended to (isolates attention from rotary rounding)
    ref, ref_lse = _reference(case, case["k_cache"], case["v_cache"], upcast=True, **kw)
    low, _ = _reference(case, case["k_cache"], case["v_cache"], upcast=False, **kw)
    err = (out.double() - ref).abs().max().item()
    low_err = (low.double() - ref).abs().max().item()
    assert err <= 2 * low_err + SLACK[dtype], (err, low_err)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse)), "rows without visible keys must have lse = +inf"
    torch.testing.assert_close(
        lse[fin], ref_lse[fin].float(), atol=1e-3 if dtype != torch.float32 else 1e-4, rtol=1e-4
    )
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [0, 16, 32])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("seqlen_new", [0, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_basic(dtype, page, seqlen_q, seqlen_new, causal):
    seqlen_new = min(seqlen_new, seqlen_q) if seqlen_new else 0
    case = _make_case(seqlen_q=seqlen_q, seqlen_new=seqlen_new, page=page, dtype=dtype, seed=seqlen_q + page)
    _run_and_check(case, causal=causal)


@pytest.mark.parametrize("heads", [(4, 4), (8, 1), (6, 3), (16, 2), (40, 1)])
@pytest.mark.parametrize("page", [0, 16])
@pytest.mark.parametrize("seqlen_q", [1, 5])
def test_gqa_mqa(heads, page, seqlen_q):
    nheads, nheads_k = heads
    case = _make_case(
        nheads=nheads,
        nheads_k=nheads_k,
        seqlen_q=seqlen_q,
        seqlen_new=1,
        page=page,
        dtype=torch.float16,
        seed=nheads,
    )
    _run_and_check(case, causal=True)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 32])
@pytest.mark.parametrize("mode", ["none", "causal", "local"])
@pytest.mark.parametrize("page", [0, 16])
def test_rotary(interleaved, rotary_dim, mode, page):
    case = _make_case(seqlen_q=3, seqlen_new=3, page=page, rotary_dim=rotary_dim, seed=rotary_dim)
    window = (10, 2) if mode == "local" else (-1, -1)
    _run_and_check(case, causal=mode == "causal", window_size=window, interleaved=interleaved)


@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("rotary", [False, True])
def test_cache_batch_idx(seqlen_q, rotary):
    case = _make_case(
        batch=3,
        seqlen_q=seqlen_q,
        seqlen_new=seqlen_q,
        batch_idx=True,
        rotary_dim=16 if rotary else 0,
        seed=7,
    )
    _run_and_check(case, causal=True, interleaved=False)


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_cache_leftpad(rotary, causal, splits):
    """Sequence b's keys are cache rows [leftpad[b], cache_seqlens[b] + seqlen_new): the reference attends
    to exactly those (causal alignment and ALiBi distances over the effective length), the new keys are
    appended at cache_seqlens[b] and rotated at that absolute position (flash-attn's test_flash_attn_kvcache
    with has_leftpad)."""
    case = _make_case(
        batch=3, seqlen_q=2, seqlen_new=2, leftpad=True, rotary_dim=32 if rotary else 0, seed=11
    )
    _run_and_check(case, causal=causal, alibi_slopes=torch.rand(3, 6).to(DEVICE) * 0.3, num_splits=splits)


@pytest.mark.parametrize("window", [(3, 1), (0, 0)])
def test_leftpad_k_keyword_and_window(window):
    """``leftpad_k`` (flash-attn's low-level name) is the same argument as ``cache_leftpad``; a left pad equal
    to cache_seqlens (no old key left) and one of 0 are valid edges."""
    case = _make_case(batch=3, seqlen_q=3, seqlen_new=1, leftpad=True, capacity=40, seed=12)
    case["cache_leftpad"][0] = case["cache_seqlens"][0]
    case["cache_leftpad"][1] = 0
    out_ref, lse_ref = _run_and_check(case, window_size=window)
    fresh = _make_case(batch=3, seqlen_q=3, seqlen_new=1, leftpad=True, capacity=40, seed=12)
    out, lse = flash_attn_with_kvcache(
        fresh["q"],
        fresh["k_cache"],
        fresh["v_cache"],
        fresh["k"],
        fresh["v"],
        cache_seqlens=case["cache_seqlens"],
        leftpad_k=case["cache_leftpad"],
        window_size=window,
        return_softmax_lse=True,
    )
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)
    torch.testing.assert_close(lse, lse_ref, atol=0, rtol=0)


def test_leftpad_with_block_table_is_refused():
    """flash-attn refuses a paged cache with left padding; so does this one, naming the argument, before
    anything is written."""
    from fa_core.errors import FlashAttnValueError

    case = _make_case(batch=2, seqlen_q=1, seqlen_new=1, leftpad=True, page=16, seed=3)
    before = case["k_cache"].clone()
    for name in ("cache_leftpad", "leftpad_k"):
        kw = {k: v for k, v in case.items() if k not in ("q", "cache_leftpad")}
        kw[name] = case["cache_leftpad"]
        with pytest.raises(FlashAttnValueError, match=f"{name} cannot be combined with block_table"):
            flash_attn_with_kvcache(case["q"], **kw)
    assert torch.equal(case["k_cache"], before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", ["window", "window_causal", "softcap", "alibi", "alibi2d", "scale"])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("page", [0, 32])
def test_features(dtype, feature, seqlen_q, page):
    case = _make_case(seqlen_q=seqlen_q, seqlen_new=1, page=page, dtype=dtype, capacity=64, seed=3)
    kw = {}
    if feature == "window":
        kw = dict(window_size=(7, 3))
    elif feature == "window_causal":
        kw = dict(window_size=(5, -1), causal=True)
    elif feature == "softcap":
        kw = dict(softcap=2.5)
    elif feature == "alibi":
        kw = dict(alibi_slopes=torch.rand(6).to(DEVICE) * 0.5, causal=True)
    elif feature == "alibi2d":
        kw = dict(alibi_slopes=torch.rand(2, 6).to(DEVICE) * 0.5)
    else:
        kw = dict(softmax_scale=0.3)
    _run_and_check(case, **kw)


@pytest.mark.parametrize("page", [0, 16])
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_num_splits_agree(page, seqlen_q):
    results = []
    for splits in (1, 2, 5, 0):
        case = _make_case(seqlen_q=seqlen_q, seqlen_new=1, page=page, capacity=96, seed=5)
        results.append(_run_and_check(case, causal=True, num_splits=splits))
    out1, lse1 = results[0]
    for out, lse in results[1:]:
        torch.testing.assert_close(out, out1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, lse1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page", [0, 16])
def test_more_splits_than_blocks_and_empty_rows(page):
    # sequence 0 holds 0 keys (no append): its rows have out 0 and lse +inf; many splits are empty
    case = _make_case(seqlen_q=2, page=page, seed=9)
    case["cache_seqlens"][0] = 0
    out, lse = _run_and_check(case, num_splits=16, window_size=(3, 0))
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("page", [0, 16, 24])
@pytest.mark.parametrize("mode", ["plain", "causal", "chunk", "chunk_causal", "chunk_window"])
def test_sink_and_chunk(splits, page, mode):
    """learnable_sink (in the single-split epilogue and in the combine) and attention_chunk (beyond
    flash-attn 2) against the reference; seqlen_q 3 so a chunk edge falls between query rows."""
    case = _make_case(seqlen_q=3, seqlen_new=2, page=page, capacity=64, seed=21 + page)
    kw: dict = dict(learnable_sink=(torch.randn(6) * 2).to(DEVICE))
    if "chunk" in mode:
        kw["attention_chunk"] = 16 if mode == "chunk_window" else 8
    if "causal" in mode:
        kw["causal"] = True
    if mode == "chunk_window":
        kw["window_size"] = (5, 2)
    if mode == "chunk":
        kw.pop("learnable_sink")
    _run_and_check(case, num_splits=splits, **kw)


@pytest.mark.parametrize("splits", [1, 4])
def test_sink_empty_rows(splits):
    # no visible key: out 0 and lse = the sink's logit (it is the only term of the denominator)
    case = _make_case(seqlen_q=2, page=16, seed=9)
    case["cache_seqlens"][0] = 0
    sink = (torch.randn(6) * 2).to(DEVICE)
    out, lse = _run_and_check(case, num_splits=splits, learnable_sink=sink)
    assert (out[0] == 0).all()
    torch.testing.assert_close(lse[0], sink.float()[:, None].expand(6, 2))


@pytest.mark.parametrize("page", [0, 16, 24])
def test_full_cache_and_odd_sizes(page):
    # the append fills the cache exactly; head dims not powers of two, v head dim != qk head dim
    case = _make_case(seqlen_q=2, seqlen_new=2, page=page, d=40, dv=24, capacity=48, full=True, seed=13)
    _run_and_check(case, causal=True)


def test_cache_seqlens_int_and_none():
    case = _make_case(seqlen_q=2, seqlen_new=2, seed=4)
    case["cache_seqlens"] = 20
    _run_and_check(case, causal=True)
    case = _make_case(seqlen_q=3, seed=4)
    ref_case = dict(case)
    case.pop("cache_seqlens")
    out = flash_attn_with_kvcache(case["q"], case["k_cache"], case["v_cache"], causal=True)
    ref_case["cache_seqlens"] = torch.full((2,), case["k_cache"].shape[1], dtype=torch.int32, device=DEVICE)
    ref, _ = _reference(
        ref_case,
        case["k_cache"],
        case["v_cache"],
        causal=True,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        interleaved=True,
        upcast=True,
        softmax_scale=None,
    )
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_return_types():
    case = _make_case(seed=1)
    args = {k: v for k, v in case.items() if k not in ("q", "k", "v")}
    out = flash_attn_with_kvcache(case["q"], **args)
    assert isinstance(out, torch.Tensor) and out.shape == case["q"].shape
    res = flash_attn_with_kvcache(case["q"], return_softmax_lse=True, **args)
    assert isinstance(res, tuple) and len(res) == 2
    # positional order of flash-attn 2.8
    out2 = flash_attn_with_kvcache(
        case["q"],
        case["k_cache"],
        case["v_cache"],
        None,
        None,
        None,
        None,
        case["cache_seqlens"],
        None,
        None,
        None,
        None,
        False,
        (-1, -1),
        0.0,
        True,
        None,
        1,
        False,
    )
    torch.testing.assert_close(out, out2)


def test_num_splits_heuristic_fitted_points():
    from fa_kvcache.interface import num_splits_heuristic

    # the H200 (132 SMs) points it was fitted on: (work, 64-key blocks) -> best measured splits (or near)
    assert num_splits_heuristic(8, 512, 132) == 16  # batch 1, 32k keys, 8 kv heads, contiguous
    assert num_splits_heuristic(8, 512, 132, paged=True) == 47  # the same, paged (49 would leave two empty)
    assert num_splits_heuristic(8, 512, 132, paged=True, page=256) == 47
    assert num_splits_heuristic(8, 512, 132, paged=True, page=16) == 32  # pages smaller than the tile
    assert num_splits_heuristic(8, 500, 132, paged=True) == 46  # 49 -> 11 blocks each -> 46 splits hold them
    assert num_splits_heuristic(64, 128, 132) == 2  # batch 8, 8k, contiguous
    assert num_splits_heuristic(64, 128, 132, paged=True) == 6  # batch 8, 8k, paged
    assert num_splits_heuristic(64, 128, 132, paged=True, page=16) == 4
    # batch 64, 32k: the programs fill the machine; through 16-key pages they split into 2048-key runs (the
    # block-table entries of a run fit the preload)
    assert num_splits_heuristic(512, 512, 132, paged=True, page=16) == 16
    assert num_splits_heuristic(512, 512, 132, paged=True, page=64) == 1
    assert num_splits_heuristic(512, 512, 132) == 1
    assert num_splits_heuristic(256, 16, 132, paged=True, page=16) == 1  # batch 32, 1k: short runs
    assert num_splits_heuristic(8, 16, 132) == 16  # batch 1, 1k: one block per split
    assert num_splits_heuristic(8, 16, 132, paged=True) == 16
    assert num_splits_heuristic(256, 16, 132) == 1  # batch 32: the programs fill the machine
    # an FP8 cache still splits a full machine, to ~16 programs per SM in runs of >= 512 keys (batch 32 / 8k,
    # 8 kv heads: 8 splits measured best)
    assert num_splits_heuristic(256, 128, 132, paged=True, page=64, fp8=True) == 8
    assert num_splits_heuristic(256, 16, 132, paged=True, fp8=True) == 2  # 1k keys: two runs of 512
    assert num_splits_heuristic(256, 7, 132, paged=True, fp8=True) == 1
    assert num_splits_heuristic(4096, 512, 132, paged=True, fp8=True) == 1  # batch 512: already 31 per SM
    assert num_splits_heuristic(64, 128, 132, paged=True, fp8=True) == 6  # below a full machine: as bf16
    assert num_splits_heuristic(8, 1, 132) == 1
    assert num_splits_heuristic(8, 4, 132) == 1  # 256 keys: no combine launch (FlashAttention-3's rule)
    assert num_splits_heuristic(8, 5, 132) == 5
    assert num_splits_heuristic(0, 10, 132) == 1


def test_key_tile_fitted_points():
    from fa_kvcache.interface import _key_tile

    # (seqlen_q, group, block_m, dmax, interpret, keys per program, page) -> (BLOCK_N, warps, stages), H200
    assert _key_tile(1, 4, 16, 128, False, 64, 0) == (64, 4, 2)  # short streams (batch 1 / 1k, 16 splits)
    assert _key_tile(1, 4, 16, 128, False, 64, 16) == (64, 4, 2)
    assert _key_tile(1, 4, 16, 128, False, 2048, 0) == (64, 4, 4)  # batch 1 / 32k contiguous, 16 splits
    assert _key_tile(1, 4, 16, 128, False, 4096, 0) == (64, 4, 4)  # batch 8 / 8k contiguous, 2 splits
    assert _key_tile(1, 4, 16, 128, False, 697, 256) == (32, 4, 3)  # batch 1 / 32k paged, 47 splits
    assert _key_tile(1, 4, 16, 128, False, 1024, 16) == (64, 4, 3)  # the same at page 16, 32 splits
    assert _key_tile(1, 4, 16, 128, False, 2048, 16) == (64, 4, 3)  # batch 64 / 32k at page 16, 16 splits
    assert _key_tile(1, 4, 16, 128, False, 1365, 256) == (32, 4, 3)  # batch 8 / 8k paged, 6 splits
    assert _key_tile(1, 4, 16, 128, False, 32768, 0) == (128, 4, 3)  # long, contiguous
    assert _key_tile(1, 4, 16, 128, False, 32768, 256) == (128, 4, 3)  # long, a tile inside one page
    # long, pages smaller than a 128-key tile: 64-key tiles (batch 64, 32k: 3507 -> 4255 GB/s at page 16)
    assert _key_tile(1, 4, 16, 128, False, 32768, 16) == (64, 4, 3)
    assert _key_tile(4, 4, 16, 128, False, 8192, 64) == (64, 4, 3)


@contextlib.contextmanager
def bt_preload_off():
    """Paged split-KV launches read their block-table entries inside the key loop (the path of splits too
    long to preload: ``MAX_BT_PRELOAD`` exceeded) instead of preloading them; plans are re-made on both sides."""
    import fa_kvcache.decode_configs as dc
    import fa_kvcache.interface as ki

    saved = dc.MAX_BT_PRELOAD
    dc.MAX_BT_PRELOAD = 0
    ki.plan_decode.cache_clear()
    try:
        yield
    finally:
        dc.MAX_BT_PRELOAD = saved
        ki.plan_decode.cache_clear()


@pytest.mark.parametrize("page", [16, 32, 48])
@pytest.mark.parametrize("splits", [1, 3, 7])
def test_block_table_preload(page, splits):
    """Paged caches with the split's block-table entries preloaded into registers (BT_PRELOAD > 0, the
    default) and read inside the key loop (splits too long to preload): both match the reference and each
    other, with splits that start mid-page (48-key pages) and the ragged end of the keys."""
    leftpad = False
    import fa_kvcache.interface as ki

    results = []
    for preload in (True, False):
        with contextlib.nullcontext() if preload else bt_preload_off():
            case = _make_case(
                batch=3, seqlen_q=2, seqlen_new=3, leftpad=leftpad, page=page, capacity=192, seed=41 + page
            )
            results.append(_run_and_check(case, causal=True, num_splits=splits))
    (out1, lse1), (out0, lse0) = results
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse1, lse0, atol=1e-5, rtol=1e-5)
    # the sizes it picks: every page of the longest split, the first one possibly partial
    assert ki.bt_preload(16, 32768, 16, 64) == 256  # 2048 keys: 128 pages + 1
    assert ki.bt_preload(16, 32768, 16, 64, aligned=True) == 128  # tiles on page boundaries: no partial page
    assert ki.bt_preload(16, 32768, 64, 32, aligned=True) == 32  # b1/32k, 64 splits: 512 keys
    assert ki.bt_preload(64, 32768, 16, 64) == 64  # 32 + 1 pages
    assert ki.bt_preload(256, 32768, 64, 64) == 4  # 512 keys: 2 + 1 pages
    assert ki.bt_preload(16, 32768, 1, 64) == 0  # 2048 pages: loaded inside the loop
    assert ki.bt_preload(0, 32768, 16, 64) == 0  # contiguous cache


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_pages_smaller_than_tile(splits, causal):
    """16-key pages under 32-key tiles (8 query rows x GQA 4 = 32 rows: the interpreter's 32-key tile): the
    preloaded entries picked per key (``tl.gather``), against the reference."""
    import fa_kvcache.interface as ki

    case = _make_case(seqlen_q=8, nheads=8, nheads_k=2, seqlen_new=2, page=16, capacity=192, seed=77)
    assert ki._row_tile(8, 4, 32, 32, True)[0] == 32 and ki._key_tile(8, 4, 32, 32, True, 96, 16)[0] == 32
    _run_and_check(case, causal=causal, num_splits=splits)


@pytest.mark.parametrize("page", [0, 16])
def test_force_tile(page):
    """force_tile imposes (BLOCK_N, num_warps, num_stages) on the split-KV launch: results still match the
    reference (32-key tiles over 16-key pages: one tile straddles two pages); the innermost of nested tiles
    applies and the heuristic's comes back on exit; bad tiles are refused naming ``tile``."""
    import fa_kvcache.decode_configs as dc
    import fa_kvcache.interface as ki
    from fa_core.errors import FlashAttnValueError

    default = ki._key_tile(1, 2, 16, 32, True, 96, page)
    with dc.force_tile((64, 2, 2)) as outer:
        assert outer == (64, 2, 2) and ki._key_tile(1, 2, 16, 32, True, 96, page) == (64, 2, 2)
        with dc.force_tile((32, 1, 1)):
            assert ki._key_tile(1, 2, 16, 32, True, 96, page) == (32, 1, 1)
            case = _make_case(seqlen_q=2, seqlen_new=1, page=page, capacity=96, seed=13 + page)
            _run_and_check(case, causal=True, num_splits=3)
        assert ki._key_tile(1, 2, 16, 32, True, 96, page) == (64, 2, 2)
    assert ki._key_tile(1, 2, 16, 32, True, 96, page) == default
    for bad in [(48, 4, 2), (8, 4, 2), (64, 0, 2), (64, 4), (64, 4, 2.0), (True, 4, 2), [64, 4, 2]]:
        with pytest.raises(FlashAttnValueError, match="tile"), dc.force_tile(bad):  # type: ignore[arg-type]
            pass
    assert not dc._FORCED_TILES


def test_plan_decode_is_cached():
    """A steady decode loop plans once: the second identical call is a plan_decode cache hit; a new shape,
    flag or split count makes a new plan, and the plan's constexprs follow the arguments."""
    import fa_kvcache.interface as ki

    ki.plan_decode.cache_clear()
    case = _make_case(seqlen_q=1, seqlen_new=1, page=16, capacity=96, seed=5)
    _run_and_check(case, causal=True, num_splits=2)
    info = ki.plan_decode.cache_info()
    _run_and_check(case, causal=True, num_splits=2)
    after = ki.plan_decode.cache_info()
    assert after.hits == info.hits + 1 and after.misses == info.misses
    _run_and_check(case, causal=True, num_splits=3)
    assert ki.plan_decode.cache_info().misses == after.misses + 1
    args = (
        2,
        1,
        6,
        2,
        32,
        32,
        96,
        16,
        3,
        4,
        True,
        False,
        False,
        False,
        False,
        False,
        False,
        False,
        False,
        True,
    )
    plan = ki.plan_decode(*args)
    assert plan.splits == 3 and plan.grid[2] == 3 and plan.grid[1] == 2 * 2
    assert plan.split_meta["PAGED"] and plan.split_meta["PAGE"] == 16 and plan.split_meta["SPLIT"]
    assert plan.combine_grid == (2 * 1 * 6,) and plan.combine_meta["BLOCK_S"] == 4
    contiguous = ki.plan_decode(*args[:7], 0, 1, *args[9:])
    assert (
        contiguous.splits == 1
        and not contiguous.split_meta["PAGED"]
        and contiguous.split_meta["BT_PRELOAD"] == 0
    )


@pytest.mark.parametrize("page", [0, 16])
def test_num_splits_is_honoured(monkeypatch, page):
    """num_splits = n launches n key splits (then the combine), 1 launches one split and no combine, 0 the
    heuristic's count; above 128 (flash-attn's limit) it is capped at 128. Outputs agree with the
    reference."""
    import fa_kvcache.decode_configs as dc
    import fa_kvcache.interface as ki

    seen: list[tuple[str, int]] = []

    def spy(name, launch):
        def run(grid, *args, **kw):
            seen.append((name, grid[2] if name == "split" else grid[0]))
            return launch(grid, *args, **kw)

        return run

    monkeypatch.setattr(ki, "split_kv_launch", spy("split", ki.split_kv_launch))
    monkeypatch.setattr(ki, "combine_launch", spy("combine", ki.combine_launch))
    for n in (1, 2, 5, 0, 300):
        seen.clear()
        case = _make_case(seqlen_q=1, seqlen_new=1, page=page, capacity=96, seed=5)
        _run_and_check(case, causal=True, num_splits=n)
        split_counts = [c for name, c in seen if name == "split"]
        expected = {0: dc.num_splits_heuristic(2 * 2, 2, dc._CPU_SM_FALLBACK, paged=page > 0, page=page)}
        expected[300] = dc.MAX_SPLITS
        want = expected.get(n, n) if DEVICE == "cpu" or n != 0 else split_counts[0]
        assert split_counts == [want], (n, seen)
        assert any(name == "combine" for name, _ in seen) == (want > 1)


def test_strided_last_dim_of_q_k_v_is_copied():
    """flash-attn's maybe_contiguous: q / k / v with a strided last dim are accepted (copied), same result."""
    case = _make_case(seqlen_q=2, seqlen_new=2, seed=8)
    ref_case = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    out_ref = flash_attn_with_kvcache(ref_case.pop("q"), **ref_case, causal=True)
    strided = {}
    for name in ("q", "k", "v"):
        t = case[name]
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        strided[name] = wide[..., ::2]
        assert strided[name].stride(-1) == 2
    args = {k: v for k, v in case.items() if k not in ("q", "k", "v")}
    out = flash_attn_with_kvcache(strided["q"], k=strided["k"], v=strided["v"], **args, causal=True)
    assert torch.equal(out, out_ref)
    assert torch.equal(case["k_cache"], ref_case["k_cache"]) and torch.equal(
        case["v_cache"], ref_case["v_cache"]
    )
