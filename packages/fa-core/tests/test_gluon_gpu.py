"""The Gluon Hopper forward against the float32 reference (sm_90 + Triton 3.6 only)."""

from __future__ import annotations

import pytest
import torch

from fa_core import attention_ref, attention_varlen_ref
from fa_core import gluon as fg
from fa_core.errors import FlashAttnValueError
from fa_core.testing import assert_close_2x, poisoned

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not torch.cuda.is_available() or not fg.available(),
        reason="fa_core.gluon needs an sm_90 GPU and Triton 3.6",
    ),
]

CASES = [
    # batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window_size, softcap
    (2, 1000, 1000, 4, 2, 64, False, (-1, -1), 0.0),
    (2, 1000, 1000, 4, 2, 128, True, (-1, -1), 0.0),
    (1, 300, 777, 8, 1, 128, True, (-1, -1), 0.0),  # causal, seqlen_q < seqlen_k, MQA
    (1, 777, 300, 2, 2, 64, True, (-1, -1), 0.0),  # causal, seqlen_q > seqlen_k: the first rows see no key
    (3, 128, 128, 2, 1, 128, True, (-1, -1), 0.0),  # whole tiles
    (2, 256, 384, 2, 2, 64, False, (-1, -1), 0.0),
    (2, 1, 1000, 4, 4, 128, False, (-1, -1), 0.0),  # one query row
    (1, 4096, 4096, 2, 1, 128, True, (-1, -1), 0.0),
    (2, 1000, 1000, 4, 2, 128, False, (100, 50), 0.0),  # sliding window: masked left and right edges
    (1, 777, 300, 2, 2, 64, False, (10, 10), 0.0),  # window rows with no key
    (1, 300, 700, 2, 2, 128, False, (0, 0), 0.0),
    (1, 1000, 1000, 2, 2, 64, True, (255, 0), 10.0),
    (2, 517, 517, 3, 3, 128, False, (-1, -1), 30.0),
]


def _kind_params():
    return [
        (kind, case)
        for kind in fg.KINDS
        for case in range(len(CASES))
        if CASES[case][5] in fg.head_dims(kind)
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind, case", _kind_params())
def test_forward_matches_reference(kind, case, dtype):
    b, sq, sk, h, hk, d, causal, window, softcap = CASES[case]
    torch.manual_seed(case)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    out = poisoned(q.shape, dtype, "cuda")
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    assert fg.supports(q, k, v, **kw)
    o, lse = fg.forward(q, k, v, out=out, kind=kind, **kw)
    assert o.data_ptr() == out.data_ptr()
    ref_o, ref_lse = attention_ref(q, k, v, **kw)
    low_o, _ = attention_ref(q, k, v, upcast=False, **kw)
    assert_close_2x(o, ref_o, low_o, "out")
    assert_close_2x(lse, ref_lse, ref_lse, "lse", slack=1e-3)
    if causal and sq > sk:
        empty = sq - sk  # rows i < seqlen_q - seqlen_k see no key
        assert torch.isinf(lse[:, :, :empty]).all() and (o[:, :empty] == 0).all()


@pytest.mark.parametrize("kind", ["ws", "ws3"])
def test_default_kinds_and_ws3_head_dim(kind):
    q = torch.randn(1, 64, 2, 128, device="cuda", dtype=torch.bfloat16)
    if 128 in fg.head_dims(kind):
        fg.forward(q, q, q, kind=kind)
    else:
        with pytest.raises(FlashAttnValueError, match="no tile"):
            fg.forward(q, q, q, kind=kind)


@pytest.mark.parametrize("kind, d", [(kind, d) for kind in fg.KINDS for d in fg.head_dims(kind)])
def test_strided_views_and_scale(kind, d):
    torch.manual_seed(d)
    qkv = torch.randn(2, 517, 3, 3, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert fg.supports(q, k, v, causal=True, softmax_scale=0.3)
    o, lse = fg.forward(q, k, v, causal=True, softmax_scale=0.3, kind=kind)
    ref_o, ref_lse = attention_ref(q, k, v, causal=True, softmax_scale=0.3)
    low_o, _ = attention_ref(q, k, v, causal=True, softmax_scale=0.3, upcast=False)
    assert_close_2x(o, ref_o, low_o, "out")
    assert_close_2x(lse, ref_lse, ref_lse, "lse", slack=1e-3)


def test_unsupported_call_raises():
    q = torch.randn(1, 64, 2, 96, device="cuda", dtype=torch.bfloat16)
    assert not fg.supports(q, q, q)
    with pytest.raises(FlashAttnValueError, match="head dim"):
        fg.forward(q, q, q)


VARLEN_CASES = [
    # nheads, nheads_k, headdim, causal, window_size, softcap, (seqlen_q, seqlen_k) per sequence
    (4, 2, 128, True, (-1, -1), 0.0, [(300, 300), (1, 77), (1000, 1000), (129, 513)]),
    (4, 4, 64, False, (-1, -1), 0.0, [(513, 257), (77, 1), (0, 100), (200, 200)]),
    (2, 2, 128, True, (64, 0), 5.0, [(700, 900), (256, 256)]),
]


@pytest.mark.parametrize("kind", fg.KINDS)
@pytest.mark.parametrize("case", range(len(VARLEN_CASES)))
def test_varlen_matches_reference(case, kind):
    h, hk, d, causal, window, softcap, lens = VARLEN_CASES[case]
    if d not in fg.head_dims(kind):
        pytest.skip(f"{kind} has no tile for head dim {d}")
    torch.manual_seed(case)
    cu_q = torch.tensor([0] + [sum(a for a, _ in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(c for _, c in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    q = torch.randn(int(cu_q[-1]), h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(int(cu_k[-1]), hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    mq, mk = max(a for a, _ in lens), max(c for _, c in lens)
    assert fg.supports(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk, **kw)
    o, lse = fg.forward_varlen(
        q, k, v, cu_q, cu_k, mq, mk, out=poisoned(q.shape, q.dtype, "cuda"), kind=kind, **kw
    )
    ref_o, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, **kw)
    low_o, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **kw)
    assert_close_2x(o, ref_o, low_o, "out")
    assert_close_2x(lse, ref_lse, ref_lse, "lse", slack=1e-3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_public_forward_dispatches_to_gluon(causal, d):
    """The public flash_attn_func takes the Gluon forward where it covers the call (bitwise its output),
    the Triton kernels with it switched off, and both meet the 2x rule; gradients flow through either."""
    from fa_core import settings
    from flash_attn import flash_attn_func

    torch.manual_seed(3)
    q = torch.randn(2, 8191, 16, d, device="cuda", dtype=torch.bfloat16)  # above ops.GLUON_MIN_FLOPS
    k, v = (torch.randn(2, 8191, 4, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = flash_attn_func(q, k, v, causal=causal)
    g_out, _ = fg.forward(q, k, v, causal=causal)
    assert torch.equal(out, g_out)
    with settings.override(gluon=False):
        tl_out = flash_attn_func(q, k, v, causal=causal)
    ref, _ = attention_ref(q, k, v, causal=causal)
    low, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_close_2x(out, ref, low, "gluon out")
    assert_close_2x(tl_out, ref, low, "triton out")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    flash_attn_func(qg, kg, vg, causal=causal).float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qg, kg, vg))


@pytest.mark.parametrize("kind, d", [(kind, d) for kind in fg.KINDS for d in fg.head_dims(kind)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_is_bitwise_deterministic(kind, d, causal):
    """Two runs of every kernel kind on the same inputs, dense and varlen, into fresh buffers: the same bits
    (no atomics, a fixed reduction order per row)."""
    torch.manual_seed(d + causal)
    q = torch.randn(2, 1537, 4, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1537, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    runs = [
        fg.forward(q, k, v, out=poisoned(q.shape, q.dtype, "cuda"), kind=kind, causal=causal)
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    cu = torch.tensor([0, 700, 1537 * 2], dtype=torch.int32, device="cuda")
    qp, kp, vp = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
    runs = [
        fg.forward_varlen(
            qp, kp, vp, cu, cu, 2374, 2374, out=poisoned(qp.shape, qp.dtype, "cuda"), kind=kind, causal=causal
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
