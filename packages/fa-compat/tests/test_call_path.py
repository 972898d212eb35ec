"""The host path of one public call: eager calls launch directly (no torch.library dispatch), the argument
checks run once per signature, and ``import flash_attn`` imports neither Triton nor ``torch._dynamo``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from fa_compat_testutils import HAS_BACKWARD, HI, cu_seqlens, needs_backward, rand

import flash_attn
from fa_core import ops
from flash_attn import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func


class _Refuse:
    """Stands in for ``torch.ops.flash_attn_plus``: any op call fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"eager call dispatched torch.ops.flash_attn_plus.{name}")


@pytest.fixture
def no_ops(monkeypatch):
    real = torch.ops.flash_attn_plus
    monkeypatch.setattr(torch.ops, "flash_attn_plus", _Refuse())
    yield real


def test_eager_forward_skips_the_custom_ops(no_ops):
    q, k, v = rand(1, 12, 2, 16), rand(1, 12, 1, 16), rand(1, 12, 1, 16)
    out = flash_attn_func(q, k, v, causal=True)
    ref = no_ops.fwd(q, k, v, 0.0, 16**-0.5, True, -1, 0, 0.0, None, False, False)[0]
    assert torch.equal(out, ref)
    cu = cu_seqlens([5, 7])
    out_v = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 7, 7, causal=True)
    assert out_v.shape == (12, 2, 16)


@needs_backward
def test_eager_backward_skips_the_custom_ops(no_ops):
    qkv = rand(1, 10, 3, 2, 16, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    (dqkv,) = torch.autograd.grad(out.float().sum(), qkv)
    assert dqkv.shape == qkv.shape and torch.isfinite(dqkv).all()


def test_checks_run_once_per_signature(monkeypatch):
    calls: list[int] = []
    real = ops._full_checks
    monkeypatch.setattr(ops, "_full_checks", lambda *a: (calls.append(1), real(*a))[1])
    ops._CHECKED.clear()
    q, k, v = rand(1, 9, 2, 16), rand(1, 9, 2, 16), rand(1, 9, 2, 16)
    for _ in range(3):
        flash_attn_func(q, k, v, causal=True)
    assert len(calls) == 1
    flash_attn_func(q, k, v, causal=False)  # another signature: checked again
    assert len(calls) == 2
    with pytest.raises(ValueError, match="dropout_p"):  # a bad value is never served from the cache
        flash_attn_func(q, k, v, causal=True, dropout_p=2.0)


def test_traced_tensors_take_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 12, 2, 16, dtype=HI)
        out = flash_attn_func(q, q, q, causal=True)  # the op's fake implementation: no launch on fake data
        assert out.shape == (1, 12, 2, 16)


def test_import_is_light():
    """``import flash_attn`` (fa-backward included) imports no Triton and no torch._dynamo."""
    code = (
        "import sys, flash_attn\n"
        "heavy = [m for m in ('triton', 'torch._dynamo', 'fa_kvcache') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"import flash_attn imported {res.stdout.strip()}"
    assert HAS_BACKWARD is (flash_attn._extras.BACKWARD is not None)
