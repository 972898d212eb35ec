"""flash-attn's legacy Triton modules ``flash_attn.flash_attn_triton`` and ``flash_attn.flash_attn_triton_og``
against a float64 PyTorch reference (2x rule): outputs and q/k/v gradients, top-left causal masks with
seqlen_q != seqlen_k, every bias broadcast form, the packed variants, the bias gradient refusal, error paths
and the parameters recorded from flash-attn v2.8.3's sources.

Outputs are poisoned: every ``torch.empty`` returns NaN here (deterministic mode fills uninitialized memory),
so an element the code forgets to write fails the comparison.
"""

from __future__ import annotations

import ast
import inspect
import math

import pytest
import torch
from fa_compat_testutils import (  # noqa: F401 (poison_empty: autouse fixture)
    DEVICE,
    DTYPES,
    GRAD_SLACK,
    HI,
    LOWP,
    needs_backward,
    poison_empty,
    rand,
)

from fa_core.errors import FlashAttnValueError
from fa_core.testing import assert_close_2x
from flash_attn import _extras
from flash_attn import flash_attn_func as bottom_right_flash_attn_func
from flash_attn import flash_attn_triton as fat
from flash_attn import flash_attn_triton_og as og
from flash_attn.flash_attn_triton import (
    BiasGradientError,
    FlashAttnFunc,
    FlashAttnKVPackedFunc,
    FlashAttnQKVPackedFunc,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
)


# ------------------------------------------------------------------------------------------ reference
def ref_attention(q, k, v, bias=None, causal=False, scale=None, upcast=True):
    """``softmax(scale * q @ k^T + bias, top-left causal mask) @ v`` on ``(b, s, h, d)`` tensors, in float64
    when ``upcast`` (the truth), else in the inputs' precision (the bias promotes the logits as it will)."""
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
        bias = None if bias is None else bias.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + bias
    if causal:
        visible = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s.float() if s.dtype == torch.float16 else s, dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def ref_out_and_grads(tensors, split, dout, upcast=True, **kw):
    """Reference output and gradients with respect to ``tensors`` (split into q, k, v by ``split``); no
    gradients when ``dout`` is None."""
    dtype = torch.float64 if upcast else tensors[0].dtype
    leaves = [t.detach().to(dtype).requires_grad_(dout is not None) for t in tensors]
    out = ref_attention(*split(*leaves), upcast=False, **kw)
    grads = None if dout is None else torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), grads


def check(out, grads, tensors, split, dout, names, **kw):
    """2x rule for out and each gradient (``dout`` None: the output only)."""
    true_out, true_grads = ref_out_and_grads(tensors, split, dout, **kw)
    low_out, low_grads = ref_out_and_grads(tensors, split, dout, upcast=False, **kw)
    assert out.shape == true_out.shape and out.dtype == tensors[0].dtype
    assert_close_2x(out, true_out, low_out, "out")
    if dout is None:
        return
    for name, g, t, lo in zip(names, grads, true_grads, low_grads):
        assert g.shape == t.shape and g.dtype == tensors[0].dtype, name
        slack = GRAD_SLACK[g.dtype] * float(t.abs().max()) + 1e-6
        assert_close_2x(g, t, lo, name, slack=slack)


def dense(q, k, v):
    return q, k, v


def kv_split(q, kv):
    return q, kv[:, :, 0], kv[:, :, 1]


def qkv_split(qkv):
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def run(fn, tensors, dout, *args, **kwargs):
    """``fn(*tensors, *args, **kwargs)`` and the gradients of ``(out * dout).sum()`` for ``tensors``."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves, *args, **kwargs)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads, leaves


B, H, D = 2, 2, 24
SEQLENS = [(13, 13), (5, 11), (12, 7)]  # square, seqlen_q < seqlen_k, seqlen_q > seqlen_k
#: every form of bias flash-attn takes: (batch or 1, nheads or 1, 1 or seqlen_q, seqlen_k)
BIAS_FORMS = [(bb, bh, row) for bb in (B, 1) for bh in (H, 1) for row in ("vector", "matrix")]


def bias_tensor(form, sq, sk, dtype, requires_grad=False):
    bb, bh, row = form
    return rand(bb, bh, 1 if row == "vector" else sq, sk, dtype=dtype, requires_grad=requires_grad)


def form_id(form):
    bb, bh, row = form
    return f"{'b' if bb > 1 else '1'}{'h' if bh > 1 else '1'}-{row}"


# ------------------------------------------------------------------------------- flash_attn_triton: no bias
@needs_backward
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_func_without_bias(dtype, causal, seqlens):
    torch.manual_seed(0)
    sq, sk = seqlens
    q, k, v = rand(B, sq, H, D, dtype=dtype), rand(B, sk, H, D, dtype=dtype), rand(B, sk, H, D, dtype=dtype)
    dout = rand(B, sq, H, D, dtype=dtype)
    out, grads, _ = run(flash_attn_func, (q, k, v), dout, None, causal)
    check(out, grads, (q, k, v), dense, dout, ("dq", "dk", "dv"), causal=causal)


@needs_backward
def test_causal_is_top_left():
    """Query i sees keys j <= i: with seqlen_q < seqlen_k the first query attends to key 0 alone and later
    keys get no gradient; with seqlen_q > seqlen_k the last queries see every key."""
    torch.manual_seed(1)
    q, k, v = rand(1, 4, 2, 16), rand(1, 9, 2, 16), rand(1, 9, 2, 16)
    out, (_, dk, dv), _ = run(flash_attn_func, (q, k, v), torch.ones(1, 4, 2, 16, device=DEVICE), causal=True)
    torch.testing.assert_close(out[:, 0], v[:, 0])
    assert torch.all(dk[:, 4:] == 0) and torch.all(dv[:, 4:] == 0)
    assert dv[:, :4].abs().amin() > 0
    # seqlen_q > seqlen_k: queries 4.. see all 4 keys, i.e. non-causal attention for them
    q2, k2, v2 = rand(1, 9, 2, 16), rand(1, 4, 2, 16), rand(1, 4, 2, 16)
    causal_out = flash_attn_func(q2, k2, v2, causal=True)
    full_out = flash_attn_func(q2, k2, v2, causal=False)
    torch.testing.assert_close(causal_out[:, 4:], full_out[:, 4:])
    assert not torch.allclose(causal_out[:, :3], full_out[:, :3])
    # and not the bottom-right alignment of flash_attn.flash_attn_func
    assert not torch.allclose(causal_out, bottom_right_flash_attn_func(q2, k2, v2, causal=True))


# ----------------------------------------------------------------------------- flash_attn_triton: with bias
BIAS_PARAMS = [
    (dtype, bias_dtype, causal, seqlens, form)
    for dtype in DTYPES
    for bias_dtype in ("q", "float32")
    if not (bias_dtype == "float32" and dtype == torch.float32)
    for causal in (False, True)
    for seqlens in SEQLENS
    for form in BIAS_FORMS
]


@pytest.mark.parametrize(
    ("dtype", "bias_dtype", "causal", "seqlens", "form"),
    BIAS_PARAMS,
    ids=[
        f"{str(d).replace('torch.', '')}-bias_{bd}-{'causal' if c else 'full'}-{s[0]}x{s[1]}-{form_id(f)}"
        for d, bd, c, s, f in BIAS_PARAMS
    ],
)
def test_func_with_bias(dtype, bias_dtype, causal, seqlens, form):
    torch.manual_seed(2)
    sq, sk = seqlens
    q, k, v = rand(B, sq, H, D, dtype=dtype), rand(B, sk, H, D, dtype=dtype), rand(B, sk, H, D, dtype=dtype)
    bias = bias_tensor(form, sq, sk, dtype if bias_dtype == "q" else torch.float32) * 2
    dout = rand(B, sq, H, D, dtype=dtype)
    out, grads, _ = run(flash_attn_func, (q, k, v), dout, bias, causal)
    check(out, grads, (q, k, v), dense, dout, ("dq", "dk", "dv"), bias=bias, causal=causal)


def test_float32_bias_keeps_its_precision():
    """A float32 bias with large, finely spaced values (ALiBi-like) with low-precision inputs: the bias is
    not rounded to the inputs' dtype."""
    torch.manual_seed(3)
    sq = sk = 16
    q, k, v = (rand(1, sq, 2, 16, dtype=LOWP) for _ in range(3))
    bias = -300.0 + torch.linspace(0, 4, sk, device=DEVICE).expand(1, 2, 1, sk)
    out = flash_attn_func(q, k, v, bias)
    ref = ref_attention(q, k, v, bias=bias)
    assert (out.double() - ref).abs().max() < 4 * torch.finfo(LOWP).eps


@pytest.mark.parametrize("fn", ["func", "kvpacked", "qkvpacked"])
def test_bias_gradient_is_refused(fn):
    """As flash-attn: the backward raises when the bias requires grad (even for q's gradient alone), the
    forward does not."""
    torch.manual_seed(4)
    s = 6
    bias = rand(1, H, 1, s, requires_grad=True)
    q, k, v = (rand(B, s, H, 16, requires_grad=True) for _ in range(3))
    if fn == "func":
        out = flash_attn_func(q, k, v, bias)
    elif fn == "kvpacked":
        out = flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), bias)
    else:
        out = flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2), bias)
    with pytest.raises(BiasGradientError, match="does not support bias gradient") as exc:
        torch.autograd.grad(out.sum(), q)
    assert isinstance(exc.value, AssertionError) and isinstance(exc.value, NotImplementedError)
    # a bias that does not require grad: gradients flow to q, k, v, none to the bias
    q.grad = None
    plain = bias.detach()
    out = FlashAttnFunc.apply(q, k, v, plain)
    out.sum().backward()
    assert q.grad is not None and plain.grad is None


# -------------------------------------------------------------------------------------- packed variants
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_qkvpacked(dtype, causal, with_bias):
    if not with_bias and not _extras.BACKWARD:
        pytest.skip("fa-backward not installed")
    torch.manual_seed(5)
    s = 11
    qkv = rand(B, s, 3, H, D, dtype=dtype)
    bias = rand(B, 1, s, s, dtype=dtype) if with_bias else None
    dout = rand(B, s, H, D, dtype=dtype)
    out, grads, _ = run(flash_attn_qkvpacked_func, (qkv,), dout, bias, causal)
    check(out, grads, (qkv,), qkv_split, dout, ("dqkv",), bias=bias, causal=causal)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("seqlens", [(5, 11), (12, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_kvpacked(dtype, causal, seqlens, with_bias):
    if not with_bias and not _extras.BACKWARD:
        pytest.skip("fa-backward not installed")
    torch.manual_seed(6)
    sq, sk = seqlens
    q, kv = rand(B, sq, H, D, dtype=dtype), rand(B, sk, 2, H, D, dtype=dtype)
    bias = rand(1, H, 1, sk, dtype=torch.float32) if with_bias else None
    dout = rand(B, sq, H, D, dtype=dtype)
    out, grads, _ = run(flash_attn_kvpacked_func, (q, kv), dout, bias, causal)
    check(out, grads, (q, kv), kv_split, dout, ("dq", "dkv"), bias=bias, causal=causal)


# ------------------------------------------------------------------------------- calling conventions
@needs_backward
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_apply_keywords_scale_and_layouts(with_bias):
    """``Function.apply`` positional == the function with keywords; softmax_scale None and 0 select
    1/sqrt(d) (flash-attn's ``or``); strided inputs; the output is a fresh tensor."""
    torch.manual_seed(7)
    sq, sk, d = 7, 9, 16
    q = rand(B, sq, H, 2 * d)[..., ::2]  # strided last dim
    k = rand(B, H, sk, d).transpose(1, 2)  # (b, h, s, d) memory
    v = rand(B, sk, H, d)
    bias = rand(B, H, sq, sk) if with_bias else None
    out = FlashAttnFunc.apply(q, k, v, bias, True, 0.37)
    check(out, None, (q, k, v), dense, None, (), bias=bias, causal=True, scale=0.37)
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True, softmax_scale=0.37, bias=bias), out)
    default = flash_attn_func(q, k, v, bias, False)
    assert torch.equal(flash_attn_func(q, k, v, bias, False, 0.0), default)
    assert torch.equal(FlashAttnFunc.apply(q, k, v, bias), default)
    check(default, None, (q, k, v), dense, None, (), bias=bias, scale=1.0 / math.sqrt(d))
    qkv = rand(B, sq, 3, H, d)
    torch.testing.assert_close(
        FlashAttnQKVPackedFunc.apply(qkv, None if bias is None else bias[..., :sq], True),
        flash_attn_qkvpacked_func(qkv, causal=True, bias=None if bias is None else bias[..., :sq]),
    )
    kv = rand(B, sk, 2, H, d)
    torch.testing.assert_close(
        FlashAttnKVPackedFunc.apply(q, kv, bias, False, 0.5),
        flash_attn_kvpacked_func(q, kv, softmax_scale=0.5, bias=bias),
    )
    # the output is no view: it may be modified in place; the kernel path saves it for the backward (as
    # flash-attn does), which then reports the modification, the bias path does not need it
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*leaves, bias, True)
    assert out._base is None
    out.mul_(2.0)
    if bias is None:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    else:
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    # no gradient wanted: no graph
    with torch.no_grad():
        assert not flash_attn_func(*leaves, bias, True).requires_grad


def test_second_order_backward_raises():
    torch.manual_seed(8)
    q, k, v = (rand(1, 5, 2, 16, requires_grad=True) for _ in range(3))
    bias = rand(1, 2, 5, 5)
    out = flash_attn_func(q, k, v, bias)
    (dq,) = torch.autograd.grad((out * out).sum(), q, create_graph=True)  # dout depends on q
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


def test_missing_backward_extra(monkeypatch):
    """Without fa-backward, the kernel path refuses inputs that want a gradient in the forward; the bias
    path (PyTorch's SDPA) still differentiates; without a gradient both run."""
    torch.manual_seed(9)
    q, k, v = (rand(1, 5, 2, 16, requires_grad=True) for _ in range(3))
    monkeypatch.setattr(_extras, "BACKWARD", None)
    with pytest.raises(_extras.MissingExtraError):
        flash_attn_func(q, k, v)
    with torch.no_grad():
        flash_attn_func(q, k, v)
    flash_attn_func(q, k, v, rand(1, 2, 1, 5)).sum().backward()
    assert q.grad is not None
    with pytest.raises(_extras.MissingExtraError):
        og.attention(*(rand(1, 2, 5, 16, requires_grad=True) for _ in range(3)), 0.25)


# ------------------------------------------------------------------------------------------ error paths
def _qkv(sq=6, sk=6, h=H, hk=H, d=16, dk=None, dtype=None):
    return (
        rand(B, sq, h, d, dtype=dtype),
        rand(B, sk, hk, dk or d, dtype=dtype),
        rand(B, sk, hk, d, dtype=dtype),
    )


@pytest.mark.parametrize(
    ("bias_shape", "exc", "match"),
    [
        ((H, 6, 6), FlashAttnValueError, "4 dimensions"),
        ((B, H, 6, 1), RuntimeError, "Last 2 dimensions of bias"),
        ((B, H, 2, 6), RuntimeError, "Last 2 dimensions of bias"),
        ((B, H, 6, 7), RuntimeError, "Last 2 dimensions of bias"),
        ((B + 1, H, 1, 6), RuntimeError, "does not broadcast"),
        ((B, H + 1, 6, 6), RuntimeError, "does not broadcast"),
    ],
    ids=["3d", "column", "rows", "cols", "batch", "heads"],
)
def test_bad_bias_shapes(bias_shape, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match) as info:
        flash_attn_func(q, k, v, rand(*bias_shape))
    assert isinstance(info.value, ValueError)


def test_bad_bias_dtype_device_type():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="bias has dtype"):
        flash_attn_func(q, k, v, rand(1, 1, 1, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        flash_attn_func(q, k, v, [[[[0.0] * 6]]])
    with pytest.raises(ValueError, match="bias is on meta"):
        flash_attn_func(q, k, v, torch.zeros(1, 1, 1, 6, device="meta"))


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_bad_qkv(with_bias):
    bias = rand(1, 1, 1, 6) if with_bias else None
    with pytest.raises(ValueError, match="as many heads as q"):
        flash_attn_func(*_qkv(hk=1, h=2), bias)
    with pytest.raises(ValueError, match="k head dim"):
        flash_attn_func(*_qkv(d=16, dk=32), bias)
    with pytest.raises(ValueError, match="head dim must be in"):
        flash_attn_func(*_qkv(d=264), bias)
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="must share a dtype"):
        flash_attn_func(q, k.to(LOWP if q.dtype != LOWP else HI), v, bias)
    with pytest.raises(ValueError, match="softmax_scale is NaN"):
        flash_attn_func(q, k, v, bias, False, float("nan"))
    with pytest.raises(ValueError, match="kv must have 2 slices"):
        flash_attn_kvpacked_func(q, torch.stack([k, v, v], dim=2), bias)
    with pytest.raises(ValueError, match="qkv must have 3 slices"):
        flash_attn_qkvpacked_func(torch.stack([q, k], dim=2), bias)


# ------------------------------------------------------------------------------- flash_attn_triton_og
def og_ref(q, k, v, sm_scale, upcast=True):
    t = lambda x: x.transpose(1, 2)
    return t(ref_attention(t(q), t(k), t(v), causal=True, scale=sm_scale, upcast=upcast))


@needs_backward
@pytest.mark.parametrize(("seqlen", "d"), [(19, 16), (9, 32), (5, 64)], ids=["19x16", "9x32", "5x64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_og_attention(dtype, seqlen, d):
    torch.manual_seed(10)
    shape = (B, H, seqlen, d)
    q, k, v = (rand(*shape, dtype=dtype) for _ in range(3))
    dout = rand(*shape, dtype=dtype)
    scale = 0.8 / math.sqrt(d)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = og.attention(*leaves, scale)
    assert out.shape == shape and out.dtype == dtype
    assert out.stride() == torch.empty_like(q).stride() and out._base is None
    grads = torch.autograd.grad(out, leaves, dout)
    true = [t.detach().double().requires_grad_() for t in (q, k, v)]
    true_out = og_ref(*true, scale)
    true_grads = torch.autograd.grad(true_out, true, dout.double())
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    low_out = og_ref(*low, scale, upcast=False)
    low_grads = torch.autograd.grad(low_out, low, dout)
    assert_close_2x(out, true_out, low_out, "out")
    for name, g, t, lo in zip(("dq", "dk", "dv"), grads, true_grads, low_grads):
        assert g.shape == shape and g.dtype == dtype
        assert_close_2x(g, t, lo, name, slack=GRAD_SLACK[dtype] * float(t.abs().max()) + 1e-6)


@needs_backward
def test_og_apply_and_layouts():
    """``_attention.apply`` == ``attention``; inputs as transposed views of ``(b, s, h, d)`` memory give an
    output laid out like ``torch.empty_like(q)``; the output may be modified in place."""
    torch.manual_seed(11)
    q, k, v = (rand(1, 7, 2, 32).transpose(1, 2) for _ in range(3))
    out = og._attention.apply(q, k, v, 0.2)
    assert out.stride() == torch.empty_like(q).stride()
    assert torch.equal(og.attention(q, k, v, 0.2), out)
    assert_close_2x(out, og_ref(q, k, v, 0.2), og_ref(q, k, v, 0.2, upcast=False))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    res = og.attention(*leaves, 0.2)
    res.add_(1.0)
    res.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize(
    ("shapes", "sm_scale", "exc", "match"),
    [
        (((1, 2, 8, 40),) * 3, 0.1, ValueError, "head dim must be one of"),
        (((1, 2, 8, 8),) * 3, 0.1, ValueError, "head dim must be one of"),
        (((1, 2, 8, 256),) * 3, 0.1, ValueError, "head dim must be one of"),
        (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32)), 0.1, ValueError, "one head dim"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 32)), 0.1, ValueError, "one head dim"),
        (((1, 2, 8, 16), (1, 2, 9, 16), (1, 2, 9, 16)), 0.1, ValueError, "one shape"),
        (((1, 2, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16)), 0.1, ValueError, "one shape"),
        (((2, 8, 16),) * 3, 0.1, ValueError, "4 dimensions"),
        (((1, 2, 8, 16),) * 3, None, TypeError, "sm_scale must be a real number"),
        (((1, 2, 8, 16),) * 3, "0.1", TypeError, "sm_scale must be a real number"),
    ],
    ids=["d40", "d8", "d256", "dk", "dv", "seqlen_k", "heads_k", "3d", "no_scale", "str_scale"],
)
def test_og_errors(shapes, sm_scale, exc, match):
    q, k, v = (rand(*s) for s in shapes)
    with pytest.raises(exc, match=match):
        og.attention(q, k, v, sm_scale)


def test_og_dtype_errors():
    q, k, v = (rand(1, 2, 8, 16) for _ in range(3))
    with pytest.raises(TypeError, match="must share a dtype"):
        og.attention(q, k.double(), v, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        og.attention(q.double(), k.double(), v.double(), 0.1)


# ----------------------------------------------------------------------------------------- signatures
#: parameter lists as written in flash-attn v2.8.3's flash_attn/flash_attn_triton.py and
#: flash_attn/flash_attn_triton_og.py (the ``*_func`` / ``attention`` aliases are ``Function.apply`` there,
#: taking the forward's parameters without ``ctx``)
UPSTREAM_SIGNATURES = [
    (fat, "flash_attn_func", "q, k, v, bias=None, causal=False, softmax_scale=None"),
    (fat, "flash_attn_kvpacked_func", "q, kv, bias=None, causal=False, softmax_scale=None"),
    (fat, "flash_attn_qkvpacked_func", "qkv, bias=None, causal=False, softmax_scale=None"),
    (fat, "FlashAttnFunc.forward", "ctx, q, k, v, bias=None, causal=False, softmax_scale=None"),
    (fat, "FlashAttnFunc.backward", "ctx, do"),
    (fat, "FlashAttnKVPackedFunc.forward", "ctx, q, kv, bias=None, causal=False, softmax_scale=None"),
    (fat, "FlashAttnKVPackedFunc.backward", "ctx, do"),
    (fat, "FlashAttnQKVPackedFunc.forward", "ctx, qkv, bias=None, causal=False, softmax_scale=None"),
    (fat, "FlashAttnQKVPackedFunc.backward", "ctx, do"),
    (og, "attention", "q, k, v, sm_scale"),
    (og, "_attention.forward", "ctx, q, k, v, sm_scale"),
    (og, "_attention.backward", "ctx, do"),
]


def _parse(params: str) -> list[tuple[str, object]]:
    args = ast.parse(f"def f({params}): pass").body[0].args
    defaults = [ast.literal_eval(d) for d in args.defaults]
    names = [a.arg for a in args.args]
    padded = [inspect.Parameter.empty] * (len(names) - len(defaults)) + defaults
    return list(zip(names, padded))


@pytest.mark.parametrize(
    ("module", "name", "params"), UPSTREAM_SIGNATURES, ids=[s[1] for s in UPSTREAM_SIGNATURES]
)
def test_signature_matches_flash_attn(module, name, params):
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    sig = inspect.signature(obj)
    ours = [(p.name, p.default) for p in sig.parameters.values()]
    assert ours == _parse(params)
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in sig.parameters.values())


def test_public_names():
    for name in ("flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "FlashAttnFunc",
                 "FlashAttnKVPackedFunc", "FlashAttnQKVPackedFunc"):  # fmt: skip
        assert name in fat.__all__ and hasattr(fat, name)
    assert issubclass(fat.FlashAttnFunc, torch.autograd.Function)
    assert issubclass(og._attention, torch.autograd.Function) and callable(og.attention)
