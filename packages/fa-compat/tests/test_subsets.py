"""fa-compat with each subset of its extras (nox sets FA_COMPAT_SUBSET): what is missing raises an error that
says what to install; what is present is used."""

from __future__ import annotations

import pytest
import torch
from fa_compat_testutils import DEVICE, HAS_BACKWARD, HAS_KVCACHE, SUBSET, cu_seqlens, rand

import flash_attn
from flash_attn import _extras
from flash_attn.flash_attn_interface import _flash_attn_backward

EXPECTED = {
    "none": (False, False),
    "backward": (True, False),
    "kvcache": (False, True),
    "all": (True, True),
}


def test_installed_extras_match_subset():
    if SUBSET is None:
        pytest.skip("FA_COMPAT_SUBSET not set (run by hand): using whatever is importable")
    assert SUBSET in EXPECTED, f"unknown FA_COMPAT_SUBSET={SUBSET!r}"
    assert EXPECTED[SUBSET] == (HAS_BACKWARD, HAS_KVCACHE), (
        f"FA_COMPAT_SUBSET={SUBSET} but fa_backward importable={HAS_BACKWARD}, fa_kvcache importable={HAS_KVCACHE}"
    )


def _assert_backward_message(exc: pytest.ExceptionInfo) -> None:
    msg = str(exc.value)
    assert "fa-backward" in msg and "pip install fa-compat[backward]" in msg


def _assert_kvcache_message(exc: pytest.ExceptionInfo) -> None:
    msg = str(exc.value)
    assert "fa-kvcache" in msg and "pip install fa-compat[kvcache]" in msg


def _grad_calls():
    q = rand(1, 8, 2, 16, requires_grad=True)
    k, v = rand(1, 8, 2, 16), rand(1, 8, 2, 16)
    qkv = rand(1, 8, 3, 2, 16, requires_grad=True)
    cu = cu_seqlens([8])
    return [
        lambda: flash_attn.flash_attn_func(q, k, v),
        lambda: flash_attn.flash_attn_qkvpacked_func(qkv),
        lambda: flash_attn.flash_attn_kvpacked_func(q, qkv[:, :, :2]),
        lambda: flash_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 8, 8),
        lambda: flash_attn.flash_attn_varlen_qkvpacked_func(qkv[0], cu, 8),
        lambda: flash_attn.flash_attn_varlen_kvpacked_func(q[0], qkv[0, :, :2], cu, cu, 8, 8),
    ]


def _check_without_backward():
    for call in _grad_calls():
        with pytest.raises(_extras.MissingExtraError) as exc:
            call()  # raised at the forward, before any kernel runs
        _assert_backward_message(exc)
        with torch.no_grad():  # no gradient wanted: the forward works
            assert torch.isfinite(call()).all()
    t = rand(1, 8, 2, 16)
    lse = torch.zeros(1, 2, 8, device=DEVICE)
    with pytest.raises(_extras.MissingExtraError) as exc:
        _flash_attn_backward(t, t, t, t, t, lse, None, None, None, 0.0, None, False, -1, -1, 0.0, None, False)
    _assert_backward_message(exc)
    assert issubclass(_extras.MissingExtraError, ImportError)


def _check_without_kvcache():
    q = rand(1, 1, 2, 16)
    cache = rand(1, 8, 2, 16)
    with pytest.raises(_extras.MissingExtraError) as exc:
        flash_attn.flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=4)
    _assert_kvcache_message(exc)


@pytest.mark.skipif(HAS_BACKWARD, reason="fa-backward is installed: see the simulated test")
def test_missing_backward_raises_install_message():
    _check_without_backward()


@pytest.mark.skipif(HAS_KVCACHE, reason="fa-kvcache is installed: see the simulated test")
def test_missing_kvcache_raises_install_message():
    _check_without_kvcache()


def test_missing_extras_simulated(monkeypatch):
    """The same checks with the members hidden (runs in every subset, so the messages are always tested)."""
    monkeypatch.setattr(_extras, "BACKWARD", None)
    monkeypatch.setattr(_extras, "KVCACHE", None)
    _check_without_backward()
    _check_without_kvcache()


def test_function_views_without_backward(monkeypatch):
    """flash-attn's FlashAttn*Func names exist in every subset: forward only without fa-backward, refusing
    inputs that want a gradient at the forward."""
    from flash_attn.flash_attn_interface import FlashAttnFunc, FlashAttnQKVPackedFunc

    monkeypatch.setattr(_extras, "BACKWARD", None)
    q = rand(1, 8, 2, 16)
    out = FlashAttnFunc.apply(q, q, q, 0.0, None, True, (-1, -1), 0.0, None, False, False, False)
    assert torch.equal(out, flash_attn.flash_attn_func(q, q, q, causal=True))
    qkv = rand(1, 8, 3, 2, 16, requires_grad=True)
    with pytest.raises(_extras.MissingExtraError) as exc:
        FlashAttnQKVPackedFunc.apply(qkv, 0.0, None, False, (-1, -1), 0.0, None, False, False, True)
    _assert_backward_message(exc)


def test_loader_treats_placeholder_as_missing(monkeypatch):
    """A member too old to have the functions fa-compat calls counts as not installed."""
    import types

    fake = types.ModuleType("fa_fake_member")
    monkeypatch.setitem(__import__("sys").modules, "fa_fake_member", fake)
    assert _extras._load("fa_fake_member", ("flash_attn_backward",)) is None
    fake.flash_attn_backward = lambda: None
    assert _extras._load("fa_fake_member", ("flash_attn_backward",)) is fake
    assert _extras._load("fa_no_such_member_here", ()) is None
