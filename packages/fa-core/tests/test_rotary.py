"""Tests for fa_core.rotary.apply_rotary against the plain-PyTorch reference.

Error rule: |kernel - truth| <= 2 * |ref_lowprec - truth| + slack, where truth is the float64
reference and ref_lowprec the reference run in the input dtype.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fa_core.rotary import apply_rotary  # noqa: E402
from fa_core.rotary_ref import apply_rotary_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SLACK = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _cos_sin(seqlen_ro: int, rotary_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.rand(seqlen_ro, rotary_dim // 2, device=DEVICE) * 2 * torch.pi
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def _check(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **kw: object) -> None:
    truth = apply_rotary_ref(x.double(), cos.double(), sin.double(), **kw)
    ref = apply_rotary_ref(x, cos, sin, **kw)
    err = (out.double() - truth).abs().max().item()
    ref_err = (ref.double() - truth).abs().max().item()
    assert not out.isnan().any(), "output has unwritten (NaN) elements"
    assert err <= 2 * ref_err + SLACK[x.dtype], (err, ref_err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("offsets_kind", ["zero", "int", "tensor"])
def test_apply_rotary_dense(dtype, interleaved, rotary_fraction, offsets_kind):
    torch.manual_seed(0)
    batch, seqlen, nheads, headdim = 2, 7, 3, 32
    rotary_dim = int(rotary_fraction * headdim)
    cos, sin = _cos_sin(seqlen + 5, rotary_dim, dtype)
    x = torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, dtype=dtype)
    offsets = {"zero": 0, "int": 3, "tensor": torch.tensor([5, 1], dtype=torch.int32, device=DEVICE)}[
        offsets_kind
    ]
    out = apply_rotary(x, cos, sin, seqlen_offsets=offsets, interleaved=interleaved)
    assert out.shape == x.shape and out.dtype == x.dtype and out.data_ptr() != x.data_ptr()
    _check(out, x, cos, sin, seqlen_offsets=offsets, interleaved=interleaved)
    # pass-through channels are bit-exact
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tensor_offsets", [False, True])
def test_apply_rotary_varlen(dtype, interleaved, tensor_offsets):
    torch.manual_seed(1)
    seqlens = [3, 9, 1, 5]
    cu_seqlens = torch.tensor([0, 3, 12, 13, 18], dtype=torch.int32, device=DEVICE)
    nheads, headdim, rotary_dim = 2, 24, 16
    cos, sin = _cos_sin(16, rotary_dim, dtype)
    x = torch.randn(sum(seqlens), nheads, headdim, device=DEVICE, dtype=dtype)
    offsets = torch.tensor([0, 7, 2, 4], dtype=torch.int64, device=DEVICE) if tensor_offsets else 2
    kw = dict(seqlen_offsets=offsets, cu_seqlens=cu_seqlens, max_seqlen=max(seqlens), interleaved=interleaved)
    out = apply_rotary(x, cos, sin, **kw)
    _check(out, x, cos, sin, **kw)


def test_max_seqlen_as_tensor():
    x = torch.randn(6, 2, 8, device=DEVICE)
    cos, sin = _cos_sin(8, 8, torch.float32)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    out = apply_rotary(x, cos, sin, cu_seqlens=cu, max_seqlen=torch.tensor(4))
    _check(out, x, cos, sin, cu_seqlens=cu)


def test_tensor_offsets_beyond_table_are_identity():
    # Rows past seqlen_ro cannot be checked on the host (device sync); they pass through unrotated.
    x = torch.randn(1, 4, 1, 8, device=DEVICE)
    cos, sin = _cos_sin(5, 8, torch.float32)
    out = apply_rotary(x, cos, sin, seqlen_offsets=torch.tensor([3], dtype=torch.int32, device=DEVICE))
    torch.testing.assert_close(out[:, 2:], x[:, 2:], rtol=0, atol=0)
    _check(out, x, cos, sin, seqlen_offsets=torch.tensor([3]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_inplace(dtype, interleaved):
    torch.manual_seed(2)
    x = torch.randn(2, 6, 2, 16, device=DEVICE, dtype=dtype)
    cos, sin = _cos_sin(8, 12, dtype)
    x_in = x.clone()
    out = apply_rotary(x_in, cos, sin, seqlen_offsets=1, interleaved=interleaved, inplace=True)
    assert out is x_in
    _check(out, x, cos, sin, seqlen_offsets=1, interleaved=interleaved)
    assert torch.equal(out[..., 12:], x[..., 12:])


def test_apply_rotary_inplace_strided_view():
    # In-place on a non-contiguous view (the q/k slice of a packed qkv) must touch only that view.
    qkv = torch.randn(2, 5, 3, 2, 16, device=DEVICE)
    ref = qkv.clone()
    cos, sin = _cos_sin(5, 16, torch.float32)
    k = qkv[:, :, 1]
    apply_rotary(k, cos, sin, inplace=True)
    torch.testing.assert_close(qkv[:, :, 1], apply_rotary_ref(ref[:, :, 1], cos, sin))
    assert torch.equal(qkv[:, :, 0], ref[:, :, 0]) and torch.equal(qkv[:, :, 2], ref[:, :, 2])


def test_non_contiguous_input_and_all_elements_written():
    x = torch.randn(2, 3, 6, 16, device=DEVICE).transpose(1, 2)  # (2, 6, 3, 16), non-contiguous
    cos, sin = _cos_sin(6, 16, torch.float32)
    out = apply_rotary(x, cos, sin, interleaved=True)
    _check(out, x, cos, sin, interleaved=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_conjugate_is_inverse(dtype, interleaved):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 2, 16, device=DEVICE, dtype=dtype)
    cos, sin = _cos_sin(9, 16, dtype)
    offs = torch.tensor([4, 0], dtype=torch.int32, device=DEVICE)
    y = apply_rotary(x, cos, sin, seqlen_offsets=offs, interleaved=interleaved)
    back = apply_rotary(y, cos, sin, seqlen_offsets=offs, interleaved=interleaved, conjugate=True)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(back, x, rtol=tol, atol=tol)
    _check(
        apply_rotary(x, cos, sin, interleaved=interleaved, conjugate=True),
        x,
        cos,
        sin,
        interleaved=interleaved,
        conjugate=True,
    )


def test_empty_inputs():
    cos, sin = _cos_sin(4, 8, torch.float32)
    x = torch.randn(0, 4, 2, 8, device=DEVICE)
    assert apply_rotary(x, cos, sin).shape == x.shape
    x = torch.randn(2, 0, 2, 8, device=DEVICE)
    assert apply_rotary(x, cos, sin).shape == x.shape


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=torch.randn(2, 4, 2, 8, dtype=torch.float64)), TypeError, "x must be"),
        (dict(x=torch.randn(2, 4, 8)), ValueError, "x must have shape"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(cos=torch.ones(8, 4, dtype=torch.int32)), TypeError, "cos must be a floating"),
        (dict(cos=torch.ones(8, 4, 1)), ValueError, "cos must have shape"),
        (dict(sin=torch.ones(8, 3)), ValueError, "sin must have the same shape"),
        (dict(cos=torch.ones(8, 5), sin=torch.ones(8, 5)), ValueError, "rotary_dim"),
        (dict(cos=torch.ones(8, 0), sin=torch.ones(8, 0)), ValueError, "rotary_dim"),
        (dict(cos=torch.ones(3, 4), sin=torch.ones(3, 4)), ValueError, "seqlen_ro"),
        (dict(seqlen_offsets=6), ValueError, "seqlen_ro"),
        (dict(seqlen_offsets=-1), ValueError, "seqlen_offsets must be >= 0"),
        (dict(seqlen_offsets=1.5), TypeError, "seqlen_offsets"),
        (
            dict(seqlen_offsets=torch.zeros(3, dtype=torch.int32)),
            ValueError,
            "seqlen_offsets tensor must have",
        ),
        (dict(seqlen_offsets=torch.zeros(2)), TypeError, "seqlen_offsets tensor must be int"),
        (
            dict(x=torch.randn(8, 2, 8), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)),
            ValueError,
            "max_seqlen",
        ),
        (
            dict(x=torch.randn(8, 2, 8), cu_seqlens=torch.tensor([0.0, 8.0]), max_seqlen=8),
            TypeError,
            "cu_seqlens must be int",
        ),
        (
            dict(x=torch.randn(8, 2, 8), cu_seqlens=torch.tensor([[0, 8]], dtype=torch.int32), max_seqlen=8),
            ValueError,
            "cu_seqlens must have shape",
        ),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = dict(x=torch.randn(2, 4, 2, 8), cos=torch.ones(8, 4), sin=torch.zeros(8, 4))
    args.update(kwargs)
    if args["cos"].shape != args["sin"].shape and "sin" not in kwargs:
        args["sin"] = torch.zeros_like(args["cos"], dtype=torch.float32)
    with pytest.raises(exc, match=match):
        apply_rotary(**args)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a second device type")
def test_device_mismatch():
    x = torch.randn(2, 4, 2, 8, device="cuda")
    with pytest.raises(ValueError, match="cos must be on the same device"):
        apply_rotary(x, torch.ones(8, 4), torch.zeros(8, 4, device="cuda"))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_apply_rotary_is_differentiable(inplace, varlen):
    # out of place: the op's registered gradient; in place on a non-leaf: the same op and a tracked copy_
    torch.manual_seed(4)
    cos, sin = _cos_sin(12, 12, torch.float32)
    if varlen:
        kw = dict(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE), max_seqlen=5)
        x0 = torch.randn(8, 2, 16, device=DEVICE)
        kw["seqlen_offsets"] = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    else:
        kw = dict(seqlen_offsets=torch.tensor([2, 5], dtype=torch.int32, device=DEVICE))
        x0 = torch.randn(2, 6, 2, 16, device=DEVICE)
    x = x0.clone().requires_grad_()
    inp = x * 1.0 if inplace else x
    out = apply_rotary(inp, cos, sin, interleaved=True, inplace=inplace, **kw)
    assert (out is inp) == inplace
    g = torch.randn_like(out)
    g_copy = g.clone()
    out.backward(g)
    assert torch.equal(g, g_copy), "backward must not write into the caller's gradient"
    x64 = x0.double().requires_grad_()
    ref = apply_rotary_ref(x64, cos.double(), sin.double(), interleaved=True, **kw)
    ref.backward(g.double())
    _check(out.detach(), x0, cos, sin, interleaved=True, **kw)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


def test_in_place_on_a_leaf_that_requires_grad_is_refused():
    # autograd cannot record an in-place write into a leaf; the caller gets PyTorch's error, nothing silent
    x = torch.randn(1, 4, 1, 8, device=DEVICE, requires_grad=True)
    cos, sin = _cos_sin(4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="leaf"):
        apply_rotary(x, cos, sin, inplace=True)
    with torch.no_grad():
        assert apply_rotary(x, cos, sin, inplace=True) is x


def test_kernel_does_not_specialize_on_problem_sizes():
    from fa_core.rotary import rotary_kernel

    names = getattr(rotary_kernel, "kwargs", {}).get("do_not_specialize")
    if names is None:  # a compiled JITFunction: indices or names
        names = [
            rotary_kernel.arg_names[n] if isinstance(n, int) else n for n in rotary_kernel.do_not_specialize
        ]
    assert {"seqlen", "nheads", "seqlen_ro", "SEQLEN_OFFSETS"} <= set(names)


def test_negative_tensor_offsets_are_identity():
    # a negative offset (not checked on the host: a device sync) never reads before the table
    x = torch.randn(2, 4, 1, 8, device=DEVICE)
    cos, sin = _cos_sin(6, 8, torch.float32)
    offs = torch.tensor([-2, 1], dtype=torch.int32, device=DEVICE)
    out = apply_rotary(x, cos, sin, seqlen_offsets=offs)
    torch.testing.assert_close(out[0, :2], x[0, :2], rtol=0, atol=0)
    _check(out, x, cos, sin, seqlen_offsets=offs)


@pytest.mark.parametrize(
    "cu, clamped", [([0, 5, 100], [0, 5, 8]), ([0, -3, 8], [0, 0, 8]), ([2, 9, 5], [2, 8, 8])]
)
def test_garbage_cu_seqlens_stay_inside_x(monkeypatch, cu, clamped):
    # with host value checks off, the kernel clamps every cu_seqlens entry to [0, total] (end >= start)
    import fa_core.settings

    monkeypatch.setenv("FA_PLUS_SKIP_VALUE_CHECKS", "1")
    buf = torch.randn(16, 2, 16, device=DEVICE)  # x is its first 8 rows; the rest must stay untouched
    guard = buf[8:].clone()
    x = buf[:8]
    x0 = x.clone()
    cos, sin = _cos_sin(16, 16, torch.float32)
    with fa_core.settings.override(value_checks=False):
        apply_rotary(x, cos, sin, cu_seqlens=torch.tensor(cu, device=DEVICE), max_seqlen=16, inplace=True)
    assert torch.equal(buf[8:], guard), "rows past x were written"
    want = apply_rotary_ref(x0, cos, sin, cu_seqlens=torch.tensor(clamped, device=DEVICE))
    torch.testing.assert_close(x, want, atol=1e-6, rtol=1e-6)
