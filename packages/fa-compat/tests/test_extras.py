"""The keyword-only extras beyond flash-attn 2.8 (``attention_chunk``, ``learnable_sink``) of ``flash_attn_func``,
``flash_attn_varlen_func`` and ``flash_attn_with_kvcache``: forward and gradients (q, k, v and the sink)
against fa-core's reference with the 2x rule, the 2.8 path untouched at the defaults, and the error cases."""

from __future__ import annotations

import pytest
import torch
from fa_compat_testutils import (
    DEVICE,
    HAS_BACKWARD,
    HI,
    LOWP,
    cu_seqlens,
    needs_backward,
    needs_kvcache,
    rand,
)

import flash_attn
from fa_core.reference import attention_ref, attention_varlen_ref
from fa_core.testing import assert_close_2x
from flash_attn import _extras, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

D = 16
NHEADS, NHEADS_K = 4, 2  # GQA everywhere

# name -> (dtype, kwargs of the call; "sink" stands for a random learnable_sink)
CASES = {
    "sink": (HI, dict(sink=True)),
    "chunk_causal": (HI, dict(attention_chunk=4, causal=True)),
    "sink_chunk_window": (HI, dict(sink=True, attention_chunk=6, window_size=(3, 1))),
    "sink_causal_lowp": (LOWP, dict(sink=True, causal=True, softcap=5.0)),
}


def _make(dtype, spec, q_shape, k_shape, grad):
    torch.manual_seed(0)
    q = rand(*q_shape, dtype=dtype, requires_grad=grad)
    k = rand(*k_shape, dtype=dtype, requires_grad=grad)
    v = rand(*k_shape, dtype=dtype, requires_grad=grad)
    kw = {key: val for key, val in spec.items() if key != "sink"}
    if spec.get("sink"):
        kw["learnable_sink"] = rand(NHEADS, dtype=torch.float32, requires_grad=grad)
    return q, k, v, kw


def _ref(q, k, v, kw, varlen, upcast):
    """Reference (out, lse) and the differentiable leaves (q, k, v[, sink]) it was computed from."""
    dtype = torch.float64 if upcast else q.dtype
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    kw = dict(kw)
    if "learnable_sink" in kw:
        leaves.append(kw["learnable_sink"].detach().to(dtype).requires_grad_())
        kw["learnable_sink"] = leaves[-1]
    if varlen is None:
        out, lse = attention_ref(*leaves[:3], upcast=False, **kw)
    else:
        out, lse = attention_varlen_ref(*leaves[:3], *varlen, upcast=False, **kw)
    return out, lse, leaves


def _check(q, k, v, kw, out, lse, varlen=None):
    out_ref, lse_ref, leaves = _ref(q, k, v, kw, varlen, upcast=True)
    out_low, lse_low, leaves_low = _ref(q, k, v, kw, varlen, upcast=False)
    assert_close_2x(out, out_ref, out_low, "out")
    assert_close_2x(lse, lse_ref, lse_low, "softmax_lse")
    if not q.requires_grad:
        return
    torch.manual_seed(1)
    dout = torch.randn_like(out)
    ours_in = [q, k, v] + ([kw["learnable_sink"]] if "learnable_sink" in kw else [])
    ours = torch.autograd.grad(out, ours_in, dout)
    refs = torch.autograd.grad(out_ref, leaves, dout.to(out_ref.dtype))
    lows = torch.autograd.grad(out_low, leaves_low, dout.to(out_low.dtype))
    for name, x, g, r, lo in zip(("dq", "dk", "dv", "dsink"), ours_in, ours, refs, lows):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert_close_2x(g, r, lo, name)


@pytest.mark.parametrize("case", list(CASES))
def test_func_extras(case):
    dtype, spec = CASES[case]
    q, k, v, kw = _make(dtype, spec, (2, 8, NHEADS, D), (2, 11, NHEADS_K, D), HAS_BACKWARD)
    out, lse, s_dmask = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert s_dmask.shape == (0,)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (2, NHEADS, 8)
    _check(q, k, v, kw, out, lse)


@pytest.mark.parametrize("case", ["sink_causal", "sink_chunk_window"])
def test_varlen_func_extras(case):
    spec = {
        "sink_causal": dict(sink=True, causal=True),  # sequence 1 has more queries than keys: empty rows
        "sink_chunk_window": dict(sink=True, attention_chunk=4, window_size=(2, 2)),
    }[case]
    lq, lk = [5, 8], [9, 4]
    q, k, v, kw = _make(HI, spec, (sum(lq), NHEADS, D), (sum(lk), NHEADS_K, D), HAS_BACKWARD)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True, **kw)
    assert lse.shape == (NHEADS, sum(lq))
    _check(q, k, v, kw, out, lse, varlen=(cu_q, cu_k))
    assert flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw).shape == out.shape


@needs_backward
def test_lse_is_differentiable_with_a_sink():
    """Beyond 2.8 (where softmax_lse is not differentiable): gradients through the lse, the sink's included."""
    q, k, v, kw = _make(HI, dict(sink=True), (1, 6, NHEADS, D), (1, 6, NHEADS_K, D), True)
    _, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    _, lse_ref, leaves = _ref(q, k, v, kw, None, upcast=True)
    ours = torch.autograd.grad(lse.sum(), [q, k, kw["learnable_sink"]])
    refs = torch.autograd.grad(lse_ref.sum(), [leaves[0], leaves[1], leaves[3]])
    for name, g, r in zip(("dq", "dk", "dsink"), ours, refs):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4, msg=name)


def test_defaults_give_the_2_8_result():
    """attention_chunk=0 / learnable_sink=None: bitwise the result of the 2.8 call and of the custom op."""
    q, k, v, _ = _make(HI, {}, (2, 8, NHEADS, D), (2, 8, NHEADS_K, D), False)
    before = flash_attn_func(q, k, v, 0.0, None, True)
    after = flash_attn_func(q, k, v, 0.0, None, True, attention_chunk=0, learnable_sink=None)
    op = torch.ops.flash_attn_plus.fwd(q, k, v, 0.0, D**-0.5, True, -1, 0, 0.0, None, False, False)[0]
    assert torch.equal(before, after) and torch.equal(before, op)
    cu = cu_seqlens([8, 8])
    qv, kv, vv = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
    out_v = flash_attn_varlen_func(qv, kv, vv, cu, cu, 8, 8, causal=True, attention_chunk=0)
    assert torch.equal(out_v, flash_attn_varlen_func(qv, kv, vv, cu, cu, 8, 8, causal=True))


def test_forward_without_fa_backward(monkeypatch):
    """Without fa-backward: the extras run through fa-core's forward; a sink requiring grad is refused."""
    q, k, v, kw = _make(HI, dict(sink=True, attention_chunk=4), (1, 8, NHEADS, D), (1, 8, NHEADS_K, D), False)
    with_backward = flash_attn_func(q, k, v, **kw)
    monkeypatch.setattr(_extras, "BACKWARD", None)
    assert torch.equal(flash_attn_func(q, k, v, **kw), with_backward)
    with pytest.raises(_extras.MissingExtraError, match="fa-backward"):
        flash_attn_func(q, k, v, learnable_sink=kw["learnable_sink"].clone().requires_grad_())


@needs_kvcache
def test_kvcache_extras():
    torch.manual_seed(0)
    b, s_cache, s_new, s_q = 2, 16, 2, 2
    q = rand(b, s_q, NHEADS, D)
    k_cache, v_cache = rand(b, s_cache, NHEADS_K, D), rand(b, s_cache, NHEADS_K, D)
    k_new, v_new = rand(b, s_new, NHEADS_K, D), rand(b, s_new, NHEADS_K, D)
    seqlens = torch.tensor([5, 11], dtype=torch.int32, device=DEVICE)
    sink = rand(NHEADS, dtype=torch.float32)
    kw = dict(causal=True, attention_chunk=4, learnable_sink=sink)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, k_new, v_new, cache_seqlens=seqlens, return_softmax_lse=True, **kw
    )
    for i, n in enumerate(seqlens.tolist()):
        keys = torch.cat([k_cache[i, :n], k_new[i]])[None]
        vals = torch.cat([v_cache[i, :n], v_new[i]])[None]
        assert torch.equal(kc[i, : n + s_new], keys[0]) and torch.equal(vc[i, : n + s_new], vals[0])
        out_ref, lse_ref = attention_ref(q[i : i + 1], keys, vals, dtype=torch.float64, **kw)
        out_low, lse_low = attention_ref(q[i : i + 1], keys, vals, upcast=False, **kw)
        assert_close_2x(out[i : i + 1], out_ref, out_low, f"out[{i}]")
        assert_close_2x(lse[i : i + 1], lse_ref, lse_low, f"lse[{i}]")
    # defaults: the same op call as 2.8's
    a = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True)
    c = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True, attention_chunk=0)
    assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------- errors
def _small():
    q, k, v, _ = _make(HI, {}, (1, 4, NHEADS, D), (1, 4, NHEADS_K, D), False)
    return q, k, v


def test_extras_are_keyword_only():
    q, k, v = _small()
    with pytest.raises(TypeError):
        flash_attn_func(q, k, v, 0.0, None, False, (-1, -1), 0.0, None, False, False, 4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(learnable_sink=torch.zeros(NHEADS + 1)), ValueError, "learnable_sink"),
        (dict(learnable_sink=torch.zeros(NHEADS, dtype=torch.int32)), TypeError, "learnable_sink"),
        (dict(learnable_sink=[0.0] * NHEADS), TypeError, "learnable_sink"),
        (dict(learnable_sink=torch.zeros(NHEADS, device="meta")), ValueError, "learnable_sink"),
        (dict(attention_chunk=-1), ValueError, "attention_chunk"),
        (dict(attention_chunk=2.5), ValueError, "attention_chunk"),
        (dict(attention_chunk=True), ValueError, "attention_chunk"),
    ],
)
def test_invalid_extras(kwargs, exc, match):
    q, k, v = _small()
    kwargs = {
        key: (val.to(DEVICE) if isinstance(val, torch.Tensor) and val.device.type != "meta" else val)
        for key, val in kwargs.items()
    }
    with pytest.raises(exc, match=match):
        flash_attn_func(q, k, v, **kwargs)
    cu = cu_seqlens([4])
    with pytest.raises(exc, match=match):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, **kwargs)
    if _extras.KVCACHE is not None and "dropout_p" not in kwargs:
        with pytest.raises(exc, match=match):
            flash_attn_with_kvcache(q, k, v, **kwargs)


def test_dropout_probs_with_a_sink_and_chunks():
    """S_dmask with dropout, a sink and chunks (one path for every feature): kept entries are the reference's
    probabilities (the sink's share included), dropped ones negated."""
    torch.manual_seed(1)
    q, k, v, kw = _make(HI, dict(sink=True, attention_chunk=4), (1, 8, NHEADS, D), (1, 8, NHEADS_K, D), False)
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True, **kw)
    assert s_dmask.shape == (1, NHEADS, 128, 128)
    probs = s_dmask[:, :, :8, :8].abs().double()
    _, lse_ref, leaves = _ref(q, k, v, kw, None, upcast=True)
    scores = torch.einsum("bihd,bjhd->bhij", leaves[0], leaves[1].repeat_interleave(NHEADS // NHEADS_K, 2))
    chunk = torch.arange(8) // 4
    scores = scores * D**-0.5 + torch.where(chunk[:, None] == chunk[None, :], 0.0, float("-inf"))
    expect = torch.exp(scores - lse_ref[..., None])
    torch.testing.assert_close(probs, expect, atol=2e-5 if torch.float32 == HI else 2e-3, rtol=1e-3)
    assert torch.isfinite(out).all()


def test_exported_functions_are_the_extended_ones():
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"):
        assert getattr(flash_attn, name) is getattr(flash_attn.flash_attn_interface, name)
