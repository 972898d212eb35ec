"""Tests for fa_core.layer_norm (fused dropout + residual + LayerNorm / RMSNorm) against the PyTorch reference.

Error rule (flash-attn's): |kernel - ref_fp32| <= 2 * |ref_lowprec - ref_fp32| + atol, where ref_fp32 is the
reference run with ``upcast=True`` and ref_lowprec the reference in the inputs' dtypes; with dropout both
references apply the masks the kernel returned. Triton's CPU interpreter rounds fp32 -> bf16 stores toward
zero (GPUs round to nearest), so bf16 outputs here can be one bf16 ulp further off than on a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fa_core.layer_norm_kernels as kernels  # noqa: E402
from fa_core.errors import FlashAttnValueError  # noqa: E402
from fa_core.layer_norm import (  # noqa: E402
    RMSNorm,
    layer_norm_fn,
    layer_norm_linear_fn,
    layer_norm_ref,
    rms_norm_fn,
    rms_norm_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _atol(*dtypes: torch.dtype) -> float:
    if BF16 in dtypes:
        return 5e-2
    return 1e-2 if F16 in dtypes else 1e-4


def _close(out: torch.Tensor, pt: torch.Tensor, ref: torch.Tensor, atol: float) -> bool:
    """flash-attn's rule; where the low-precision reference is exact, it is perturbed by ``* 0.3 / 0.3``."""
    ok = ~pt.isnan()
    err = (out.float() - ref.float()).abs().max()
    pt_err = (pt[ok].float() - ref[ok].float()).abs().max()
    if pt_err == 0:
        pt_err = (pt[ok] * 0.3 / 0.3 - ref[ok]).float().abs().max()
    return bool(err <= 2 * pt_err + atol)


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach().clone().requires_grad_() if t is not None else None


def _run_case(
    hidden: int,
    input_dtype: torch.dtype,
    residual_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    has_residual: bool = False,
    is_rms_norm: bool = False,
    prenorm: bool = False,
    dropout_p: float = 0.0,
    has_rowscale: bool = False,
    has_x1: bool = False,
    has_weight1: bool = False,
    zero_centered_weight: bool = False,
    shape: tuple[int, ...] = (4, 8),
) -> None:
    """One flash-attn style case: forward values, dropout masks, then every gradient."""
    torch.manual_seed(0)
    atol = _atol(input_dtype, residual_dtype, weight_dtype)
    ref_fn = rms_norm_ref if is_rms_norm else layer_norm_ref
    x0 = torch.randn(*shape, hidden, device=DEVICE, dtype=input_dtype, requires_grad=True)
    res = torch.randn_like(x0, dtype=residual_dtype, requires_grad=True) if has_residual else None
    weight = torch.randn(hidden, device=DEVICE, dtype=weight_dtype, requires_grad=True)
    bias = None if is_rms_norm else torch.randn(hidden, device=DEVICE, dtype=weight_dtype, requires_grad=True)
    x1 = torch.randn_like(x0, requires_grad=True) if has_x1 else None
    weight1 = bias1 = None
    if has_weight1:
        weight1 = torch.randn(hidden, device=DEVICE, dtype=weight_dtype, requires_grad=True)
        if not is_rms_norm:
            bias1 = torch.randn(hidden, device=DEVICE, dtype=weight_dtype, requires_grad=True)
    rowscale = torch.randn(*shape, device=DEVICE, dtype=input_dtype) if has_rowscale else None
    leaves = [x0, res, weight, bias, x1, weight1, bias1]
    pt_leaves = [_leaf(t) for t in leaves]
    ref_leaves = [_leaf(t) for t in leaves]

    out, *rest = layer_norm_fn(
        x0, weight, bias, residual=res, x1=x1, weight1=weight1, bias1=bias1, eps=1e-6, dropout_p=dropout_p,
        rowscale=rowscale, prenorm=prenorm, residual_in_fp32=not has_residual and residual_dtype == F32,
        zero_centered_weight=zero_centered_weight, is_rms_norm=is_rms_norm, return_dropout_mask=True,
    )  # fmt: skip
    mask = rest[-2] if dropout_p > 0.0 else None
    mask1 = rest[-1] if dropout_p > 0.0 and has_x1 else None
    assert (rest[-2] is None) == (dropout_p == 0.0) and (rest[-1] is None) == (mask1 is None)

    def reference(ls: list, upcast: bool) -> list[torch.Tensor]:
        x_, res_, w_, b_, x1_, w1_, b1_ = ls
        r = ref_fn(
            x_, w_, b_, residual=res_, x1=x1_, weight1=w1_, bias1=b1_, eps=1e-6, dropout_p=dropout_p,
            rowscale=rowscale, prenorm=prenorm, zero_centered_weight=zero_centered_weight, dropout_mask=mask,
            dropout_mask1=mask1, upcast=upcast,
        )  # fmt: skip
        return list(r) if isinstance(r, tuple) else [r]

    outs = [out, *rest[: int(has_weight1) + int(prenorm)]]
    outs_pt, outs_ref = reference(pt_leaves, False), reference(ref_leaves, True)
    assert len(outs) == len(outs_pt) == len(outs_ref)
    assert out.dtype == input_dtype and out.shape == x0.shape
    if has_weight1:
        assert outs[1].dtype == input_dtype
    if prenorm:
        assert outs[-1].dtype == residual_dtype
    for o, o_pt, o_ref in zip(outs, outs_pt, outs_ref):
        assert _close(o, o_pt, o_ref, atol)
    if mask1 is not None:
        assert not torch.equal(mask, mask1)

    g = torch.randn_like(out) / shape[0]

    def loss(os_: list[torch.Tensor], upcast_residual: bool) -> torch.Tensor:
        y = os_[0] * F.gelu(os_[1]) if has_weight1 else os_[0]
        if prenorm:
            r = os_[-1].to(residual_dtype) if upcast_residual else os_[-1]
            y = y * torch.sigmoid(r)
        return (y * g).sum()

    loss(outs, False).backward()
    loss(outs_pt, False).backward()
    loss(outs_ref, True).backward()
    for name, t, t_pt, t_ref in zip(
        ["x", "residual", "weight", "bias", "x1", "weight1", "bias1"], leaves, pt_leaves, ref_leaves
    ):
        if t is None:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.dtype == t.dtype, name
        assert _close(t.grad, t_pt.grad, t_ref.grad, atol), name


# (residual, rms, prenorm, dropout_p, rowscale, x1, weight1, zero_centered)
OPTION_CASES = [
    (False, False, False, 0.0, False, False, False, False),
    (True, False, True, 0.0, False, False, False, False),
    (True, True, True, 0.0, False, False, False, False),
    (False, True, True, 0.0, False, False, False, True),  # the residual output is x itself
    (True, False, False, 0.27, False, False, False, False),
    (True, False, True, 0.0, True, False, False, False),
    (False, True, True, 0.27, True, False, False, False),
    (True, False, True, 0.27, False, True, True, False),
    (True, True, False, 0.27, False, True, True, True),
    (False, False, True, 0.0, False, True, False, False),
    (False, True, False, 0.0, False, False, True, False),
    (True, False, True, 0.0, False, False, True, True),
]
# (input, residual, weight)
DTYPE_CASES = [(F32, F32, F32), (F16, F16, F32), (F16, F32, F16), (BF16, BF16, F32), (BF16, F32, BF16)]
HIDDEN = [33, 64, 200]


@pytest.mark.parametrize("case", range(len(OPTION_CASES)))
@pytest.mark.parametrize("dtypes", range(2))
def test_layer_norm_options(case: int, dtypes: int) -> None:
    """Every option combination that changes the kernels' paths, over fp32 / fp16 / bf16 mixes."""
    has_res, rms, prenorm, p, rowscale, x1, w1, zc = OPTION_CASES[case]
    input_dtype, residual_dtype, weight_dtype = DTYPE_CASES[(case + 3 * dtypes) % len(DTYPE_CASES)]
    _run_case(
        HIDDEN[(case + dtypes) % len(HIDDEN)], input_dtype, residual_dtype, weight_dtype, has_residual=has_res,
        is_rms_norm=rms, prenorm=prenorm, dropout_p=p, has_rowscale=rowscale, has_x1=x1, has_weight1=w1,
        zero_centered_weight=zc,
    )  # fmt: skip


@pytest.mark.parametrize("is_rms_norm", [False, True])
def test_column_block_loop(monkeypatch: pytest.MonkeyPatch, is_rms_norm: bool) -> None:
    """Rows longer than one block (blocks shrunk to 64 columns, 200-column rows) give the single-block
    results, dropout masks included (they depend on the column, not the block)."""
    torch.manual_seed(1)
    x, res, x1 = (torch.randn(6, 200, device=DEVICE, requires_grad=True) for _ in range(3))
    w, b, w1, b1 = (torch.randn(200, device=DEVICE, requires_grad=True) for _ in range(4))

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for t in (x, res, x1, w, b, w1, b1):
            t.grad = None
        torch.manual_seed(2)
        outs = layer_norm_fn(
            x, w, b, residual=res, x1=x1, weight1=w1, bias1=b1, dropout_p=0.2, prenorm=True,
            is_rms_norm=is_rms_norm, return_dropout_mask=True, zero_centered_weight=True,
        )  # fmt: skip
        (outs[0] * outs[1].sin() + outs[2].cos()).sum().backward()
        return list(outs), [t.grad for t in (x, res, x1, w, b, w1, b1)]

    outs, grads = run()
    monkeypatch.setattr(kernels, "MAX_BLOCK_N", 64)
    assert not kernels.col_block(200)[1]
    outs_loop, grads_loop = run()
    for a, b_ in zip(outs + grads, outs_loop + grads_loop):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden,is_rms_norm", [(9000, False), (65536, True)])
def test_long_rows(hidden: int, is_rms_norm: bool) -> None:
    """Hidden sizes past one block (the loop at its real block size), up to 64K columns."""
    _run_case(hidden, F16, F32, F32, has_residual=True, is_rms_norm=is_rms_norm, prenorm=True, shape=(2,))


def test_bf16_everywhere() -> None:
    """bf16 inputs, residual and weights with dropout and a second weight."""
    _run_case(64, BF16, BF16, BF16, has_residual=True, prenorm=True, dropout_p=0.1, has_weight1=True)


def test_rule_rejects_wrong_gradients() -> None:
    """The error rule is tight enough to catch a missing bias gradient or a dropped mean term."""
    torch.manual_seed(0)
    x = torch.randn(32, 64, device=DEVICE, dtype=F16)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    b = torch.randn(64, device=DEVICE, requires_grad=True)
    g = torch.randn(32, 64, device=DEVICE, dtype=F16)
    grads = {}
    for upcast in (False, True):
        wl, bl = _leaf(w), _leaf(b)
        (layer_norm_ref(x, wl, bl, upcast=upcast) * g).float().sum().backward()
        grads[upcast] = (wl.grad, bl.grad)
    wk, bk = _leaf(w), _leaf(b)
    (layer_norm_fn(x, wk, bk) * g).float().sum().backward()
    assert _close(bk.grad, grads[False][1], grads[True][1], 1e-2)
    assert not _close(torch.zeros_like(bk.grad), grads[False][1], grads[True][1], 1e-2)
    assert not _close(bk.grad * 1.05, grads[False][1], grads[True][1], 1e-2)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_masks(p: float) -> None:
    """Kept fraction ~ 1 - p, independent masks for x and x1, reproducible under torch.manual_seed, and
    dropped elements contribute nothing to the output or receive no gradient."""
    x = torch.randn(16, 512, device=DEVICE, requires_grad=True)
    x1 = torch.randn(16, 512, device=DEVICE)
    w = torch.ones(512, device=DEVICE)
    torch.manual_seed(3)
    out, mask, mask1 = layer_norm_fn(x, w, None, x1=x1, dropout_p=p, return_dropout_mask=True)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    for m in (mask, mask1):
        assert abs((1.0 - m.float().mean().item()) - p) < 0.02
    assert not torch.equal(mask, mask1)
    torch.manual_seed(3)
    out2, mask2, _ = layer_norm_fn(x, w, None, x1=x1, dropout_p=p, return_dropout_mask=True)
    assert torch.equal(mask, mask2) and torch.equal(out, out2)
    out.sum().backward()
    assert x.grad is not None and bool((x.grad[~mask] == 0).all())


def test_return_conventions_and_buffers() -> None:
    """Return order and dtypes; out_dtype, residual_in_fp32, leading shapes, non-contiguous inputs and the
    caller's out / residual_out buffers."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 48, device=DEVICE, dtype=F16)
    w, b, w1 = (torch.randn(48, device=DEVICE) for _ in range(3))
    y = layer_norm_fn(x, w, b)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == F16
    # prenorm without anything changing x returns x itself as the residual
    y, r = layer_norm_fn(x, w, b, prenorm=True)
    assert torch.equal(r, x)
    y, r = layer_norm_fn(x, w, b, prenorm=True, residual_in_fp32=True)
    assert r.dtype == F32 and torch.equal(r, x.float())
    y, y1, r, m, m1 = layer_norm_fn(x, w, b, weight1=w1, prenorm=True, return_dropout_mask=True)
    assert m is None and m1 is None and y1.shape == x.shape
    y, m, m1 = rms_norm_fn(x, w, None, dropout_p=0.1, return_dropout_mask=True)
    assert m is not None and m1 is None
    assert layer_norm_fn(x, w, b, out_dtype=F32).dtype == F32
    ref = layer_norm_ref(x, w, b, upcast=True).float()
    # last dimension not contiguous
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(layer_norm_fn(xt, w, b).float(), ref, atol=1e-2, rtol=1e-2)
    # caller buffers
    res = torch.randn_like(x)
    out_buf, res_buf = torch.empty_like(x), torch.empty_like(x, dtype=F32)
    y, r = layer_norm_fn(x, w, b, residual=res, prenorm=True, out=out_buf, residual_out=res_buf)
    assert y.data_ptr() == out_buf.data_ptr() and r.data_ptr() == res_buf.data_ptr()
    torch.testing.assert_close(res_buf, x.float() + res.float())
    torch.testing.assert_close(
        out_buf.float(), layer_norm_ref(x, w, b, residual=res, upcast=True).float(), atol=1e-2, rtol=1e-2
    )


def test_invalid_arguments() -> None:
    x = torch.randn(4, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    with pytest.raises(FlashAttnValueError):
        layer_norm_fn(x, w, None, x1=x, rowscale=torch.ones(4, device=DEVICE))
    with pytest.raises(FlashAttnValueError):
        layer_norm_fn(x, torch.ones(8, device=DEVICE), None)
    with pytest.raises(FlashAttnValueError):
        layer_norm_fn(x, w, None, residual=torch.randn(4, 8, device=DEVICE))
    with pytest.raises(FlashAttnValueError):
        layer_norm_fn(x, w, None, dropout_p=1.0)


@pytest.mark.parametrize(
    "input_dtype,residual_dtype,has_residual,is_rms_norm,prenorm,autocast",
    [
        (F32, F32, True, False, True, False),
        (F32, F32, False, True, False, False),
        (BF16, BF16, True, False, False, True),
        (BF16, F32, False, True, True, True),
        (F16, F32, True, True, True, True),
    ],
)
def test_layer_norm_linear(
    input_dtype: torch.dtype,
    residual_dtype: torch.dtype,
    has_residual: bool,
    is_rms_norm: bool,
    prenorm: bool,
    autocast: bool,
) -> None:
    """The fused norm + linear layer against the reference norm followed by F.linear (fp32 weights, under
    autocast on the input's device for low-precision inputs)."""
    torch.manual_seed(0)
    hidden, atol = 40, _atol(input_dtype, residual_dtype)
    ref_fn = rms_norm_ref if is_rms_norm else layer_norm_ref
    x0 = torch.randn(3, 8, hidden, device=DEVICE, dtype=input_dtype, requires_grad=True)
    res = torch.randn_like(x0, dtype=residual_dtype, requires_grad=True) if has_residual else None
    nw = torch.randn(hidden, device=DEVICE, requires_grad=True)
    nb = None if is_rms_norm else torch.randn(hidden, device=DEVICE, requires_grad=True)
    lw = torch.empty(2 * hidden, hidden, device=DEVICE, requires_grad=True)
    torch.nn.init.xavier_uniform_(lw)
    lb = None if is_rms_norm else torch.randn(2 * hidden, device=DEVICE, requires_grad=True)
    leaves = [x0, res, nw, nb, lw, lb]
    pt, ref = [_leaf(t) for t in leaves], [_leaf(t) for t in leaves]
    ctx = torch.autocast(device_type=DEVICE, dtype=input_dtype, enabled=autocast)
    with ctx:
        res_out = layer_norm_linear_fn(
            x0, nw, nb, lw, lb, residual=res, eps=1e-6, prenorm=prenorm,
            residual_in_fp32=not has_residual and residual_dtype == F32, is_rms_norm=is_rms_norm,
        )  # fmt: skip
    out, *rest = res_out if prenorm else (res_out,)
    y_pt, *rest_pt = ref_fn(pt[0], pt[2], pt[3], residual=pt[1], eps=1e-6, prenorm=True)
    with torch.autocast(device_type=DEVICE, dtype=input_dtype, enabled=autocast):
        out_pt = F.linear(y_pt, pt[4], pt[5])
    y_ref, *rest_ref = ref_fn(ref[0], ref[2], ref[3], residual=ref[1], eps=1e-6, prenorm=True, upcast=True)
    out_ref = F.linear(y_ref.to(ref[4].dtype), ref[4], ref[5])
    assert out.dtype == input_dtype and out.shape == (3, 8, 2 * hidden)
    assert _close(out, out_pt, out_ref, atol)
    if prenorm:
        assert rest[0].dtype == residual_dtype
        assert _close(rest[0], rest_pt[0], rest_ref[0], atol)
    g = torch.randn_like(out) / 3
    out.backward(g)
    out_pt.backward(g)
    out_ref.backward(g)
    for name, t, t_pt, t_ref in zip(["x", "residual", "norm_w", "norm_b", "lin_w", "lin_b"], leaves, pt, ref):
        if t is not None:
            assert t.grad is not None and t.grad.dtype == t.dtype, name
            assert _close(t.grad, t_pt.grad, t_ref.grad, atol), name


def test_rms_norm_module() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, device=DEVICE)
    res = torch.randn_like(x)
    for zero_centered in (False, True):
        mod = RMSNorm(24, eps=1e-5, zero_centered_weight=zero_centered, device=DEVICE)
        assert mod.bias is None and list(dict(mod.named_parameters())) == ["weight"]
        out, r = mod(x, residual=res, prenorm=True)
        torch.testing.assert_close(out, rms_norm_ref(x + res, torch.ones(24, device=DEVICE), None, eps=1e-5))
        torch.testing.assert_close(r, x + res)
    mod = RMSNorm(24, dropout_p=0.5, device=DEVICE)
    assert not torch.equal(mod(x), mod.eval()(x))


def test_empty_rows() -> None:
    x = torch.randn(0, 3, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    y = layer_norm_fn(x, w, b, dropout_p=0.1)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
