"""Tests for flash_attn.utils.torch (the autocast decorators) and flash_attn.utils.library (``triton_op``).

The decorators are checked for following the autocast of their device type (CUDA by default, so nothing
changes under CPU autocast; an explicit ``device_type="cpu"`` follows the CPU's: casts, autocast off inside
the forward, the forward's state restored in the backward). ``triton_op`` builds operators around a Triton
kernel (run by the CPU interpreter without a GPU) and around plain PyTorch bodies: results against float64
PyTorch, the schema as given or inferred, mutation, the fake kernel, and what ``torch.compile``'s AOT
dispatcher and ``torch.export`` record with and without the decomposition.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl
from fa_compat_testutils import DEVICE
from functorch.compile import aot_function
from torch._library.triton import is_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import wrap_triton

from flash_attn.utils.library import triton_op
from flash_attn.utils.torch import custom_amp_decorator, custom_bwd, custom_fwd

_COUNTER = itertools.count()


def _name(base: str) -> str:
    """A fresh operator name (an operator name can be registered once per process)."""
    return f"fa_compat_test::{base}_{next(_COUNTER)}"


# ------------------------------------------------------------------------------------ custom_fwd
def _recording_function(fwd_decorator, bwd_decorator):
    """An x * w Function whose forward / backward record their inputs' dtypes and the CPU autocast state."""
    seen: dict[str, object] = {}

    class Mul(torch.autograd.Function):
        @staticmethod
        @fwd_decorator
        def forward(ctx, x, w):
            seen["fwd"] = (x.dtype, w.dtype, torch.is_autocast_enabled("cpu"))
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        @bwd_decorator
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            seen["bwd"] = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            return grad * w, grad * x

    return Mul, seen


def _inputs():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    return x, w


@pytest.mark.parametrize("form", ["bare", "called"])
def test_custom_fwd_defaults_to_cuda_autocast(form):
    fwd = custom_fwd if form == "bare" else custom_fwd(cast_inputs=torch.float16)
    Mul, seen = _recording_function(fwd, custom_bwd)
    x, w = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = Mul.apply(x, w)
    # CPU autocast is not the decorators' business: inputs untouched, CPU autocast still on inside
    assert seen["fwd"] == (torch.float64, torch.float64, True)
    y.backward(torch.ones_like(y))
    assert seen["bwd"][0] is False  # run under the forward's (CUDA) state: CPU autocast off again
    torch.testing.assert_close(x.grad, w.detach())
    torch.testing.assert_close(w.grad, x.detach())


def test_custom_fwd_explicit_device_type():
    Mul, seen = _recording_function(
        custom_fwd(device_type="cpu", cast_inputs=torch.float16), custom_bwd(device_type="cpu")
    )
    x, w = (t.detach().float().requires_grad_() for t in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = Mul.apply(x, w)
    assert seen["fwd"] == (torch.float16, torch.float16, False)  # cast, autocast off inside
    assert y.dtype == torch.float16
    y.sum().backward()
    assert seen["bwd"] == (False, torch.bfloat16)  # cast_inputs: the backward runs without autocast
    torch.testing.assert_close(x.grad, w.detach().half().float())

    Mul, seen = _recording_function(custom_fwd(device_type="cpu"), custom_bwd(device_type="cpu"))
    x, w = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = Mul.apply(x, w)
    assert seen["fwd"] == (torch.float64, torch.float64, True)
    y.sum().backward()  # outside autocast, but under the forward's state
    assert seen["bwd"] == (True, torch.bfloat16)


def test_custom_amp_decorator():
    calls = []

    def dec(*args, **kwargs):
        calls.append((args, kwargs))
        return "decorated"

    wrapped = custom_amp_decorator(dec, True)
    assert wrapped(len) == "decorated" and calls[-1] == ((len,), {"device_type": "cuda"})
    wrapped(cast_inputs=torch.float16)
    assert calls[-1] == ((), {"cast_inputs": torch.float16, "device_type": "cuda"})
    wrapped(device_type="cpu")
    assert calls[-1] == ((), {"device_type": "cpu"})
    custom_amp_decorator(dec, False)(len, cast_inputs=torch.float16)
    assert calls[-1] == ((len,), {"cast_inputs": torch.float16})


# ------------------------------------------------------------------------------------- triton_op
@triton.jit
def _axpy_kernel(X, Y, OUT, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask)
    y = tl.load(Y + offs, mask=mask)
    tl.store(OUT + offs, alpha * x + y, mask=mask)


def _axpy(x, y, alpha=2.0):  # no annotations: the schema must be given
    out = torch.empty_like(x)
    n = x.numel()
    wrap_triton(_axpy_kernel)[(triton.cdiv(n, 64),)](x, y, out, n, alpha, BLOCK=64)
    return out


def test_triton_op_with_schema_runs_the_kernel():
    name = _name("axpy")
    op = triton_op(name, _axpy, mutates_args=(), schema="(Tensor x, Tensor y, float alpha=2.0) -> Tensor")
    namespace, opname = name.split("::")
    overload = getattr(getattr(torch.ops, namespace), opname).default
    assert str(overload._schema) == f"{name}(Tensor x, Tensor y, float alpha=2.) -> Tensor"
    torch.manual_seed(0)
    x, y = torch.randn(300, device=DEVICE), torch.randn(300, device=DEVICE)
    expected = 2.0 * x.double() + y.double()
    torch.testing.assert_close(op(x, y).double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(overload(x, y, alpha=-0.5).double(), -0.5 * x.double() + y.double())
    torch.testing.assert_close(op(x, y, 3.0).double(), 3.0 * x.double() + y.double())


def test_triton_op_infers_schema_and_decorates():
    @triton_op(_name("axpy_inferred"), mutates_args=())
    def op(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
        return _axpy(x, y, alpha)

    assert "float alpha=2." in str(op._opoverload._schema)
    torch.manual_seed(1)
    x, y = torch.randn(70, device=DEVICE), torch.randn(70, device=DEVICE)
    torch.testing.assert_close(op(x, y, alpha=0.25).double(), 0.25 * x.double() + y.double())


def test_triton_op_eager_calls_launch_directly():
    states = []

    def body(x: torch.Tensor) -> torch.Tensor:
        states.append(is_wrap_triton_enabled())
        return x + 1

    op = triton_op(_name("direct"), body, mutates_args=())
    op(torch.zeros(2))
    assert states == [False]  # no higher-order-operator dispatch in eager mode
    assert is_wrap_triton_enabled()  # restored


def test_triton_op_mutation_and_fake_kernel():
    def scale_(x: torch.Tensor, out: torch.Tensor, alpha: float) -> None:
        out.copy_(x * alpha)

    op = triton_op(
        _name("scale_"), scale_, mutates_args=("out",), schema="(Tensor x, Tensor(a!) out, float alpha) -> ()"
    )
    x, out = torch.randn(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    assert op(x, out, 3.0) is None
    torch.testing.assert_close(out, 3.0 * x)
    with pytest.raises(ValueError, match="mutates"):
        triton_op(
            _name("bad_mutation"),
            scale_,
            mutates_args=(),
            schema="(Tensor x, Tensor(a!) out, float alpha) -> ()",
        )

    # the body is the fake kernel: shapes and dtypes without running it
    def outer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ran.append(True)
        return x[:, None] * y[None, :].to(x.dtype)

    ran: list[bool] = []
    op2 = triton_op(_name("outer"), outer, mutates_args=())
    with FakeTensorMode() as mode:
        result = op2(mode.from_tensor(torch.empty(8)), mode.from_tensor(torch.empty(3, dtype=torch.float64)))
    assert result.shape == (8, 3) and result.dtype == torch.float32
    assert ran == [True]  # the fake kernel ran on fake tensors


@pytest.mark.parametrize("allow_decomposition", [True, False])
def test_triton_op_decomposition(allow_decomposition):
    def shifted_sin(x: torch.Tensor) -> torch.Tensor:
        return x.sin() + 1

    name = _name("shifted_sin")
    op = triton_op(name, shifted_sin, mutates_args=(), allow_decomposition=allow_decomposition)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    x = torch.randn(6, dtype=torch.float64)
    out = aot_function(lambda t: op(t) * 2, fw_compiler=capture)(x)
    torch.testing.assert_close(out, (x.sin() + 1) * 2)
    (code,) = graphs
    opname = name.split("::")[1]
    if allow_decomposition:  # the AOT dispatcher sees the body
        assert "aten.sin" in code and opname not in code
    else:  # one opaque node
        assert opname in code and "aten.sin" not in code

    class Module(torch.nn.Module):
        def forward(self, t):
            return op(t)

    exported = torch.export.export(Module(), (x,))
    assert opname in str(exported.graph)  # export keeps the operator whole either way


def test_triton_op_errors():
    with pytest.raises(ValueError, match="namespace::op_name"):
        triton_op("no_namespace", _axpy, mutates_args=())
    with pytest.raises(ValueError, match="namespace::op_name"):
        triton_op("a::b::c", mutates_args=())
    with pytest.raises(TypeError, match="name must be a str"):
        triton_op(None, _axpy, mutates_args=())
