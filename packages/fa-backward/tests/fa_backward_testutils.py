"""Helpers shared by fa-backward's tests: random inputs, reference gradients, the 2x error rule."""

from __future__ import annotations

import torch

from fa_core.reference import attention_ref, attention_varlen_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: CPU interpreter: fp32/fp16 only (bf16 tl.dot is wrong there); GPU: fp16/bf16.
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]
#: default dtype of the tests: float32 under the interpreter, float16 on a GPU (kernels take no fp32 there)
FP = DTYPES[0]
#: absolute slack of the 2x rule, relative to the largest true gradient entry
SLACK = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rand(*shape, dtype=FP, device=DEVICE, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)


def ref_grads(q, k, v, dout, *, varlen=None, upcast=True, **kw):
    """Gradients of the reference: float64 when ``upcast`` (the truth), else in the inputs' precision.

    ``varlen``: ``(cu_seqlens_q, cu_seqlens_k, seqused_k)`` for :func:`attention_varlen_ref`.
    """
    dtype = torch.float64 if upcast else q.dtype
    q_, k_, v_ = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    if varlen is None:
        out, lse = attention_ref(q_, k_, v_, upcast=False, **kw)
    else:
        cu_q, cu_k, seqused = varlen
        out, lse = attention_varlen_ref(q_, k_, v_, cu_q, cu_k, seqused_k=seqused, upcast=False, **kw)
    out.backward(dout.to(dtype))
    return out.detach(), lse, (q_.grad, k_.grad, v_.grad)


def check_2x(ours, truth, lowp, dtype, names=("dq", "dk", "dv"), factor=2.0):
    """``max|ours - truth| <= factor * max|lowp - truth| + slack * max(1, max|truth|)``, and no NaN/inf."""
    for name, g, t, lp in zip(names, ours, truth, lowp):
        assert g.shape == t.shape, (name, g.shape, t.shape)
        assert torch.isfinite(g).all(), f"{name} has non-finite entries (unwritten or NaN)"
        if t.numel() == 0:
            continue
        err = (g.double() - t).abs().max().item()
        ref_err = (lp.double() - t).abs().max().item()
        tol = factor * ref_err + SLACK[dtype] * max(1.0, t.abs().max().item())
        assert err <= tol, f"{name}: err {err:.3g} > tol {tol:.3g} (ref_err {ref_err:.3g})"


def keep_mask(s_dmask: torch.Tensor) -> torch.Tensor:
    """The dropout keep-mask encoded in ``S_dmask`` (dropped entries are stored negated, -0.0 included)."""
    return ~torch.signbit(s_dmask)


def cu_seqlens(lens, device=DEVICE):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    return cu.to(device)
