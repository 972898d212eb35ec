"""GPU tests of the Hopper Gluon dQ pass (:mod:`fa_backward.gluon_dq`) against the float32 reference
(flash-attn's 2x rule) and the Triton dQ pass (its dq, and the delta / lse2 it writes for the dK/dV pass).

Run (from the repository root, on an H100 with Triton 3.6):
    PYTHONPATH=packages/fa-core/src:packages/fa-backward/src \\
        python -m pytest packages/fa-backward/tests/test_gluon_dq_gpu.py -m gpu -q -s -n 0
"""

from __future__ import annotations

import math

import pytest
import torch

from fa_backward import gluon_dkdv, gluon_dq
from fa_backward.backward import flash_attn_backward
from fa_core.forward import flash_attn_forward
from fa_core.reference import attention_ref
from fa_core.testing import assert_close_2x, poisoned, slack_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not gluon_dq.available(),
        reason="needs Triton 3.6 Gluon and an sm_90 GPU",
    ),
]

LOG2E = 1.4426950408889634

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal): ragged lengths (not multiples of the
# 128-row query tiles or the key tiles), seqlen_q < / > seqlen_k (causal: rows that see no key), GQA groups
# 1 / 4, MQA
CASES = {
    "d64": (2, 1000, 1000, 4, 4, 64, False),
    "d64_causal_gqa4": (2, 777, 1537, 8, 2, 64, True),
    "d64_causal_sq_gt_sk": (2, 1000, 333, 4, 2, 64, True),
    "d128": (1, 1537, 1000, 4, 4, 128, False),
    "d128_causal": (2, 1000, 1000, 4, 4, 128, True),
    "d128_causal_gqa4": (1, 1537, 777, 8, 2, 128, True),
    "d128_gqa4": (2, 513, 255, 4, 1, 128, False),
    "d64_short": (3, 65, 129, 2, 1, 64, True),
    "d128_tiny": (2, 7, 5, 2, 2, 128, True),
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
    return q, k, v, fwd.out, dout, fwd.lse, scale, causal


def _gluon(q, k, v, out, dout, lse, scale, causal, dlse=None):
    """The Gluon pass on NaN-poisoned outputs (every element it must write is checked by the callers)."""
    dq = poisoned(q.shape, q.dtype, q.device)
    delta, lse2 = poisoned((2, *lse.shape), torch.float32, q.device).unbind(0)
    res = gluon_dq.dq_pass(
        q, k, v, out, dout, lse, dq, delta, lse2, causal=causal, softmax_scale=scale, dlse=dlse
    )
    assert res[0] is dq and res[1] is delta and res[2] is lse2
    return dq, delta, lse2


def _triton(q, k, v, out, dout, lse, scale, causal, monkeypatch, dlse=None):
    """The Triton backward's dq, and the delta / lse2 its dQ pass writes (taken from the dK/dV launch, which
    receives them; replays are emptied so that the launch runs through Python)."""
    from fa_backward import launch

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = launch.dkdv_launch

    def spy(*args, **kwargs):
        seen.append((args[5].clone(), args[6].clone()))  # (grid, q, k, v, dout, lse2, delta, ...)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "_REPLAYS", {})
    monkeypatch.setattr(launch, "GLUON_DKDV_MIN_FLOPS", None)
    monkeypatch.setattr(launch, "dkdv_launch", spy)
    bwd = flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=scale, causal=causal, dsoftmax_lse=dlse)
    torch.cuda.synchronize()
    monkeypatch.undo()
    assert len(seen) == 1, "the Triton dK/dV launch was not seen"
    lse2, delta = seen[0]
    assert torch.equal(delta, bwd.softmax_d)
    return bwd.dq, delta, lse2


def _ref_dq(q, k, v, dout, scale, causal, dtype):
    q_, k_, v_ = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, _ = attention_ref(q_, k_, v_, softmax_scale=scale, causal=causal, upcast=False)
    out.backward(dout.to(dtype))
    return q_.grad


def _check_vectors(delta, lse2, t_delta, t_lse2, lse) -> None:
    """delta close to the Triton pass's (same float32 sum, other order), lse2 bitwise (the same product)."""
    assert not torch.isnan(delta).any(), "unwritten (NaN) delta rows"
    torch.testing.assert_close(delta, t_delta, rtol=1e-5, atol=1e-4)
    assert torch.equal(lse2, t_lse2), "lse2 differs from the Triton dQ pass's"
    assert torch.equal(lse2, lse * LOG2E)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_and_triton(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, out, dout, lse, scale, causal = _setup(name, dtype)
    assert gluon_dq.supports(q, k, v, out, dout, lse, causal=causal, softmax_scale=scale)
    dq, delta, lse2 = _gluon(q, k, v, out, dout, lse, scale, causal)
    torch.cuda.synchronize()
    assert torch.isfinite(dq).all(), "unwritten (NaN) or non-finite dq rows"
    t_dq, t_delta, t_lse2 = _triton(q, k, v, out, dout, lse, scale, causal, monkeypatch)
    _check_vectors(delta, lse2, t_delta, t_lse2, lse)
    true_dq = _ref_dq(q, k, v, dout, scale, causal, torch.float32)
    low_dq = _ref_dq(q, k, v, dout, scale, causal, dtype)
    assert_close_2x(dq, true_dq, low_dq, "dq")
    assert_close_2x(t_dq, true_dq, low_dq, "triton dq")
    # and within the sum of both kernels' allowances of the Triton dQ pass (both accumulate in float32)
    tol = 4 * (low_dq.double() - true_dq.double()).abs().max().item() + 2 * slack_for(dtype)
    err = (dq.double() - t_dq.double()).abs().max().item()
    assert err <= tol, f"dq: |gluon - triton| {err:.3e} > {tol:.3e}"
    # rows that see no key (causal, seqlen_q > seqlen_k): dq exactly 0, lse2 +inf
    empty = (torch.arange(q.shape[1], device="cuda") + k.shape[1] - q.shape[1]) < 0
    if causal and empty.any():
        assert (dq[:, empty] == 0).all()
        assert torch.isinf(lse2[:, :, empty]).all()


@pytest.mark.parametrize("name", ["d128_causal_gqa4", "d64_causal_gqa4", "d128_gqa4"])
def test_deterministic(name: str) -> None:
    q, k, v, out, dout, lse, scale, causal = _setup(name, torch.bfloat16, seed=1)
    first = _gluon(q, k, v, out, dout, lse, scale, causal)
    second = _gluon(q, k, v, out, dout, lse, scale, causal)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_dlse(monkeypatch: pytest.MonkeyPatch) -> None:
    """A differentiated lse: delta = rowsum(dout * out) - dlse, as in the Triton pass."""
    q, k, v, out, dout, lse, scale, causal = _setup("d128_causal_gqa4", torch.bfloat16, seed=2)
    dlse = torch.randn(lse.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    dq, delta, lse2 = _gluon(q, k, v, out, dout, lse, scale, causal, dlse=dlse)
    t_dq, t_delta, t_lse2 = _triton(q, k, v, out, dout, lse, scale, causal, monkeypatch, dlse=dlse)
    _check_vectors(delta, lse2, t_delta, t_lse2, lse)
    tol = 2 * slack_for(torch.bfloat16) + 1e-2 * t_dq.abs().max().item()
    err = (dq.double() - t_dq.double()).abs().max().item()
    assert err <= tol, f"dq: |gluon - triton| {err:.3e} > {tol:.3e}"


def test_empty_rows_with_negative_infinite_lse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that see no key with lse = -inf instead of the forward's +inf: dq of those rows stays 0 (no NaN),
    lse2 = -inf, as the Triton pass gives."""
    q, k, v, out, dout, lse, scale, causal = _setup("d64_causal_sq_gt_sk", torch.float16, seed=3)
    lse = torch.where(torch.isinf(lse), float("-inf"), lse)
    assert torch.isneginf(lse).any()
    dq, delta, lse2 = _gluon(q, k, v, out, dout, lse, scale, causal)
    t_dq, t_delta, t_lse2 = _triton(q, k, v, out, dout, lse, scale, causal, monkeypatch)
    _check_vectors(delta, lse2, t_delta, t_lse2, lse)
    assert torch.isfinite(dq).all() and torch.isfinite(t_dq).all()
    empty = torch.isneginf(lse).transpose(1, 2)  # (batch, seqlen_q, nheads)
    assert (dq[empty] == 0).all() and (t_dq[empty] == 0).all()


def test_feeds_the_gluon_dkdv_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """delta / lse2 of the Gluon dQ pass, laid out as the launch allocates them, give the Gluon dK/dV pass the
    same dk / dv as the Triton dQ pass's buffers do."""
    if not gluon_dkdv.available():
        pytest.skip("the Gluon dK/dV pass is not available")
    # (a query length that the dK/dV pass takes: a multiple of 4)
    q, k, v, out, dout, lse, scale, causal = _setup("d128_causal", torch.bfloat16, seed=4)
    _dq, delta, lse2 = _gluon(q, k, v, out, dout, lse, scale, causal)
    _t_dq, t_delta, t_lse2 = _triton(q, k, v, out, dout, lse, scale, causal, monkeypatch)
    ours = gluon_dkdv.dkdv(q, k, v, dout, lse2, delta, causal=causal, softmax_scale=scale)
    theirs = gluon_dkdv.dkdv(q, k, v, dout, t_lse2, t_delta, causal=causal, softmax_scale=scale)
    torch.cuda.synchronize()
    for a, b in zip(ours, theirs):
        tol = 1e-2 * b.abs().max().item() + slack_for(torch.bfloat16)
        assert (a.double() - b.double()).abs().max().item() <= tol


def test_strided_inputs_and_default_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """q / k / v as views of a packed ``(b, s, 3, h, d)`` buffer, dout as a ``(b, h, s, d)`` transpose and dq a
    view with a padded head (the layouts models hand over), with the default softmax scale."""
    torch.manual_seed(3)
    b, s, h, d = 2, 1000, 4, 128
    qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    fwd = flash_attn_forward(q, k, v, causal=True)
    if not gluon_dq.supports(q, k, v, fwd.out, dout, fwd.lse, causal=True):
        pytest.skip("these strides are not TMA-compatible for the Gluon pass")
    pad = torch.full((b, s, h + 1, d), float("nan"), dtype=q.dtype, device="cuda")
    dq = pad[:, :, 1:]
    gluon_dq.dq_pass(q, k, v, fwd.out, dout, fwd.lse, dq, causal=True)
    torch.cuda.synchronize()
    assert torch.isnan(pad[:, :, 0]).all(), "wrote outside the dq view"
    true_dq = _ref_dq(q, k, v, dout, d**-0.5, True, torch.float32)
    low_dq = _ref_dq(q, k, v, dout, d**-0.5, True, torch.bfloat16)
    assert_close_2x(dq, true_dq, low_dq, "dq")


def test_refuses_unsupported() -> None:
    q, k, v, out, dout, lse, scale, causal = _setup("d64_short", torch.float16)
    from fa_core.errors import FlashAttnValueError

    with pytest.raises(FlashAttnValueError, match="lse"):
        gluon_dq.dq_pass(q, k, v, out, dout, lse[:, :, :-1], causal=causal)
    with pytest.raises(FlashAttnValueError, match="softmax_scale"):
        gluon_dq.dq_pass(q, k, v, out, dout, lse, causal=causal, softmax_scale=-1.0)
