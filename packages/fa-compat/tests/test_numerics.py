"""Numerics at the extremes, through the flash_attn API, on the CPU interpreter (fp32/fp16) and on the GPU
(fp16/bf16; the same module runs there, ``scripts/gpu_stage_hardening.sh``).

* large magnitudes: scores ~1e4 before scaling (near one-hot softmax, lse ~1e3);
* fp16 near its range: entries ~250, so ``q.k`` (~1e6) would overflow fp16 if computed in fp16; our kernels
  accumulate in fp32 and must not (fp16 only: bf16 has fp32's range);
* rows with no visible key (causal with seqlen_q > seqlen_k, a window, an empty varlen sequence, an empty
  cache): out = 0, lse = +inf (docs/CONVENTIONS.md), finite zero gradients;
* NaN / Inf in q, k, v propagate like the reference and are never hidden: every output the reference makes
  NaN is NaN here too. Where the reference's NaN only comes from ``0 * NaN`` (a NaN in v at a key a row does not
  see; gradients of keys a NaN query row does not see), the kernels may or may not give NaN (the reference's
  dense matmul touches every key, the kernels skip invisible blocks): the tests require NaN for every visible
  key and, elsewhere, either NaN or the value of the same computation with the NaN zeroed.
* NaN written into memory a call must not read (cache rows past ``cache_seqlens``, pages not in the block
  table, the neighbouring sequences of a varlen batch) never reaches an output.

The truth is ``fa_core.reference`` in float64; the 2x baseline is the same reference in float32 rounded to the
output dtype (the best a kernel accumulating in fp32 can give).
"""

from __future__ import annotations

import pytest
import torch
from fa_compat_testutils import DTYPES, HAS_BACKWARD, needs_backward, needs_kvcache

from fa_core.reference import attention_ref, attention_varlen_ref, visible_mask
from fa_core.testing import DEVICE, assert_close_2x, slack_for
from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

NAN = float("nan")
INF = float("inf")
#: NaN/Inf propagation does not depend on the dtype: one dtype under the (slow) CPU interpreter, both on a GPU
NAN_DTYPES = DTYPES if DEVICE == "cuda" else DTYPES[:1]


def _rand(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _truth_and_base(q, k, v, **kw):
    """(float64 truth, float32 reference rounded to q's dtype) of (out, lse)."""
    out64, lse64 = attention_ref(q.double(), k.double(), v.double(), upcast=False, **kw)
    out32, lse32 = attention_ref(q.float(), k.float(), v.float(), upcast=False, **kw)
    return (out64, lse64), (out32.to(q.dtype), lse32)


def _grads_ref(q, k, v, dout, dtype, **kw):
    ins = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, _ = attention_ref(*ins, upcast=False, **kw)
    return torch.autograd.grad(out, ins, dout.to(dtype))


def _amax(t):
    t = t.double()
    t = t[torch.isfinite(t)]
    return float(t.abs().max()) if t.numel() else 0.0


def _natural_scale(q, k, v, dout):
    """Magnitude of the terms summed into each gradient (not of the gradient itself, which can cancel to ~0):
    dq ~ |dout| |v| sqrt(d) |k| scale, dk ~ same with |q|, dv ~ |dout| seqlen_q (probabilities <= 1)."""
    d = q.shape[-1]
    scale = d**-0.5
    dp = _amax(dout) * _amax(v) * d**0.5
    return dp * _amax(k) * scale, dp * _amax(q) * scale, _amax(dout) * q.shape[1]


def _check_grads_extreme(grads, q, k, v, dout, rel, **kw):
    """Gradients at extreme inputs: finite, and ``err <= 2 err(fp32 reference) + slack_for(dtype) |g| + rel *
    natural scale``. The backward recomputes P = exp(s - lse) from the stored lse and delta = rowsum(dout * out)
    from the rounded output (flash-attn's algorithm): both lose ~|s| 2^-24 resp. an ulp of |out| |dout| that the
    one-pass reference does not, so near one-hot rows get an absolute error tied to the size of the summed
    terms, not to the (cancelling, ~0) gradient. ``rel = (for dq and dk, for dv)``."""
    true = _grads_ref(q, k, v, dout, torch.float64, **kw)
    low = _grads_ref(q, k, v, dout, torch.float32, **kw)
    rels = (rel[0], rel[0], rel[1])
    for name, g, t, lo, nat, r in zip(
        ("dq", "dk", "dv"), grads, true, low, _natural_scale(q, k, v, dout), rels
    ):
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient (overflow inside the backward)"
        slack = slack_for(g.dtype) * max(_amax(t), 1.0) + r * nat
        assert_close_2x(g, t, lo.to(g.dtype), name, slack=slack)


def _run(q, k, v, grad=False, **kw):
    """(out, lse, grads or None) of flash_attn_func; dout = ones-like normal with a fixed seed."""
    q, k, v = (x.detach().clone().requires_grad_(grad) for x in (q, k, v))
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    if not grad:
        return out, lse, None, None
    dout = _rand(*out.shape, dtype=out.dtype, seed=99)
    out.backward(dout)
    return out, lse, (q.grad, k.grad, v.grad), dout


# ------------------------------------------------------------------------------------- large magnitudes
#: (dq/dk, dv) slack x the natural scale of the gradient terms at scores ~1e4; measured (err - 2 err32) / scale on
#: the CPU: fp32 (9e-6, 1.5e-5), fp16 (1.1e-5, 2.2e-5); bf16 has 8x fp16's rounding
REL_LARGE = {torch.float32: (4e-5, 1e-4), torch.float16: (5e-5, 1e-4), torch.bfloat16: (4e-4, 8e-4)}
MAGNITUDE_CASES = [
    # (seqlen_q, seqlen_k, headdim, causal): scores q.k ~ 1e4 before the softmax scale
    pytest.param(33, 47, 32, False, id="33x47-d32"),
    pytest.param(40, 40, 64, True, id="40x40-d64-causal"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,d,causal", MAGNITUDE_CASES)
def test_large_scores_forward_backward(dtype, sq, sk, d, causal):
    # |q.k| ~ scale^2 * sqrt(d) ~ 1e4 for entries ~ N(0, scale^2)
    scale = (1e4 / d**0.5) ** 0.5
    q = _rand(2, sq, 2, d, dtype=dtype, scale=scale, seed=1)
    k = _rand(2, sk, 2, d, dtype=dtype, scale=scale, seed=2)
    v = _rand(2, sk, 2, d, dtype=dtype, seed=3)
    kw = dict(causal=causal)
    qk = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())
    assert float(qk.abs().max()) > 5e3, "the inputs do not reach the intended magnitude"
    out, lse, grads, dout = _run(q, k, v, grad=HAS_BACKWARD, **kw)
    (ref, ref_lse), (base, base_lse) = _truth_and_base(q, k, v, **kw)
    assert_close_2x(out, ref, base, "out")
    # lse ~ max score ~ 1e3: fp32 carries ~1e-7 relative
    assert_close_2x(lse, ref_lse, base_lse, "lse", slack=1e-6 * _amax(ref_lse) + 1e-5)
    if grads is not None:
        # |s| ~ 2e3 (log2 units): P recomputed from lse carries ~|s| 2^-24 ~ 1e-4 relative; fp16/bf16 add the
        # rounding of out inside delta
        _check_grads_extreme(grads, q, k, v, dout, rel=REL_LARGE[dtype], **kw)


@pytest.mark.skipif(torch.float16 not in DTYPES, reason="fp16 not run here")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp16_near_range(causal):
    """Entries ~250: q.k ~ 1e6 overflows fp16 (max 65504) unless accumulated in fp32; v ~250 keeps the output
    itself near (but inside) fp16's range."""
    dtype = torch.float16
    q = _rand(1, 37, 2, 16, dtype=dtype, scale=250.0, seed=4).clamp(-1000, 1000)
    k = _rand(1, 29, 2, 16, dtype=dtype, scale=250.0, seed=5).clamp(-1000, 1000)
    v = _rand(1, 29, 2, 16, dtype=dtype, scale=250.0, seed=6).clamp(-1000, 1000)
    kw = dict(causal=causal)
    naive = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float())
    assert float(naive.abs().max()) > 65504, "q.k must overflow fp16 for this test to mean anything"
    out, lse, grads, dout = _run(q, k, v, grad=HAS_BACKWARD, **kw)
    assert torch.isfinite(out).all(), "fp16 overflow inside the forward"
    (ref, ref_lse), (base, base_lse) = _truth_and_base(q, k, v, **kw)
    # empty rows (causal, seqlen_q > seqlen_k) are +inf in both
    assert_close_2x(out, ref, base, "out", slack=slack_for(dtype) * _amax(ref))
    assert_close_2x(lse, ref_lse, base_lse, "lse", slack=1e-6 * _amax(ref_lse) + 1e-5)
    if grads is not None:
        # exactly one-hot rows: the true dq/dk are 0; ours are dp - delta (two fp32 sums of ~1e3 in different
        # orders) times |k| scale: an fp32 ulp of the natural scale (measured 4e-8). dv: P recomputed as
        # exp2(s log2e - lse log2e) with s ~ 3e5 where an fp32 ulp is 0.03: p off by ~2% (measured 6.5e-4 x
        # |dout| seqlen_q); flash-attn recomputes P the same way
        _check_grads_extreme(grads, q, k, v, dout, rel=(2e-7, 3e-3), **kw)


# ----------------------------------------------------------------------------------- fully masked rows
EMPTY_ROW_CASES = [
    # seqlen_q > seqlen_k, causal (bottom-right aligned): the first seqlen_q - seqlen_k rows see nothing
    pytest.param(24, 9, dict(causal=True), id="causal-sq>sk"),
    # a window that ends before the keys start for the top rows
    pytest.param(30, 10, dict(window_size=(2, 0)), id="window-left2"),
    # window (0, 0) with seqlen_q > seqlen_k: only the diagonal, absent for the first rows
    pytest.param(20, 5, dict(window_size=(0, 0)), id="window-0-0"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,kw", EMPTY_ROW_CASES)
def test_fully_masked_rows_dense(dtype, sq, sk, kw):
    q = _rand(2, sq, 2, 16, dtype=dtype, seed=7)
    k = _rand(2, sk, 2, 16, dtype=dtype, seed=8)
    v = _rand(2, sk, 2, 16, dtype=dtype, seed=9)
    empty = ~visible_mask(sq, sk, kw.get("causal", False), kw.get("window_size", (-1, -1)), "cpu").any(-1)
    assert empty.any() and not empty.all(), "the case must have some empty rows and some others"
    empty = empty.to(DEVICE)
    out, lse, grads, dout = _run(q, k, v, grad=HAS_BACKWARD, **kw)
    assert torch.equal(out[:, empty], torch.zeros_like(out[:, empty])), "empty rows: out must be exactly 0"
    assert torch.isinf(lse[:, :, empty]).all() and (lse[:, :, empty] > 0).all(), (
        "empty rows: lse must be +inf"
    )
    assert torch.isfinite(lse[:, :, ~empty]).all()
    (ref, ref_lse), (base, base_lse) = _truth_and_base(q, k, v, **kw)
    assert_close_2x(out, ref, base, "out")
    assert_close_2x(lse, ref_lse, base_lse, "lse", slack=1e-4)
    if grads is not None:
        dq = grads[0]
        assert torch.equal(dq[:, empty], torch.zeros_like(dq[:, empty])), "empty rows: dq must be exactly 0"
        true = _grads_ref(q, k, v, dout, torch.float64, **kw)
        low = _grads_ref(q, k, v, dout, q.dtype, **kw)
        for name, g, t, lo in zip(("dq", "dk", "dv"), grads, true, low):
            assert_close_2x(g, t, lo, name, slack=slack_for(dtype) * max(_amax(t), 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_varlen(dtype):
    """A sequence with queries but no keys (seqlen_k = 0): all its rows are empty; its neighbours unaffected."""
    lq, lk = [5, 7, 3], [6, 0, 4]
    cu_q = torch.tensor([0, 5, 12, 15], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 6, 6, 10], dtype=torch.int32, device=DEVICE)
    q = _rand(sum(lq), 2, 16, dtype=dtype, seed=10).requires_grad_(HAS_BACKWARD)
    k = _rand(sum(lk), 2, 16, dtype=dtype, seed=11).requires_grad_(HAS_BACKWARD)
    v = _rand(sum(lk), 2, 16, dtype=dtype, seed=12).requires_grad_(HAS_BACKWARD)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True)
    rows = slice(5, 12)
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.isinf(lse[:, rows]).all() and (lse[:, rows] > 0).all()
    ref, ref_lse = attention_varlen_ref(q.detach(), k.detach(), v.detach(), cu_q, cu_k, dtype=torch.float64)
    base, base_lse = attention_varlen_ref(q.detach(), k.detach(), v.detach(), cu_q, cu_k, upcast=False)
    assert_close_2x(out, ref, base, "out")
    assert_close_2x(lse, ref_lse, base_lse.float(), "lse", slack=1e-4)
    if HAS_BACKWARD:
        out.backward(torch.ones_like(out))
        assert torch.equal(q.grad[rows], torch.zeros_like(q.grad[rows])), "dq of empty rows must be 0"
        for g in (q.grad, k.grad, v.grad):
            assert torch.isfinite(g).all()


@needs_kvcache
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_fully_masked_rows_kvcache(dtype, paged):
    """cache_seqlens = 0 and nothing appended: no key at all -> out 0, lse +inf; the other sequence normal."""
    b, cap, h, d = 2, 32, 2, 16
    q = _rand(b, 1, h, d, dtype=dtype, seed=13)
    kc = _rand(b, cap, h, d, dtype=dtype, seed=14)
    vc = _rand(b, cap, h, d, dtype=dtype, seed=15)
    lens = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
    kw = {}
    if paged:
        kc, vc = kc.reshape(b * 2, 16, h, d), vc.reshape(b * 2, 16, h, d)
        kw["block_table"] = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, return_softmax_lse=True, **kw)
    assert torch.equal(out[0], torch.zeros_like(out[0])), "empty cache: out must be exactly 0"
    assert torch.isinf(lse[0]).all() and (lse[0] > 0).all(), f"empty cache: lse must be +inf, got {lse[0]}"
    k1, v1 = kc.reshape(b, cap, h, d)[1:, :9], vc.reshape(b, cap, h, d)[1:, :9]
    (ref, ref_lse), (base, base_lse) = _truth_and_base(q[1:], k1, v1)
    assert_close_2x(out[1:], ref, base, "out")
    assert_close_2x(lse[1:], ref_lse, base_lse, "lse", slack=1e-4)


# ------------------------------------------------------------------------------------- NaN / Inf inputs
def _poison(x, idx, value):
    x = x.clone()
    x[idx] = value
    return x


def _check_superset(ours, ref, name):
    """Every NaN of the reference is a NaN here (not hidden)."""
    hidden = torch.isnan(ref) & ~torch.isnan(ours)
    assert not hidden.any(), f"{name}: {int(hidden.sum())} NaN of the reference hidden (finite here)"


def _check_finite_part(ours, ref, name, dtype):
    both = torch.isfinite(ours) & torch.isfinite(ref)
    if both.any():
        err = float((ours.double()[both] - ref.double()[both]).abs().max())
        tol = 4 * slack_for(dtype) * max(_amax(ref), 1.0)
        assert err <= tol, f"{name}: finite entries differ by {err:.3e} > {tol:.1e}"


NAN_CASES = [
    # (tensor, position (batch, row, head, dim), value, causal)
    pytest.param("q", (0, 5, 1, 3), NAN, False, id="q-nan"),
    pytest.param(
        "q", (1, 20, 0, 0), INF, True, id="q-inf-causal"
    ),  # regression: an Inf/NaN row leaked into unseen keys' dk/dv
    pytest.param("q", (0, 7, 1, 9), NAN, True, id="q-nan-causal"),
    pytest.param("k", (0, 17, 1, 2), NAN, True, id="k-nan-causal"),
    pytest.param("k", (1, 3, 0, 7), -INF, False, id="k-neginf"),
    pytest.param("k", (0, 30, 0, 1), INF, False, id="k-inf"),
    pytest.param("v", (0, 11, 1, 4), NAN, True, id="v-nan-causal"),
    pytest.param("v", (1, 2, 0, 0), INF, False, id="v-inf"),
]


def _ref_visible_only(q, k, v, dout, causal):
    """float64 reference that touches, for each row, only the keys it sees (a loop over rows): no ``0 * NaN``
    from masked entries. Returns (out, (dq, dk, dv))."""
    ins = [x.detach().double().requires_grad_() for x in (q, k, v)]
    qq, kk, vv = ins
    seen = visible_mask(q.shape[1], k.shape[1], causal, (-1, -1), "cpu")
    scale = q.shape[-1] ** -0.5
    rows = []
    for i in range(q.shape[1]):
        keys = seen[i].nonzero().flatten().to(q.device)
        s = torch.einsum("bhd,bkhd->bhk", qq[:, i], kk[:, keys]) * scale
        rows.append(torch.einsum("bhk,bkhd->bhd", torch.softmax(s, -1), vv[:, keys]))
    out = torch.stack(rows, 1)
    return out.detach(), torch.autograd.grad(out, ins, dout.double())


def _check_between(ours, lower, upper, name):
    """non-finite(lower) <= non-finite(ours) <= non-finite(upper) elementwise: every non-finite value of the
    visible-only reference is non-finite here (nothing hidden), and nothing is non-finite that the dense
    reference (which also multiplies masked zeros by the bad value) has finite."""
    bad, lo, up = ~torch.isfinite(ours), ~torch.isfinite(lower), ~torch.isfinite(upper)
    hidden = lo & ~bad
    assert not hidden.any(), f"{name}: {int(hidden.sum())} non-finite values of the reference hidden"
    extra = bad & ~up
    assert not extra.any(), f"{name}: {int(extra.sum())} non-finite values where the reference is finite"


@pytest.mark.parametrize("dtype", NAN_DTYPES)
@pytest.mark.parametrize("which,pos,value,causal", NAN_CASES)
def test_nan_inf_propagate_like_reference(dtype, which, pos, value, causal):
    """Bounds: the kernels skip key blocks a row cannot see, the dense reference multiplies their zero
    probabilities by the bad value (0 * NaN = NaN) and a visible-only reference does not; ours must lie in
    between, elementwise, for out, lse and every gradient, and agree with the reference on the finite part."""
    sq = sk = 40
    x = dict(
        q=_rand(2, sq, 2, 16, dtype=dtype, seed=16),
        k=_rand(2, sk, 2, 16, dtype=dtype, seed=17),
        v=_rand(2, sk, 2, 16, dtype=dtype, seed=18),
    )
    x[which] = _poison(x[which], pos, value)
    q, k, v = x["q"], x["k"], x["v"]
    kw = dict(causal=causal)
    out, lse, grads, dout = _run(q, k, v, grad=HAS_BACKWARD, **kw)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), upcast=False, **kw)
    dout_ = dout if dout is not None else torch.ones_like(out)
    vis_out, vis_grads = _ref_visible_only(q, k, v, dout_, causal)
    assert not torch.isfinite(vis_out).all(), "the bad input vanished from the reference"
    _check_between(out, vis_out, ref, "out")
    # lse: where the reference has +inf (a +inf score) ours may be NaN (exp2(inf - inf)): both non-finite
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), "non-finite pattern of lse differs"
    _check_finite_part(out, ref, "out", dtype)
    if grads is not None:
        dense = _grads_ref(q, k, v, dout, torch.float64, **kw)
        for name, g, lo, up in zip(("dq", "dk", "dv"), grads, vis_grads, dense):
            _check_between(g, lo, up, name)


@needs_backward
@pytest.mark.parametrize("dtype", NAN_DTYPES)
def test_nan_in_dout_propagates(dtype):
    q, k, v = (_rand(1, 24, 2, 16, dtype=dtype, seed=s).requires_grad_() for s in (19, 20, 21))
    out = flash_attn_func(q, k, v, causal=True)
    dout = _poison(torch.ones_like(out), (0, 10, 1, 0), NAN)
    out.backward(dout)
    true = _grads_ref(q, k, v, dout, torch.float64, causal=True)
    for name, g, t in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), true):
        _check_superset(g, t, name)
    assert torch.isnan(q.grad[0, 10, 1]).all(), "dq of the row with NaN dout must be NaN"
    assert torch.isfinite(q.grad[0, :, 0]).all(), "another head must stay finite"


@pytest.mark.parametrize("dtype", NAN_DTYPES)
def test_varlen_nan_stays_in_its_sequence(dtype):
    """A NaN in one sequence of a packed batch must not leak into its neighbours (forward and backward)."""
    lens = [9, 13, 6]
    cu = torch.tensor([0, 9, 22, 28], dtype=torch.int32, device=DEVICE)
    q = _rand(28, 2, 16, dtype=dtype, seed=22)
    k = _poison(_rand(28, 2, 16, dtype=dtype, seed=23), (12, 0, 0), NAN)  # sequence 1
    v = _poison(_rand(28, 2, 16, dtype=dtype, seed=24), (3, 1, 5), NAN)  # sequence 0
    q, k, v = (x.requires_grad_(HAS_BACKWARD) for x in (q, k, v))
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens))
    assert torch.isfinite(out[22:]).all(), "NaN leaked into sequence 2"
    assert torch.isnan(out[9:22, 0]).all(), "k NaN in sequence 1, head 0: all its rows NaN"
    assert torch.isnan(out[0:9, 1, 5]).all(), "v NaN at sequence 0, head 1, dim 5: that dim NaN in every row"
    assert torch.isfinite(out[9:22, 1]).all() and torch.isfinite(out[0:9, 0]).all()
    assert torch.isfinite(out[0:9, 1, :5]).all() and torch.isfinite(out[0:9, 1, 6:]).all()
    if HAS_BACKWARD:
        out.backward(torch.ones_like(out))
        for g in (q.grad, k.grad, v.grad):
            assert torch.isfinite(g[22:]).all(), "NaN leaked into sequence 2's gradients"


@needs_kvcache
@pytest.mark.parametrize("dtype", NAN_DTYPES)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_nan(dtype, paged):
    """NaN in live cache rows propagates; NaN in rows past cache_seqlens or in pages not in the block table
    (stale memory of earlier requests) never reaches an output. The appended row goes in first."""
    b, cap, h, d, page = 2, 48, 2, 16, 16
    q = _rand(b, 1, h, d, dtype=dtype, seed=25)
    kc = _rand(b, cap, h, d, dtype=dtype, seed=26)
    vc = _rand(b, cap, h, d, dtype=dtype, seed=27)
    k_new, v_new = _rand(b, 1, h, d, dtype=dtype, seed=28), _rand(b, 1, h, d, dtype=dtype, seed=29)
    lens = [20, 33]
    kc[0, 25:] = NAN  # past sequence 0's end (20 + 1 appended)
    vc[0, 30:] = NAN
    kc[1, 7, 1] = NAN  # live row of sequence 1, head 1
    kw = {}
    if paged:
        # logical pages of each sequence scattered; two stale NaN pages in the pool that no table uses
        pool_k = torch.full((b * 3 + 2, page, h, d), NAN, dtype=dtype, device=DEVICE)
        pool_v = pool_k.clone()
        table = torch.tensor([[4, 0, 6], [2, 7, 1]], dtype=torch.int32, device=DEVICE)
        pool_k[table.long().flatten()] = kc.reshape(b * 3, page, h, d)
        pool_v[table.long().flatten()] = vc.reshape(b * 3, page, h, d)
        kc_arg, vc_arg = pool_k, pool_v
        kw["block_table"] = table
    else:
        kc_arg, vc_arg = kc, vc
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = flash_attn_with_kvcache(q, kc_arg, vc_arg, k_new, v_new, cache_seqlens=seqlens, **kw)
    assert torch.isfinite(out[0]).all(), "NaN of rows past cache_seqlens reached the output"
    assert torch.isnan(out[1, 0, 1]).all(), "NaN in a live cache row was hidden"
    assert torch.isfinite(out[1, 0, 0]).all(), "NaN of head 1 leaked into head 0"
    k0 = torch.cat([kc[0:1, :20], k_new[0:1]], 1)
    v0 = torch.cat([vc[0:1, :20], v_new[0:1]], 1)
    (ref, _), (base, _) = _truth_and_base(q[0:1], k0, v0)
    assert_close_2x(out[0:1], ref, base, "out")
