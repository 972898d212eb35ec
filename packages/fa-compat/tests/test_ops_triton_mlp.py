"""Tests for flash_attn.ops.triton.k_activations, .linear and .mlp, and the GPT configuration that builds
``FusedDenseSqreluDense``.

Everything is held against float64 PyTorch on fresh random inputs: the Triton device functions through a
small element-wise test kernel (values and the derivatives of the float64 reference by autograd), the linear
layer with its activation and the input-gradient product (both the Triton element-wise path and the PyTorch
one), and the MLP's output and the gradients of its input, weights and biases at every ``checkpoint_lvl``.
Kernels run through the CPU interpreter without a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fa_compat_hf import needs_hf, transformers
from fa_compat_testutils import DEVICE

from flash_attn.modules.mlp import Mlp
from flash_attn.ops.activations import sqrelu_fwd
from flash_attn.ops.triton import k_activations as ka
from flash_attn.ops.triton import linear as linear_mod
from flash_attn.ops.triton.linear import triton_dgrad_act, triton_linear_act
from flash_attn.ops.triton.mlp import (
    FusedDenseSqreluDense,
    FusedDenseSqreluDenseFunc,
    fused_dense_sqrelu_dense_function,
)

F64 = torch.float64
#: dtypes the kernels take here (bf16 element-wise works in the interpreter too; its dot does not matter here)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
#: relative tolerance (to the largest reference value) of a computation in each dtype against float64
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> None:
    scale = max(ref.abs().max().item(), 1.0)
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= factor * RTOL[dtype] * scale, f"max error {err:.3g} > {factor * RTOL[dtype] * scale:.3g}"


# ------------------------------------------------------------------------------- k_activations
@triton.jit
def _map_kernel(X, Y, n, FN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0)
    y = FN(x)
    tl.static_assert(y.dtype == x.dtype)  # every function returns its input's dtype
    tl.store(Y + offs, y, mask=mask)


def _map(fn, x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _map_kernel[(triton.cdiv(x.numel(), 128),)](x, y, x.numel(), FN=fn, BLOCK=128)
    return y


#: float64 references of the device functions
FORWARD_REFS = {
    "relu": torch.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "squared_relu": lambda x: torch.relu(x) ** 2,
    "gelu": F.gelu,
    "gelu_approx": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "cosh": torch.cosh,
}


def _inputs(dtype: torch.dtype, n: int = 300, scale: float = 3.0) -> torch.Tensor:
    x = torch.randn(n, device=DEVICE, dtype=F64) * scale
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FORWARD_REFS))
def test_activation_device_functions(name, dtype):
    torch.manual_seed(hash(name) % 1000)
    x = _inputs(dtype)
    ref = FORWARD_REFS[name](x.double())
    y = _map(getattr(ka, name), x)
    assert y.dtype == dtype
    # a value past the dtype's range (cosh of |x| > 11.8 in fp16) is inf there, as the rounded reference is
    over = torch.isinf(ref.to(dtype))
    assert torch.equal(torch.isinf(y), over)
    _assert_close(y[~over], ref[~over], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "squared_relu", "gelu", "gelu_approx"])
def test_activation_gradients(name, dtype):
    torch.manual_seed(hash(name) % 1000 + 1)
    x = _inputs(dtype)
    x = torch.where(x.double().abs() < 1e-3, torch.ones_like(x), x)  # away from relu's kink
    x64 = x.double().requires_grad_()
    (ref,) = torch.autograd.grad(FORWARD_REFS[name](x64).sum(), x64)
    grad = _map(getattr(ka, f"{name}_grad"), x)
    assert grad.dtype == dtype
    _assert_close(grad, ref, dtype)


def test_activation_gradients_at_zero():
    # the kink: x >= 0 is the positive side, as in flash-attn
    zero = torch.zeros(4, device=DEVICE)
    assert _map(ka.relu_grad, zero).eq(1).all()
    assert _map(ka.leaky_relu_grad, zero).eq(1).all()
    assert _map(ka.squared_relu_grad, zero).eq(0).all()
    assert _map(ka.relu, zero).eq(0).all()
    neg = -torch.ones(4, device=DEVICE)
    torch.testing.assert_close(_map(ka.leaky_relu_grad, neg), torch.full_like(neg, 0.01))


def test_activation_enum_and_getters():
    forward = {"relu": ka.relu, "leaky_relu": ka.leaky_relu, "gelu": ka.gelu, "gelu_approx": ka.gelu_approx}
    forward["squared_relu"] = ka.squared_relu
    assert {a.value for a in ka.Activation} == set(forward)
    for value, fn in forward.items():
        act = ka.Activation(value)
        assert act == value  # a str enum
        assert ka.get_triton_activation_kernel(act) is fn
        assert ka.get_triton_activation_kernel(value) is fn
        assert ka.get_triton_activation_bwd_kernel(act) is getattr(ka, f"{value}_grad")
    assert ka.get_triton_activation_kernel(None) is None
    assert ka.get_triton_activation_bwd_kernel(None) is None
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ka.get_triton_activation_kernel("swish")
    with pytest.raises(ValueError, match="known"):
        ka.get_triton_activation_bwd_kernel("sqrelu")


# -------------------------------------------------------------------------------------- linear
ACTS = {
    "id": lambda t: t,
    "gelu": F.gelu,
    "gelu_approx": lambda t: F.gelu(t, approximate="tanh"),
    "squared_relu": lambda t: torch.relu(t) ** 2,
}


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Run the element-wise part through the Triton kernels or through PyTorch."""
    if request.param == "torch":
        monkeypatch.setattr(linear_mod, "_use_triton", lambda t: False)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ACTS))
def test_triton_linear_act(activation, dtype, path):
    torch.manual_seed(len(activation))
    x = torch.randn(2, 5, 24, device=DEVICE, dtype=dtype)
    weight = torch.randn(20, 24, device=DEVICE, dtype=dtype) / 4
    bias = torch.randn(20, device=DEVICE, dtype=dtype)
    pre_ref = F.linear(x.double(), weight.double(), bias.double())
    out = triton_linear_act(x, weight, bias, activation=activation)
    assert out.shape == (2, 5, 20) and out.dtype == dtype
    _assert_close(out, ACTS[activation](pre_ref), dtype, factor=4)
    out2, act_input = triton_linear_act(x, weight, bias, activation=activation, save_act_input=True)
    assert torch.equal(out2, out) and act_input.shape == (2, 5, 20) and act_input.dtype == dtype
    _assert_close(act_input, pre_ref, dtype, factor=4)
    # the output is the activation of the returned (rounded) pre-activation, rounded once
    _assert_close(out, ACTS[activation](act_input.double()), dtype)
    # without bias
    out_nb = triton_linear_act(x, weight, None, activation=activation)
    _assert_close(out_nb, ACTS[activation](F.linear(x.double(), weight.double())), dtype, factor=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ACTS))
def test_triton_dgrad_act(activation, dtype, path):
    torch.manual_seed(len(activation) + 10)
    act_input = torch.randn(3, 4, 16, device=DEVICE, dtype=dtype)
    weight = torch.randn(12, 16, device=DEVICE, dtype=dtype) / 4
    grad_output = torch.randn(3, 4, 12, device=DEVICE, dtype=dtype)
    pre = act_input.double().requires_grad_()
    out = F.linear(ACTS[activation](pre), weight.double())
    (ref,) = torch.autograd.grad(out, pre, grad_output.double())
    grad = triton_dgrad_act(grad_output, weight, activation=activation, act_input=act_input)
    assert grad.shape == (3, 4, 16) and grad.dtype == dtype
    _assert_close(grad, ref, dtype, factor=4)
    if activation == "id":  # act_input is not needed
        _assert_close(triton_dgrad_act(grad_output, weight), ref, dtype, factor=4)


def test_linear_paths_agree(monkeypatch):
    torch.manual_seed(4)
    x = torch.randn(33, 40, device=DEVICE)
    weight = torch.randn(50, 40, device=DEVICE) / 6
    bias = torch.randn(50, device=DEVICE)
    grad = torch.randn(33, 50, device=DEVICE)
    for activation in ACTS:
        triton_out = triton_linear_act(x, weight, bias, activation, save_act_input=True)
        triton_grad = triton_dgrad_act(grad, weight, activation, act_input=x)
        with monkeypatch.context() as m:
            m.setattr(linear_mod, "_use_triton", lambda t: False)
            torch_out = triton_linear_act(x, weight, bias, activation, save_act_input=True)
            torch_grad = triton_dgrad_act(grad, weight, activation, act_input=x)
        for a, b in zip(triton_out, torch_out):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(triton_grad, torch_grad, atol=1e-6, rtol=1e-6)


def test_linear_no_graph_autocast_strides_and_empty():
    torch.manual_seed(5)
    x = torch.randn(16, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(12, 8, device=DEVICE, requires_grad=True)
    out, act_input = triton_linear_act(x, weight, None, "gelu", save_act_input=True)
    assert not out.requires_grad and not act_input.requires_grad  # no autograd graph, as in flash-attn
    # autocast is ignored: the inputs' dtype throughout
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert triton_linear_act(x, weight, None, "gelu").dtype == torch.float32
        assert triton_dgrad_act(out, weight, "gelu", act_input=x).dtype == torch.float32
    # strided inputs
    xt = torch.randn(8, 16, device=DEVICE).t()
    _assert_close(
        triton_linear_act(xt, weight.detach(), activation="squared_relu"),
        torch.relu(F.linear(xt.double(), weight.detach().double())) ** 2,
        torch.float32,
        factor=4,
    )
    # no rows
    empty = triton_linear_act(torch.empty(0, 3, 8, device=DEVICE), weight.detach(), None, "gelu", True)
    assert empty[0].shape == empty[1].shape == (0, 3, 12)
    no_rows = triton_dgrad_act(
        torch.empty(0, 12, device=DEVICE), weight.detach(), "gelu", torch.empty(0, 8, device=DEVICE)
    )
    assert no_rows.shape == (0, 8)


def test_linear_errors():
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    with pytest.raises(ValueError, match="activation must be one of"):
        triton_linear_act(x, w, b, activation="relu")
    with pytest.raises(TypeError, match="same dtype"):
        triton_linear_act(x, w.double(), b)
    with pytest.raises(TypeError, match="same dtype"):
        triton_linear_act(x, w, b.half())
    with pytest.raises(ValueError, match="in_features"):
        triton_linear_act(x, w[:, :4], b)
    with pytest.raises(ValueError, match="out_features"):
        triton_linear_act(x, w, b[:4])
    with pytest.raises(ValueError, match="2 dimension"):
        triton_linear_act(x, w[None], b)
    with pytest.raises(TypeError, match="torch.Tensor"):
        triton_linear_act(x.tolist(), w, b)
    with pytest.raises(TypeError, match="floating-point"):
        triton_linear_act(x.long(), w.long())
    g = torch.randn(4, 6)
    with pytest.raises(ValueError, match="act_input is required"):
        triton_dgrad_act(g, w, activation="gelu")
    with pytest.raises(ValueError, match="act_input must have shape"):
        triton_dgrad_act(g, w, activation="gelu", act_input=torch.randn(4, 6))
    with pytest.raises(ValueError, match="out_features"):
        triton_dgrad_act(g[:, :5], w, activation="gelu", act_input=x)
    with pytest.raises(TypeError, match="same dtype"):
        triton_dgrad_act(g.double(), w, activation="id")
    with pytest.raises(ValueError, match="activation must be one of"):
        triton_dgrad_act(g, w, activation="leaky_relu", act_input=x)


# ----------------------------------------------------------------------------------------- MLP
def _reference_mlp(x, w1, b1, w2, b2):
    h = F.linear(x, w1, b1)
    return F.linear(torch.relu(h) ** 2, w2, b2)


def _mlp_grads(mlp: FusedDenseSqreluDense, x: torch.Tensor, g: torch.Tensor):
    params = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    params = [p for p in params if p is not None]
    out = mlp(x)
    return out, torch.autograd.grad(out, params, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("checkpoint_lvl", [0, 1, 2])
def test_fused_dense_sqrelu_dense(checkpoint_lvl, dtype):
    torch.manual_seed(checkpoint_lvl)
    mlp = FusedDenseSqreluDense(24, 40, 16, checkpoint_lvl=checkpoint_lvl, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for p in mlp.parameters():  # O(1) activations
            p.normal_(0, 0.3)
    x = torch.randn(2, 5, 24, device=DEVICE, dtype=dtype, requires_grad=True)
    out, grads = _mlp_grads(mlp, x, g := torch.randn(2, 5, 16, device=DEVICE, dtype=dtype))
    assert out.shape == (2, 5, 16) and out.dtype == dtype
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, *mlp.parameters())]
    ref = _reference_mlp(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, g.double())
    _assert_close(out, ref, dtype, factor=8)
    for ours, theirs in zip(grads, ref_grads):
        assert ours.dtype == dtype
        _assert_close(ours, theirs, dtype, factor=8)


def test_fused_dense_sqrelu_dense_levels_agree_and_partial_grads():
    torch.manual_seed(7)
    x = torch.randn(3, 7, 16, device=DEVICE, requires_grad=True)
    g = torch.randn(3, 7, 16, device=DEVICE)
    mlps = [FusedDenseSqreluDense(16, checkpoint_lvl=lvl, device=DEVICE) for lvl in (0, 1, 2)]
    for m in mlps[1:]:
        m.load_state_dict(mlps[0].state_dict())
    assert mlps[0].fc1.weight.shape == (64, 16) and mlps[0].fc2.weight.shape == (16, 64)  # 4x, out = in
    results = [_mlp_grads(m, x, g) for m in mlps]
    for out, grads in results[1:]:  # recomputation reproduces the kept tensors exactly
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))
    # frozen weights: only the gradients asked for
    mlp = mlps[2]
    mlp.requires_grad_(False)
    mlp(x).backward(g)
    assert all(p.grad is None for p in mlp.parameters())
    torch.testing.assert_close(x.grad, results[0][1][0])


def test_fused_dense_sqrelu_dense_saves_per_checkpoint_lvl():
    # what the backward keeps: x, the weights, bias1, then the pre-activation (levels 0, 1) and the
    # activation output (level 0)
    torch.manual_seed(12)
    x = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    hidden = 24
    for lvl, expected in ((0, 6), (1, 5), (2, 4)):
        mlp = FusedDenseSqreluDense(8, hidden, checkpoint_lvl=lvl, device=DEVICE)
        shapes = []

        def pack(t, shapes=shapes):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = mlp(x)
        assert len(shapes) == expected
        assert shapes.count((5, hidden)) == max(2 - lvl, 0)  # pre-activation / activation output
        out.sum().backward()


def test_fused_dense_sqrelu_dense_without_biases():
    torch.manual_seed(8)
    for bias1, bias2 in ((False, True), (True, False), (False, False)):
        mlp = FusedDenseSqreluDense(8, 12, 6, bias1=bias1, bias2=bias2, device=DEVICE, dtype=F64)
        assert (mlp.fc1.bias is None) != bias1 and (mlp.fc2.bias is None) != bias2
        x = torch.randn(5, 8, device=DEVICE, dtype=F64, requires_grad=True)
        g = torch.randn(5, 6, device=DEVICE, dtype=F64)
        out, grads = _mlp_grads(mlp, x, g)
        ref_inputs = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
        ref = _reference_mlp(*ref_inputs)
        torch.testing.assert_close(out, ref)
        ref_grads = torch.autograd.grad(ref, [t for t in ref_inputs if t is not None], g)
        for ours, theirs in zip(grads, ref_grads):
            torch.testing.assert_close(ours, theirs)


def test_fused_dense_sqrelu_dense_function_and_state_dict():
    assert fused_dense_sqrelu_dense_function == FusedDenseSqreluDenseFunc.apply
    torch.manual_seed(9)
    fused = FusedDenseSqreluDense(12, 20, 10, device=DEVICE, dtype=F64)
    plain = Mlp(12, 20, 10, activation=sqrelu_fwd, device=DEVICE, dtype=F64)
    plain.load_state_dict(fused.state_dict())  # strict, both ways
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(4, 12, device=DEVICE, dtype=F64)
    torch.testing.assert_close(fused(x), plain(x))
    w1, b1, w2, b2 = fused.fc1.weight, fused.fc1.bias, fused.fc2.weight, fused.fc2.bias
    torch.testing.assert_close(fused_dense_sqrelu_dense_function(x, w1, b1, w2, b2), plain(x))
    torch.testing.assert_close(fused_dense_sqrelu_dense_function(x, w1, b1, w2, b2, 2), plain(x))


def test_fused_dense_sqrelu_dense_autocast():
    torch.manual_seed(10)
    mlp = FusedDenseSqreluDense(16, 32, 8, device=DEVICE)
    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    g = torch.randn(6, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = mlp(x)
    assert out.dtype == torch.bfloat16
    out.backward(g.bfloat16())
    assert x.grad.dtype == torch.float32 and mlp.fc1.weight.grad.dtype == torch.float32
    # the computation in bfloat16 (the parameters rounded to it), against float64
    ref_inputs = [t.detach().bfloat16().double().requires_grad_() for t in (x, *mlp.parameters())]
    ref = _reference_mlp(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, g.bfloat16().double())
    _assert_close(out, ref, torch.bfloat16, factor=4)
    for ours, theirs in zip([x.grad, *(p.grad for p in mlp.parameters())], ref_grads):
        _assert_close(ours, theirs, torch.bfloat16, factor=4)


def test_fused_dense_sqrelu_dense_errors():
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        FusedDenseSqreluDense(8, checkpoint_lvl=3)
    x, w1, w2 = torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16)
    b1, b2 = torch.randn(16), torch.randn(8)
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        fused_dense_sqrelu_dense_function(x, w1, b1, w2, b2, 5)
    with pytest.raises(ValueError, match="in_features"):
        fused_dense_sqrelu_dense_function(x[:, :4], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="weight2 must have shape"):
        fused_dense_sqrelu_dense_function(x, w1, b1, w2[:, :8], b2)
    with pytest.raises(ValueError, match="bias1 must have shape"):
        fused_dense_sqrelu_dense_function(x, w1, b1[:8], w2, b2)
    with pytest.raises(TypeError, match="bias2 must have x's dtype"):
        fused_dense_sqrelu_dense_function(x, w1, b1, w2, b2.double())
    with pytest.raises(ValueError, match="2-D"):
        fused_dense_sqrelu_dense_function(x, w1[None], b1, w2, b2)
    with pytest.raises(TypeError, match="weight1 must be a torch.Tensor"):
        fused_dense_sqrelu_dense_function(x, None, b1, w2, b2)


# ----------------------------------------------------------------------------------------- GPT
def _mlp_config(**kw):
    base = {
        "activation_function": "sqrelu",
        "fused_dense_sqrelu_dense": True,
        "n_inner": 48,
        "mlp_checkpoint_lvl": 0,
    }
    return SimpleNamespace(**{**base, **kw})


def test_gpt_create_mlp_cls_builds_fused_dense_sqrelu_dense():
    from flash_attn.models.gpt import create_mlp_cls

    mlp = create_mlp_cls(_mlp_config(mlp_checkpoint_lvl=[0, 2]), layer_idx=1, dtype=F64)(16)
    assert isinstance(mlp, FusedDenseSqreluDense)
    assert mlp.checkpoint_lvl == 2 and mlp.fc1.weight.shape == (48, 16) and mlp.fc2.weight.shape == (16, 48)
    assert mlp.fc1.weight.dtype == F64
    # flash-attn's module always has both biases, whatever mlp_fc1_bias / mlp_fc2_bias say
    mlp = create_mlp_cls(_mlp_config(n_inner=None, mlp_fc1_bias=False))(8)
    assert mlp.fc1.weight.shape == (32, 8) and mlp.fc1.bias is not None
    with pytest.raises(ValueError, match="sqrelu"):
        create_mlp_cls(_mlp_config(activation_function="gelu_new"))
    with pytest.raises(ValueError, match="both"):
        create_mlp_cls(_mlp_config(fused_mlp=True))
    with pytest.raises(ValueError, match="Tensor Parallel"):
        create_mlp_cls(_mlp_config(), 0, object())
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        create_mlp_cls(_mlp_config(mlp_checkpoint_lvl=4))(8)


@needs_hf
def test_gpt_model_with_fused_dense_sqrelu_dense():
    from flash_attn.models.gpt import GPTLMHeadModel

    def config(**kw):
        return transformers.GPT2Config(
            vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=64, use_flash_attn=False,
            activation_function="sqrelu", bos_token_id=0, eos_token_id=0, **kw,
        )  # fmt: skip

    torch.manual_seed(11)
    fused = GPTLMHeadModel(config(fused_dense_sqrelu_dense=True, mlp_checkpoint_lvl=[1, 2])).to(DEVICE).eval()
    plain = GPTLMHeadModel(config()).to(DEVICE).eval()  # eval: no dropout
    assert all(isinstance(layer.mlp, FusedDenseSqreluDense) for layer in fused.transformer.layers)
    assert [layer.mlp.checkpoint_lvl for layer in fused.transformer.layers] == [1, 2]
    plain.load_state_dict(fused.state_dict())  # same parameter names and shapes
    ids = torch.randint(0, 40, (2, 10), device=DEVICE)
    logits = fused(ids).logits
    torch.testing.assert_close(logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    logits.square().mean().backward()
    plain(ids).logits.square().mean().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
