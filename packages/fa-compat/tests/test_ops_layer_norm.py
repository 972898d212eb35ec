"""Tests for flash_attn.ops.triton.layer_norm (Triton; interpreter on CPU): names, signatures of flash-attn
2.8.x, an end-to-end call, and (GPU only) flash-attn-sized cases in bf16."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import flash_attn.ops.triton.layer_norm as ln  # noqa: E402
from flash_attn.ops.triton.layer_norm import (  # noqa: E402
    LayerNormFn,
    LayerNormLinearFn,
    RMSNorm,
    layer_norm_fn,
    layer_norm_linear_fn,
    layer_norm_ref,
    rms_norm_fn,
    rms_norm_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_NORM_ARGS = [
    "x",
    "weight",
    "bias",
    "residual",
    "x1",
    "weight1",
    "bias1",
    "eps",
    "dropout_p",
    "rowscale",
    "prenorm",
]
_FN_TAIL = ["residual_in_fp32", "zero_centered_weight", "is_rms_norm", "return_dropout_mask", "out_dtype", "out", "residual_out"]  # fmt: skip
_REF_TAIL = ["zero_centered_weight", "dropout_mask", "dropout_mask1", "upcast"]
_LINEAR = ["x", "norm_weight", "norm_bias", "linear_weight", "linear_bias", "residual", "eps", "prenorm", "residual_in_fp32", "is_rms_norm"]  # fmt: skip
SIGNATURES = {
    layer_norm_fn: _NORM_ARGS + _FN_TAIL,
    rms_norm_fn: _NORM_ARGS + [a for a in _FN_TAIL if a != "is_rms_norm"],
    layer_norm_ref: _NORM_ARGS + _REF_TAIL,
    rms_norm_ref: _NORM_ARGS + _REF_TAIL,
    layer_norm_linear_fn: _LINEAR,
    LayerNormFn.forward: ["ctx", *_NORM_ARGS, *_FN_TAIL],
    LayerNormLinearFn.forward: ["ctx", *_LINEAR],
    RMSNorm.__init__: ["self", "hidden_size", "eps", "dropout_p", "zero_centered_weight", "device", "dtype"],
    RMSNorm.forward: ["self", "x", "residual", "prenorm", "residual_in_fp32"],
}
DEFAULTS = {"eps": 1e-6, "dropout_p": 0.0, "prenorm": False, "upcast": False, "return_dropout_mask": False}


@pytest.mark.parametrize("fn", list(SIGNATURES), ids=lambda f: f.__qualname__)
def test_signatures(fn) -> None:
    params = inspect.signature(fn).parameters
    assert list(params) == SIGNATURES[fn]
    for name, default in DEFAULTS.items():
        if name in params and fn is not RMSNorm.__init__:
            assert params[name].default == default, name
    if fn is RMSNorm.__init__:
        assert params["eps"].default == 1e-5


def test_namespace() -> None:
    import flash_attn.ops.triton as ops_triton

    assert ops_triton.layer_norm is ln
    for name in ln.__all__:
        assert getattr(ln, name) is not None
    assert issubclass(RMSNorm, torch.nn.Module)
    assert issubclass(LayerNormFn, torch.autograd.Function)


def test_end_to_end() -> None:
    """A pre-norm transformer step: residual add + dropout + RMSNorm, then a fused LayerNorm + linear."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 64, device=DEVICE, requires_grad=True)
    res = torch.randn(2, 4, 64, device=DEVICE, requires_grad=True)
    norm = RMSNorm(64, device=DEVICE)
    out, new_res = norm(x, residual=res, prenorm=True, residual_in_fp32=True)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(out, rms_norm_ref(x, norm.weight, None, residual=res, eps=1e-5))
    lw = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    y = layer_norm_linear_fn(out, torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE), lw, None)
    torch.testing.assert_close(y, F.linear(F.layer_norm(out, (64,), eps=1e-6), lw))
    y.sum().backward()
    for t in (x, res, lw, norm.weight):
        assert t.grad is not None and bool(t.grad.isfinite().all())


@pytest.mark.gpu
@pytest.mark.parametrize("hidden_size", [192, 3000, 4096])
@pytest.mark.parametrize(
    "is_rms_norm,has_residual,prenorm,dropout_p,has_rowscale,has_x1,has_weight1",
    [
        (False, True, True, 0.0, False, False, False),
        (True, True, False, 0.27, True, False, False),
        (False, False, True, 0.27, False, True, True),
        (True, True, True, 0.27, False, True, True),
    ],
)
def test_gpu_flash_attn_sizes_bf16(
    hidden_size, is_rms_norm, has_residual, prenorm, dropout_p, has_rowscale, has_x1, has_weight1
) -> None:
    """flash-attn's test sizes (8 x 512 rows) in bf16 with fp32 residual and weights, flash-attn's rule."""
    torch.manual_seed(0)
    dt, atol = torch.bfloat16, 5e-2
    x0 = torch.randn(8, 512, hidden_size, device="cuda", dtype=dt, requires_grad=True)
    res = torch.randn_like(x0, dtype=torch.float32, requires_grad=True) if has_residual else None
    w = torch.randn(hidden_size, device="cuda", requires_grad=True)
    b = None if is_rms_norm else torch.randn(hidden_size, device="cuda", requires_grad=True)
    x1 = torch.randn_like(x0, requires_grad=True) if has_x1 else None
    w1 = torch.randn(hidden_size, device="cuda", requires_grad=True) if has_weight1 else None
    b1 = (
        torch.randn(hidden_size, device="cuda", requires_grad=True)
        if has_weight1 and not is_rms_norm
        else None
    )
    rowscale = torch.randn(8, 512, device="cuda", dtype=dt) if has_rowscale else None
    leaves = [x0, res, w, b, x1, w1, b1]
    copies = [
        [t.detach().clone().requires_grad_() if t is not None else None for t in leaves] for _ in range(2)
    ]
    outs = layer_norm_fn(
        x0, w, b, residual=res, x1=x1, weight1=w1, bias1=b1, dropout_p=dropout_p, rowscale=rowscale,
        prenorm=prenorm, residual_in_fp32=not has_residual, is_rms_norm=is_rms_norm, return_dropout_mask=True,
    )  # fmt: skip
    mask, mask1 = outs[-2], outs[-1]
    outs = list(outs[:-2])
    if mask is not None:
        assert abs((1.0 - mask.float().mean().item()) - dropout_p) < 0.01
    if mask1 is not None:
        assert not torch.equal(mask, mask1)
    ref_fn = rms_norm_ref if is_rms_norm else layer_norm_ref
    refs = []
    for upcast, (xc, rc, wc, bc, x1c, w1c, b1c) in zip((False, True), copies):
        r = ref_fn(
            xc, wc, bc, residual=rc, x1=x1c, weight1=w1c, bias1=b1c, dropout_p=dropout_p, rowscale=rowscale,
            prenorm=prenorm, dropout_mask=mask, dropout_mask1=mask1, upcast=upcast,
        )  # fmt: skip
        refs.append(list(r) if isinstance(r, tuple) else [r])

    def close(a, pt, ref):
        ok = ~pt.isnan()
        pt_err = (pt[ok].float() - ref[ok].float()).abs().max()
        if pt_err == 0:
            pt_err = (pt[ok] * 0.3 / 0.3 - ref[ok]).float().abs().max()
        return (a.float() - ref.float()).abs().max() <= 2 * pt_err + atol

    for o, o_pt, o_ref in zip(outs, *refs):
        assert close(o, o_pt, o_ref)
    g = torch.randn_like(outs[0]) / 8
    for os_ in (outs, *refs):
        y = os_[0] * F.gelu(os_[1]) if has_weight1 else os_[0]
        if prenorm:
            y = y * torch.sigmoid(os_[-1].to(torch.float32))
        (y * g).sum().backward()
    for t, t_pt, t_ref in zip(leaves, *copies):
        if t is not None:
            assert close(t.grad, t_pt.grad, t_ref.grad)
