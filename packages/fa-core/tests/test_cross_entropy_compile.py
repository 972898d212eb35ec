"""The cross-entropy loss under torch.compile (fullgraph, aot_eager and inductor): compiled and eager losses,
z-losses and gradients agree exactly (the same kernels run, through the ``fa_core::cross_entropy_*`` custom
ops), for every option, each reduction of the nn.Module and a second batch size; opcheck on the ops. On CPU
the kernels run in Triton's interpreter, which the tracer must never enter.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402

import fa_core.cross_entropy as ce  # noqa: E402
from fa_core.cross_entropy import CrossEntropyLossFunction, cross_entropy_loss, override_block_sizes  # noqa: E402
from fa_core.errors import FlashAttnValueError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["aot_eager", "inductor"]
# (vocab, dtype, forward block, backward block): several column blocks per row
SHAPES = [(100, torch.float32, 32, 16), (1000, torch.bfloat16, 128, 256)]
# keyword arguments of cross_entropy_loss, one call each inside one compiled function; "lse" passes the
# rows' logsumexp as precomputed_lse
CASES = [
    {},
    {"label_smoothing": 0.2},
    {"logit_scale": 0.7, "lse_square_scale": 1e-2},
    {"label_smoothing": 0.1, "logit_scale": 0.8, "lse_square_scale": 1e-2, "ignore_index": 3},
    {"lse": True, "lse_square_scale": 1e-2},
    {"inplace_backward": True, "label_smoothing": 0.3, "lse_square_scale": 1e-2},
]


def _inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g) * 3).to(DEVICE, dtype)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[torch.randperm(rows, generator=g)[:2]] = -100
    y[-1] = 3  # a row that ignore_index=3 drops
    return x, y.to(DEVICE)


def _all_cases(xs, y, lse):
    out = []
    for x, case in zip(xs, CASES):
        kw = {k: v for k, v in case.items() if k != "lse"}
        out.append(cross_entropy_loss(x, y, precomputed_lse=lse if case.get("lse") else None, **kw))
    return out


def _run_cases(fn, x, y, blocks):
    """Losses, z-losses, gradients and the logits after the backward, per case."""
    xs = [x.clone().requires_grad_() for _ in CASES]
    lse = torch.logsumexp(x.float(), dim=-1)
    with override_block_sizes(*blocks):
        out = fn(xs, y, lse)
    g = torch.randn(y.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.autograd.backward([loss for loss, _ in out], [g] * len(out))
    return [(loss.detach(), z, xk.grad, xk.detach()) for (loss, z), xk in zip(out, xs)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab, dtype, fwd_block, bwd_block", SHAPES)
def test_options_match_eager(backend, vocab, dtype, fwd_block, bwd_block):
    torch._dynamo.reset()
    x, y = _inputs(8, vocab, dtype)
    blocks = (fwd_block, bwd_block)
    eager = _run_cases(_all_cases, x, y, blocks)
    compiled = _run_cases(torch.compile(_all_cases, backend=backend, fullgraph=True), x, y, blocks)
    for case, e, c in zip(CASES, eager, compiled):
        for name, a, b in zip(("loss", "z_loss", "grad", "logits after backward"), c, e):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name, k=case: f"{k} {n}: {m}")
    inplace = CASES.index({"inplace_backward": True, "label_smoothing": 0.3, "lse_square_scale": 1e-2})
    # in place, the logits hold their gradient; otherwise they are left alone
    torch.testing.assert_close(compiled[inplace][3], compiled[inplace][2], rtol=0, atol=0)
    assert torch.equal(compiled[0][3], x)
    ignored = y == 3
    assert not compiled[3][0][ignored].any() and not compiled[3][2][ignored].any()


def test_graph_holds_the_custom_ops():
    """The traced forward and backward call the ops (one node per launch); no Triton launch is traced."""
    graphs = []

    def record(gm, _):
        # the op itself, or the first argument of the functionalization wrapper of a mutating op
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        graphs.append({str(n.target) for n in calls} | {str(n.args[0]) for n in calls if n.args})
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    x, y = _inputs(6, 100, torch.float32)
    for inplace in (False, True):
        graphs.clear()
        fn = torch.compile(
            lambda a, t, i=inplace: cross_entropy_loss(a, t, inplace_backward=i)[0].sum(),
            backend=backend,
            fullgraph=True,
        )
        fn(x.clone().requires_grad_(), y).backward()
        fwd, bwd = graphs
        assert "fa_core.cross_entropy_fwd.default" in fwd
        assert any("cross_entropy_bwd_inplace" in t for t in bwd) == inplace
        assert ("fa_core.cross_entropy_bwd.default" in bwd) != inplace


# The ops carry no autograd formula (CrossEntropyLossFunction is the autograd layer), so opcheck's
# test_autograd_registration does not apply.
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("precomputed", [False, True])
def test_opcheck(precomputed):
    x, y = _inputs(5, 100, torch.float32)
    lse = torch.logsumexp(x, dim=-1)
    # scalars: smoothing, logit_scale, lse_square_scale, ignore_index, total_classes, class_start_idx
    scalars = (0.0, 1.0, 1e-2, -100, 100, 0) if precomputed else (0.2, 0.7, 1e-2, -100, 100, 0)
    fwd_args = (x, y, lse if precomputed else None, *scalars, False, 32)
    torch.library.opcheck(torch.ops.fa_core.cross_entropy_fwd.default, fwd_args, test_utils=OPCHECK_UTILS)
    dloss = torch.randn(5).to(DEVICE)
    if precomputed:
        dloss = dloss[:1].expand(5)  # a stride-0 incoming gradient
    bwd_tail = (lse, y, *scalars, 16)
    for logits in (x, x.t().contiguous().t()):  # unit column stride, and a column-strided view
        torch.library.opcheck(
            torch.ops.fa_core.cross_entropy_bwd.default, (dloss, logits, *bwd_tail), test_utils=OPCHECK_UTILS
        )
        torch.library.opcheck(
            torch.ops.fa_core.cross_entropy_bwd_inplace.default,
            (dloss, logits.clone(), *bwd_tail),
            test_utils=OPCHECK_UTILS,
        )
    expected = torch.ops.fa_core.cross_entropy_bwd(dloss, x, *bwd_tail)
    inplace = x.clone()
    torch.ops.fa_core.cross_entropy_bwd_inplace(dloss, inplace, *bwd_tail)
    torch.testing.assert_close(inplace, expected, rtol=0, atol=0)


def test_tensor_parallel_is_a_graph_break(monkeypatch):
    """With a process group the loss runs eagerly (a graph break; fullgraph=True reports it), and a traced
    CrossEntropyLossFunction over several ranks raises."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    torch._dynamo.reset()
    x, y = _inputs(4, 100, torch.float32)
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
        try:
            group = dist.group.WORLD

            def fn(a, t):
                return cross_entropy_loss(a, t, label_smoothing=0.1, process_group=group)[0] * 2.0

            expected = fn(x, y)
            torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(x, y), expected)
            torch._dynamo.reset()
            with pytest.raises(torch._dynamo.exc.Unsupported, match="eagerly only"):
                torch.compile(fn, backend="aot_eager", fullgraph=True)(x, y)
            monkeypatch.setattr(ce.dist, "get_world_size", lambda group=None: 2)
            torch._dynamo.reset()
            args = (None, 0.0, 1.0, 0.0, -100, False, group)
            with pytest.raises((FlashAttnValueError, torch._dynamo.exc.Unsupported), match="eagerly only"):
                torch.compile(
                    lambda a, t: CrossEntropyLossFunction.apply(a, t, *args)[0],
                    backend="aot_eager",
                    fullgraph=True,
                )(x.clone().requires_grad_(), y)
        finally:
            dist.destroy_process_group()
