"""CPU tests of :mod:`fa_backward.gluon_dq`: it imports under any Triton, and :func:`supports` /
:func:`unsupported_reason` follow their documented rules (checked without a device: ``check_device=False``)."""

from __future__ import annotations

import pytest
import torch

from fa_backward import gluon_dq


def _args(b=2, sq=100, sk=130, h=4, hk=2, d=64, dtype=torch.bfloat16):
    q = torch.zeros(b, sq, h, d, dtype=dtype)
    k = torch.zeros(b, sk, hk, d, dtype=dtype)
    v = torch.zeros_like(k)
    out = torch.zeros_like(q)
    dout = torch.zeros_like(q)
    lse = torch.zeros(b, h, sq)
    return q, k, v, out, dout, lse


def _reason(*args, **kw):
    return gluon_dq.unsupported_reason(*args, check_device=False, **kw)


def test_imports_and_public_names() -> None:
    for name in gluon_dq.__all__:
        assert hasattr(gluon_dq, name), name
    assert set(gluon_dq.CONFIGS) == set(gluon_dq.HEAD_DIMS)
    if not torch.cuda.is_available():
        assert not gluon_dq.available()


def test_supported_shapes() -> None:
    for d in (64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            for hk in (1, 2, 4):
                assert _reason(*_args(d=d, dtype=dtype, hk=hk)) is None
    assert _reason(*_args(), causal=True, softmax_scale=0.1) is None
    q, k, v, out, dout, lse = _args()
    # the launch's buffers: delta and lse2 are the two halves of one (2, b, h, s_q) float32 allocation
    delta, lse2 = torch.empty(2, *lse.shape).unbind(0)
    assert _reason(q, k, v, out, dout, lse, torch.empty_like(q), delta, lse2) is None
    assert _reason(q, k, v, out, dout, lse, dlse=torch.zeros_like(lse)) is None
    # lse with padded rows (any batch / head strides, unit last stride)
    wide = torch.zeros(2, 4, 104)[..., :100]
    assert _reason(q, k, v, out, dout, wide) is None


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (dict(d=96), "head dim"),
        (dict(d=256), "head dim"),
        (dict(dtype=torch.float32), "bfloat16"),
        (dict(h=3, hk=2), "multiple"),
        (dict(sq=0), "empty"),
        (dict(sk=0), "empty"),
    ],
)
def test_refused_shapes(change: dict, needle: str) -> None:
    reason = _reason(*_args(**change))
    assert reason is not None and needle in reason


def test_refused_arguments() -> None:
    q, k, v, out, dout, lse = _args()
    assert "softmax_scale" in _reason(q, k, v, out, dout, lse, softmax_scale=0.0)
    assert "softmax_scale" in _reason(q, k, v, out, dout, lse, softmax_scale=float("nan"))
    assert "dout" in _reason(q, k, v, out, dout[:, :-1], lse)
    assert "out" in _reason(q, k, v, out[:, :, :-1], dout, lse)
    assert "lse" in _reason(q, k, v, out, dout, lse[..., :-1])
    assert "lse" in _reason(q, k, v, out, dout, lse.double())
    assert "lse" in _reason(q, k, v, out, dout, lse.transpose(1, 2).contiguous().transpose(1, 2))
    assert "delta" in _reason(q, k, v, out, dout, lse, None, lse.half())
    assert "lse2" in _reason(q, k, v, out, dout, lse, None, None, lse[:, :-1])
    assert "dlse" in _reason(q, k, v, out, dout, lse, dlse=lse.half())
    assert "dq" in _reason(q, k, v, out, dout, lse, torch.empty_like(k))
    assert "dq" in _reason(q, k, v, out, dout, lse, q.half())
    assert "k and v" in _reason(q, k, v[:, :-1], out, dout, lse)
    # not 16-byte aligned strides (TMA): a head dim slice
    wide = torch.zeros(2, 100, 4, 68, dtype=torch.bfloat16)[..., :64]
    assert "TMA" in _reason(wide, k, v, out, dout, lse)
    assert "TMA" in _reason(q, k, v, wide, dout, lse)
    # options of the portable kernels that this one does not have
    for extra in (dict(window_size=(8, 8)), dict(softcap=5.0), dict(dropout_p=0.1), dict(alibi_slopes=lse)):
        assert "not supported" in _reason(q, k, v, out, dout, lse, **extra)
    for extra in (dict(window_size=(-1, -1)), dict(softcap=0.0), dict(dropout_p=0), dict(alibi_slopes=None)):
        assert _reason(q, k, v, out, dout, lse, **extra) is None


def test_supports_needs_the_device() -> None:
    args = _args()
    if not gluon_dq.available():
        assert not gluon_dq.supports(*args)
        assert "sm_90" in gluon_dq.unsupported_reason(*args)
        with pytest.raises(ValueError, match="sm_90"):
            gluon_dq.dq_pass(*args)
