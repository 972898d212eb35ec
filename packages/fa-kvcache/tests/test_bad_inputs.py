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
