"""Tests for flash_attn.ops.layer_norm / flash_attn.ops.rms_norm (Triton; interpreter on CPU).

Every function is held against a float32 PyTorch reference written here after flash-attn's own test
(tests/ops/test_dropout_layer_norm.py): the reference applies the dropout mask the function returns, so the
outputs and all gradients (x0, residual, x1, weights, biases, layerscale) must agree whatever the random
stream. Shapes are tiny (at most 16 rows of 64) to keep the interpreter fast.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fa_compat_testutils import DEVICE  # noqa: E402

from flash_attn.ops import layer_norm as ln  # noqa: E402
from flash_attn.ops import rms_norm as rn  # noqa: E402
from flash_attn.ops.layer_norm import (  # noqa: E402
    DropoutAddLayerNorm,
    DropoutAddLayerNormFn,
    DropoutAddLayerNormParallelResidualFn,
    DropoutAddLayerNormSubsetFn,
    dropout_add_layer_norm,
    dropout_add_layer_norm_parallel_residual,
    dropout_add_layer_norm_subset,
    layer_norm,
)
from flash_attn.ops.rms_norm import (  # noqa: E402
    DropoutAddRMSNorm,
    RMSNorm,
    dropout_add_rms_norm,
    dropout_add_rms_norm_parallel_residual,
    dropout_add_rms_norm_subset,
    rms_norm,
)

F32, F16 = torch.float32, torch.float16
EPS = 1e-5
N = 64


def _tol(*dtypes: torch.dtype) -> float:
    """Absolute and relative tolerance against the fp32 reference."""
    return 1e-4 if all(d == F32 for d in dtypes) else 2e-2


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(actual.float(), expected.detach().float(), atol=tol, rtol=tol)


def _rand(*shape, dtype=F32, grad=True):
    t = torch.randn(*shape, device=DEVICE, dtype=F32).to(dtype)
    return t.requires_grad_(grad)


def _leaf(t):
    """An fp32 copy of ``t`` for the reference (None stays None)."""
    return t.detach().float().requires_grad_() if t is not None else None


def _norm_ref(x, weight, bias, is_rms_norm):
    if is_rms_norm:
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight
        return out + bias if bias is not None else out
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def _grads_close(pairs, tol):
    for name, ours, ref in pairs:
        if ours is None:
            continue
        assert ours.grad is not None, name
        assert ours.grad.dtype == ours.dtype, name
        assert ours.grad.shape == ours.shape, name
        try:
            _close(ours.grad, ref.grad, tol)
        except AssertionError as e:
            raise AssertionError(f"gradient of {name}: {e}") from None


# ------------------------------------------------------------------------- dropout_add_{layer,rms}_norm

#: has_residual, has_rowscale, has_colscale, dropout_p, input dtype, residual dtype, weight dtype
MAIN_CASES = [
    (True, True, True, 0.37, F32, F32, F32),
    (False, False, False, 0.0, F32, F32, F32),
    (True, False, False, 0.0, F32, F32, F32),
    (False, False, True, 0.37, F32, F32, F16),
    (True, False, True, 0.0, F16, F16, F32),
    (False, True, True, 0.37, F16, F32, F16),
    (True, True, False, 0.37, F16, F32, F16),
]
#: (is_rms_norm, prenorm)
NORM_KINDS = [(False, False), (False, True), (True, False), (True, True)]
ROWS = (2, 4)


def _case_id(case) -> str:
    names = ("res", "rowscale", "colscale")
    flags = "-".join(n for n, on in zip(names, case) if on) or "plain"
    return f"{flags}-p{case[3]}-" + "/".join(str(d).removeprefix("torch.float") for d in case[4:])


def _kind_id(kind) -> str:
    return ("rms" if kind[0] else "layer") + ("-prenorm" if kind[1] else "")


@pytest.mark.parametrize("case", MAIN_CASES, ids=_case_id)
@pytest.mark.parametrize("kind", NORM_KINDS, ids=_kind_id)
def test_dropout_add_norm(kind, case) -> None:
    is_rms_norm, prenorm = kind
    has_res, has_rowscale, has_colscale, dropout_p, idt, rdt, wdt = case
    torch.manual_seed(0)
    x0 = _rand(*ROWS, N, dtype=idt)
    res = _rand(*ROWS, N, dtype=rdt) if has_res else None
    w = _rand(N, dtype=wdt)
    b = _rand(N, dtype=wdt) if not is_rms_norm else None
    # stochastic depth per row
    rowscale = (torch.rand(*ROWS, device=DEVICE) < 0.8).to(idt) / 0.8 if has_rowscale else None
    colscale = _rand(N, dtype=wdt) if has_colscale else None
    residual_in_fp32 = not has_res and rdt == F32
    fn = dropout_add_rms_norm if is_rms_norm else dropout_add_layer_norm
    outs = fn(
        x0, res, w, b, dropout_p, EPS, rowscale=rowscale, layerscale=colscale, prenorm=prenorm,
        residual_in_fp32=residual_in_fp32, return_dropout_mask=True,
    )  # fmt: skip
    assert len(outs) == (3 if prenorm else 2)
    out, dmask = outs[0], outs[-1]
    assert dmask.dtype == torch.uint8 and dmask.shape == x0.shape and not dmask.requires_grad
    if dropout_p == 0.0:
        assert bool(dmask.all())

    x0r, resr, wr, br, csr = map(_leaf, (x0, res, w, b, colscale))
    scaled = x0r * rowscale.float()[..., None] if rowscale is not None else x0r
    if csr is not None:
        scaled = scaled * csr
    xr = scaled * dmask.float() / (1 - dropout_p)
    if resr is not None:
        xr = xr + resr
    outr = _norm_ref(xr, wr, br, is_rms_norm)
    tol = _tol(idt, rdt, wdt)
    assert out.dtype == idt and out.shape == x0.shape
    _close(out, outr, tol)
    g = torch.randn_like(outr)
    loss, loss_ref = (out.float() * g).sum(), (outr * g).sum()
    if prenorm:
        x = outs[1]
        assert x.dtype == rdt and x.shape == x0.shape
        _close(x, xr, tol)
        gx = torch.randn_like(xr)
        loss = loss + (x.float().sigmoid() * gx).sum()
        loss_ref = loss_ref + (xr.sigmoid() * gx).sum()
    loss.backward()
    loss_ref.backward()
    _grads_close(
        [
            ("x0", x0, x0r),
            ("residual", res, resr),
            ("weight", w, wr),
            ("bias", b, br),
            ("colscale", colscale, csr),
        ],
        tol,
    )


def test_rms_norm_with_bias_and_2d_noncontiguous_input() -> None:
    torch.manual_seed(1)
    base = _rand(N, 12)
    x0 = base.t()  # (12, N), last dimension not contiguous
    res = _rand(12, N)
    w, b = _rand(N), _rand(N)
    out, x = dropout_add_rms_norm(x0, res, w, b, 0.0, EPS, prenorm=True)
    x0r, resr, wr, br = map(_leaf, (x0, res, w, b))
    xr = x0r + resr
    outr = _norm_ref(xr, wr, br, True)
    _close(out, outr, 1e-4)
    _close(x, xr, 1e-4)
    g = torch.randn_like(outr)
    (out * g).sum().backward()
    (outr * g).sum().backward()
    _grads_close([("residual", res, resr), ("weight", w, wr), ("bias", b, br)], 1e-4)
    _close(base.grad.t(), x0r.grad, 1e-4)


def test_layer_norm_and_rms_norm_functions() -> None:
    torch.manual_seed(2)
    for is_rms in (False, True):
        x = _rand(3, 5, N)
        w = _rand(N)
        b = None if is_rms else _rand(N)
        out = rms_norm(x, w, EPS) if is_rms else layer_norm(x, w, b, EPS)
        assert isinstance(out, torch.Tensor) and out.shape == x.shape
        xr, wr, br = map(_leaf, (x, w, b))
        outr = _norm_ref(xr, wr, br, is_rms)
        _close(out, outr, 1e-4)
        g = torch.randn_like(outr)
        (out * g).sum().backward()
        (outr * g).sum().backward()
        _grads_close([("x", x, xr), ("weight", w, wr), ("bias", b, br)], 1e-4)


# --------------------------------------------------------------------------------------------- subsets

#: has_residual, has_colscale, dropout_p, input dtype, residual dtype, weight dtype
SUBSET_CASES = [
    (True, True, 0.37, F32, F32, F32),
    (False, False, 0.0, F32, F32, F32),
    (True, False, 0.37, F16, F32, F32),
    (False, True, 0.0, F16, F16, F16),
]
B, S = 4, 2
X0_KEEP = torch.tensor([True, False, True, True])
OUT_KEEP = torch.tensor([True, True, False, True])
DROP_PATH_SCALE = 1 / (1 - 0.4)


def _subset(keep: torch.Tensor) -> torch.Tensor:
    """flash-attn's drop-path index map: (B, S) int32, 1-based row of the compact tensor or 0."""
    rows = keep.repeat_interleave(S)
    return torch.cumsum(rows, 0, dtype=torch.int32).masked_fill(~rows, 0).view(B, S).to(DEVICE)


def _expand(compact: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, ...) from the kept batches ``compact`` with zeros elsewhere (differentiable)."""
    pad = torch.cat([compact, torch.zeros_like(compact[:1])])
    index = torch.where(keep, torch.cumsum(keep, 0) - 1, int(keep.sum())).to(DEVICE)
    return pad[index]


@pytest.mark.parametrize("case", SUBSET_CASES, ids=lambda c: _case_id((c[0], False, *c[1:])))
@pytest.mark.parametrize("kind", NORM_KINDS, ids=_kind_id)
def test_dropout_add_norm_subset(kind, case) -> None:
    is_rms_norm, prenorm = kind
    has_res, has_colscale, dropout_p, idt, rdt, wdt = case
    torch.manual_seed(3)
    x0 = _rand(int(X0_KEEP.sum()), S, N, dtype=idt)
    res = _rand(B, S, N, dtype=rdt) if has_res else None
    w = _rand(N, dtype=wdt)
    b = _rand(N, dtype=wdt) if not is_rms_norm else None
    colscale = _rand(N, dtype=wdt) if has_colscale else None
    out_numrows = int(OUT_KEEP.sum()) * S
    fn = dropout_add_rms_norm_subset if is_rms_norm else dropout_add_layer_norm_subset
    outs = fn(
        x0, res, w, b, dropout_p, EPS, layerscale=colscale, x0_subset=_subset(X0_KEEP),
        out_subset=_subset(OUT_KEEP), rowscale_const=DROP_PATH_SCALE, out_numrows=out_numrows, prenorm=prenorm,
        residual_in_fp32=not has_res and rdt == F32, return_dropout_mask=True,
    )  # fmt: skip
    out, dmask = outs[0], outs[-1]
    assert dmask.dtype == torch.uint8 and dmask.shape == x0.shape
    assert out.dtype == idt and out.shape == (int(OUT_KEEP.sum()), S, N)

    x0r, resr, wr, br, csr = map(_leaf, (x0, res, w, b, colscale))
    scaled = x0r * DROP_PATH_SCALE * (csr if csr is not None else 1.0)
    xr = _expand(scaled * dmask.float() / (1 - dropout_p), X0_KEEP)
    if resr is not None:
        xr = xr + resr
    outr = _norm_ref(xr, wr, br, is_rms_norm)[OUT_KEEP.to(DEVICE)]
    tol = _tol(idt, rdt, wdt)
    _close(out, outr, tol)
    g = torch.randn_like(outr)
    loss, loss_ref = (out.float() * g).sum(), (outr * g).sum()
    if prenorm:
        x = outs[1]
        assert x.dtype == rdt and x.shape == (B, S, N)
        _close(x, xr, tol)
        gx = torch.randn_like(xr)
        loss = loss + (x.float().sigmoid() * gx).sum()
        loss_ref = loss_ref + (xr.sigmoid() * gx).sum()
    loss.backward()
    loss_ref.backward()
    _grads_close(
        [
            ("x0", x0, x0r),
            ("residual", res, resr),
            ("weight", w, wr),
            ("bias", b, br),
            ("colscale", colscale, csr),
        ],
        tol,
    )


@pytest.mark.parametrize("which", ["x0_subset", "out_subset"])
def test_subset_one_side(which) -> None:
    """Either map alone: the other side covers every row; rowscale_const applies either way."""
    torch.manual_seed(4)
    full_x0 = which == "out_subset"
    x0 = _rand(B if full_x0 else int(X0_KEEP.sum()), S, N)
    res = _rand(B, S, N)
    w, b = _rand(N), _rand(N)
    kw = {"x0_subset": _subset(X0_KEEP)} if not full_x0 else {"out_subset": _subset(OUT_KEEP)}
    out_numrows = int(OUT_KEEP.sum()) * S
    out, dmask = dropout_add_layer_norm_subset(
        x0, res, w, b, 0.2, EPS, rowscale_const=2.0, out_numrows=out_numrows, return_dropout_mask=True, **kw
    )
    x0r, resr, wr, br = map(_leaf, (x0, res, w, b))
    xr = x0r * 2.0 * dmask.float() / 0.8
    xr = (xr if full_x0 else _expand(xr, X0_KEEP)) + resr
    outr = _norm_ref(xr, wr, br, False)
    if full_x0:
        outr = outr[OUT_KEEP.to(DEVICE)]
    _close(out, outr, 1e-4)
    g = torch.randn_like(outr)
    (out * g).sum().backward()
    (outr * g).sum().backward()
    _grads_close([("x0", x0, x0r), ("residual", res, resr), ("weight", w, wr), ("bias", b, br)], 1e-4)


def test_subset_repeated_and_unused_rows() -> None:
    """An x0 row named twice gets both gradients, an unnamed one a zero gradient; unnamed output rows are 0."""
    torch.manual_seed(5)
    x0 = _rand(4, N)
    w, b = _rand(N), _rand(N)
    x0_subset = torch.tensor([1, 1, 0, 3, 2, 0], dtype=torch.int32, device=DEVICE)
    out_subset = torch.tensor([2, 0, 1, 4, 0, 5], dtype=torch.int32, device=DEVICE)
    out = dropout_add_layer_norm_subset(
        x0, None, w, b, 0.0, EPS, x0_subset=x0_subset, out_subset=out_subset, out_numrows=6
    )
    x0r, wr, br = map(_leaf, (x0, w, b))
    xr = torch.cat([x0r, torch.zeros(1, N, device=DEVICE)])[torch.tensor([0, 0, 4, 2, 1, 4], device=DEVICE)]
    normed = _norm_ref(xr, wr, br, False)
    outr = torch.cat([torch.zeros(1, N, device=DEVICE), normed])[
        torch.tensor([3, 1, 0, 4, 6, 0], device=DEVICE)  # output row r <- full row (out_subset == r + 1)
    ]
    _close(out, outr, 1e-4)
    assert bool((out[5] == 0).all())
    g = torch.randn_like(outr)
    (out * g).sum().backward()
    (outr * g).sum().backward()
    _grads_close([("x0", x0, x0r), ("weight", w, wr), ("bias", b, br)], 1e-4)
    assert bool((x0.grad[3] == 0).all())


# ----------------------------------------------------------------------------------- parallel residual

#: has_x1, has_residual, tied_norm, dropout_p, input dtype, residual dtype, weight dtype
PARALLEL_CASES = [
    (True, True, False, 0.37, F32, F32, F32),
    (True, False, True, 0.0, F32, F32, F32),
    (False, True, False, 0.37, F16, F32, F32),
    (True, False, False, 0.37, F16, F16, F16),
]


def _parallel_id(case) -> str:
    names = ("x1", "res", "tied")
    flags = "-".join(n for n, on in zip(names, case) if on) or "plain"
    return f"{flags}-p{case[3]}-" + "/".join(str(d).removeprefix("torch.float") for d in case[4:])


@pytest.mark.parametrize("case", PARALLEL_CASES, ids=_parallel_id)
@pytest.mark.parametrize("kind", NORM_KINDS, ids=_kind_id)
def test_dropout_add_norm_parallel_residual(kind, case) -> None:
    is_rms_norm, prenorm = kind
    has_x1, has_res, tied, dropout_p, idt, rdt, wdt = case
    torch.manual_seed(6)
    x0 = _rand(*ROWS, N, dtype=idt)
    x1 = _rand(*ROWS, N, dtype=idt) if has_x1 else None
    res = _rand(*ROWS, N, dtype=rdt) if has_res else None
    w0 = _rand(N, dtype=wdt)
    b0 = _rand(N, dtype=wdt) if not is_rms_norm else None
    w1 = _rand(N, dtype=wdt) if not tied else None
    b1 = _rand(N, dtype=wdt) if not tied and not is_rms_norm else None
    fn = dropout_add_rms_norm_parallel_residual if is_rms_norm else dropout_add_layer_norm_parallel_residual
    outs = fn(
        x0, x1, res, w0, b0, w1, b1, dropout_p, EPS, prenorm=prenorm,
        residual_in_fp32=not has_res and rdt == F32, return_dropout_mask=True,
    )  # fmt: skip
    assert len(outs) == (5 if prenorm else 4)
    out0, out1, dmask0, dmask1 = outs[0], outs[1], outs[-2], outs[-1]
    for m in (dmask0, dmask1):
        assert m.dtype == torch.uint8 and m.shape == x0.shape
    if not has_x1 or dropout_p == 0.0:
        assert bool(dmask1.all())
    assert (out1 is None) == tied

    x0r, x1r, resr, w0r, b0r, w1r, b1r = map(_leaf, (x0, x1, res, w0, b0, w1, b1))
    xr = x0r * dmask0.float() / (1 - dropout_p)
    if x1r is not None:
        xr = xr + x1r * dmask1.float() / (1 - dropout_p)
    if resr is not None:
        xr = xr + resr
    out0r = _norm_ref(xr, w0r, b0r, is_rms_norm)
    tol = _tol(idt, rdt, wdt)
    assert out0.dtype == idt
    _close(out0, out0r, tol)
    g0 = torch.randn_like(out0r)
    loss, loss_ref = (out0.float() * g0).sum(), (out0r * g0).sum()
    if not tied:
        out1r = _norm_ref(xr, w1r, b1r, is_rms_norm)
        assert out1.dtype == idt
        _close(out1, out1r, tol)
        g1 = torch.randn_like(out1r)
        loss, loss_ref = loss + (out1.float() * g1).sum(), loss_ref + (out1r * g1).sum()
    if prenorm:
        x = outs[2]
        assert x.dtype == rdt
        _close(x, xr, tol)
        gx = torch.randn_like(xr)
        loss = loss + (x.float().sigmoid() * gx).sum()
        loss_ref = loss_ref + (xr.sigmoid() * gx).sum()
    loss.backward()
    loss_ref.backward()
    _grads_close(
        [
            ("x0", x0, x0r), ("x1", x1, x1r), ("residual", res, resr), ("weight0", w0, w0r), ("bias0", b0, b0r),
            ("weight1", w1, w1r), ("bias1", b1, b1r),
        ],
        tol,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- modules


def test_module_defaults() -> None:
    m = DropoutAddLayerNorm(N, device=DEVICE)
    assert (m.prenorm, m.p, m.eps, m.residual_in_fp32) == (False, 0.0, 1e-5, False)
    assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())
    r = DropoutAddRMSNorm(N, device=DEVICE, dtype=F16)
    assert (r.prenorm, r.p, r.eps, r.residual_in_fp32) == (False, 0.0, 1e-5, False)
    assert r.bias is None and r.weight.dtype == F16 and bool((r.weight == 1).all())
    n = RMSNorm(N, device=DEVICE)
    assert n.eps == 1e-5 and n.bias is None and bool((n.weight == 1).all())
    assert [name for name, _ in n.named_parameters()] == ["weight"]


@pytest.mark.parametrize("is_rms_norm", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("prenorm", [False, True])
def test_dropout_add_norm_module(is_rms_norm, prenorm) -> None:
    """Training: the module's output is the function's under the same seed (p, eps, prenorm and
    residual_in_fp32 passed on), held against the reference with that mask; eval: no dropout."""
    torch.manual_seed(7)
    cls = DropoutAddRMSNorm if is_rms_norm else DropoutAddLayerNorm
    fn = dropout_add_rms_norm if is_rms_norm else dropout_add_layer_norm
    model = cls(N, prenorm=prenorm, p=0.3, eps=1e-3, residual_in_fp32=True, device=DEVICE)
    with torch.no_grad():
        model.weight.normal_()
        if model.bias is not None:
            model.bias.normal_()
    x0 = _rand(2, 8, N, dtype=F16)
    torch.manual_seed(8)
    got = model(x0)
    torch.manual_seed(8)
    want = fn(x0, None, model.weight, model.bias, 0.3, 1e-3, prenorm=prenorm, residual_in_fp32=True,
              return_dropout_mask=True)  # fmt: skip
    got = got if prenorm else (got,)
    for a, e in zip(got, want[:-1]):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    dmask = want[-1]
    assert 0.15 < 1 - dmask.float().mean().item() < 0.45
    xr = x0.detach().float() * dmask.float() / 0.7
    if is_rms_norm:
        outr = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-3) * model.weight.detach()
    else:
        outr = F.layer_norm(xr, (N,), model.weight.detach(), model.bias.detach(), 1e-3)
    _close(got[0], outr, 2e-2)
    if prenorm:
        assert got[1].dtype == F32  # residual_in_fp32
        _close(got[1], xr, 1e-3)

    model.eval()
    res = _rand(2, 8, N, dtype=F16, grad=False)
    out = model(x0, res)
    out = out[0] if prenorm else out
    xr = x0.detach().float() + res.float()
    if is_rms_norm:
        outr = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-3) * model.weight.detach()
    else:
        outr = F.layer_norm(xr, (N,), model.weight.detach(), model.bias.detach(), 1e-3)
    _close(out, outr, 2e-2)


def test_rms_norm_module() -> None:
    torch.manual_seed(9)
    model = RMSNorm(N, eps=1e-4, device=DEVICE)
    with torch.no_grad():
        model.weight.normal_()
    x = _rand(3, 7, N)
    out = model(x)
    xr, wr = _leaf(x), _leaf(model.weight)
    outr = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-4) * wr
    _close(out, outr, 1e-4)
    g = torch.randn_like(outr)
    (out * g).sum().backward()
    (outr * g).sum().backward()
    _grads_close([("x", x, xr), ("weight", model.weight, wr)], 1e-4)


# -------------------------------------------------------------------------------------------- contract


def test_dropout_mask_randomness() -> None:
    """flash-attn's randomness test: a fresh mask per call, the same one after re-seeding; masks are uint8
    keep-masks with roughly ``1 - p`` ones."""
    x0 = _rand(2, 8, N, grad=False)
    res = _rand(2, 8, N, grad=False)
    w, b = torch.ones(N, device=DEVICE), torch.zeros(N, device=DEVICE)
    torch.manual_seed(42)
    _, m0 = dropout_add_layer_norm(x0, res, w, b, 0.3, EPS, return_dropout_mask=True)
    _, m1 = dropout_add_layer_norm(x0, res, w, b, 0.3, EPS, return_dropout_mask=True)
    torch.manual_seed(42)
    _, m2 = dropout_add_layer_norm(x0, res, w, b, 0.3, EPS, return_dropout_mask=True)
    assert not torch.equal(m0, m1)
    assert torch.equal(m0, m2)
    assert set(m0.unique().tolist()) == {0, 1}
    assert 0.2 < 1 - m0.float().mean().item() < 0.4


def test_return_arity_of_autograd_functions() -> None:
    """The Functions' positional ``apply`` signatures and output tuples follow flash-attn."""
    x0 = _rand(4, N, grad=False)
    w, b = torch.ones(N, device=DEVICE), torch.zeros(N, device=DEVICE)
    for prenorm in (False, True):
        for dmask in (False, True):
            out = DropoutAddLayerNormFn.apply(
                x0, None, w, b, None, None, 0.1, EPS, False, prenorm, False, dmask
            )
            n_out = 1 + prenorm + dmask
            assert isinstance(out, torch.Tensor) if n_out == 1 else len(out) == n_out
            out = DropoutAddLayerNormSubsetFn.apply(
                x0, None, w, b, None, None, None, 0.1, EPS, 1.0, 0, False, prenorm, False, dmask
            )
            assert isinstance(out, torch.Tensor) if n_out == 1 else len(out) == n_out
            out = DropoutAddLayerNormParallelResidualFn.apply(
                x0, None, None, w, b, None, None, 0.1, EPS, False, prenorm, False, dmask
            )
            assert len(out) == 2 + prenorm + 2 * dmask and out[1] is None


def test_prenorm_returns_input_when_unchanged() -> None:
    """No residual, dropout, scale or dtype change: the pre-norm value is x0 itself, still differentiable."""
    x0 = _rand(4, N)
    w, b = _rand(N), _rand(N)
    out, x = dropout_add_layer_norm(x0, None, w, b, 0.0, EPS, prenorm=True)
    torch.testing.assert_close(x, x0, atol=0, rtol=0)
    (x * 3.0).sum().backward()
    assert bool((x0.grad == 3.0).all())
    assert bool((w.grad == 0).all()) and bool((b.grad == 0).all())


def test_bad_arguments() -> None:
    x0 = _rand(2, 4, N, grad=False)
    w = torch.ones(N, device=DEVICE)
    with pytest.raises(ValueError, match="layerscale|colscale"):
        dropout_add_layer_norm(x0, None, w, None, 0.0, EPS, layerscale=torch.ones(N + 1, device=DEVICE))
    with pytest.raises(ValueError, match="rowscale"):
        dropout_add_layer_norm(x0, None, w, None, 0.0, EPS, rowscale=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        dropout_add_rms_norm(x0, _rand(2, 5, N, grad=False), w, None, 0.0, EPS)
    with pytest.raises(ValueError, match="hidden size"):
        dropout_add_layer_norm(x0, None, torch.ones(N // 2, device=DEVICE), None, 0.0, EPS)
    with pytest.raises(ValueError, match="x0_subset"):
        dropout_add_layer_norm_subset(x0, None, w, None, 0.0, EPS, x0_subset=torch.ones(5, device=DEVICE))
    with pytest.raises(ValueError, match="x1"):
        dropout_add_layer_norm_parallel_residual(
            x0, _rand(3, N, grad=False), None, w, None, None, None, 0.0, EPS
        )


#: flash-attn 2.8.3's parameter lists (names and order)
_SUBSET = ["x0", "residual", "weight", "bias", "dropout_p", "epsilon", "layerscale", "x0_subset", "out_subset",
           "rowscale_const", "out_numrows", "prenorm", "residual_in_fp32", "return_dropout_mask"]  # fmt: skip
_PLAIN = ["x0", "residual", "weight", "bias", "dropout_p", "epsilon", "rowscale", "layerscale", "prenorm",
          "residual_in_fp32", "return_dropout_mask"]  # fmt: skip
_PARALLEL = ["x0", "x1", "residual", "weight0", "bias0", "weight1", "bias1", "dropout_p", "epsilon", "prenorm",
             "residual_in_fp32", "return_dropout_mask"]  # fmt: skip
_MODULE = ["self", "hidden_size", "prenorm", "p", "eps", "residual_in_fp32", "device", "dtype"]
SIGNATURES = {
    dropout_add_layer_norm: _PLAIN,
    dropout_add_rms_norm: _PLAIN,
    dropout_add_layer_norm_subset: _SUBSET,
    dropout_add_rms_norm_subset: _SUBSET,
    dropout_add_layer_norm_parallel_residual: _PARALLEL,
    dropout_add_rms_norm_parallel_residual: _PARALLEL,
    layer_norm: ["x", "weight", "bias", "epsilon"],
    rms_norm: ["x", "weight", "epsilon"],
    DropoutAddLayerNormFn.forward: ["ctx", "x0", "residual", "gamma", "beta", "rowscale", "colscale", "dropout_p",
                                    "epsilon", "residual_in_fp32", "prenorm", "is_rms_norm", "return_dmask"],
    DropoutAddLayerNormSubsetFn.forward: ["ctx", "x0", "residual", "gamma", "beta", "colscale", "x0_subset",
                                          "out_subset", "dropout_p", "epsilon", "rowscale_const", "out_numrows",
                                          "residual_in_fp32", "prenorm", "is_rms_norm", "return_dmask"],
    DropoutAddLayerNormParallelResidualFn.forward: ["ctx", "x0", "x1", "residual", "gamma0", "beta0", "gamma1",
                                                    "beta1", "dropout_p", "epsilon", "residual_in_fp32", "prenorm",
                                                    "is_rms_norm", "return_dmask"],
    DropoutAddLayerNorm.__init__: _MODULE,
    DropoutAddRMSNorm.__init__: _MODULE,
    RMSNorm.__init__: ["self", "hidden_size", "eps", "device", "dtype"],
    DropoutAddLayerNorm.forward: ["self", "x0", "residual"],
    DropoutAddRMSNorm.forward: ["self", "x0", "residual"],
    RMSNorm.forward: ["self", "x"],
}  # fmt: skip
DEFAULTS = {"rowscale": None, "layerscale": None, "x0_subset": None, "out_subset": None, "rowscale_const": 1.0,
            "out_numrows": 0, "prenorm": False, "residual_in_fp32": False, "return_dropout_mask": False,
            "return_dmask": False, "is_rms_norm": False, "p": 0.0, "eps": 1e-5, "residual": None}  # fmt: skip


@pytest.mark.parametrize("fn", list(SIGNATURES), ids=lambda f: f.__qualname__)
def test_signatures(fn) -> None:
    params = inspect.signature(fn).parameters
    assert list(params) == SIGNATURES[fn]
    for name, default in DEFAULTS.items():
        if name in params and params[name].default is not inspect.Parameter.empty:
            assert params[name].default == default, name
    if fn.__qualname__.endswith("Fn.forward"):
        return
    for name in ("rowscale", "layerscale", "prenorm", "return_dropout_mask", "rowscale_const", "eps"):
        if name in params:
            assert params[name].default is not inspect.Parameter.empty, name


def test_namespace_and_lazy_import() -> None:
    for mod in (ln, rn):
        for name in mod.__all__:
            assert getattr(mod, name) is not None
    assert rn.DropoutAddLayerNormFn is DropoutAddLayerNormFn
    assert issubclass(DropoutAddLayerNormSubsetFn, torch.autograd.Function)
    code = (
        "import sys, flash_attn; "
        "assert not any(m in sys.modules for m in ('flash_attn.ops.layer_norm', 'flash_attn.ops.rms_norm'))"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "FA_PLUS_SILENCE_CONFLICT": "1"}
    )
