"""Helpers shared by fa-compat's tests: which extras are installed, inputs, reference gradients."""

from __future__ import annotations

import os

import pytest
import torch

from fa_core.reference import attention_ref, attention_varlen_ref
from fa_core.testing import assert_close_2x
from flash_attn import _extras

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: CPU interpreter: fp32/fp16 only (bf16 tl.dot is wrong there); GPU: fp16/bf16.
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]
#: the most precise dtype the kernels take here, and the other one
HI, LOWP = DTYPES
#: absolute tolerance for comparisons of two computations by our kernels (order of summation only)
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[HI]

#: "none" | "backward" | "kvcache" | "all" under nox; None when run by hand (then: whatever is importable).
SUBSET = os.environ.get("FA_COMPAT_SUBSET")
HAS_BACKWARD = _extras.BACKWARD is not None
HAS_KVCACHE = _extras.KVCACHE is not None

needs_backward = pytest.mark.skipif(not HAS_BACKWARD, reason="fa-backward not installed (FA_COMPAT_SUBSET)")
needs_kvcache = pytest.mark.skipif(not HAS_KVCACHE, reason="fa-kvcache not installed (FA_COMPAT_SUBSET)")


def rand(*shape, dtype=None, device=DEVICE, requires_grad=False):
    t = torch.randn(*shape, device=device, dtype=torch.float32).to(dtype or HI)
    return t.requires_grad_(requires_grad)


def cu_seqlens(lengths: list[int], device=DEVICE) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def ref_out_lse(q, k, v, *, varlen=None, upcast=True, **kw):
    """Reference ``(out, lse)``; ``varlen = (cu_q, cu_k)`` for packed sequences."""
    if varlen is None:
        return attention_ref(q, k, v, upcast=upcast, **kw)
    return attention_varlen_ref(q, k, v, varlen[0], varlen[1], upcast=upcast, **kw)


def ref_out_and_grads(q, k, v, dout, *, varlen=None, upcast=True, **kw):
    """Reference ``out`` and ``(dq, dk, dv)``: float64 when ``upcast`` (the truth), else in the inputs'
    precision; zeros for inputs the output does not use."""
    dtype = torch.float64 if upcast else q.dtype
    ins = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, _ = ref_out_lse(*ins, varlen=varlen, upcast=False, **kw)
    grads = torch.autograd.grad(out, ins, dout.to(dtype), allow_unused=True)
    return out.detach(), tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, ins))


def ref_grads(q, k, v, dout, *, varlen=None, upcast=True, **kw):
    """Gradients of the reference: float64 when ``upcast`` (the truth), else in the inputs' precision."""
    return ref_out_and_grads(q, k, v, dout, varlen=varlen, upcast=upcast, **kw)[1]


#: relative slack of the gradient comparisons (x the largest true gradient entry)
GRAD_SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def poison_empty():
    """torch.empty & co. return NaN-filled memory while deterministic algorithms are on (a module that imports
    this fixture gets it for every test)."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)


def check_out_lse(out, lse, q, k, v, varlen=None, **kw):
    """flash-attn's rule against the fp64 reference: out (and lse when given) within 2x the error of the same
    reference computed in the inputs' precision."""
    ref, ref_lse = ref_out_lse(q, k, v, varlen=varlen, **kw)
    low, low_lse = ref_out_lse(q, k, v, varlen=varlen, upcast=False, **kw)
    assert_close_2x(out, ref, low, "out")
    if lse is not None:
        assert_close_2x(lse, ref_lse, low_lse.float(), "lse", slack=1e-4)


def check_grads(grads, q, k, v, dout, varlen=None, **kw):
    """(dq, dk, dv) against the fp64 reference's gradients by flash-attn's 2x rule (slack: :data:`GRAD_SLACK`)."""
    true = ref_grads(q, k, v, dout, varlen=varlen, **kw)
    low = ref_grads(q, k, v, dout, varlen=varlen, upcast=False, **kw)
    for name, g, t, lo in zip(("dq", "dk", "dv"), grads, true, low):
        assert g.shape == t.shape, name
        assert_close_2x(g, t, lo, name, slack=GRAD_SLACK[q.dtype] * float(t.abs().max()) + 1e-6)
