"""Tests for flash_attn.ops.fused_dense and the tensor-parallel modules ParallelMLP / ParallelGatedMlp
(flash_attn.modules.mlp) and ParallelMHA (flash_attn.modules.mha); Triton attention through the interpreter
on CPU.

Single process: FusedDense / FusedMLP against nn.Linear / Mlp with the same weights (forward and every
gradient, return_residual, checkpoint_lvl, autocast), what each checkpoint_lvl keeps for the backward, the
parallel classes without a process group against their plain counterparts, argument errors and flash-attn's
signatures. Distributed: every parallel class in spawned gloo groups of one and two ranks (CPU), each rank's
module holding its shard of a full single-process module built from the same seed; outputs and gradients
compared with and without sequence parallelism (float64 for the dense layers and MLPs, float32 for attention).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ast  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
from functools import partial  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fa_compat_dist import spawn_gloo  # noqa: E402
from fa_compat_testutils import DEVICE, HAS_BACKWARD  # noqa: E402
from torch import nn  # noqa: E402

from flash_attn.modules.mha import MHA, ParallelMHA  # noqa: E402
from flash_attn.modules.mlp import (  # noqa: E402
    GatedMlp,
    Mlp,
    ParallelGatedMlp,
    ParallelMLP,
)
from flash_attn.ops.activations import sqrelu_fwd  # noqa: E402
from flash_attn.ops.fused_dense import (  # noqa: E402
    ColumnParallelLinear,
    FusedDense,
    FusedDenseFunc,
    FusedMLP,
    FusedMLPFunc,
    ParallelFusedMLP,
    RowParallelLinear,
    fused_dense_func,
    fused_mlp_func,
)
from flash_attn.utils.distributed import get_dim_for_local_rank  # noqa: E402
from flash_attn.utils.generation import InferenceParams  # noqa: E402

F64 = torch.float64


def _sqrelu(x):
    return F.relu(x).square()


#: the plain-PyTorch activation of each FusedMLP activation name (in the input's precision)
ACTIVATION_FNS = {"gelu_approx": partial(F.gelu, approximate="tanh"), "relu": F.relu, "sqrelu": _sqrelu}


def _close(a, b, tol=1e-10, msg=""):
    """assert_close with the absolute tolerance scaled by b's largest magnitude (sums over tokens)."""
    scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a.detach(), b.detach(), atol=tol * scale, rtol=tol, msg=msg or None)


def _copy_(dst, src):
    with torch.no_grad():
        dst.copy_(src)


def _grads(module):
    return {name: p.grad for name, p in module.named_parameters()}


def _close_with_grads(out, out_ref, x, x_ref, model, ref):
    """``model``'s output ``out`` of ``x`` is ``ref``'s ``out_ref`` of ``x_ref``, and after the backward of one
    output gradient through both, so are the input gradients and every parameter's gradient."""
    _close(out, out_ref)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    _close(x.grad, x_ref.grad)
    for name, grad in _grads(model).items():
        _close(grad, _grads(ref)[name], msg=name)


# ================================================================================ single process
@pytest.mark.parametrize("return_residual", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
def test_fused_dense_matches_linear(has_bias, return_residual):
    torch.manual_seed(0)
    ref = nn.Linear(12, 20, bias=has_bias, dtype=F64)
    model = FusedDense(12, 20, bias=has_bias, return_residual=return_residual, dtype=F64)
    assert model.weight.shape == (20, 12) and (model.bias is not None) == has_bias
    model.load_state_dict(ref.state_dict())
    x_ref = torch.randn(3, 5, 12, dtype=F64, requires_grad=True)
    x = x_ref.detach().clone().requires_grad_()
    out_ref = ref(x_ref)
    if return_residual:  # some function of the residual, as flash-attn's test
        out, res = model(x)
        assert res is x or torch.equal(res, x)
        out_ref, out = out_ref + F.gelu(F.pad(x_ref, (0, 8))), out + F.gelu(F.pad(res, (0, 8)))
    else:
        out = model(x)
    _close_with_grads(out, out_ref, x, x_ref, model, ref)


def test_fused_dense_func_paths():
    """fused_dense_func without a group is F.linear; FusedDenseFunc (the group path) gives the same numbers,
    also for a frozen weight with a trainable bias."""
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    w = torch.randn(5, 6, dtype=F64, requires_grad=True)
    b = torch.randn(5, dtype=F64, requires_grad=True)
    _close(fused_dense_func(x, w, b), F.linear(x, w, b))
    out, res = fused_dense_func(x, w, return_residual=True)
    assert res is x
    _close(out, x @ w.t())
    assert torch.autograd.gradcheck(lambda *t: FusedDenseFunc.apply(*t, True, None, True), (x, w, b))
    w.requires_grad_(False)
    FusedDenseFunc.apply(x, w, b, False, None, True).backward(torch.ones(4, 5, dtype=F64))
    _close(b.grad, torch.full((5,), 4.0, dtype=F64))
    assert w.grad is None


@pytest.mark.parametrize("return_residual", [False, True])
@pytest.mark.parametrize("checkpoint_lvl", [0, 1, 2])
@pytest.mark.parametrize("activation", ["gelu_approx", "relu", "sqrelu"])
def test_fused_mlp_matches_mlp(activation, checkpoint_lvl, return_residual):
    torch.manual_seed(2)
    has_bias1, has_bias2 = checkpoint_lvl != 1, checkpoint_lvl != 2
    ref = Mlp(8, 24, 6, activation=ACTIVATION_FNS[activation], bias1=has_bias1, bias2=has_bias2, dtype=F64)
    model = FusedMLP(
        8, 24, 6, bias1=has_bias1, bias2=has_bias2, activation=activation, return_residual=return_residual,
        checkpoint_lvl=checkpoint_lvl, heuristic=-1 if checkpoint_lvl else "auto", dtype=F64,
    )  # fmt: skip
    assert model.heuristic == (-1 if activation == "sqrelu" or checkpoint_lvl else "auto")
    model.load_state_dict(ref.state_dict())
    x_ref = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    x = x_ref.detach().clone().requires_grad_()
    out_ref = ref(x_ref)
    if return_residual:
        out, res = model(x)
        out_ref, out = out_ref + F.gelu(x_ref[..., :6]), out + F.gelu(res[..., :6])
    else:
        out = model(x)
    _close_with_grads(out, out_ref, x, x_ref, model, ref)
    model.eval()  # save_pre_act=False: nothing kept, same numbers
    with torch.no_grad():
        out_eval = model(x)
    _close(out_eval[0] if return_residual else out_eval, ref(x).detach())


def _saved_hidden_tensors(model, x):
    """How many tensors of the hidden width the forward keeps for the backward."""
    hidden = model.fc1.weight.shape[0]
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(1 for s in shapes if len(s) > 1 and s[-1] == hidden and s != tuple(model.fc2.weight.shape))


@pytest.mark.parametrize("activation", ["gelu_approx", "relu"])
def test_fused_mlp_checkpoint_lvl_keeps_less(activation):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, requires_grad=True)
    kept = []
    for lvl in (0, 1, 2):
        kept.append(_saved_hidden_tensors(FusedMLP(8, 32, activation=activation, checkpoint_lvl=lvl), x))
    assert kept == [2, 1, 0]  # pre-activation + activation output / pre-activation / nothing
    assert _saved_hidden_tensors(FusedMLP(8, 32, activation=activation).eval(), x) == 0  # save_pre_act=False


def test_fused_mlp_func_arguments():
    x, w1, w2 = torch.randn(3, 4), torch.randn(8, 4), torch.randn(4, 8)
    want = F.linear(sqrelu_fwd(F.linear(x, w1)), w2)
    _close(fused_mlp_func(x, w1, w2, activation="sqrelu", heuristic=-1), want, tol=1e-5)
    _close(fused_mlp_func(x, w1, w2, activation="sqrelu", save_pre_act=False, heuristic=4), want, tol=1e-5)
    for kwargs in (
        {"activation": "gelu"},
        {"checkpoint_lvl": 3},
        {"heuristic": 5},
        {"heuristic": "auto"},
    ):
        with pytest.raises(ValueError):
            fused_mlp_func(x, w1, w2, **kwargs)
    with pytest.raises(ValueError):
        FusedMLP(4, activation="silu")
    with pytest.raises(ValueError):
        ParallelFusedMLP(4, checkpoint_lvl=-1)
    with pytest.raises(ValueError, match="multiple of"):
        ColumnParallelLinear(4, 10, None, multiple_of=4)
    with pytest.raises(ValueError, match="multiple of"):
        RowParallelLinear(10, 4, None, multiple_of=3)


def test_autocast_cpu_bf16():
    """Under CPU autocast (bf16 matmuls in PyTorch, no Triton) the outputs are bf16, the gradients keep the
    parameters' dtype, and the numbers are close to float32's."""
    torch.manual_seed(4)
    mlp, dense = FusedMLP(16, 32), FusedDense(16, 8)
    x = torch.randn(4, 16)
    want_mlp, want_dense = mlp(x).detach(), dense(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_mlp = mlp(x)
        out_dense = FusedDenseFunc.apply(x, dense.weight, dense.bias, False, None, True)
    assert out_mlp.dtype == out_dense.dtype == torch.bfloat16
    _close(out_mlp.float(), want_mlp, tol=3e-2)
    _close(out_dense.float(), want_dense, tol=3e-2)
    (out_mlp.float().sum() + out_dense.float().sum()).backward()
    assert mlp.fc1.weight.grad.dtype == dense.weight.grad.dtype == torch.float32
    ref = FusedMLP(16, 32)
    ref.load_state_dict(mlp.state_dict())
    ref(x).sum().backward()
    _close(mlp.fc1.weight.grad, ref.fc1.weight.grad, tol=5e-2)


def test_parallel_classes_without_group_are_the_plain_ones():
    """process_group=None: one process, the full layers, the plain counterparts' numbers."""
    torch.manual_seed(5)
    col = ColumnParallelLinear(6, 10, None, multiple_of=5)
    row = RowParallelLinear(10, 6, None, multiple_of=5)
    assert col.weight.shape == (10, 6) and row.weight.shape == (6, 10) and row.bias is not None
    x = torch.randn(3, 6)
    _close(row(col(x)), F.linear(F.linear(x, col.weight, col.bias), row.weight, row.bias), tol=1e-6)

    pairs = [
        (Mlp(8, 16), ParallelMLP(8, 16)),
        (GatedMlp(8, 12, multiple_of=4), ParallelGatedMlp(8, None, 12, multiple_of=4)),
        (GatedMlp(8, 12, activation=F.silu, multiple_of=4), ParallelGatedMlp(8, None, 12, activation=F.silu, multiple_of=4)),
        (FusedMLP(8, 16, activation="relu"), ParallelFusedMLP(8, 16, activation="relu")),
        (
            MHA(32, 4, num_heads_kv=2, rotary_emb_dim=8, causal=True),
            ParallelMHA(32, 4, None, num_heads_kv=2, rotary_emb_dim=8, causal=True),
        ),
    ]  # fmt: skip
    x = torch.randn(2, 5, 8)
    for plain, par in pairs:
        par.load_state_dict(plain.state_dict())  # strict: the same parameter names and shapes
        inp = torch.randn(2, 5, 32) if isinstance(plain, MHA) else x
        _close(par(inp), plain(inp), tol=1e-6, msg=type(par).__name__)
    mha = pairs[-1][1]
    assert (mha.world_size, mha.local_rank, mha.num_heads_per_rank, mha.num_heads_kv_per_rank) == (1, 0, 4, 2)
    assert mha.allocate_inference_cache(3, 7).shape == (3, 7, 2, 2, 8)


def test_parallel_mha_constructor_errors():
    with pytest.raises(ValueError, match="use_flash_attn"):
        ParallelMHA(32, 4, None, use_alibi=True)
    with pytest.raises(ValueError, match="use_flash_attn"):
        ParallelMHA(32, 4, None, window_size=(2, 0))
    with pytest.raises(ValueError, match="num_heads_kv"):
        ParallelMHA(32, 4, None, num_heads_kv=3)
    with pytest.raises(ValueError, match="divisible"):
        ParallelMHA(30, 4, None)
    with pytest.raises(ValueError, match="layer_idx"):
        ParallelMHA(32, 4, None)(torch.randn(1, 2, 32), inference_params=InferenceParams(4, 1))


# flash-attn 2.8.3's parameter lists (v2.8.3 source, annotations left out)
_PARALLEL_LINEAR_INIT = (
    "self, in_features, out_features, process_group, bias=True, sequence_parallel=True, multiple_of=1, "
    "device=None, dtype=None"
)
UPSTREAM_SIGNATURES = [
    (FusedDenseFunc.forward, "ctx, x, weight, bias, return_residual=False, process_group=None, sequence_parallel=True"),
    (fused_dense_func, "x, weight, bias=None, return_residual=False, process_group=None, sequence_parallel=True"),
    (FusedDense.__init__, "self, in_features, out_features, bias=True, return_residual=False, device=None, dtype=None"),
    (ColumnParallelLinear.__init__, _PARALLEL_LINEAR_INIT),
    (RowParallelLinear.__init__, _PARALLEL_LINEAR_INIT),
    (FusedMLPFunc.forward,
     "ctx, x, weight1, bias1, weight2, bias2, activation='gelu_approx', save_pre_act=True, return_residual=False, "
     "checkpoint_lvl=0, heuristic=0, process_group=None, sequence_parallel=True"),
    (fused_mlp_func,
     "x, weight1, weight2, bias1=None, bias2=None, activation='gelu_approx', save_pre_act=True, "
     "return_residual=False, checkpoint_lvl=0, heuristic=0, process_group=None, sequence_parallel=True"),
    (FusedMLP.__init__,
     "self, in_features, hidden_features=None, out_features=None, bias1=True, bias2=True, activation='gelu_approx', "
     "return_residual=False, checkpoint_lvl=0, heuristic='auto', device=None, dtype=None"),
    (ParallelFusedMLP.__init__,
     "self, in_features, hidden_features=None, out_features=None, activation='gelu_approx', process_group=None, "
     "bias1=True, bias2=True, sequence_parallel=True, checkpoint_lvl=0, heuristic='auto', device=None, dtype=None"),
    (ParallelMLP.__init__,
     "self, in_features, hidden_features=None, out_features=None, activation=F.gelu, process_group=None, "
     "sequence_parallel=True, bias1=True, bias2=True, device=None, dtype=None"),
    (ParallelGatedMlp.__init__,
     "self, in_features, process_group, hidden_features=None, out_features=None, activation=F.sigmoid, "
     "bias1=True, bias2=True, multiple_of=128, sequence_parallel=True, device=None, dtype=None"),
    (ParallelMHA.__init__,
     "self, embed_dim, num_heads, process_group, num_heads_kv=None, qkv_proj_bias=True, out_proj_bias=True, "
     "dropout=0.0, softmax_scale=None, causal=False, layer_idx=None, rotary_emb_dim=0, rotary_emb_base=10000.0, "
     "rotary_emb_scale_base=None, rotary_emb_interleaved=False, use_alibi=False, window_size=(-1, -1), "
     "use_flash_attn=False, checkpointing=False, sequence_parallel=True, device=None, dtype=None"),
    (ParallelMHA.allocate_inference_cache, "self, batch_size, max_seqlen, dtype=None"),
    (ParallelMHA.forward, "self, x, seqlen=None, inference_params=None, **kwargs"),
    *[(func.backward, "ctx, grad_output, *args") for func in (FusedDenseFunc, FusedMLPFunc)],
    *[(module.forward, "self, x, process_group=None") for module in (FusedDense, FusedMLP)],
    *[
        (module.forward, "self, x")
        for module in (ColumnParallelLinear, RowParallelLinear, ParallelFusedMLP, ParallelMLP, ParallelGatedMlp)
    ],
]  # fmt: skip


@pytest.mark.parametrize(
    "fn, params", UPSTREAM_SIGNATURES, ids=lambda v: getattr(v, "__qualname__", "params")
)
def test_signatures_match_flash_attn_2_8(fn, params):
    args = ast.parse(f"def f({params}): pass").body[0].args
    positional = args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    want = [(a.arg, "POSITIONAL_OR_KEYWORD", d) for a, d in zip(positional, defaults)]
    if args.vararg is not None:
        want.append((args.vararg.arg, "VAR_POSITIONAL", None))
    if args.kwarg is not None:
        want.append((args.kwarg.arg, "VAR_KEYWORD", None))
    got = list(inspect.signature(fn).parameters.values())
    assert [(p.name, p.kind.name) for p in got] == [(n, k) for n, k, _ in want]
    for p, (_, _, default) in zip(got, want):
        if default is None:
            assert p.default is inspect.Parameter.empty, p.name
            continue
        text = ast.unparse(default)
        expected = getattr(F, text[2:]) if text.startswith("F.") else ast.literal_eval(text)
        assert p.default == expected and type(p.default) is type(expected), (p.name, p.default, text)


def test_mlp_module_exports():
    mlp = importlib.import_module("flash_attn.modules.mlp")
    assert mlp.FusedMLP is FusedMLP and mlp.ParallelFusedMLP is ParallelFusedMLP
    assert {"FusedMLP", "ParallelFusedMLP", "ParallelMLP", "ParallelGatedMlp"} <= set(mlp.__all__)
    assert "ParallelMHA" in importlib.import_module("flash_attn.modules.mha").__all__


# ================================================================================== distributed
def _split(dim, world, multiple_of=1):
    return [get_dim_for_local_rank(dim, world, r, multiple_of) for r in range(world)]


def _bounds(sizes, rank):
    return sum(sizes[:rank]), sum(sizes[: rank + 1])


def _my_rows(t, rank, world):
    """This rank's block of dim 0 (sequence parallelism)."""
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def _check_dense(rank, world, group):
    rows = partial(_my_rows, rank=rank, world=world)
    for seq in (True, False):
        for has_bias in (True, False):
            tag = f"{seq=} {has_bias=}"
            torch.manual_seed(10 + has_bias)  # the same full layers, inputs and gradients on every rank
            full_col = nn.Linear(8, 10, bias=has_bias, dtype=F64)
            full_row = nn.Linear(10, 6, bias=has_bias, dtype=F64)
            x_full = torch.randn(2 * world, 3, 8, dtype=F64)
            g_col, g_row = torch.randn(2 * world, 3, 10, dtype=F64), torch.randn(2 * world, 3, 6, dtype=F64)
            x_ref = x_full.clone().requires_grad_()
            h_ref = full_col(x_ref)
            h_ref.backward(g_col)
            h_in = h_ref.detach().requires_grad_()
            out_ref = full_row(h_in)
            out_ref.backward(g_row)

            # column-parallel: whole units of 2 output features (5 units: 3 + 2 on two ranks)
            beg, end = _bounds(_split(10, world, 2), rank)
            col = ColumnParallelLinear(
                8, 10, group, bias=has_bias, sequence_parallel=seq, multiple_of=2, dtype=F64
            )
            assert col.weight.shape == (end - beg, 8), tag
            _copy_(col.weight, full_col.weight[beg:end])
            if has_bias:
                _copy_(col.bias, full_col.bias[beg:end])
            x = (rows(x_full) if seq else x_full).clone().requires_grad_()
            h = col(x)
            _close(h, h_ref[..., beg:end], msg=tag)  # every row: the input was all-gathered
            h.backward(g_col[..., beg:end])
            _close(x.grad, rows(x_ref.grad) if seq else x_ref.grad, msg=tag)
            _close(col.weight.grad, full_col.weight.grad[beg:end], msg=tag)
            if has_bias:
                _close(col.bias.grad, full_col.bias.grad[beg:end], msg=tag)

            # row-parallel: this rank's input features, output summed (reduce-scatter / all-reduce)
            row = RowParallelLinear(
                10, 6, group, bias=has_bias, sequence_parallel=seq, multiple_of=2, dtype=F64
            )
            assert row.weight.shape == (6, end - beg) and (row.bias is not None) == (has_bias and rank == 0)
            _copy_(row.weight, full_row.weight[:, beg:end])
            if row.bias is not None:
                _copy_(row.bias, full_row.bias)
            h = h_ref.detach()[..., beg:end].clone().requires_grad_()
            out = row(h)
            _close(out, rows(out_ref) if seq else out_ref, msg=tag)
            out.backward(rows(g_row) if seq else g_row)
            _close(h.grad, h_in.grad[..., beg:end], msg=tag)
            _close(row.weight.grad, full_row.weight.grad[:, beg:end], msg=tag)
            if row.bias is not None:
                _close(row.bias.grad, full_row.bias.grad, msg=tag)

    # FusedDense with a group (sequence parallel) and return_residual: each rank's own output gradient;
    # the input gradient is the reduce-scattered sum plus this rank's residual gradient
    torch.manual_seed(12)
    dense = FusedDense(8, 5, return_residual=True, dtype=F64)
    x_full = torch.randn(2 * world, 4, 8, dtype=F64)
    g_all = torch.randn(world, 2 * world, 4, 5, dtype=F64)
    g_res_all = torch.randn(world, 2, 4, 8, dtype=F64)
    x = rows(x_full).clone().requires_grad_()
    out, res = dense(x, process_group=group)
    _close(out, F.linear(x_full, dense.weight, dense.bias))
    assert torch.equal(res, x)
    torch.autograd.backward([out, res], [g_all[rank], g_res_all[rank]])
    want = rows(g_all.sum(0) @ dense.weight) + g_res_all[rank]
    _close(x.grad, want)
    _close(dense.weight.grad, torch.einsum("bso,bsi->oi", g_all[rank], x_full))
    _close(dense.bias.grad, g_all[rank].sum((0, 1)))

    # FusedDenseFunc with a replicated input (all-reduce): the residual gradient is counted once
    x = x_full.clone().requires_grad_()
    out, res = FusedDenseFunc.apply(x, dense.weight * (rank + 1), None, True, group, False)
    torch.autograd.backward([out, res], [g_all[rank], g_res_all[0].repeat(world, 1, 1)])
    want = sum((g_all[r] @ (dense.weight * (r + 1))) for r in range(world)) + g_res_all[0].repeat(world, 1, 1)
    _close(x.grad, want)


def _check_fused_mlp(rank, world, group):
    rows = partial(_my_rows, rank=rank, world=world)
    hidden = 9  # 5 + 4 hidden units on two ranks
    beg, end = _bounds(_split(hidden, world), rank)
    configs = [("gelu_approx", 0, True, True), ("sqrelu", 1, False, True), ("relu", 2, True, False)]
    for seq in (True, False):
        for activation, lvl, has_bias2, train in configs:
            tag = f"{seq=} {activation} {lvl=} {has_bias2=}"
            torch.manual_seed(20)
            ref = Mlp(8, hidden, 8, activation=ACTIVATION_FNS[activation], bias2=has_bias2, dtype=F64)
            x_full = torch.randn(2 * world, 3, 8, dtype=F64)
            g = torch.randn(2 * world, 3, 8, dtype=F64)
            x_ref = x_full.clone().requires_grad_()
            out_ref = ref(x_ref)
            out_ref.backward(g)
            par = ParallelFusedMLP(
                8, hidden, 8, activation=activation, process_group=group, bias2=has_bias2,
                sequence_parallel=seq, checkpoint_lvl=lvl, dtype=F64,
            )  # fmt: skip
            assert par.fc1.weight.shape == (end - beg, 8) and par.fc2.weight.shape == (8, end - beg)
            assert (par.fc2.bias is not None) == (has_bias2 and rank == 0)
            _copy_(par.fc1.weight, ref.fc1.weight[beg:end])
            _copy_(par.fc1.bias, ref.fc1.bias[beg:end])
            _copy_(par.fc2.weight, ref.fc2.weight[:, beg:end])
            if par.fc2.bias is not None:
                _copy_(par.fc2.bias, ref.fc2.bias)
            par.train(train)
            x = (rows(x_full) if seq else x_full).clone().requires_grad_()
            out = par(x)
            _close(out, rows(out_ref) if seq else out_ref, msg=tag)
            out.backward(rows(g) if seq else g)
            _close(x.grad, rows(x_ref.grad) if seq else x_ref.grad, msg=tag)
            _close(par.fc1.weight.grad, ref.fc1.weight.grad[beg:end], msg=tag)
            _close(par.fc1.bias.grad, ref.fc1.bias.grad[beg:end], msg=tag)
            _close(par.fc2.weight.grad, ref.fc2.weight.grad[:, beg:end], msg=tag)
            if par.fc2.bias is not None:
                _close(par.fc2.bias.grad, ref.fc2.bias.grad, msg=tag)

    # FusedMLP.forward(x, process_group): gathered input, this rank's hidden units, reduce-scattered output
    torch.manual_seed(21)
    ref = Mlp(8, hidden, 8, activation=ACTIVATION_FNS["gelu_approx"], dtype=F64)
    x_full = torch.randn(2 * world, 3, 8, dtype=F64)
    g, g_res = torch.randn(2 * world, 3, 8, dtype=F64), torch.randn(2 * world, 3, 8, dtype=F64)
    x_ref = x_full.clone().requires_grad_()
    out_ref = ref(x_ref)
    torch.autograd.backward([out_ref, x_ref], [g, g_res])
    fused = FusedMLP(8, end - beg, 8, return_residual=True, checkpoint_lvl=1, dtype=F64)
    _copy_(fused.fc1.weight, ref.fc1.weight[beg:end])
    _copy_(fused.fc1.bias, ref.fc1.bias[beg:end])
    _copy_(fused.fc2.weight, ref.fc2.weight[:, beg:end])
    _copy_(fused.fc2.bias, ref.fc2.bias if rank == 0 else torch.zeros_like(ref.fc2.bias))
    x = rows(x_full).clone().requires_grad_()
    out, res = fused(x, process_group=group)
    _close(out, rows(out_ref))
    assert torch.equal(res, x)
    torch.autograd.backward([out, res], [rows(g), rows(g_res)])
    _close(x.grad, rows(x_ref.grad))
    _close(fused.fc1.weight.grad, ref.fc1.weight.grad[beg:end])
    _close(fused.fc2.weight.grad, ref.fc2.weight.grad[:, beg:end])
    _close(fused.fc2.bias.grad, ref.fc2.bias.grad)


def _check_parallel_mlp(rank, world, group):
    rows = partial(_my_rows, rank=rank, world=world)
    for seq in (True, False):
        for kind, activation in (("mlp", F.gelu), ("gated", F.sigmoid), ("gated", F.silu), ("gated", F.relu)):
            tag = f"{seq=} {kind} {activation.__name__}"
            torch.manual_seed(30)
            if kind == "mlp":
                hidden = 9
                ref = Mlp(8, hidden, 6, activation=activation, dtype=F64)
            else:
                hidden = 9  # multiple_of=1: (value, gate) pairs split 5 + 4 on two ranks
                ref = GatedMlp(8, hidden, 6, activation=activation, multiple_of=1, dtype=F64)
            beg, end = _bounds(_split(hidden, world), rank)
            x_full = torch.randn(2 * world, 3, 8, dtype=F64)
            g = torch.randn(2 * world, 3, 6, dtype=F64)
            x_ref = x_full.clone().requires_grad_()
            out_ref = ref(x_ref)
            out_ref.backward(g)
            if kind == "mlp":
                par = ParallelMLP(
                    8, hidden, 6, activation=activation, process_group=group, sequence_parallel=seq, dtype=F64
                )

                def fc1_shard(t, beg=beg, end=end):
                    return t[beg:end]
            else:
                par = ParallelGatedMlp(
                    8,
                    group,
                    hidden,
                    6,
                    activation=activation,
                    multiple_of=1,
                    sequence_parallel=seq,
                    dtype=F64,
                )

                def fc1_shard(t, beg=beg, end=end):  # [value_r; gate_r]
                    value, gate = t.chunk(2, dim=0)
                    return torch.cat([value[beg:end], gate[beg:end]])

            assert par.fc1.weight.shape[0] == (end - beg) * (1 if kind == "mlp" else 2), tag
            _copy_(par.fc1.weight, fc1_shard(ref.fc1.weight))
            _copy_(par.fc1.bias, fc1_shard(ref.fc1.bias))
            _copy_(par.fc2.weight, ref.fc2.weight[:, beg:end])
            assert (par.fc2.bias is not None) == (rank == 0)
            if par.fc2.bias is not None:
                _copy_(par.fc2.bias, ref.fc2.bias)
            x = (rows(x_full) if seq else x_full).clone().requires_grad_()
            out = par(x)
            _close(out, rows(out_ref) if seq else out_ref, msg=tag)
            out.backward(rows(g) if seq else g)
            _close(x.grad, rows(x_ref.grad) if seq else x_ref.grad, msg=tag)
            _close(par.fc1.weight.grad, fc1_shard(ref.fc1.weight.grad), msg=tag)
            _close(par.fc1.bias.grad, fc1_shard(ref.fc1.bias.grad), msg=tag)
            _close(par.fc2.weight.grad, ref.fc2.weight.grad[:, beg:end], msg=tag)
            if par.fc2.bias is not None:
                _close(par.fc2.bias.grad, ref.fc2.bias.grad, msg=tag)


def _shard_mha(full, par, rank, world):
    """Copy this rank's heads of ``full`` (MHA) into ``par`` (ParallelMHA); returns the Wqkv shard function."""
    h, hk, d = full.num_heads, full.num_heads_kv, full.head_dim
    qb, qe = _bounds(_split(h, world), rank)
    kb, ke = _bounds(_split(hk, world), rank)

    def qkv_shard(t):  # rows [q heads; k heads; v heads] -> [q_r; k_r; v_r]
        heads = t.unflatten(0, (h + 2 * hk, d))
        parts = [heads[qb:qe], heads[h + kb : h + ke], heads[h + hk + kb : h + hk + ke]]
        return torch.cat(parts).flatten(0, 1)

    def out_shard(t):
        return t[:, qb * d : qe * d]

    _copy_(par.Wqkv.weight, qkv_shard(full.Wqkv.weight))
    _copy_(par.Wqkv.bias, qkv_shard(full.Wqkv.bias))
    _copy_(par.out_proj.weight, out_shard(full.out_proj.weight))
    assert (par.out_proj.bias is not None) == (rank == 0)
    if par.out_proj.bias is not None:
        _copy_(par.out_proj.bias, full.out_proj.bias)
    return qkv_shard, out_shard


MHA_CONFIGS = [
    # (name, MHA kwargs, sequence_parallel, flattened rows with seqlen)
    ("rotary", {"num_heads": 4, "rotary_emb_dim": 8, "causal": True, "use_flash_attn": True}, True, True),
    ("rotary_replicated", {"num_heads": 4, "rotary_emb_dim": 8, "causal": True, "use_flash_attn": True}, False, False),
    ("gqa_rotary", {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8, "use_flash_attn": True}, True, False),
    ("gqa_torch_ckpt", {"num_heads": 4, "num_heads_kv": 2, "causal": True, "checkpointing": True}, False, True),
    ("uneven_heads_torch", {"num_heads": 3, "rotary_emb_dim": 8, "rotary_emb_interleaved": True}, True, True),
    ("alibi_window", {"num_heads": 4, "use_alibi": True, "window_size": (2, 1), "use_flash_attn": True}, True, True),
]  # fmt: skip


def _check_parallel_mha(rank, world, group):
    rows = partial(_my_rows, rank=rank, world=world)
    batch, seqlen, head_dim = 2, 5, 16
    for name, kw, seq, flat in MHA_CONFIGS:
        if kw.get("use_flash_attn") and not HAS_BACKWARD:
            continue  # the flash backward lives in fa-backward
        kw = dict(kw)
        num_heads = kw.pop("num_heads")
        embed = num_heads * head_dim
        torch.manual_seed(40)
        full = MHA(embed, num_heads, device=DEVICE, **kw)
        x_full = torch.randn(batch, seqlen, embed, device=DEVICE)
        g = torch.randn(batch, seqlen, embed, device=DEVICE)
        x_ref = x_full.clone().requires_grad_()
        out_ref = full(x_ref)
        out_ref.backward(g)
        par = ParallelMHA(embed, num_heads, group, sequence_parallel=seq, device=DEVICE, **kw)
        assert par.num_heads_per_rank == _split(num_heads, world)[rank], name
        qkv_shard, out_shard = _shard_mha(full, par, rank, world)
        if flat:  # (B * S, E) rows; sequence parallelism splits the rows
            x_in, want, g_in, want_dx = (t.flatten(0, 1) for t in (x_full, out_ref, g, x_ref.grad))
        else:  # (B, S, E); sequence parallelism splits the batch
            x_in, want, g_in, want_dx = x_full, out_ref, g, x_ref.grad
        if seq:
            x_in, want, g_in, want_dx = (rows(t) for t in (x_in, want, g_in, want_dx))
        x = x_in.clone().requires_grad_()
        out = par(x, seqlen=seqlen if flat else None)
        _close(out, want, tol=2e-4, msg=name)
        out.backward(g_in)
        _close(x.grad, want_dx, tol=2e-4, msg=name)
        _close(par.Wqkv.weight.grad, qkv_shard(full.Wqkv.weight.grad), tol=2e-4, msg=name)
        _close(par.Wqkv.bias.grad, qkv_shard(full.Wqkv.bias.grad), tol=2e-4, msg=name)
        _close(par.out_proj.weight.grad, out_shard(full.out_proj.weight.grad), tol=2e-4, msg=name)
        if par.out_proj.bias is not None:
            _close(par.out_proj.bias.grad, full.out_proj.bias.grad, tol=2e-4, msg=name)


def _check_parallel_mha_generation(rank, world, group):
    """Prefill + one-token decoding with this rank's kv heads in the cache == the full forward."""
    batch, seqlen, prompt, head_dim = 2, 6, 4, 16
    configs = [
        ("gqa_rotary16_flash", {"num_heads_kv": 2, "rotary_emb_dim": 16, "use_flash_attn": True}),
        ("mha_rotary8_torch", {"rotary_emb_dim": 8}),
    ]
    for name, kw in configs:
        torch.manual_seed(50)
        full = MHA(4 * head_dim, 4, causal=True, layer_idx=0, device=DEVICE, **kw).eval()
        x = torch.randn(batch, seqlen, 4 * head_dim, device=DEVICE)  # before par: its init draws per rank
        par = ParallelMHA(
            4 * head_dim, 4, group, causal=True, layer_idx=0, sequence_parallel=False, device=DEVICE, **kw
        ).eval()
        _shard_mha(full, par, rank, world)
        params = InferenceParams(max_seqlen=seqlen + 2, max_batch_size=batch)
        with torch.no_grad():
            want = full(x)
            outs = [par(x[:, :prompt], inference_params=params)]
            for i in range(prompt, seqlen):
                params.seqlen_offset = i
                outs.append(par(x[:, i : i + 1], inference_params=params))
        _close(torch.cat(outs, dim=1), want, tol=2e-4, msg=name)
        cache = params.key_value_memory_dict[0]
        assert cache.shape == (batch, seqlen + 2, 2, par.num_heads_kv_per_rank, head_dim), name
        assert par.allocate_inference_cache(batch, 3).shape == (
            batch,
            3,
            2,
            par.num_heads_kv_per_rank,
            head_dim,
        )


def _check_uneven_gqa_split_rejected(rank, world, group):
    if world == 2:
        with pytest.raises(ValueError, match="num_heads_kv"):
            ParallelMHA(64, 4, group, num_heads_kv=1)
        with pytest.raises(ValueError, match="num_heads_kv"):
            ParallelMHA(96, 6, group, num_heads_kv=3)
    else:
        assert ParallelMHA(64, 4, group, num_heads_kv=1).num_heads_kv_per_rank == 1


@pytest.mark.parametrize("world", [1, 2])
def test_column_row_parallel_linear_and_fused_dense(world, tmp_path):
    spawn_gloo(__file__, ["_check_dense"], world, tmp_path)


@pytest.mark.parametrize("world", [1, 2])
def test_parallel_fused_mlp(world, tmp_path):
    spawn_gloo(__file__, ["_check_fused_mlp"], world, tmp_path)


@pytest.mark.parametrize("world", [1, 2])
def test_parallel_mlp_and_gated_mlp(world, tmp_path):
    spawn_gloo(__file__, ["_check_parallel_mlp"], world, tmp_path)


@pytest.mark.parametrize("world", [1, 2])
def test_parallel_mha(world, tmp_path):
    spawn_gloo(__file__, ["_check_parallel_mha", "_check_uneven_gqa_split_rejected"], world, tmp_path)


@pytest.mark.parametrize("world", [1, 2])
def test_parallel_mha_generation(world, tmp_path):
    spawn_gloo(__file__, ["_check_parallel_mha_generation"], world, tmp_path)
