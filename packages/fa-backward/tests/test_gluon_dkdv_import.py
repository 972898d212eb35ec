"""CPU tests of :mod:`fa_backward.gluon_dkdv`: it imports under any Triton, and :func:`supports` /
:func:`unsupported_reason` follow their documented rules (checked without a device: ``check_device=False``)."""

from __future__ import annotations

import pytest
import torch

from fa_backward import gluon_dkdv


def _args(b=2, sq=100, sk=130, h=4, hk=2, d=64, dtype=torch.bfloat16):
    q = torch.zeros(b, sq, h, d, dtype=dtype)
    k = torch.zeros(b, sk, hk, d, dtype=dtype)
    v = torch.zeros_like(k)
    dout = torch.zeros_like(q)
    lse2, delta = torch.zeros(2, b, h, sq).unbind(0)
    return q, k, v, dout, lse2, delta


def _reason(*args, **kw):
    return gluon_dkdv.unsupported_reason(*args, check_device=False, **kw)


def test_imports_and_public_names() -> None:
    for name in gluon_dkdv.__all__:
        assert hasattr(gluon_dkdv, name), name
    assert set(gluon_dkdv.CONFIGS) == set(gluon_dkdv.HEAD_DIMS)
    if not torch.cuda.is_available():
        assert not gluon_dkdv.available()


def test_supported_shapes() -> None:
    for d in (64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            for hk in (1, 2, 4):
                assert _reason(*_args(d=d, dtype=dtype, hk=hk)) is None
    assert _reason(*_args(), causal=True, softmax_scale=0.1) is None
    q, k, v, dout, lse2, delta = _args()
    assert _reason(q, k, v, dout, lse2, delta, torch.empty_like(k), torch.empty_like(v)) is None


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (dict(d=96), "head dim"),
        (dict(d=256), "head dim"),
        (dict(dtype=torch.float32), "bfloat16"),
        (dict(h=3, hk=2), "multiple"),
        (dict(sq=0), "empty"),
        # lse2 / delta rows through TMA: each row's coordinate must address a 16-byte boundary
        (dict(sq=98), "seqlen_q"),
        (dict(sq=1537), "seqlen_q"),
    ],
)
def test_refused_shapes(change: dict, needle: str) -> None:
    reason = _reason(*_args(**change))
    assert reason is not None and needle in reason


def test_refused_arguments() -> None:
    q, k, v, dout, lse2, delta = _args()
    assert "softmax_scale" in _reason(q, k, v, dout, lse2, delta, softmax_scale=0.0)
    assert "softmax_scale" in _reason(q, k, v, dout, lse2, delta, softmax_scale=float("nan"))
    assert "dout" in _reason(q, k, v, dout[:, :-1], lse2, delta)
    assert "lse2" in _reason(q, k, v, dout, lse2[..., :-1], delta)
    assert "lse2" in _reason(q, k, v, dout, lse2.double(), delta)
    # a vector that does not start 16-byte aligned (a view one element into its storage)
    shifted = torch.zeros(lse2.numel() + 1)[1:].view(lse2.shape)
    assert "16-byte" in _reason(q, k, v, dout, shifted, delta)
    assert "16-byte" in _reason(q, k, v, dout, lse2, shifted)
    assert "delta" in _reason(q, k, v, dout, lse2, delta.transpose(1, 2).contiguous().transpose(1, 2))
    assert "dk" in _reason(q, k, v, dout, lse2, delta, torch.empty_like(q))
    assert "dv" in _reason(q, k, v, dout, lse2, delta, None, v.half())
    assert "k and v" in _reason(q, k, v[:, :-1], dout, lse2, delta)
    # not 16-byte aligned strides (TMA): a head dim slice
    wide = torch.zeros(2, 100, 4, 68, dtype=torch.bfloat16)[..., :64]
    assert "TMA" in _reason(wide, k, v, dout, lse2, delta)
    # options of the portable kernels that this one does not have
    for extra in (dict(window_size=(8, 8)), dict(softcap=5.0), dict(dropout_p=0.1), dict(alibi_slopes=lse2)):
        assert "not supported" in _reason(q, k, v, dout, lse2, delta, **extra)
    for extra in (dict(window_size=None), dict(softcap=0.0), dict(dropout_p=0), dict(alibi_slopes=None)):
        assert _reason(q, k, v, dout, lse2, delta, **extra) is None


def test_supports_needs_the_device() -> None:
    args = _args()
    if not gluon_dkdv.available():
        assert not gluon_dkdv.supports(*args)
        assert "sm_90" in gluon_dkdv.unsupported_reason(*args)
        with pytest.raises(ValueError, match="sm_90"):
            gluon_dkdv.dkdv(*args)
