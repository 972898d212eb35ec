"""Tests for flash_attn.losses.cross_entropy and flash_attn.ops.triton.cross_entropy (Triton; interpreter on
CPU). The ``gpu`` test runs flash-attn's own cases (vocab 50257 and 128256) on CUDA."""

import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fa_core.cross_entropy import override_block_sizes  # noqa: E402
from flash_attn.losses.cross_entropy import CrossEntropyLoss  # noqa: E402
from flash_attn.ops.triton.cross_entropy import cross_entropy_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_namespaces_and_signatures():
    import fa_core.cross_entropy as core
    import flash_attn.losses
    import flash_attn.ops.triton.cross_entropy as ops

    assert flash_attn.losses.__doc__
    assert ops.cross_entropy_loss is core.cross_entropy_loss
    assert ops.CrossEntropyLoss is core.CrossEntropyLossFunction
    assert issubclass(ops.CrossEntropyLoss, torch.autograd.Function)
    assert ops.cross_entropy_fwd_kernel is core.cross_entropy_fwd_kernel
    assert ops.cross_entropy_bwd_kernel is core.cross_entropy_bwd_kernel
    empty = inspect.Parameter.empty
    assert _params(cross_entropy_loss) == [
        ("logits", empty),
        ("labels", empty),
        ("precomputed_lse", None),
        ("label_smoothing", 0.0),
        ("logit_scale", 1.0),
        ("lse_square_scale", 0.0),
        ("ignore_index", -100),
        ("inplace_backward", False),
        ("process_group", None),
    ]
    assert [name for name, _ in _params(ops.CrossEntropyLoss.forward)] == [
        "ctx",
        "logits",
        "labels",
        "precomputed_lse",
        "smoothing",
        "logit_scale",
        "lse_square_scale",
        "ignore_index",
        "inplace_backward",
        "process_group",
    ]
    assert _params(CrossEntropyLoss.__init__)[1:] == [
        ("ignore_index", -100),
        ("reduction", "mean"),
        ("label_smoothing", 0.0),
        ("logit_scale", 1.0),
        ("lse_square_scale", 0.0),
        ("inplace_backward", False),
        ("process_group", None),
        ("return_z_loss", False),
    ]
    assert _params(CrossEntropyLoss.forward)[1:] == [
        ("input", empty),
        ("target", empty),
        ("precomputed_lse", None),
    ]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("return_z_loss", [False, True])
def test_module_reductions(reduction, return_z_loss):
    torch.manual_seed(0)
    smoothing, scale, z = 0.1, 0.8, 1e-2
    x = torch.randn(10, 300, device=DEVICE)
    y = torch.randint(0, 300, (10,), device=DEVICE)
    y[[2, 7]] = -100
    model = CrossEntropyLoss(
        reduction=reduction,
        label_smoothing=smoothing,
        logit_scale=scale,
        lse_square_scale=z,
        return_z_loss=return_z_loss,
    )
    xk = x.clone().requires_grad_()
    out = model(xk, y)
    loss, z_loss = out if return_z_loss else (out, None)

    x_pt = x.clone().requires_grad_()
    xs = x_pt * scale
    loss_pt = torch.nn.functional.cross_entropy(xs, y, label_smoothing=smoothing, reduction="none")
    z_pt = torch.where(y != -100, z * torch.logsumexp(xs, dim=-1).square(), 0.0)
    loss_pt = loss_pt + z_pt
    kept = (y != -100).sum()
    reduce = {"mean": lambda v: v.sum() / kept, "sum": lambda v: v.sum(), "none": lambda v: v}[reduction]
    loss_pt, z_pt = reduce(loss_pt), reduce(z_pt)
    assert loss.dtype == torch.float32 and loss.shape == loss_pt.shape
    torch.testing.assert_close(loss, loss_pt, rtol=1e-5, atol=1e-5)
    if return_z_loss:
        assert z_loss is not None and not z_loss.requires_grad
        torch.testing.assert_close(z_loss, z_pt, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(loss)
    loss.backward(g)
    loss_pt.backward(g)
    torch.testing.assert_close(xk.grad, x_pt.grad, rtol=1e-5, atol=1e-6)
    assert (xk.grad[y == -100] == 0).all()


def test_module_precomputed_lse_and_inplace_backward():
    torch.manual_seed(1)
    x = torch.randn(6, 50, device=DEVICE, dtype=torch.float16)
    y = torch.randint(0, 50, (6,), device=DEVICE)
    lse = torch.logsumexp(x.float(), dim=-1)
    xk = x.clone().requires_grad_()
    loss = CrossEntropyLoss(inplace_backward=True)(xk, y, precomputed_lse=lse)
    loss.backward()
    x_pt = x.clone().requires_grad_()
    loss_pt = torch.nn.functional.cross_entropy(x_pt.float(), y)
    loss_pt.backward()
    torch.testing.assert_close(loss, loss_pt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xk.grad, x_pt.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(xk.detach(), x_pt.grad, rtol=1e-3, atol=1e-4)  # the logits hold the gradient


def test_module_rejects_unknown_reduction():
    with pytest.raises(NotImplementedError):
        CrossEntropyLoss(reduction="batchmean")


# flash-attn's tests/losses/test_cross_entropy.py, trimmed to a cover of its options per vocab size and dtype.
# (label_smoothing, logit_scale, lse_square_scale, return_z_loss, inplace_backward, precompute_lse)
GPU_OPTIONS = [
    (0.0, 1.0, 0.0, False, False, False),
    (0.0, 1.0, 1e-2, True, True, True),
    (0.9, 1.0, 0.0, False, True, False),
    (0.0, 0.7, 1e-2, True, False, False),
    (0.9, 0.7, 1e-2, False, True, False),
    (0.0, 1.0, 0.0, True, False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("options", GPU_OPTIONS)
@pytest.mark.parametrize("vocab_size", [50257, 128256])
def test_gpu_flash_attn_cases(vocab_size, options, dtype):
    smoothing, logit_scale, lse_square_scale, return_z_loss, inplace_backward, precompute_lse = options
    device = "cuda"
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-3, 1e-4)
    torch.random.manual_seed(0)
    batch_size = 1 if dtype == torch.float32 else 4
    seqlen = 4096 if lse_square_scale == 0.0 and logit_scale == 1.0 else 1024
    x_pt = torch.randn(batch_size * seqlen, vocab_size, device=device, dtype=dtype, requires_grad=True)
    x = x_pt.detach().clone().requires_grad_()
    y = torch.randint(0, vocab_size, (batch_size * seqlen,), dtype=torch.long, device=device)
    y[torch.randperm(batch_size * seqlen)[:10]] = -100
    model_pt = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    model = CrossEntropyLoss(
        label_smoothing=smoothing,
        logit_scale=logit_scale,
        lse_square_scale=lse_square_scale,
        return_z_loss=return_z_loss,
        inplace_backward=inplace_backward,
    )
    lse = None
    if precompute_lse:
        with torch.no_grad():
            lse = torch.logsumexp(x.float(), dim=-1)
    if return_z_loss:
        out, out_z_loss = model(x, y, precomputed_lse=lse)
    else:
        out = model(x, y, precomputed_lse=lse)
    x_pt_scaled = (x_pt.float() * logit_scale) if logit_scale != 1.0 else x_pt.float()
    out_pt = model_pt(x_pt_scaled, y)
    if lse_square_scale > 0.0:
        lse_pt = torch.logsumexp(x_pt_scaled, dim=-1)
        z_loss_pt = lse_square_scale * (lse_pt[y != -100] ** 2).mean()
        if return_z_loss:
            assert torch.allclose(out_z_loss, z_loss_pt, rtol=rtol, atol=atol)
        out_pt += z_loss_pt
    assert torch.allclose(out, out_pt, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    out_pt.backward(g)
    out.backward(g)
    assert torch.allclose(x.grad, x_pt.grad, rtol=rtol, atol=atol)


def _compile_inputs(rows: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g) * 3).to(DEVICE)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[torch.randperm(rows, generator=g)[:2]] = -100
    return x, y.to(DEVICE)


def _module_losses(modules, xs, y):
    return [m(x, y) for m, x in zip(modules, xs)]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_module_reductions_and_dynamic_batch(backend):
    torch._dynamo.reset()
    kw = {"label_smoothing": 0.1, "logit_scale": 0.8, "lse_square_scale": 1e-2, "return_z_loss": True}
    modules = [CrossEntropyLoss(reduction=r, **kw) for r in ("mean", "sum", "none")]
    compiled = torch.compile(_module_losses, backend=backend, fullgraph=True, dynamic=True)
    for rows in (8, 5):  # a second batch size reuses the dynamic graph
        x, y = _compile_inputs(rows, 100, seed=rows)
        results = []
        for fn in (_module_losses, compiled):
            xs = [x.clone().requires_grad_() for _ in modules]
            with override_block_sizes(32, 16):
                out = fn(modules, xs, y)
            torch.autograd.backward([loss.sum() for loss, _ in out])
            results.append([(loss.detach(), z, xk.grad) for (loss, z), xk in zip(out, xs)])
        for reduction, e, c in zip(("mean", "sum", "none"), *results):
            assert c[0].shape == (() if reduction != "none" else (rows,))
            for a, b in zip(c, e):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
