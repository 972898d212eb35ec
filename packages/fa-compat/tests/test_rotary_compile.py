"""Rotary under ``torch.compile``: every public function, every argument form, ``fullgraph=True``.

The Triton launch sits behind the custom ops ``torch.ops.fa_core.rotary`` (differentiable) and
``torch.ops.fa_core.rotary_inplace``: the ops pass ``opcheck``; every case of ``rotary_cases.NAMES``
compiles with aot_eager (dynamo + AOTAutograd + functionalization; the kernels run through the interpreter on
CPU) forward and backward, gives the eager bits and meets the 2x rule against the float64 reference; a few
compile with dynamic shapes, with the eager backend, in fp16, and with inductor (CPU code around the op).
The kernel's compile classes: the constexprs and Triton-specialized arguments of every launch do not change
with batch size or sequence length. test_gpu_rotary_compile.py runs inductor on the GPU and counts real
compilations.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from rotary_cases import NAMES, Dims, build, check

import fa_core.rotary
from flash_attn.layers.rotary import apply_rotary_emb, apply_rotary_emb_qkv_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
DIMS = Dims(batch=2, seqlen=8, nheads=2, headdim=16, varlen=(3, 8, 1))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(case, backend: str, dynamic: bool | None = None):
    return torch.compile(case.make_fn(), backend=backend, fullgraph=True, dynamic=dynamic)


@pytest.mark.parametrize("name", NAMES)
def test_compile_aot_eager_fwd_bwd(name):
    torch.manual_seed(0)
    case = build(name, DEVICE, DTYPE, DIMS)
    eager = check(case, case.make_fn(), grad=True)
    check(case, _compiled(case, "aot_eager"), grad=True, eager=eager)


@pytest.mark.parametrize(
    "name",
    [
        "emb,off=tensor,il=1,rd=half,inplace=1",
        "qkv,gqa=1,off=tensor,il=0,rd=full",
        "kv,off=int,il=1,rd=half",
        "module_kv,off=tensor,il=0,rd=half",
        "ops,varlen=1,off=tensor,il=0,rd=full",
    ],
)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_no_grad_rotates_in_place(name, backend):
    # inference: the in-place forms run the in-place op, and the caller's tensor is rotated
    torch.manual_seed(1)
    case = build(name, DEVICE, DTYPE, DIMS)
    eager = check(case, case.make_fn(), grad=False)
    check(case, _compiled(case, backend), grad=False, eager=eager)


@pytest.mark.parametrize(
    "name",
    [
        "emb,off=int,il=0,rd=full,inplace=0",
        "emb,off=tensor,il=1,rd=half,inplace=1",
        "emb,varlen=1,off=int,il=0,rd=half,inplace=0",
        "qkv,gqa=1,off=int,il=1,rd=half",
        "kv,off=tensor,il=0,rd=full",
    ],
)
def test_compile_dynamic_shapes(name):
    # dynamic=True: sizes (and an int offset) are symbolic; the ops take SymInts
    torch.manual_seed(2)
    case = build(name, DEVICE, DTYPE, DIMS)
    eager = check(case, case.make_fn(), grad=True)
    check(case, _compiled(case, "aot_eager", dynamic=True), grad=True, eager=eager)


@pytest.mark.parametrize("grad", [False, True])
def test_dynamic_shapes_one_graph_for_new_sizes(grad):
    # after the first recompile marks sizes dynamic, new batch sizes / lengths / int offsets reuse the graph
    # (sizes and ints 0 / 1 are always specialized by dynamo, hence none here)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    fn = torch.compile(apply_rotary_emb_qkv_, backend=counter, fullgraph=True)
    for batch, seqlen, offset in [(2, 8, 2), (3, 5, 3), (5, 7, 4), (4, 9, 3), (6, 3, 5)]:
        cos = torch.rand(16, 8, device=DEVICE, dtype=DTYPE)
        sin = torch.rand(16, 8, device=DEVICE, dtype=DTYPE)
        qkv = torch.randn(batch, seqlen, 3, 2, 16, device=DEVICE, dtype=DTYPE, requires_grad=grad)
        offsets = torch.full((batch,), offset, dtype=torch.int32, device=DEVICE) if grad else offset
        out = fn(qkv, cos, sin, seqlen_offsets=offsets)
        if grad:
            out.backward(torch.randn_like(out))
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.parametrize("name", ["qkv,gqa=1,off=tensor,il=0,rd=full", "emb,off=int,il=1,rd=half,inplace=0"])
def test_compile_fp16(name):
    torch.manual_seed(3)
    case = build(name, DEVICE, torch.float16, DIMS)
    eager = check(case, case.make_fn(), grad=True)
    check(case, _compiled(case, "aot_eager"), grad=True, eager=eager)


def test_compile_inductor_packed_qkv_tensor_offsets():
    # the reported form: packed qkv, (batch,) int32 offsets, inductor, forward and backward
    torch.manual_seed(4)
    case = build("qkv,gqa=0,off=tensor,il=0,rd=full", DEVICE, DTYPE, DIMS)
    eager = check(case, case.make_fn(), grad=True)
    check(case, _compiled(case, "inductor"), grad=True, eager=eager)


def test_compile_inductor_in_place_on_a_view_without_grad():
    # inductor's functionalization of the in-place op on a view of the caller's tensor (K of a packed kv)
    torch.manual_seed(5)
    case = build("kv,off=tensor,il=1,rd=half", DEVICE, DTYPE, DIMS)
    eager = check(case, case.make_fn(), grad=False)
    check(case, _compiled(case, "inductor"), grad=False, eager=eager)


# ------------------------------------------------------------------------------------------ custom ops
def _op_args(offsets: str, varlen: bool):
    if varlen:
        x = torch.randn(12, 2, 16, device=DEVICE, dtype=DTYPE)
        cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
        batch, max_seqlen = 2, 7
    else:
        x = torch.randn(2, 6, 2, 16, device=DEVICE, dtype=DTYPE)
        cu, batch, max_seqlen = None, 2, 0
    cos = torch.rand(16, 4, device=DEVICE, dtype=DTYPE)
    sin = torch.rand(16, 4, device=DEVICE, dtype=DTYPE)
    t = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE) if offsets == "tensor" else None
    assert batch == 2
    return x, (cos, sin, t, 2 if t is None else 0, cu, max_seqlen, True, False)


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("offsets", ["int", "tensor"])
@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck_rotary(offsets, varlen):
    x, rest = _op_args(offsets, varlen)
    torch.library.opcheck(
        torch.ops.fa_core.rotary.default, (x.requires_grad_(), *rest), test_utils=OPCHECK_TESTS
    )


@pytest.mark.parametrize("offsets", ["int", "tensor"])
def test_opcheck_rotary_inplace(offsets):
    x, rest = _op_args(offsets, False)
    torch.library.opcheck(
        torch.ops.fa_core.rotary_inplace.default, (x, *rest), test_utils=("test_schema", "test_faketensor")
    )


def test_op_gradient_is_conjugate_rotation():
    # the registered backward: gradient = conjugate rotation of the incoming gradient (also for an expanded one)
    x, rest = _op_args("tensor", False)
    x.requires_grad_()
    out = torch.ops.fa_core.rotary(x, *rest)
    out.sum().backward()
    cos, sin, t, off, cu, ms, il, conj = rest
    want = torch.ops.fa_core.rotary(torch.ones_like(x), cos, sin, t, off, cu, ms, il, not conj)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ compile classes
class _Recorder:
    """Stands in for rotary_kernel: records every launch, then runs the real kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _do_not_specialize(kernel) -> set[str]:
    names = getattr(kernel, "kwargs", {}).get("do_not_specialize")  # interpreter
    if names is None:
        names = kernel.do_not_specialize
    arg_names = kernel.arg_names
    return {arg_names[n] if isinstance(n, int) else n for n in names}


def _triton_class(kernel, args, kwargs):
    """What Triton keys a compilation on, modelled: the constexprs, tensor dtypes and 16-byte alignment, and
    for ints not in do_not_specialize, == 1 / divisible by 16 / 32 or 64 bit."""
    skip = _do_not_specialize(kernel)
    key = []
    for name, a in zip(kernel.arg_names, args):
        if isinstance(a, torch.Tensor):
            key.append((name, a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, int) and not isinstance(a, bool) and name not in skip:
            key.append((name, a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
        elif a is None:
            key.append((name, None))
    return tuple(key), tuple(sorted(kwargs.items()))


def test_launch_class_does_not_depend_on_batch_or_seqlen(monkeypatch):
    # the flash-attn compile-count property, on the launch arguments: sweeping batch and seqlen (fwd + bwd)
    # gives one class for the forward and one for the backward (conjugate)
    rec = _Recorder(fa_core.rotary.rotary_kernel)
    monkeypatch.setattr(fa_core.rotary, "rotary_kernel", rec)
    assert {"seqlen", "nheads", "seqlen_ro", "SEQLEN_OFFSETS"} <= _do_not_specialize(rec.kernel)
    nheads, headdim = 2, 16
    for batch in (1, 2, 3, 5, 8):
        for seqlen in (17, 64, 100, 513) if DEVICE == "cuda" else (17, 64):
            x = torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, dtype=DTYPE, requires_grad=True)
            cos = torch.rand(seqlen + 4, headdim // 2, device=DEVICE, dtype=DTYPE)
            sin = torch.rand_like(cos)
            for offsets in (seqlen % 5, torch.arange(batch, dtype=torch.int32, device=DEVICE) % 4):
                apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets).backward(torch.randn_like(x))
    classes = {_triton_class(rec.kernel, a, k) for a, k in rec.launches}
    # forward and backward, each with an int and a tensor offset
    assert len(rec.launches) == 5 * (4 if DEVICE == "cuda" else 2) * 2 * 2
    assert len(classes) == 4, classes


@pytest.mark.parametrize("inplace", [False, True])
def test_make_fx_records_one_op(inplace):
    # a dispatch-mode tracer sees the custom op, never the eager direct launch
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(2, 6, 2, 16, device=DEVICE, dtype=DTYPE)
    cos = torch.rand(8, 4, device=DEVICE, dtype=DTYPE)
    sin = torch.rand(8, 4, device=DEVICE, dtype=DTYPE)
    offs = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
    gm = make_fx(lambda x, c, s, o: apply_rotary_emb(x, c, s, inplace=inplace, seqlen_offsets=o))(
        x, cos, sin, offs
    )
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    op = "fa_core.rotary_inplace.default" if inplace else "fa_core.rotary.default"
    assert targets.count(op) == 1, targets
    x_in = x.clone()
    out = gm(x_in, cos, sin, offs)
    want = apply_rotary_emb(x.clone(), cos, sin, seqlen_offsets=offs)
    assert torch.equal(out, want)
    assert torch.equal(x_in, want if inplace else x)
