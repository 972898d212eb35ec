"""GPU tests of the Hopper Gluon dK/dV pass (:mod:`fa_backward.gluon_dkdv`) against the Triton dK/dV pass and
the float32 reference (flash-attn's 2x rule), on the lse2 / delta that the Triton dQ pass writes.

Run (from the repository root, on an H100 with Triton 3.6):
    PYTHONPATH=packages/fa-core/src:packages/fa-backward/src \\
        python -m pytest packages/fa-backward/tests/test_gluon_dkdv_gpu.py -m gpu -q -s -n 0
"""

from __future__ import annotations

import math

import pytest
import torch

from fa_backward import gluon_dkdv
from fa_backward.backward import flash_attn_backward
from fa_core.forward import flash_attn_forward
from fa_core.reference import attention_ref
from fa_core.testing import assert_close_2x, poisoned, slack_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not gluon_dkdv.available(),
        reason="needs Triton 3.6 Gluon and an sm_90 GPU",
    ),
]

LOG2E = 1.4426950408889634

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal): ragged lengths (not multiples of the
# 64-row query tiles or the 128-key blocks; seqlen_q a multiple of 4, as the pass requires), seqlen_q < / >
# seqlen_k, GQA groups 1 / 4, MQA
CASES = {
    "d64": (2, 1000, 1000, 4, 4, 64, False),
    "d64_causal_gqa4": (2, 780, 1537, 8, 2, 64, True),
    "d128": (1, 1540, 1000, 4, 4, 128, False),
    "d128_causal": (2, 1000, 1000, 4, 4, 128, True),
    "d128_causal_gqa4": (1, 1540, 777, 8, 2, 128, True),
    "d128_gqa4": (2, 516, 255, 4, 1, 128, False),
    "d64_short": (3, 68, 129, 2, 1, 64, True),
    # whole tiles (the training shapes): every query tile full, the diagonal exactly on tile boundaries
    "d128_causal_whole": (2, 1024, 1024, 4, 4, 128, True),
    "d64_causal_gqa8_whole": (1, 2048, 2048, 16, 2, 64, True),
}


def _setup(name: str, dtype: torch.dtype, seed: int = 0):
    batch, sq, sk, h, hk, d, causal = CASES[name]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, dout = (torch.randn(batch, sq, h, d, device="cuda", generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(batch, sk, hk, d, device="cuda", generator=gen).to(dtype) for _ in range(2))
    scale = 0.9 / math.sqrt(d)
    fwd = flash_attn_forward(q, k, v, softmax_scale=scale, causal=causal)
    # the Triton backward: its dQ pass writes delta (returned) and lse2 = lse * log2(e) (as computed here)
    bwd = flash_attn_backward(dout, q, k, v, fwd.out, fwd.lse, softmax_scale=scale, causal=causal)
    lse2 = (fwd.lse * LOG2E).contiguous()
    delta = bwd.softmax_d.contiguous()
    return q, k, v, dout, lse2, delta, scale, causal, bwd


def _gluon(q, k, v, dout, lse2, delta, scale, causal):
    dk = poisoned(k.shape, k.dtype, k.device)
    dv = poisoned(v.shape, v.dtype, v.device)
    out = gluon_dkdv.dkdv(q, k, v, dout, lse2, delta, dk, dv, causal=causal, softmax_scale=scale)
    assert out[0] is dk and out[1] is dv
    return dk, dv


def _ref_grads(q, k, v, dout, scale, causal, dtype):
    q_, k_, v_ = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, _ = attention_ref(q_, k_, v_, softmax_scale=scale, causal=causal, upcast=False)
    out.backward(dout.to(dtype))
    return k_.grad, v_.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_and_triton(name: str, dtype: torch.dtype) -> None:
    q, k, v, dout, lse2, delta, scale, causal, bwd = _setup(name, dtype)
    assert gluon_dkdv.supports(q, k, v, dout, lse2, delta, causal=causal, softmax_scale=scale)
    dk, dv = _gluon(q, k, v, dout, lse2, delta, scale, causal)
    torch.cuda.synchronize()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all(), "unwritten (NaN) or non-finite rows"
    true_dk, true_dv = _ref_grads(q, k, v, dout, scale, causal, torch.float32)
    low_dk, low_dv = _ref_grads(q, k, v, dout, scale, causal, dtype)
    assert_close_2x(dk, true_dk, low_dk, "dk")
    assert_close_2x(dv, true_dv, low_dv, "dv")
    # and within the sum of both kernels' allowances of the Triton dK/dV pass (both accumulate in float32)
    assert_close_2x(bwd.dk, true_dk, low_dk, "triton dk")
    assert_close_2x(bwd.dv, true_dv, low_dv, "triton dv")
    for name, ours, tl_grad, low, true in (
        ("dk", dk, bwd.dk, low_dk, true_dk),
        ("dv", dv, bwd.dv, low_dv, true_dv),
    ):
        tol = 4 * (low.double() - true.double()).abs().max().item() + 2 * slack_for(dtype)
        err = (ours.double() - tl_grad.double()).abs().max().item()
        assert err <= tol, f"{name}: |gluon - triton| {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("name", ["d128_causal_gqa4", "d64_causal_gqa4", "d128_gqa4"])
def test_deterministic(name: str) -> None:
    q, k, v, dout, lse2, delta, scale, causal, _ = _setup(name, torch.bfloat16, seed=1)
    first = _gluon(q, k, v, dout, lse2, delta, scale, causal)
    second = _gluon(q, k, v, dout, lse2, delta, scale, causal)
    torch.cuda.synchronize()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_misaligned_vectors_refused_and_strided_outputs() -> None:
    """lse2 / delta that do not start 16-byte aligned are refused before any launch (their rows are TMA
    coordinates, which must address 16-byte boundaries); dk / dv views with padded heads are written in place,
    nothing outside them."""
    from fa_core.errors import FlashAttnValueError

    q, k, v, dout, lse2, delta, scale, causal, bwd = _setup("d64_short", torch.float16)
    both = torch.empty(2 * lse2.numel() + 1, device="cuda")
    lse2_m = both[1 : 1 + lse2.numel()].view_as(lse2).copy_(lse2)
    delta_m = both[1 + lse2.numel() :].view_as(delta).copy_(delta)
    assert lse2_m.data_ptr() % 16 and delta_m.data_ptr() % 16
    with pytest.raises(FlashAttnValueError, match="16-byte"):
        gluon_dkdv.dkdv(q, k, v, dout, lse2_m, delta, causal=causal, softmax_scale=scale)
    with pytest.raises(FlashAttnValueError, match="16-byte"):
        gluon_dkdv.dkdv(q, k, v, dout, lse2, delta_m, causal=causal, softmax_scale=scale)
    pad = torch.full((*k.shape[:2], k.shape[2] + 1, k.shape[3]), float("nan"), dtype=k.dtype, device="cuda")
    pad2 = pad.clone()
    dk, dv = pad[:, :, 1:], pad2[:, :, 1:]
    gluon_dkdv.dkdv(q, k, v, dout, lse2, delta, dk, dv, causal=causal, softmax_scale=scale)
    ref_dk, ref_dv = _gluon(q, k, v, dout, lse2, delta, scale, causal)
    torch.cuda.synchronize()
    assert torch.equal(dk, ref_dk) and torch.equal(dv, ref_dv)
    assert torch.isnan(pad[:, :, 0]).all(), "wrote outside the dk view"


def test_refuses_unsupported() -> None:
    q, k, v, dout, lse2, delta, scale, causal, _ = _setup("d64_short", torch.float16)
    from fa_core.errors import FlashAttnValueError

    with pytest.raises(FlashAttnValueError, match="lse2"):
        gluon_dkdv.dkdv(q, k, v, dout, lse2[:, :, :-1], delta, causal=causal)
    with pytest.raises(FlashAttnValueError, match="softmax_scale"):
        gluon_dkdv.dkdv(q, k, v, dout, lse2, delta, causal=causal, softmax_scale=-1.0)
    # a query length that is not a multiple of 4: the lse2 / delta rows would be TMA coordinates off a
    # 16-byte boundary (an illegal instruction on the device), refused before any launch
    with pytest.raises(FlashAttnValueError, match="seqlen_q"):
        gluon_dkdv.dkdv(
            q[:, :-1], k, v, dout[:, :-1], lse2[:, :, :-1].contiguous(), delta[:, :, :-1].contiguous()
        )


def test_strided_inputs_and_default_scale() -> None:
    """q / k / v as views of a packed ``(b, s, 3, h, d)`` buffer and dout as a ``(b, h, s, d)`` transpose (the
    layouts models hand over), with the default softmax scale."""
    torch.manual_seed(3)
    b, s, h, d = 2, 1000, 4, 128
    qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    fwd = flash_attn_forward(q, k, v, causal=True)
    bwd = flash_attn_backward(dout, q, k, v, fwd.out, fwd.lse, causal=True)
    lse2, delta = (fwd.lse * LOG2E).contiguous(), bwd.softmax_d.contiguous()
    if not gluon_dkdv.supports(q, k, v, dout, lse2, delta, causal=True):
        pytest.skip("these strides are not TMA-compatible for the Gluon pass")
    dk, dv = poisoned(k.shape, k.dtype, k.device), poisoned(v.shape, v.dtype, v.device)
    gluon_dkdv.dkdv(q, k, v, dout, lse2, delta, dk, dv, causal=True)
    true_dk, true_dv = _ref_grads(q, k, v, dout, d**-0.5, True, torch.float32)
    low_dk, low_dv = _ref_grads(q, k, v, dout, d**-0.5, True, torch.bfloat16)
    assert_close_2x(dk, true_dk, low_dk, "dk")
    assert_close_2x(dv, true_dv, low_dv, "dv")


# (batch, seqlen, nheads, nheads_k, headdim, causal, packed): the public backward with the dispatch on; a
# seqlen that is not a multiple of 4 keeps the Triton dK/dV pass (see gluon_dkdv.unsupported_reason)
DISPATCH = {
    "d128": (2, 1000, 4, 4, 128, False, False),
    "d128_causal_gqa2": (1, 1540, 4, 2, 128, True, False),
    "d128_causal_ragged": (1, 1537, 4, 2, 128, True, False),
    "d64_causal": (2, 1024, 4, 4, 64, True, False),
    "d64_qkvpacked": (2, 780, 4, 4, 64, False, True),
}


@pytest.mark.parametrize("passes", ["dkdv", "dq", "dq+dkdv"])
@pytest.mark.parametrize("name", sorted(DISPATCH))
def test_public_backward_dispatch(name: str, passes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``flash_attn_func`` / ``flash_attn_qkvpacked_func`` gradients with Gluon passes dispatched
    (``fa_backward.launch.GLUON_DQ_MIN_FLOPS`` / ``GLUON_DKDV_MIN_FLOPS`` = 0): the chosen Gluon kernels run on
    every call (none is replayed without them), and dq / dk / dv match the reference (2x rule) and the
    Triton-only backward."""
    from fa_backward import flash_attn_func, flash_attn_qkvpacked_func, gluon_dq, launch

    batch, s, h, hk, d, causal, packed = DISPATCH[name]
    torch.manual_seed(11)
    dtype = torch.bfloat16
    if packed:
        qkv = torch.randn(batch, s, 3, h, d, device="cuda", dtype=dtype)
        leaves = (qkv,)
    else:
        q = torch.randn(batch, s, h, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(batch, s, hk, d, device="cuda", dtype=dtype) for _ in range(2))
        leaves = (q, k, v)
    dout = torch.randn(batch, s, h, d, device="cuda", dtype=dtype)

    def grads() -> tuple[torch.Tensor, ...]:
        xs = tuple(x.detach().clone().requires_grad_() for x in leaves)
        out = (
            flash_attn_qkvpacked_func(xs[0], causal=causal) if packed else flash_attn_func(*xs, causal=causal)
        )
        return torch.autograd.grad(out, xs, dout)

    base = grads()  # the Triton passes (the thresholds' default)
    calls = {"dq": 0, "dkdv": 0}

    def counting(module, attr: str, tag: str) -> None:
        real = getattr(module, attr)

        def wrapper(*args, **kwargs):
            calls[tag] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapper)

    wanted = passes.split("+")
    if "dq" in wanted:
        monkeypatch.setattr(launch, "GLUON_DQ_MIN_FLOPS", 0.0)
    if "dkdv" in wanted:
        monkeypatch.setattr(launch, "GLUON_DKDV_MIN_FLOPS", 0.0)
    counting(gluon_dq, "dq_pass", "dq")
    counting(gluon_dkdv, "dkdv", "dkdv")
    first, second = grads(), grads()
    torch.cuda.synchronize()
    runs = {"dq": "dq" in wanted, "dkdv": "dkdv" in wanted and s % 4 == 0}
    assert calls == {tag: (2 if runs[tag] else 0) for tag in calls}, f"Gluon passes per 2 calls: {calls}"
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "not deterministic"
    if packed:
        q, k, v = (t.detach() for t in leaves[0].unbind(2))
    xs32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    xs16 = [t.detach().requires_grad_() for t in (q, k, v)]
    out32, _ = attention_ref(*xs32, causal=causal, upcast=False)
    out16, _ = attention_ref(*xs16, causal=causal, upcast=False)
    true = torch.autograd.grad(out32, xs32, dout.float())
    low = torch.autograd.grad(out16, xs16, dout)
    got = first[0].unbind(2) if packed else first
    tl_grads = base[0].unbind(2) if packed else base
    for i, label in enumerate(("dq", "dk", "dv")):
        assert_close_2x(got[i], true[i], low[i], label)
        assert_close_2x(tl_grads[i], true[i], low[i], f"triton {label}")
    if "dq" not in wanted:
        assert torch.equal(got[0], tl_grads[0]), "dq must be the Triton pass's in both"
