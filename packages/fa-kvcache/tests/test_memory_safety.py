"""No input value makes the kv-cache kernels touch memory outside the tensors passed in.

With value checks on (the default), out-of-range ``cache_seqlens`` / ``block_table`` / ``cache_batch_idx`` /
``cache_leftpad`` raise :class:`fa_core.errors.FlashAttnValueError` naming the argument before anything is
written. With them off (``settings.override(value_checks=False)``, as under CUDA-graph capture or
torch.compile), the kernels clamp each index: the call returns, the output is finite, and guard regions around
the caches (the caches are views into larger buffers whose outer rows hold NaN) are neither read (a NaN would
reach the output) nor written (bit-identical afterwards). Under Triton's interpreter a pointer outside any
allocation raises, which also catches reads past the index tensors themselves.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from fa_core import settings
from fa_core.errors import FlashAttnValueError
from fa_kvcache import flash_attn_with_kvcache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16
I32_MAX, I32_MIN = 2**31 - 1, -(2**31)
GUARD = 2  # guard blocks / batch rows on each side of a cache


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


def _guarded(n: int, *rest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pool, view)``: a random ``(n, *rest)`` cache viewed inside a NaN-filled pool of ``n + 2 * GUARD``
    rows."""
    pool = torch.full((n + 2 * GUARD, *rest), float("nan"), dtype=DTYPE, device=DEVICE)
    view = pool[GUARD : GUARD + n]
    view.copy_(torch.randn(n, *rest, dtype=torch.float32, device=DEVICE).to(DTYPE))
    return pool, view


def _guards(pool: torch.Tensor) -> torch.Tensor:
    return torch.cat([pool[:GUARD], pool[-GUARD:]]).clone()


def _setup(*, paged: bool, batch=3, cap=32, page=16, nheads=4, nheads_k=2, d=16, seqlen_q=2, seqlen_new=2):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seqlen_q, nheads, d, generator=g).to(DTYPE).to(DEVICE)
    k = torch.randn(batch, seqlen_new, nheads_k, d, generator=g).to(DTYPE).to(DEVICE) if seqlen_new else None
    v = torch.randn(batch, seqlen_new, nheads_k, d, generator=g).to(DTYPE).to(DEVICE) if seqlen_new else None
    a = dict(q=q, k=k, v=v, cache_seqlens=torch.tensor([5, 9, 1], dtype=torch.int32, device=DEVICE)[:batch])
    if paged:
        nb = math.ceil(cap / page) * batch + 1
        kpool, kc = _guarded(nb, page, nheads_k, d)
        vpool, vc = _guarded(nb, page, nheads_k, d)
        perm = torch.randperm(nb, generator=g)[: math.ceil(cap / page) * batch]
        a["block_table"] = perm.reshape(batch, -1).to(torch.int32).to(DEVICE)
    else:
        kpool, kc = _guarded(batch + 1, cap, nheads_k, d)
        vpool, vc = _guarded(batch + 1, cap, nheads_k, d)
    a.update(k_cache=kc, v_cache=vc)
    return a, (kpool, vpool)


def _i32(*vals: int) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.int64).to(torch.int32).to(DEVICE)


# name -> (paged, mutation, argument named by the value check)
BAD = {
    "seqlens_past_capacity": (True, lambda a: a.update(cache_seqlens=_i32(5, 31, 1)), "block_table"),
    "seqlens_huge": (True, lambda a: a.update(cache_seqlens=_i32(I32_MAX - 1, 3, 2**30)), "cache_seqlens"),
    "seqlens_negative": (True, lambda a: a.update(cache_seqlens=_i32(-5, I32_MIN, 0)), "cache_seqlens"),
    "bt_past_num_blocks": (True, lambda a: a["block_table"].__setitem__((1, 0), 10**6), "block_table"),
    "bt_int32_extremes": (
        True,
        lambda a: a.update(block_table=_i32(I32_MAX, I32_MIN, -1, 7, 0, I32_MAX).reshape(3, 2)),
        "block_table",
    ),
    "contig_seqlens_past_capacity": (False, lambda a: a.update(cache_seqlens=_i32(40, 31, 2**30)), "cache"),
    "contig_seqlens_negative": (
        False,
        lambda a: a.update(cache_seqlens=_i32(-1, 3, I32_MIN)),
        "cache_seqlens",
    ),
    "batch_idx_out_of_range": (
        False,
        lambda a: a.update(cache_batch_idx=_i32(4, -1, I32_MAX)),
        "cache_batch_idx",
    ),
    "batch_idx_int32_min": (
        False,
        lambda a: a.update(cache_batch_idx=_i32(0, I32_MIN, 1)),
        "cache_batch_idx",
    ),
    "leftpad_past_seqlens": (False, lambda a: a.update(cache_leftpad=_i32(6, 40, I32_MAX)), "cache_leftpad"),
    "leftpad_negative": (False, lambda a: a.update(cache_leftpad=_i32(-1, I32_MIN, 0)), "cache_leftpad"),
    "leftpad_k_and_seqlens": (
        False,
        lambda a: a.update(leftpad_k=_i32(3, 2**30, -4), cache_seqlens=_i32(I32_MAX, -3, 40)),
        "cache_seqlens",
    ),
}


def _call(a: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    a = {k: v for k, v in a.items() if v is not None}
    return flash_attn_with_kvcache(a.pop("q"), return_softmax_lse=True, **a, **kw)


@pytest.mark.parametrize("name", sorted(BAD))
def test_value_checks_name_the_argument(name):
    paged, mutate, arg = BAD[name]
    a, _ = _setup(paged=paged)
    mutate(a)
    before = (a["k_cache"].clone(), a["v_cache"].clone())
    with pytest.raises(FlashAttnValueError, match=arg):
        _call(a)
    assert torch.equal(a["k_cache"], before[0]) and torch.equal(a["v_cache"], before[1])


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("name", sorted(BAD))
def test_checks_off_stays_in_bounds(name, rotary, splits):
    paged, mutate, _ = BAD[name]
    a, pools = _setup(paged=paged)
    mutate(a)
    kw: dict = dict(causal=True, num_splits=splits)
    if rotary:
        angle = torch.rand(40, 4) * 6.0
        kw.update(
            rotary_cos=torch.cos(angle).to(DTYPE).to(DEVICE), rotary_sin=torch.sin(angle).to(DTYPE).to(DEVICE)
        )
    guards = [_guards(p) for p in pools]
    with settings.override(value_checks=False):
        for preload in (True, False) if paged else (True,):
            with contextlib.nullcontext() if preload else bt_preload_off():
                out, lse = _call(a, **kw)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
            assert torch.isfinite(out).all(), "a NaN guard row was read"
            assert not torch.isnan(lse).any()
            for p, gd in zip(pools, guards, strict=True):
                assert torch.equal(_guards(p).view(torch.int16), gd.view(torch.int16)), (
                    "a guard row was written"
                )


def test_checks_off_without_append_and_no_keys():
    """No new keys, cache_seqlens all bad, a sequence whose clamped range is empty (out 0, lse +inf)."""
    a, pools = _setup(paged=True, seqlen_new=0)
    a["cache_seqlens"] = _i32(-3, I32_MAX, 0)
    with settings.override(value_checks=False):
        out, lse = _call(a, num_splits=2)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()  # -3 clamps to 0 keys
    assert (out[2] == 0).all() and torch.isinf(lse[2]).all()
    for p in pools:
        assert torch.isnan(_guards(p)).all()


def test_clamped_values_match_their_clamp():
    """The clamp is the documented one: cache_seqlens past the capacity attends to the whole cache (the rows
    of the append past the capacity are dropped), exactly as the in-range call with cache_seqlens = capacity -
    seqlen_new would for the keys it sees."""
    a, _ = _setup(paged=True, seqlen_new=0)
    cap = a["block_table"].shape[1] * a["k_cache"].shape[1]
    a["cache_seqlens"] = _i32(cap + 7, 2**30, cap)
    with settings.override(value_checks=False):
        out_bad, lse_bad = _call(a)
    a["cache_seqlens"] = _i32(cap, cap, cap)
    out, lse = _call(a)
    torch.testing.assert_close(out_bad, out, atol=0, rtol=0)
    torch.testing.assert_close(lse_bad, lse, atol=0, rtol=0)


def test_bf16_on_cpu_is_refused_under_the_interpreter():
    if DEVICE != "cpu":
        pytest.skip("CPU interpreter only (bf16 runs on the GPU)")
    a, _ = _setup(paged=False)
    for key in ("q", "k", "v", "k_cache", "v_cache"):
        a[key] = a[key].to(torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        _call(a)
