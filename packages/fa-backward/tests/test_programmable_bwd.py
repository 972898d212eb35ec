"""Backward of programmable attention: chunks, mask_mod, score_mod (+ derivative), block-sparse masks
(partial and full blocks), the lse gradient (sinks included), varlen; alone and in pairs, against the
reference's autograd (float64 on CPU) with the 2x rule."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fa_backward import flash_attn_backward
from fa_backward.programmable import attention, attention_varlen
from fa_core import attention_ref, attention_varlen_ref
from fa_core import score_mods as sm
from fa_core.block_sparse import (
    block_mask_from_dense,
    block_mask_to_dense,
    block_mask_to_dense_blocks,
    create_block_mask,
    transpose_block_mask,
)
from fa_core.testing import DEVICE, assert_close_2x

DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
HI = torch.float64 if DEVICE == "cpu" else torch.float32
SLACK = 1e-4 if torch.float32 == DTYPE else 2e-2


@triton.jit
def _striped(b, h, q_idx, kv_idx):
    # drop every third key; odd heads also drop keys more than 5 ahead of the query
    return ((kv_idx % 3) != 1) & ((h % 2 == 0) | (kv_idx <= q_idx + 5))


def _striped_torch(b, h, q_idx, kv_idx):
    return ((kv_idx % 3) != 1) & ((h % 2 == 0) | (kv_idx <= q_idx + 5))


@triton.jit
def _scaled(score, b, h, q_idx, kv_idx):
    # a multiplicative, position-dependent score_mod (derivative not 1)
    return score * (1.0 + 0.02 * ((q_idx + kv_idx) % 7).to(tl.float32)) + 0.1 * h


@triton.jit
def _scaled_grad(score, b, h, q_idx, kv_idx):
    return score * 0.0 + (1.0 + 0.02 * ((q_idx + kv_idx) % 7).to(tl.float32))


def _scaled_torch(score, b, h, q_idx, kv_idx):
    return score * (1.0 + 0.02 * ((q_idx + kv_idx) % 7).to(score.dtype)) + 0.1 * h


def _inputs(b, sq, sk, h, hk, d, dv, seed, varlen_total=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape_q = (b, sq, h, d) if varlen_total is None else (varlen_total, h, d)
    shape_k = (b, sk, hk, d) if varlen_total is None else (varlen_total, hk, d)
    shape_v = (b, sk, hk, dv) if varlen_total is None else (varlen_total, hk, dv)
    return [
        torch.randn(s, generator=g).to(DEVICE, DTYPE).requires_grad_() for s in (shape_q, shape_k, shape_v)
    ]


def _ref_grads(fn, ins, dout, dlse, upcast):
    """Gradients of ``<out, dout> + <lse, dlse>`` through the reference (upcast = float64/float32)."""
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    o, lse = fn(*leaves, upcast)
    loss = (o * dout.to(o.dtype)).sum()
    if dlse is not None:
        loss = loss + (lse * dlse).sum()
    return torch.autograd.grad(loss, leaves)


def _compare(names, ours, fn, ins, dout, dlse=None):
    ref = _ref_grads(fn, ins, dout, dlse, True)
    low = _ref_grads(fn, ins, dout, dlse, False)
    for name, a, r, lo in zip(names, ours, ref, low):
        assert a.shape == r.shape, name
        assert_close_2x(a, r, lo, name, slack=SLACK)


# (kernel kwargs, reference kwargs) per case; "_shape": (sq, sk); "_sink": learnable sink; "_lse": dlse too
CASES = {
    "chunk": ({"attention_chunk": 16}, {}),
    "chunk_causal": ({"attention_chunk": 24, "causal": True}, {}),
    "chunk_window_sq_gt_sk": ({"attention_chunk": 8, "window_size": (5, 3), "_shape": (50, 30)}, {}),
    "sink_chunk_lse": ({"attention_chunk": 16, "_sink": True, "_lse": True}, {}),
    "mask_mod_gqa": ({"mask_mod": _striped}, {"mask_mod": _striped_torch}),
    "mask_mod_causal_chunk": (
        {"mask_mod": _striped, "causal": True, "attention_chunk": 16},
        {"mask_mod": _striped_torch},
    ),
    "score_mod_causal": (
        {"score_mod": sm.relative_position_bias, "score_mod_grad": sm.additive_grad, "causal": True},
        {"score_mod": sm.relative_position_bias_torch},
    ),
    "score_mod_grad_softcap_window": (
        {"score_mod": _scaled, "score_mod_grad": _scaled_grad, "softcap": 3.0, "window_size": (9, 4)},
        {"score_mod": _scaled_torch},
    ),
    "score_mod_mask_mod_sink_vdim": (
        {
            "score_mod": _scaled,
            "score_mod_grad": _scaled_grad,
            "mask_mod": _striped,
            "_sink": True,
            "_dv": 24,
        },
        {"score_mod": _scaled_torch, "mask_mod": _striped_torch},
    ),
    "lse_grad_causal": ({"causal": True, "_lse": True, "_shape": (40, 48)}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_programmable_grads(case):
    kern, ref_kw = (dict(x) for x in CASES[case])
    sq, sk = kern.pop("_shape", (40, 48))
    dv = kern.pop("_dv", 16)
    use_sink, use_lse = kern.pop("_sink", False), kern.pop("_lse", False)
    ref_kw.update(
        {k_: v_ for k_, v_ in kern.items() if k_ not in ("score_mod", "score_mod_grad", "mask_mod")}
    )
    b, h, hk, d = 1, 2, 1, 16
    q, k, v = _inputs(b, sq, sk, h, hk, d, dv, seed=len(case))
    ins = [q, k, v]
    if use_sink:
        sink = (torch.randn(h, generator=torch.Generator().manual_seed(3)) * 2).to(DEVICE).requires_grad_()
        kern["learnable_sink"] = ref_kw["learnable_sink"] = sink
        ins.append(sink)
    dout = torch.randn(b, sq, h, dv, generator=torch.Generator().manual_seed(5)).to(DEVICE, DTYPE)
    dlse = torch.randn(b, h, sq, generator=torch.Generator().manual_seed(6)).to(DEVICE) if use_lse else None

    out, lse = attention(q, k, v, **kern)
    loss = (out * dout).sum() + ((lse * dlse).sum() if dlse is not None else 0.0)
    ours = torch.autograd.grad(loss, ins)

    def fn(q_, k_, v_, *rest, upcast=True):
        kw = dict(ref_kw)
        if rest:
            kw["learnable_sink"] = rest[0]
        return attention_ref(q_, k_, v_, upcast=upcast, dtype=HI, **kw)

    _compare(("dq", "dk", "dv", "dsink"), ours, lambda *a: fn(*a[:-1], upcast=a[-1]), ins, dout, dlse)


# ----------------------------------------------------------------------------------------- block-sparse
def _window_global(b, h, q_idx, kv_idx):
    return (kv_idx < 16) | ((q_idx - kv_idx).abs() <= 40)


@triton.jit
def _window_global_jit(b, h, q_idx, kv_idx):
    rel = q_idx - kv_idx
    return (kv_idx < 16) | ((rel <= 40) & (rel >= -40))


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_grads_partial_blocks(causal):
    """Through the forward: per-(batch, head) random block lists, partial blocks only, GQA."""
    sq, sk = 80, 96
    blocks = torch.rand(1, 2, 3, 3, generator=torch.Generator().manual_seed(7 + causal)) > 0.45
    blocks[..., 0] = True
    bm = block_mask_from_dense(blocks.to(DEVICE), block_size=(32, 32))
    q, k, v = _inputs(1, sq, sk, 2, 1, 16, 16, seed=9 + causal)
    dout = torch.randn(1, sq, 2, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    out, _ = attention(q, k, v, causal=causal, block_mask=bm)
    ours = torch.autograd.grad(out, (q, k, v), dout)
    _compare(
        ("dq", "dk", "dv"),
        ours,
        lambda q_, k_, v_, up: attention_ref(q_, k_, v_, causal=causal, block_mask=bm, upcast=up, dtype=HI),
        [q, k, v],
        dout,
    )


@pytest.mark.parametrize(
    "with_mask_mod,rules,shape",
    [
        (False, {}, (96, 96)),
        (True, {}, (96, 96)),
        (False, {}, (128, 112)),
        (False, {"causal": True}, (128, 112)),
        (True, {"causal": True}, (112, 128)),
        (True, {"window_size": (40, 8)}, (128, 112)),
        (False, {"window_size": (20, 3)}, (112, 128)),
    ],
    ids=["plain", "mask_mod", "ragged", "causal", "mask_mod_causal", "mask_mod_window", "window"],
)
def test_block_sparse_full_blocks_backward(with_mask_mod, rules, shape):
    """Full + partial blocks (from a mask function), backward against the reference's out / lse and autograd:
    full blocks skip mask_mod, partial ones evaluate it. With causal (bottom-right, seqlen_q != seqlen_k) /
    window, the full blocks' tiles that cut the band edge must still be masked; a ragged key length (112,
    not a multiple of the 32-key blocks) leaves a last full block that reaches past the keys."""
    sq, sk = shape
    bm = create_block_mask(_window_global, None, None, sq, sk, block_size=(32, 32), device=DEVICE)
    partial, full = block_mask_to_dense_blocks(bm)
    assert bool(full.any()) and bool(partial.any()) and not bool((partial & full).any())
    q, k, v = _inputs(1, sq, sk, 2, 1, 16, 16, seed=31 + with_mask_mod + 2 * len(rules) + sq % 7)
    dout = torch.randn(1, sq, 2, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE, DTYPE)
    mods = {"mask_mod": _window_global_jit} if with_mask_mod else {}
    ref_mods = {"mask_mod": _window_global} if with_mask_mod else {}
    ref_kw = {**ref_mods, **rules}
    kern = dict(mods)
    if "causal" in rules:
        kern["causal"] = True
    if "window_size" in rules:
        kern["window_size_left"], kern["window_size_right"] = rules["window_size"]
    with torch.no_grad():
        out, lse = attention_ref(q, k, v, block_mask=bm, dtype=HI, **ref_kw)
    out = out.to(DTYPE)
    grads = flash_attn_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, block_mask=bm, **kern)
    _compare(
        ("dq", "dk", "dv"),
        grads[:3],
        lambda q_, k_, v_, up: attention_ref(q_, k_, v_, block_mask=bm, upcast=up, dtype=HI, **ref_kw),
        [q, k, v],
        dout,
    )


def test_transpose_block_mask_and_cache():
    blocks = torch.rand(2, 1, 5, 4, generator=torch.Generator().manual_seed(4)).to(DEVICE) > 0.5
    full = blocks & (torch.rand(2, 1, 5, 4, generator=torch.Generator().manual_seed(5)).to(DEVICE) > 0.5)
    bm = block_mask_from_dense(blocks, (32, 64), full_blocks=full)
    t = transpose_block_mask(bm, 4)
    assert t is transpose_block_mask(bm, 4)  # cached on the mask
    assert transpose_block_mask(bm._replace(), 4) is not t  # a replaced mask builds its own
    for num, idx, want in (
        (t.q_num_blocks, t.q_indices, blocks & ~full),
        (t.full_q_num_blocks, t.full_q_indices, full),
    ):
        assert num is not None and idx is not None
        assert num.dtype == idx.dtype == torch.int32 and num.device == blocks.device
        want_t = want.transpose(-1, -2)
        assert torch.equal(num, want_t.sum(-1).int())
        got = torch.zeros_like(want_t)
        for bi in range(2):
            for kb in range(4):
                got[bi, 0, kb, idx[bi, 0, kb, : num[bi, 0, kb]].long()] = True
                assert torch.all(idx[bi, 0, kb, : num[bi, 0, kb]].diff() > 0)
        assert torch.equal(got, want_t)
    # unused index entries, whatever they hold, never count
    junk = bm._replace(kv_indices=torch.where(bm.kv_num_blocks[..., None] > 0, bm.kv_indices, 0))
    assert torch.equal(block_mask_to_dense(junk, 160, 256), block_mask_to_dense(bm, 160, 256))


def test_create_block_mask_full_blocks():
    sq, sk = 100, 90
    bm = create_block_mask(_window_global, None, None, sq, sk, block_size=(32, 32), device=DEVICE)
    el = _window_global(None, None, torch.arange(sq)[:, None], torch.arange(sk)[None, :]).to(DEVICE)
    partial = block_mask_to_dense(bm, sq, sk, "partial")
    full = block_mask_to_dense(bm, sq, sk, "full")
    assert torch.equal((partial | full)[0, 0] & el, el)  # every visible element is in a listed block
    assert bool(el[full[0, 0]].all())  # full blocks hold visible elements only
    assert not bool((partial & full).any())
    no_full = create_block_mask(_window_global, None, None, sq, sk, (32, 32), DEVICE, full_blocks=False)
    assert no_full.full_kv_num_blocks is None
    assert torch.equal(block_mask_to_dense(no_full, sq, sk), partial | full)


# ------------------------------------------------------------------------------------------------ varlen
def test_varlen_sink_chunk_lse_grads():
    lens = [5, 40, 0, 23]
    cu = torch.tensor([0, 5, 45, 45, 68], dtype=torch.int32, device=DEVICE)
    q, k, v = _inputs(0, 0, 0, 2, 1, 16, 16, seed=12, varlen_total=68)
    sink = (torch.randn(2, generator=torch.Generator().manual_seed(8))).to(DEVICE).requires_grad_()
    dout = torch.randn(68, 2, 16, generator=torch.Generator().manual_seed(9)).to(DEVICE, DTYPE)
    dlse = torch.randn(2, 68, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    kw = {"causal": True, "attention_chunk": 16}
    out, lse = attention_varlen(q, k, v, cu, cu, max(lens), max(lens), learnable_sink=sink, **kw)
    ours = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v, sink))

    def fn(q_, k_, v_, s_, up):
        return attention_varlen_ref(q_, k_, v_, cu, cu, learnable_sink=s_, upcast=up, dtype=HI, **kw)

    _compare(("dq", "dk", "dv", "dsink"), ours, fn, [q, k, v, sink], dout, dlse)


# ------------------------------------------------------------------------------------------ worked examples
def _grads(fn, ins, dout):
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    out, _ = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize("example", ["alibi", "tanh_softcap"])
def test_examples_equal_builtin(example):
    """ALiBi and tanh softcap written as score_mods give the built-ins' outputs and gradients."""
    q, k, v = _inputs(1, 32, 32, 2, 1, 16, 16, seed=41)
    dout = torch.randn(1, 32, 2, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE, DTYPE)
    if example == "alibi":
        mod = {"score_mod": sm.alibi, "score_mod_grad": sm.additive_grad}
        builtin = {"alibi_slopes": sm.alibi_slopes(2, DEVICE)}
    else:
        mod = {"score_mod": sm.tanh_softcap, "score_mod_grad": sm.tanh_softcap_grad}
        builtin = {"softcap": sm.TANH_SOFTCAP}
    a = _grads(lambda *t: attention(*t, causal=True, **mod), [q, k, v], dout)
    b = _grads(lambda *t: attention(*t, causal=True, **builtin), [q, k, v], dout)
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        torch.testing.assert_close(x, y, atol=2e-5 if torch.float32 == DTYPE else 2e-2, rtol=1e-3, msg=name)


@pytest.mark.parametrize("example", ["relative_position_bias", "prefix_lm", "document"])
def test_examples_vs_reference(example):
    sq = sk = 64
    q, k, v = _inputs(1, sq, sk, 2, 2, 16, 16, seed=43)
    dout = torch.randn(1, sq, 2, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE, DTYPE)
    if example == "relative_position_bias":
        kern = {"score_mod": sm.relative_position_bias, "score_mod_grad": sm.additive_grad, "causal": True}
        ref_kw = {"score_mod": sm.relative_position_bias_torch, "causal": True}
    elif example == "prefix_lm":
        kern = {"mask_mod": sm.prefix_lm}
        ref_kw = {"mask_mod": sm.prefix_lm_torch}
    else:
        docs = torch.tensor([[0] * 32 + [1] * 32], device=DEVICE)
        bm = sm.document_block_mask(docs, (32, 32), causal=True)
        # the same mask with its blocks listed as partial (through the forward) ...
        kern = {
            "block_mask": block_mask_from_dense(block_mask_to_dense_blocks(bm)[1], (32, 32)),
            "causal": True,
        }
        ref_kw = {"mask_mod": sm.document_mask_torch(docs), "causal": True}
        # ... and the full-block one, through the reference (full blocks need no mask_mod)
        o1, _ = attention_ref(q, k, v, block_mask=bm, causal=True, dtype=HI)
        o2, _ = attention_ref(q, k, v, dtype=HI, **ref_kw)
        torch.testing.assert_close(o1, o2)
    out, _ = attention(q, k, v, **kern)
    ours = torch.autograd.grad(out, (q, k, v), dout)
    _compare(
        ("dq", "dk", "dv"),
        ours,
        lambda q_, k_, v_, up: attention_ref(q_, k_, v_, upcast=up, dtype=HI, **ref_kw),
        [q, k, v],
        dout,
    )


def test_document_block_mask_checks():
    with pytest.raises(ValueError, match="document_ids"):
        sm.document_block_mask(torch.tensor([[0] * 20 + [1] * 44]), (32, 32))
    with pytest.raises(ValueError, match="document_ids"):
        sm.document_block_mask(torch.zeros(64), (32, 32))


# ----------------------------------------------------------------------------------------------- errors
def test_programmable_errors():
    q = torch.randn(1, 32, 2, 16, device=DEVICE, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="score_mod needs score_mod_grad"):
        attention(q, q, q, score_mod=sm.relative_position_bias)
    with pytest.raises(ValueError, match="score_mod_grad was given without score_mod"):
        attention(q, q, q, score_mod_grad=sm.additive_grad)
    with torch.no_grad():  # forward only: no derivative needed
        attention(q, q, q, score_mod=sm.relative_position_bias)
    x = q.detach()
    o = torch.zeros_like(x)
    lse = torch.zeros(1, 2, 32, device=DEVICE)
    with pytest.raises(TypeError, match="score_mod_grad must be a @triton.jit"):
        flash_attn_backward(
            o, x, x, x, o, lse, score_mod=sm.relative_position_bias, score_mod_grad=lambda *a: 1
        )
    with pytest.raises(ValueError, match="dsoftmax_lse"):
        flash_attn_backward(o, x, x, x, o, lse, dsoftmax_lse=torch.zeros(1, 2, 31, device=DEVICE))
    with pytest.raises(ValueError, match="attention_chunk"):
        flash_attn_backward(o, x, x, x, o, lse, attention_chunk=-2)
    bm = create_block_mask(_window_global, None, None, 32, 32, (32, 32), DEVICE)
    bad = bm._replace(full_kv_indices=None, full_kv_num_blocks=bm.kv_num_blocks)
    with pytest.raises(ValueError, match="full_kv_num_blocks and block_mask.full_kv_indices"):
        flash_attn_backward(o, x, x, x, o, lse, block_mask=bad)
    assert bm.full_kv_indices is not None
    bad = bm._replace(full_kv_indices=bm.full_kv_indices.long())
    with pytest.raises(TypeError, match="full_kv_indices must be int32"):
        flash_attn_backward(o, x, x, x, o, lse, block_mask=bad)
