"""fa_core.layer_norm under torch.compile (fullgraph=True, aot_eager and inductor): compiled outputs, dropout
masks and gradients equal eager ones, a second row count reuses the graph, and ``torch.library.opcheck`` holds
for the ``fa_core::norm_fwd`` / ``fa_core::norm_bwd`` ops.

Inductor draws ``torch.randint`` from its own generator; with ``fallback_random`` it uses eager's, so the
dropout seeds (and masks) of a compiled call equal those of an eager call after the same ``manual_seed``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch._dynamo.testing  # noqa: E402
import torch._inductor.config  # noqa: E402

import fa_core.layer_norm_ops  # noqa: E402, F401  (registers the ops)
from fa_core.layer_norm import layer_norm_fn, layer_norm_linear_fn, layer_norm_ref, rms_norm_fn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 40


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _leaves(rows: int, *, residual: bool, x1: bool, weight1: bool, bias: bool) -> dict[str, Any]:
    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEVICE, requires_grad=True)

    return {
        "x": t(rows, 3, N),
        "weight": t(N),
        "bias": t(N) if bias else None,
        "residual": t(rows, 3, N) if residual else None,
        "x1": t(rows, 3, N) if x1 else None,
        "weight1": t(N) if weight1 else None,
        "bias1": t(N) if weight1 and bias else None,
    }


def _run(fn: Callable[..., Any], leaves: dict[str, Any], seed: int) -> tuple[list[Any], list[torch.Tensor]]:
    """Outputs of ``fn(**leaves)`` and the gradients of a weighted sum of its float outputs."""
    torch.manual_seed(seed)
    outs = fn(**leaves)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    diff = [o for o in outs if o is not None and o.requires_grad]
    loss = sum(
        (o.float() * torch.linspace(-1, 1, o.numel(), device=DEVICE).view(o.shape)).sum() for o in diff
    )
    inputs = [v for v in leaves.values() if v is not None]
    return outs, list(torch.autograd.grad(loss, inputs))


def _assert_same(
    got: tuple[list[Any], list[torch.Tensor]], want: tuple[list[Any], list[torch.Tensor]]
) -> None:
    assert len(got[0]) == len(want[0])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        if b.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _layer_norm_everything(**kw: Any) -> Any:
    return layer_norm_fn(
        **kw, eps=1e-5, dropout_p=0.2, prenorm=True, residual_in_fp32=True, return_dropout_mask=True
    )


def _rms_norm_residual(**kw: Any) -> Any:
    return rms_norm_fn(**kw, prenorm=True, zero_centered_weight=True, out_dtype=torch.float16)


def _rms_norm_rowscale(**kw: Any) -> Any:
    rowscale = kw["x"][..., 0].detach().sigmoid() + 0.5
    return rms_norm_fn(**kw, rowscale=rowscale, dropout_p=0.3, return_dropout_mask=True)


def _layer_norm_prenorm_only(**kw: Any) -> Any:
    return layer_norm_fn(**kw, prenorm=True)


# (function, leaves' options): layer norm with residual, x1, weight1, dropout and masks; rms norm with
# residual + prenorm; rms norm with rowscale + dropout and a lone mask (the second is None); layer norm with
# nothing to add (the residual output is x itself)
CASES = {
    "ln_res_x1_w1_dropout": (_layer_norm_everything, {"residual": True, "x1": True, "weight1": True}),
    "rms_res_prenorm": (_rms_norm_residual, {"residual": True, "x1": False, "weight1": False}),
    "rms_rowscale_dropout": (_rms_norm_rowscale, {"residual": False, "x1": False, "weight1": True}),
    "ln_prenorm_only": (_layer_norm_prenorm_only, {"residual": False, "x1": False, "weight1": False}),
}


def _check_case(name: str, backend: str, rows: tuple[int, ...]) -> None:
    fn, opts = CASES[name]
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for i, m in enumerate(rows):
        torch.manual_seed(100 + i)
        leaves = _leaves(m, bias=not name.startswith("rms"), **opts)
        _assert_same(_run(compiled, leaves, seed=i), _run(fn, leaves, seed=i))
        frames.append(counter.frame_count)
    assert frames[1:] == frames[:1] * (len(rows) - 1)  # the later row counts ran the first graph


@pytest.mark.parametrize("name", list(CASES))
def test_aot_eager_matches_eager(name: str) -> None:
    """Forward, masks and gradients under aot_eager equal eager; a second row count reuses the graph."""
    _check_case(name, "aot_eager", (2, 5))


@pytest.mark.parametrize("name", ["ln_res_x1_w1_dropout", "rms_res_prenorm"])
def test_inductor_matches_eager(name: str) -> None:
    """The same under inductor (eager's random generator for the dropout seeds)."""
    with torch._inductor.config.patch(fallback_random=True):
        _check_case(name, "inductor", (2, 5))


def test_inductor_random_matches_reference() -> None:
    """With inductor's own generator the seeds differ from eager's; outputs and gradients still follow the
    reference applied with the returned masks."""
    leaves = _leaves(4, residual=True, x1=True, weight1=False, bias=True)
    kw = {"dropout_p": 0.3, "prenorm": True}
    compiled = torch.compile(layer_norm_fn, backend="inductor", fullgraph=True)
    torch.manual_seed(0)
    out, res, mask, mask1 = compiled(**leaves, **kw, return_dropout_mask=True)
    assert 0 < int(mask.sum()) < mask.numel() and not torch.equal(mask, mask1)
    ref_leaves = {
        k: v.detach().clone().requires_grad_() if v is not None else None for k, v in leaves.items()
    }
    ref = layer_norm_ref(**ref_leaves, **kw, dropout_mask=mask, dropout_mask1=mask1, upcast=True)
    for got, want in zip((out, res), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out)
    inputs = [v for v in leaves.values() if v is not None]
    ref_inputs = [v for v in ref_leaves.values() if v is not None]
    grads = torch.autograd.grad((out * g).sum() + res.sum(), inputs)
    ref_grads = torch.autograd.grad((ref[0] * g).sum() + ref[1].sum(), ref_inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_graph_holds_the_ops() -> None:
    """The traced graph holds one opaque node per launch (no Triton code is traced)."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    leaves = _leaves(2, residual=True, x1=False, weight1=False, bias=True)
    compiled = torch.compile(_rms_norm_residual, backend=backend, fullgraph=True)
    _run(compiled, leaves, seed=0)
    text = "\n".join(str(g.graph) for g in graphs) + "\n".join(
        str(n.target) for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
    )  # fmt: skip
    assert "fa_core.norm_fwd" in text and "fa_core.norm_bwd" in text
    assert "triton" not in text.lower()


def test_buffers_under_compile() -> None:
    """Caller-given ``out`` / ``residual_out`` buffers receive the outputs (in place in eager)."""
    leaves = _leaves(2, residual=True, x1=False, weight1=False, bias=True)
    x = leaves["x"]

    def fn(out: torch.Tensor, residual_out: torch.Tensor) -> Any:
        return layer_norm_fn(**leaves, prenorm=True, out=out, residual_out=residual_out)

    bufs = [torch.empty_like(x.detach()) for _ in range(2)]
    eager = fn(*bufs)
    assert all(o.data_ptr() == b.data_ptr() for o, b in zip(eager, bufs))
    cbufs = [torch.full_like(b, float("nan")) for b in bufs]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(*cbufs)
    for o, b, want in zip(compiled, cbufs, eager):
        torch.testing.assert_close(o, want)
        torch.testing.assert_close(b, want.detach())


def test_layer_norm_linear_compiles() -> None:
    """``layer_norm_linear_fn`` (prenorm, residual) under aot_eager equals eager."""
    torch.manual_seed(0)
    leaves = {
        "x": torch.randn(4, N, device=DEVICE, requires_grad=True),
        "norm_weight": torch.randn(N, device=DEVICE, requires_grad=True),
        "norm_bias": torch.randn(N, device=DEVICE, requires_grad=True),
        "linear_weight": torch.randn(24, N, device=DEVICE, requires_grad=True),
        "linear_bias": torch.randn(24, device=DEVICE, requires_grad=True),
        "residual": torch.randn(4, N, device=DEVICE, requires_grad=True),
    }

    def fn(**kw: Any) -> Any:
        return layer_norm_linear_fn(**kw, prenorm=True, is_rms_norm=False)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    _assert_same(_run(compiled, leaves, seed=0), _run(fn, leaves, seed=0))


# ------------------------------------------------------------------------------------------------ opcheck

# The ops have no autograd formula by design (LayerNormFn / LayerNormLinearFn are the differentiable layer
# that calls them): these checks run on inputs that do not require grad, and test_autograd_registration runs
# apart (test_ops_refuse_backward), on an input that does.
_OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _fwd_args(m: int, n: int, *, full: bool) -> tuple[Any, ...]:
    """Arguments of ``fa_core::norm_fwd``: RMSNorm on rows with a row stride of ``2 * n`` and nothing else
    (the residual output not stored), or LayerNorm with every option in fp16 / fp32."""
    w = torch.randn(n, device=DEVICE)
    if not full:
        x = torch.randn(m, 2 * n, device=DEVICE, dtype=torch.float16)[:, :n]
        none7 = (None,) * 7
        return (x, w, *none7, 1e-6, 0.0, torch.float16, None, False, True, False)
    x = torch.randn(m, n, device=DEVICE, dtype=torch.float16)
    seeds = torch.randint(0, 2**62, (2 * m,), device=DEVICE, dtype=torch.int64)
    return (
        x, w, torch.randn(n, device=DEVICE), torch.randn(m, n, device=DEVICE), torch.randn_like(x),
        torch.randn_like(w), torch.randn_like(w), None, seeds, 1e-5, 0.25, torch.float32, torch.float32, True,
        False, True,
    )  # fmt: skip


@pytest.mark.parametrize("full", [False, True])
def test_opcheck_norm_fwd(full: bool) -> None:
    torch.library.opcheck(
        torch.ops.fa_core.norm_fwd.default, _fwd_args(6, 24, full=full), test_utils=_OPCHECK_TESTS
    )


@pytest.mark.parametrize("full", [False, True])
def test_opcheck_norm_bwd(full: bool) -> None:
    args = _fwd_args(6, 24, full=full)
    x, w, b, _, _, w1, b1, rowscale, seeds, _, p, _, _, zc, rms, _ = args
    _, _, mean, rstd, res_out, *_ = torch.ops.fa_core.norm_fwd(*args)
    saved = res_out if res_out is not None else x
    # the gradient of a sum: a 0-strided expansion (the op copies it to rows with a unit last stride)
    dy = torch.randn(6, 24, device=DEVICE) if full else torch.randn((), device=DEVICE).expand(6, 24)
    dy1 = torch.randn_like(dy) if full else None
    dres = torch.randn_like(saved) if full else None
    bwd_args = (
        dy, saved, w, b, mean, rstd, dres, dy1, w1, b1, rowscale, seeds, p, full, full, zc, rms, x.dtype,
        False,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.fa_core.norm_bwd.default, bwd_args, test_utils=_OPCHECK_TESTS)
    if not full:  # a single weight: the recomputed output as well
        recompute = (*bwd_args[:-1], True)
        torch.library.opcheck(torch.ops.fa_core.norm_bwd.default, recompute, test_utils=_OPCHECK_TESTS)


def test_ops_refuse_backward() -> None:
    """The ops' autograd kernel (torch.library's default) raises instead of returning gradients that would be
    silently wrong; opcheck's autograd-registration test accepts it."""
    args = list(_fwd_args(6, 24, full=True))
    args[0] = args[0].requires_grad_()
    op = torch.ops.fa_core.norm_fwd.default
    torch.library.opcheck(op, tuple(args), test_utils="test_autograd_registration")
    y = op(*args)[0]
    with pytest.raises(RuntimeError, match="no autograd formula"):
        y.sum().backward()
