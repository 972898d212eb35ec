"""``flash_attn.flash_attn_interface.flash_attn_gpu``: the raw entry points of flash-attn's compiled extension
(``fwd``, ``bwd``, ``varlen_fwd``, ``varlen_bwd``, ``fwd_kvcache``) with its positional argument lists.

Each entry point is compared with the public low-level function it maps onto (same kernels: equal results)
and with the float64 reference; caller buffers (``out``, ``dq`` / ``dk`` / ``dv``) are NaN-poisoned and must
be written in place and returned. ``torch.empty`` returns NaN here too (deterministic mode), so a row nobody
writes fails the comparison.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from fa_compat_testutils import (
    DEVICE,
    HI,
    LOWP,
    check_grads,
    check_out_lse,
    cu_seqlens,
    needs_backward,
    needs_kvcache,
    poison_empty,  # noqa: F401 (autouse fixture)
    rand,
)

from fa_core.errors import FlashAttnValueError
from fa_core.testing import poisoned
from flash_attn import flash_attn_interface as fai
from flash_attn import flash_attn_with_kvcache
from flash_attn.flash_attn_interface import (
    _flash_attn_backward,
    _flash_attn_forward,
    _flash_attn_varlen_backward,
    _flash_attn_varlen_forward,
    flash_attn_gpu,
)

GEN_MATCH = r"generator` argument is no longer supported"


def _equal(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=False)


# ------------------------------------------------------------------------------------------ the binding
#: positional arity of each entry point: flash-attn 2.8.3's, main's (varlen_fwd: + num_splits)
ARITY = {
    "fwd": (13, 13),
    "bwd": (19, 19),
    "varlen_fwd": (21, 22),
    "varlen_bwd": (24, 24),
    "fwd_kvcache": (20, 20),
}


@pytest.mark.parametrize("name", sorted(ARITY))
def test_entry_point_arity(name):
    params = inspect.signature(getattr(flash_attn_gpu, name)).parameters.values()
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    required = sum(p.default is inspect.Parameter.empty for p in params)
    assert (required, len(params)) == ARITY[name]
    with pytest.raises(TypeError):
        getattr(flash_attn_gpu, name)(*([None] * (ARITY[name][0] - 1)))


def test_name_is_bound_like_flash_attn():
    from flash_attn._flash_attn_gpu import FlashAttnTypeError

    assert fai.flash_attn_gpu is flash_attn_gpu
    assert flash_attn_gpu.__name__ == "flash_attn._flash_attn_gpu"
    assert issubclass(FlashAttnTypeError, TypeError) and issubclass(FlashAttnTypeError, RuntimeError)


# ----------------------------------------------------------------------------- generator slot (main)
def test_flash_attn_generator_arg_must_be_none():
    """flash-attn main's ``test_flash_attn_generator_arg_must_be_none`` on this device: a non-None generator
    slot raises ``RuntimeError`` before anything runs, in both ``varlen_fwd`` arities."""
    device, dtype = DEVICE, torch.bfloat16
    batch, seqlen, nheads, nheads_k, head_dim = 1, 1, 2, 1, 8
    q = torch.randn(batch, seqlen, nheads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen, nheads_k, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, seqlen, nheads_k, head_dim, device=device, dtype=dtype)
    scale = head_dim**-0.5
    lse = torch.randn(batch, nheads, seqlen, device=device, dtype=torch.float32)
    bad = torch.empty(1, device=device)

    with pytest.raises(RuntimeError, match=GEN_MATCH):
        flash_attn_gpu.fwd(q, k, v, None, None, 0.0, scale, True, -1, -1, 0.0, False, bad)
    with pytest.raises(RuntimeError, match=GEN_MATCH):
        flash_attn_gpu.bwd(
            q, q, k, v, q, lse, None, None, None, None, 0.0, scale, True, -1, -1, 0.0, False, bad, None
        )

    total_q = batch * seqlen
    qf = q.view(total_q, nheads, head_dim)
    kf = k.view(total_q, nheads_k, head_dim)
    vf = v.view(total_q, nheads_k, head_dim)
    cu = torch.arange(0, total_q + 1, seqlen, dtype=torch.int32, device=device)
    varlen_args = (qf, kf, vf, None, cu, cu, None, None, None, None, seqlen, seqlen, 0.0, scale, False, True)
    with pytest.raises(RuntimeError, match=GEN_MATCH):
        flash_attn_gpu.varlen_fwd(*varlen_args, -1, -1, 0.0, False, bad, 0)
    with pytest.raises(RuntimeError, match=GEN_MATCH):
        flash_attn_gpu.varlen_fwd(*varlen_args, -1, -1, 0.0, False, bad)  # 2.8.3's arity
    with pytest.raises(RuntimeError, match=GEN_MATCH):
        flash_attn_gpu.varlen_bwd(
            qf, qf, kf, vf, qf, lse, None, None, None, cu, cu, None, seqlen, seqlen, 0.0, scale, False, True,
            -1, -1, 0.0, False, bad, None,
        )  # fmt: skip


def test_generator_checked_first():
    """The generator slot is checked before every other argument (and before a caller's buffer is touched);
    a ``torch.Generator`` (what flash-attn 2.8.3's extension took) is refused too."""
    out = poisoned((1, 4, 2, 16), HI, DEVICE)
    with pytest.raises(RuntimeError, match=GEN_MATCH):
        flash_attn_gpu.fwd(
            None, None, None, out, None, 0.0, 1.0, False, -1, -1, 0.0, False, torch.Generator()
        )
    assert out.isnan().all()
    with pytest.raises(RuntimeError, match=GEN_MATCH):
        flash_attn_gpu.varlen_fwd(*([None] * 20), torch.Generator())
    with pytest.raises(RuntimeError, match=GEN_MATCH):
        flash_attn_gpu.bwd(*([None] * 17), 0, None)
    with pytest.raises(RuntimeError, match=GEN_MATCH):
        flash_attn_gpu.varlen_bwd(*([None] * 22), "gen", None)


# ------------------------------------------------------------------------------------------- dense
@pytest.mark.parametrize(
    ("dtype", "case"),
    [
        (HI, dict(causal=True)),
        (HI, dict(window=(5, 2), softcap=2.0, alibi=True)),
        (LOWP, dict()),
    ],
    ids=["causal", "window-softcap-alibi", "lowp"],
)
def test_fwd(dtype, case):
    torch.manual_seed(1)
    b, sq, sk, h, hk, d = 2, 13, 19, 2, 1, 16
    q, k, v = rand(b, sq, h, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype)
    causal, (left, right) = case.get("causal", False), case.get("window", (-1, -1))
    softcap = case.get("softcap", 0.0)
    alibi = torch.rand(b, h, device=DEVICE) * 0.3 if case.get("alibi") else None
    args = (0.0, 0.3, causal, left, right, softcap, False, None)
    res = flash_attn_gpu.fwd(q, k, v, None, alibi, *args)
    assert isinstance(res, list) and len(res) == 4
    out, lse, s_dmask, rng_state = res
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32 and s_dmask.shape == (0,)
    assert rng_state.shape == (2,) and rng_state.dtype == torch.int64
    kw = dict(
        softmax_scale=0.3, causal=causal, window_size=(left, right), softcap=softcap, alibi_slopes=alibi
    )
    check_out_lse(out, lse, q, k, v, **kw)
    low = _flash_attn_forward(q, k, v, 0.0, 0.3, causal, left, right, softcap, alibi, False)
    _equal(out, low[0])
    _equal(lse, low[1])
    # a caller's out is written in place and returned
    buf = poisoned(q.shape, dtype, DEVICE)
    res2 = flash_attn_gpu.fwd(q, k, v, buf, alibi, *args)
    assert res2[0] is buf
    _equal(buf, out)


@needs_backward
@pytest.mark.parametrize("given", [False, True], ids=["allocated", "in-place"])
def test_bwd(given):
    torch.manual_seed(2)
    b, sq, sk, h, hk, d = 2, 11, 17, 2, 1, 16
    q, k, v, dout = rand(b, sq, h, d), rand(b, sk, hk, d), rand(b, sk, hk, d), rand(b, sq, h, d)
    out, lse, _, rng = flash_attn_gpu.fwd(q, k, v, None, None, 0.0, 0.25, True, -1, -1, 0.0, False, None)
    bufs = [poisoned(t.shape, t.dtype, DEVICE) for t in (q, k, v)] if given else [None] * 3
    dq, dk, dv, softmax_d = flash_attn_gpu.bwd(
        dout, q, k, v, out, lse, *bufs, None, 0.0, 0.25, True, -1, -1, 0.0, False, None, rng
    )
    if given:
        assert dq is bufs[0] and dk is bufs[1] and dv is bufs[2]
    assert dk.shape == k.shape and softmax_d.shape == (b, h, 128) and softmax_d.dtype == torch.float32
    check_grads((dq, dk, dv), q, k, v, dout, softmax_scale=0.25, causal=True)
    low = [poisoned(t.shape, t.dtype, DEVICE) for t in (q, k, v)]
    low_d = _flash_attn_backward(
        dout, q, k, v, out, lse, *low, 0.0, 0.25, True, -1, -1, 0.0, None, False, rng
    )
    for g, want in zip((dq, dk, dv, softmax_d), (*low, low_d)):
        _equal(g, want)


@needs_backward
def test_dropout_rng_state_round_trip():
    """fwd with dropout returns the rng_state and S_dmask of the low-level forward; bwd replays the same mask
    from it (the gradients of the reference with the S_dmask's mask); without rng_state bwd refuses."""
    torch.manual_seed(3)
    b, s, h, d, p = 1, 20, 2, 16, 0.25
    q, k, v, dout = (rand(b, s, h, d) for _ in range(4))
    out, lse, s_dmask, rng = flash_attn_gpu.fwd(q, k, v, None, None, p, 0.25, False, -1, -1, 0.0, True, None)
    assert s_dmask.shape == (b, h, 128, 128) and s_dmask.dtype == q.dtype
    keep = s_dmask[:, :, :s, :s] >= 0
    assert 0.5 < keep.float().mean() < 0.95
    kw = dict(softmax_scale=0.25, dropout_p=p, dropout_mask=keep)
    check_out_lse(out, lse, q, k, v, **kw)
    dq, dk, dv, _ = flash_attn_gpu.bwd(
        dout, q, k, v, out, lse, None, None, None, None, p, 0.25, False, -1, -1, 0.0, False, None, rng
    )
    check_grads((dq, dk, dv), q, k, v, dout, **kw)
    low = [poisoned(t.shape, t.dtype, DEVICE) for t in (q, k, v)]
    _flash_attn_backward(dout, q, k, v, out, lse, *low, p, 0.25, False, -1, -1, 0.0, None, False, rng)
    for g, want in zip((dq, dk, dv), low):
        _equal(g, want)
    with pytest.raises(RuntimeError, match="rng_state"):
        flash_attn_gpu.bwd(dout, q, k, v, out, lse, None, None, None, None, p, 0.25, False, -1, -1, 0.0, False,
                           None, None)  # fmt: skip


# ------------------------------------------------------------------------------------------- varlen
LQ, LK = [5, 12, 1], [7, 3, 14]


def _varlen_inputs(dtype=HI, h=2, hk=1, d=16):
    q, k, v = (
        rand(sum(LQ), h, d, dtype=dtype),
        rand(sum(LK), hk, d, dtype=dtype),
        rand(sum(LK), hk, d, dtype=dtype),
    )
    return q, k, v, cu_seqlens(LQ), cu_seqlens(LK)


@pytest.mark.parametrize("arity", ["2.8.3", "main"])
def test_varlen_fwd(arity):
    torch.manual_seed(4)
    q, k, v, cu_q, cu_k = _varlen_inputs()
    tail = () if arity == "2.8.3" else (0,)
    buf = poisoned(q.shape, q.dtype, DEVICE)
    res = flash_attn_gpu.varlen_fwd(
        q, k, v, buf, cu_q, cu_k, None, None, None, None, max(LQ), max(LK), 0.0, 0.5, False, True, -1, -1, 0.0,
        False, None, *tail,
    )  # fmt: skip
    assert isinstance(res, list) and len(res) == 4
    out, lse, s_dmask, rng_state = res
    assert out is buf and lse.shape == (2, sum(LQ)) and s_dmask.shape == (0,) and rng_state.shape == (2,)
    check_out_lse(out, lse, q, k, v, varlen=(cu_q, cu_k), softmax_scale=0.5, causal=True)
    low = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max(LQ), max(LK), 0.0, 0.5, True)
    _equal(out, low[0])
    _equal(lse, low[1])


def test_varlen_fwd_seqused_leftpad_window():
    """seqused_k, leftpad_k, the window and softcap reach the low-level forward in their slots."""
    torch.manual_seed(5)
    q, k, v, cu_q, cu_k = _varlen_inputs()
    used = torch.tensor([6, 2, 11], dtype=torch.int32, device=DEVICE)
    pad = torch.tensor([1, 0, 2], dtype=torch.int32, device=DEVICE)
    for seqused_k, leftpad_k in ((used, None), (None, pad)):
        out, lse, _, _ = flash_attn_gpu.varlen_fwd(
            q, k, v, None, cu_q, cu_k, seqused_k, leftpad_k, None, None, max(LQ), max(LK), 0.0, 0.5, True,
            False, 4, 1, 1.5, False, None, 0,
        )  # fmt: skip
        low = _flash_attn_varlen_forward(
            q, k, v, cu_q, cu_k, max(LQ), max(LK), 0.0, 0.5, False, 4, 1, 1.5, leftpad_k=leftpad_k,
            seqused_k=seqused_k,
        )  # fmt: skip
        _equal(out, low[0])
        _equal(lse, low[1])
    # seqused_k against the reference: sequence b attends to its first used[b] keys
    out, lse, _, _ = flash_attn_gpu.varlen_fwd(
        q, k, v, None, cu_q, cu_k, used, None, None, None, max(LQ), max(LK), 0.0, 0.5, False, False, -1, -1, 0.0,
        False, None,
    )  # fmt: skip
    for i, n in enumerate(used.tolist()):
        qi = q[int(cu_q[i]) : int(cu_q[i + 1])][None]
        ki, vi = k[int(cu_k[i]) : int(cu_k[i]) + n][None], v[int(cu_k[i]) : int(cu_k[i]) + n][None]
        check_out_lse(out[int(cu_q[i]) : int(cu_q[i + 1])][None], None, qi, ki, vi, softmax_scale=0.5)


def test_varlen_fwd_paged():
    """A block_table (paged keys) in its slot, read as the low-level forward reads it; main's num_splits > 1
    is refused with a block table, as by the extension."""
    torch.manual_seed(6)
    page, hk, d = 16, 1, 16
    q = rand(sum(LQ), 2, d)
    k_cache, v_cache = rand(4, page, hk, d), rand(4, page, hk, d)
    table = torch.tensor([[2], [0], [3]], dtype=torch.int32, device=DEVICE)
    cu_q, cu_k = cu_seqlens(LQ), cu_seqlens(LK)
    args = (None, max(LQ), max(LK), 0.0, 0.5, False, True, -1, -1, 0.0, False, None)
    out, lse, _, _ = flash_attn_gpu.varlen_fwd(
        q, k_cache, v_cache, None, cu_q, cu_k, None, None, table, *args
    )
    k = torch.cat([k_cache[int(table[i, 0]), :n] for i, n in enumerate(LK)])
    v = torch.cat([v_cache[int(table[i, 0]), :n] for i, n in enumerate(LK)])
    check_out_lse(out, lse, q, k, v, varlen=(cu_q, cu_k), softmax_scale=0.5, causal=True)
    low = _flash_attn_varlen_forward(
        q, k_cache, v_cache, cu_q, cu_k, max(LQ), max(LK), 0.0, 0.5, True, block_table=table
    )
    _equal(out, low[0])
    out1 = flash_attn_gpu.varlen_fwd(q, k_cache, v_cache, None, cu_q, cu_k, None, None, table, *args, 1)[0]
    _equal(out1, out)
    with pytest.raises(RuntimeError, match="num_splits > 1"):
        flash_attn_gpu.varlen_fwd(q, k_cache, v_cache, None, cu_q, cu_k, None, None, table, *args, 2)


@needs_backward
@pytest.mark.parametrize("given", [False, True], ids=["allocated", "in-place"])
def test_varlen_bwd(given):
    torch.manual_seed(7)
    q, k, v, cu_q, cu_k = _varlen_inputs()
    dout = rand(*q.shape)
    out, lse, _, rng = flash_attn_gpu.varlen_fwd(
        q, k, v, None, cu_q, cu_k, None, None, None, None, max(LQ), max(LK), 0.0, 0.5, False, True, -1, -1, 0.0,
        False, None,
    )  # fmt: skip
    bufs = [poisoned(t.shape, t.dtype, DEVICE) for t in (q, k, v)] if given else [None] * 3
    dq, dk, dv, softmax_d = flash_attn_gpu.varlen_bwd(
        dout, q, k, v, out, lse, *bufs, cu_q, cu_k, None, max(LQ), max(LK), 0.0, 0.5, given, True, -1, -1, 0.0,
        False, None, rng,
    )  # fmt: skip
    if given:
        assert dq is bufs[0] and dk is bufs[1] and dv is bufs[2]
    assert softmax_d.shape == (2, sum(LQ) + 128 * len(LQ)) and softmax_d.dtype == torch.float32
    check_grads((dq, dk, dv), q, k, v, dout, varlen=(cu_q, cu_k), softmax_scale=0.5, causal=True)
    low = [poisoned(t.shape, t.dtype, DEVICE) for t in (q, k, v)]
    low_d = _flash_attn_varlen_backward(
        dout, q, k, v, out, lse, *low, cu_q, cu_k, max(LQ), max(LK), 0.0, 0.5, True, -1, -1, 0.0, None, False,
        rng, given,
    )  # fmt: skip
    for g, want in zip((dq, dk, dv, softmax_d), (*low, low_d)):
        _equal(g, want)


@needs_backward
def test_varlen_dropout_rng_state_round_trip():
    torch.manual_seed(8)
    q, k, v, cu_q, cu_k = _varlen_inputs(h=1)
    dout, p = rand(*q.shape), 0.3
    out, lse, _, rng = flash_attn_gpu.varlen_fwd(
        q, k, v, None, cu_q, cu_k, None, None, None, None, max(LQ), max(LK), p, 0.5, False, False, -1, -1, 0.0,
        False, None, 0,
    )  # fmt: skip
    low_out, _, _, _ = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max(LQ), max(LK), p, 0.5, False)
    assert not torch.equal(low_out, out)  # a fresh seed per call
    dq, dk, dv, _ = flash_attn_gpu.varlen_bwd(
        dout, q, k, v, out, lse, None, None, None, cu_q, cu_k, None, max(LQ), max(LK), p, 0.5, False, False, -1,
        -1, 0.0, False, None, rng,
    )  # fmt: skip
    low = [poisoned(t.shape, t.dtype, DEVICE) for t in (q, k, v)]
    _flash_attn_varlen_backward(
        dout, q, k, v, out, lse, *low, cu_q, cu_k, max(LQ), max(LK), p, 0.5, False, -1, -1, 0.0, None, False,
        rng,
    )  # fmt: skip
    for g, want in zip((dq, dk, dv), low):
        _equal(g, want)
    # another rng_state gives another mask, hence other gradients
    other = rng.clone()
    other[0] += 1
    dq2 = flash_attn_gpu.varlen_bwd(
        dout, q, k, v, out, lse, None, None, None, cu_q, cu_k, None, max(LQ), max(LK), p, 0.5, False, False, -1,
        -1, 0.0, False, None, other,
    )[0]  # fmt: skip
    assert not torch.allclose(dq2, dq)


# ------------------------------------------------------------------------------------------ kvcache
@needs_kvcache
def test_fwd_kvcache_appends():
    """New k / v appended into the caches at seqlens_k (in place), attention over the grown caches; the
    result equals flash_attn_with_kvcache's on copies of the caches, and a caller's out is written."""
    torch.manual_seed(9)
    b, s_new, h, hk, d, cap = 2, 3, 2, 1, 16, 24
    lens = [5, 17]
    k_full, v_full = rand(b, cap, hk, d), rand(b, cap, hk, d)
    k_new, v_new, q = rand(b, s_new, hk, d), rand(b, s_new, hk, d), rand(b, s_new, h, d)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = k_full.clone(), v_full.clone()
    buf = poisoned(q.shape, q.dtype, DEVICE)
    res = flash_attn_gpu.fwd_kvcache(
        q, k_cache, v_cache, k_new, v_new, seqlens, None, None, None, None, None, None, buf, 0.25, True, -1, -1,
        0.0, True, 0,
    )  # fmt: skip
    assert isinstance(res, list) and len(res) == 2
    out, lse = res
    assert out is buf and lse.shape == (b, h, s_new) and lse.dtype == torch.float32
    for i, n in enumerate(lens):
        _equal(k_cache[i, n : n + s_new], k_new[i])
        _equal(v_cache[i, n : n + s_new], v_new[i])
        _equal(k_cache[i, :n], k_full[i, :n])
        k_ref = torch.cat([k_full[i, :n], k_new[i]])[None]
        v_ref = torch.cat([v_full[i, :n], v_new[i]])[None]
        check_out_lse(
            out[i : i + 1], lse[i : i + 1], q[i : i + 1], k_ref, v_ref, softmax_scale=0.25, causal=True
        )
    k2, v2 = k_full.clone(), v_full.clone()
    want, want_lse = flash_attn_with_kvcache(
        q, k2, v2, k_new, v_new, cache_seqlens=seqlens, softmax_scale=0.25, causal=True,
        return_softmax_lse=True,
    )  # fmt: skip
    _equal(out, want)
    _equal(lse, want_lse)
    _equal(k_cache, k2)


@needs_kvcache
def test_fwd_kvcache_slots():
    """leftpad_k, the window and alibi_slopes in their slots (no append, out allocated)."""
    torch.manual_seed(10)
    b, sq, h, hk, d, cap = 2, 2, 2, 1, 16, 20
    k_cache, v_cache, q = rand(b, cap, hk, d), rand(b, cap, hk, d), rand(b, sq, h, d)
    seqlens = torch.tensor([12, 20], dtype=torch.int32, device=DEVICE)
    pad = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    alibi = torch.rand(h, device=DEVICE) * 0.3
    out, lse = flash_attn_gpu.fwd_kvcache(
        q, k_cache, v_cache, None, None, seqlens, None, None, None, pad, None, alibi, None, 0.25, False, 6, 0,
        0.0, False, 0,
    )  # fmt: skip
    want, want_lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=pad, softmax_scale=0.25, window_size=(6, 0),
        alibi_slopes=alibi, return_softmax_lse=True,
    )  # fmt: skip
    _equal(out, want)
    _equal(lse, want_lse)
    i = 0  # sequence 0: keys [3, 12) of the cache
    check_out_lse(
        out[i : i + 1], lse[i : i + 1], q[i : i + 1], k_cache[i : i + 1, 3:12], v_cache[i : i + 1, 3:12],
        softmax_scale=0.25, window_size=(6, 0), alibi_slopes=alibi,
    )  # fmt: skip


@needs_kvcache
def test_fwd_kvcache_rotary_slots():
    """rotary_cos / rotary_sin and is_rotary_interleaved in their slots: the same caches and output as
    flash_attn_with_kvcache with the same rotary layout (and not the other one)."""
    torch.manual_seed(13)
    b, s_new, h, hk, d, cap = 1, 2, 2, 1, 16, 16
    k_full, v_full = rand(b, cap, hk, d), rand(b, cap, hk, d)
    k_new, v_new, q = rand(b, s_new, hk, d), rand(b, s_new, hk, d), rand(b, s_new, h, d)
    seqlens = torch.tensor([7], dtype=torch.int32, device=DEVICE)
    angle = torch.rand(cap, d // 2, device=DEVICE) * 6.28
    cos, sin = angle.cos().to(HI), angle.sin().to(HI)
    results = {}
    for interleaved in (False, True):
        k_cache, v_cache = k_full.clone(), v_full.clone()
        out, lse = flash_attn_gpu.fwd_kvcache(
            q, k_cache, v_cache, k_new, v_new, seqlens, cos, sin, None, None, None, None, None, 0.25, True, -1,
            -1, 0.0, interleaved, 0,
        )  # fmt: skip
        k2, v2 = k_full.clone(), v_full.clone()
        want = flash_attn_with_kvcache(
            q, k2, v2, k_new, v_new, cos, sin, seqlens, softmax_scale=0.25, causal=True,
            rotary_interleaved=interleaved,
        )  # fmt: skip
        _equal(out, want)
        _equal(k_cache, k2)
        results[interleaved] = out
    assert not torch.allclose(results[False], results[True])


# ------------------------------------------------------------------------------------------- errors
def _fwd_args(q, k, v, out=None):
    return (q, k, v, out, None, 0.0, 0.25, False, -1, -1, 0.0, False, None)


def test_errors_are_runtime_errors():
    """Argument errors are RuntimeError (as the extension's TORCH_CHECK), and still ValueError / TypeError;
    a bad out buffer is refused before anything is written."""
    torch.manual_seed(11)
    q, k, v = rand(1, 8, 2, 16), rand(1, 8, 2, 16), rand(1, 8, 2, 16)
    bad_shape = poisoned((1, 8, 2, 8), q.dtype, DEVICE)
    with pytest.raises(RuntimeError, match="out must have shape") as err:
        flash_attn_gpu.fwd(*_fwd_args(q, k, v, bad_shape))
    assert isinstance(err.value, ValueError) and bad_shape.isnan().all()
    bad_dtype = poisoned(q.shape, LOWP, DEVICE)
    with pytest.raises(RuntimeError, match="dtype") as err:
        flash_attn_gpu.fwd(*_fwd_args(q, k, v, bad_dtype))
    assert isinstance(err.value, TypeError) and bad_dtype.isnan().all()
    with pytest.raises(RuntimeError) as err:  # k's dtype differs from q's
        flash_attn_gpu.fwd(*_fwd_args(q, k.to(LOWP), v))
    assert isinstance(err.value, TypeError)
    with pytest.raises(RuntimeError):  # nheads_k does not divide nheads
        flash_attn_gpu.fwd(*_fwd_args(rand(1, 8, 3, 16), k, v))
    cu = cu_seqlens([8])
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        flash_attn_gpu.varlen_fwd(
            q[0], k[0], v[0], None, cu.long(), cu, None, None, None, None, 8, 8, 0.0, 0.25, False, False, -1, -1,
            0.0, False, None,
        )  # fmt: skip
    with pytest.raises(FlashAttnValueError, match="max_seqlen_q"):
        flash_attn_gpu.varlen_fwd(
            q[0], k[0], v[0], None, cu, cu, None, None, None, None, 4, 8, 0.0, 0.25, False, False, -1, -1, 0.0,
            False, None,
        )  # fmt: skip


@needs_backward
def test_bwd_errors_are_runtime_errors():
    torch.manual_seed(12)
    q, k, v, dout = (rand(1, 8, 2, 16) for _ in range(4))
    out, lse, _, rng = flash_attn_gpu.fwd(*_fwd_args(q, k, v))
    args = (None, 0.0, 0.25, False, -1, -1, 0.0, False, None, rng)
    dk_bad = poisoned((1, 8, 1, 16), q.dtype, DEVICE)
    with pytest.raises(RuntimeError, match="dk") as err:
        flash_attn_gpu.bwd(dout, q, k, v, out, lse, None, dk_bad, None, *args)
    assert isinstance(err.value, ValueError)
    with pytest.raises(RuntimeError, match="softmax_lse"):
        flash_attn_gpu.bwd(dout, q, k, v, out, lse[:, :1], None, None, None, *args)
    dq_bad = poisoned(q.shape, LOWP, DEVICE)
    with pytest.raises(RuntimeError, match="dq") as err:
        flash_attn_gpu.bwd(dout, q, k, v, out, lse, dq_bad, None, None, *args)
    assert isinstance(err.value, TypeError) and dq_bad.isnan().all()
