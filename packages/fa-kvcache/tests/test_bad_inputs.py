"""Bad inputs raise ValueError / TypeError naming the argument, before anything is written to the cache."""

from __future__ import annotations

import pytest
import torch

from fa_core import settings
from fa_core.errors import FlashAttnValueError
from fa_kvcache import flash_attn_with_kvcache, kvcache_value_checks_enabled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(paged=False):
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 16, device=DEVICE, dtype=torch.float16)
    k = torch.randn(2, 1, 2, 16, device=DEVICE, dtype=torch.float16)
    v = torch.randn(2, 1, 2, 16, device=DEVICE, dtype=torch.float16)
    if paged:
        kc = torch.randn(6, 16, 2, 16, device=DEVICE, dtype=torch.float16)
        vc = torch.randn(6, 16, 2, 16, device=DEVICE, dtype=torch.float16)
        bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    else:
        kc = torch.randn(2, 32, 2, 16, device=DEVICE, dtype=torch.float16)
        vc = torch.randn(2, 32, 2, 16, device=DEVICE, dtype=torch.float16)
        bt = None
    cs = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)
    return dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v, cache_seqlens=cs, block_table=bt)


def _call(**kw):
    return flash_attn_with_kvcache(**kw)


CASES = {
    "q_ndim": (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4"),
    "k_cache_dtype": (lambda a: a.update(k_cache=a["k_cache"].float()), TypeError, "k_cache"),
    "v_cache_shape": (lambda a: a.update(v_cache=a["v_cache"][:, :16]), ValueError, "v_cache"),
    "head_counts": (
        lambda a: a.update(q=torch.randn(2, 1, 3, 16, dtype=torch.float16, device=DEVICE)),
        ValueError,
        "nheads",
    ),
    "headdim": (
        lambda a: a.update(q=torch.randn(2, 1, 4, 32, dtype=torch.float16, device=DEVICE)),
        ValueError,
        "k_cache head dim",
    ),
    "k_heads": (lambda a: a.update(k=a["k"].repeat(1, 1, 2, 1)), ValueError, "k must have shape"),
    "k_dtype": (lambda a: a.update(k=a["k"].float()), TypeError, "k has dtype"),
    "k_without_v": (lambda a: a.update(v=None), ValueError, "k and v"),
    "k_without_seqlens": (lambda a: a.update(cache_seqlens=None), ValueError, "cache_seqlens"),
    "seqlens_dtype": (
        lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()),
        TypeError,
        "cache_seqlens",
    ),
    "seqlens_len": (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "cache_seqlens"),
    "seqlens_float": (lambda a: a.update(cache_seqlens=3.0), TypeError, "cache_seqlens"),
    "cache_too_small": (
        lambda a: a.update(cache_seqlens=torch.tensor([3, 32], dtype=torch.int32, device=DEVICE)),
        ValueError,
        "cache too small",
    ),
    "negative_seqlens": (
        lambda a: a.update(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32, device=DEVICE)),
        ValueError,
        "cache_seqlens",
    ),
    "batch_idx_range": (
        lambda a: a.update(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)),
        ValueError,
        "cache_batch_idx",
    ),
    "leftpad_range": (
        lambda a: a.update(cache_leftpad=torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)),
        ValueError,
        "cache_leftpad",
    ),
    "rotary_without_k": (
        lambda a: a.update(
            k=None,
            v=None,
            rotary_cos=torch.ones(40, 4, device=DEVICE),
            rotary_sin=torch.zeros(40, 4, device=DEVICE),
        ),
        ValueError,
        "rotary",
    ),
    "rotary_dim": (
        lambda a: a.update(
            rotary_cos=torch.ones(40, 9, device=DEVICE), rotary_sin=torch.zeros(40, 9, device=DEVICE)
        ),
        ValueError,
        "rotary_dim",
    ),
    "alibi_shape": (
        lambda a: a.update(alibi_slopes=torch.ones(3, device=DEVICE)),
        ValueError,
        "alibi_slopes",
    ),
    "window": (lambda a: a.update(window_size=(-2, 0)), ValueError, "window_size"),
}

PAGED_CASES = {
    "bt_dtype": (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table"),
    "bt_rows": (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table"),
    "bt_range": (lambda a: a["block_table"].__setitem__((1, 0), 6), ValueError, r"block_table\[1, 0\]"),
    "bt_negative": (lambda a: a["block_table"].__setitem__((0, 0), -1), ValueError, r"block_table\[0, 0\]"),
    "bt_capacity": (
        lambda a: a.update(cache_seqlens=torch.tensor([3, 32], dtype=torch.int32, device=DEVICE)),
        ValueError,
        "cache too small",
    ),
    "bt_with_batch_idx": (
        lambda a: a.update(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)),
        ValueError,
        "cache_batch_idx",
    ),
    "bt_cache_dtype": (lambda a: a.update(v_cache=a["v_cache"].float()), TypeError, "v_cache"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name):
    mutate, exc, match = CASES[name]
    a = _inputs()
    mutate(a)
    before = (a["k_cache"].clone(), a["v_cache"].clone())
    with pytest.raises(exc, match=match):
        _call(**a)
    assert torch.equal(a["k_cache"], before[0]) and torch.equal(a["v_cache"], before[1])


@pytest.mark.parametrize("name", sorted(PAGED_CASES))
def test_bad_paged_input(name):
    mutate, exc, match = PAGED_CASES[name]
    a = _inputs(paged=True)
    mutate(a)
    before = (a["k_cache"].clone(), a["v_cache"].clone())
    with pytest.raises(exc, match=match):
        _call(**a)
    assert torch.equal(a["k_cache"], before[0]) and torch.equal(a["v_cache"], before[1])


def test_unused_block_table_entries_are_not_checked():
    # entries past a sequence's pages may hold anything (vLLM pads with -1 or stale ids)
    a = _inputs(paged=True)
    a["block_table"] = torch.tensor([[0, -1], [2, 99]], dtype=torch.int32, device=DEVICE)
    _call(**a)


def test_value_checks_switches():
    t = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    assert kvcache_value_checks_enabled(t)  # on by default, CPU and GPU
    with settings.override(value_checks=False):
        assert not kvcache_value_checks_enabled(t)
    assert not kvcache_value_checks_enabled(t.to("meta"))


def test_errors_are_value_and_runtime_errors():
    """flash-attn reports bad values as RuntimeError (TORCH_CHECK); both except clauses catch ours."""
    a = _inputs(paged=True)
    a["cache_seqlens"] = torch.tensor([3, 40], dtype=torch.int32, device=DEVICE)
    for exc in (FlashAttnValueError, ValueError, RuntimeError):
        with pytest.raises(exc, match="block_table"):
            _call(**a)


def _value_checks_direct(**kw):
    from fa_kvcache.checks import value_checks

    base = dict(
        cache_leftpad=None,
        cache_batch_idx=None,
        block_table=None,
        seqlen_new=0,
        capacity=64,
        num_blocks=40,
        page=8,
        batch_cache=40,
    )
    value_checks(**{**base, **kw})


def test_fused_value_check_reduces_over_programs():
    """The check kernel splits a large batch over several programs: the first bad block-table entry in
    row-major order is named whichever program saw it, counts and extrema are combined over programs, and a
    passing call raises nothing. Rows past the used columns are not read (garbage there is allowed)."""
    batch, cols = 45, 8
    lens = torch.full((batch,), 20, dtype=torch.int32, device=DEVICE)
    bt = torch.randint(0, 40, (batch, cols), dtype=torch.int32, device=DEVICE)
    bt[:, 3:] = -7  # unused: columns >= cdiv(20 + 1, 8) = 3
    _value_checks_direct(batch=batch, cache_seqlens=lens, block_table=bt, seqlen_new=1)
    bad = bt.clone()
    bad[40, 2] = 40
    bad[33, 1] = -1  # the first in row-major order, in another program's rows than row 40
    with pytest.raises(FlashAttnValueError, match=r"block_table\[33, 1\] = -1 is out of range"):
        _value_checks_direct(batch=batch, cache_seqlens=lens, block_table=bad, seqlen_new=1)
    long = lens.clone()
    long[37] = 64  # + seqlen_new 1 > capacity 64
    with pytest.raises(
        FlashAttnValueError, match="cache too small: max\\(cache_seqlens\\) \\+ seqlen_new = 65"
    ):
        _value_checks_direct(batch=batch, cache_seqlens=long, block_table=bt, seqlen_new=1)
    idx = torch.arange(batch, dtype=torch.int32, device=DEVICE) % 40
    _value_checks_direct(batch=batch, cache_seqlens=lens, cache_batch_idx=idx)
    idx[44] = 40
    with pytest.raises(FlashAttnValueError, match=r"cache_batch_idx entries must lie in \[0, 40\)"):
        _value_checks_direct(batch=batch, cache_seqlens=lens, cache_batch_idx=idx)
    pad = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    pad[20] = 21
    with pytest.raises(FlashAttnValueError, match=r"leftpad_k must lie in \[0, cache_seqlens\]"):
        _value_checks_direct(batch=batch, cache_seqlens=lens, cache_leftpad=pad, leftpad_name="leftpad_k")
    # an int cache_seqlens with an index tensor: checked by the kernel too
    with pytest.raises(FlashAttnValueError, match="cache_seqlens must be >= 0"):
        _value_checks_direct(batch=batch, cache_seqlens=-1, block_table=bt)


def test_int_seqlens_check_needs_no_device_work(monkeypatch):
    """An int cache_seqlens and no index tensor: the check is host arithmetic (no kernel launch) and still
    refuses a cache too small."""
    import fa_kvcache.checks as kc

    def no_launch(*args, **kwargs):
        raise AssertionError("the value check launched a kernel")

    monkeypatch.setattr(kc, "value_check_launch", no_launch)
    _value_checks_direct(batch=3, cache_seqlens=60, seqlen_new=4)
    with pytest.raises(
        FlashAttnValueError, match="cache too small: max\\(cache_seqlens\\) \\+ seqlen_new = 65"
    ):
        _value_checks_direct(batch=3, cache_seqlens=60, seqlen_new=5)
    with pytest.raises(FlashAttnValueError, match="cache_seqlens must be >= 0"):
        _value_checks_direct(batch=3, cache_seqlens=-2)
    a = _inputs()
    a["cache_seqlens"] = 4
    _call(**a)
