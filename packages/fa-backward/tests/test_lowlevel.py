"""Low-level backward: caller buffers, determinism, softmax_d, empty shapes, float64 gradcheck."""

from __future__ import annotations

import pytest
import torch
from fa_backward_testutils import DEVICE, FP, cu_seqlens, keep_mask, rand

from fa_backward import (
    flash_attn_backward,
    flash_attn_func,
    flash_attn_varlen_backward,
    flash_attn_varlen_func,
)
from fa_core import flash_attn_forward, flash_attn_varlen_forward
from fa_core.reference import attention_ref, attention_varlen_ref


def test_caller_buffers_strided_and_poisoned():
    """dq/dk/dv written into NaN-poisoned strided views; nothing outside the views is touched."""
    torch.manual_seed(0)
    q, k, v = rand(2, 33, 2, 40), rand(2, 21, 1, 40), rand(2, 21, 1, 40)
    res = flash_attn_forward(q, k, v, causal=True)
    dout = torch.randn_like(res.out)
    ref = flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=True)
    bufs = [
        torch.full((2, x.shape[1], 3, x.shape[2], 48), float("nan"), dtype=FP, device=DEVICE)
        for x in (q, k, v)
    ]
    views = [b[:, :, 1, :, 4:44] for b in bufs]
    got = flash_attn_backward(dout, q, k, v, res.out, res.lse, *views, causal=True)
    for name, g, r, view, buf in zip(("dq", "dk", "dv"), got[:3], ref[:3], views, bufs):
        assert g.data_ptr() == view.data_ptr(), name
        assert torch.equal(g, r), name
        rest = buf.clone()
        rest[:, :, 1, :, 4:44] = 0.0
        assert rest[:, :, 1, :, 4:44].eq(0).all() and rest.isnan().sum() == rest.numel() - view.numel(), name


def test_deterministic_bitwise():
    """The kernels use no atomics: two runs give bitwise-identical gradients (deterministic or not)."""
    torch.manual_seed(1)
    q, k, v = rand(1, 33, 2, 16), rand(1, 40, 1, 16), rand(1, 40, 1, 16)
    res = flash_attn_forward(q, k, v, dropout_p=0.2, causal=True)
    dout = torch.randn_like(res.out)
    runs = [
        flash_attn_backward(
            dout,
            q,
            k,
            v,
            res.out,
            res.lse,
            dropout_p=0.2,
            causal=True,
            deterministic=det,
            rng_state=res.rng_state,
        )
        for det in (True, False)
    ]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)


def test_deterministic_varlen_autograd():
    torch.manual_seed(2)
    lens = [5, 17, 0, 9]
    cu = cu_seqlens(lens)
    grads = []
    for _ in range(2):
        torch.manual_seed(3)
        q, k, v = (rand(sum(lens), 2, 16).requires_grad_() for _ in range(3))
        out = flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, causal=True, deterministic=True)
        out.backward(torch.ones_like(out))
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_softmax_d_is_rowsum():
    torch.manual_seed(4)
    q, k, v = rand(1, 17, 2, 16), rand(1, 9, 2, 16), rand(1, 9, 2, 24)
    res = flash_attn_forward(q, k, v)
    dout = torch.randn_like(res.out)
    r = flash_attn_backward(dout, q, k, v, res.out, res.lse)
    expect = (dout.double() * res.out.double()).sum(-1).transpose(1, 2)
    assert r.softmax_d.shape == res.lse.shape
    torch.testing.assert_close(r.softmax_d.double(), expect, atol=1e-5, rtol=1e-5)


def test_empty_query_dense_gives_zero_dkdv():
    q, k, v = rand(1, 0, 2, 16), rand(1, 9, 1, 16), rand(1, 9, 1, 16)
    res = flash_attn_forward(q, k, v)
    dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    r = flash_attn_backward(torch.empty_like(res.out), q, k, v, res.out, res.lse, None, dk, dv)
    assert r.dq.shape == q.shape
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_empty_keys_dense_gives_zero_dq():
    q, k, v = rand(1, 9, 2, 16), rand(1, 0, 1, 16), rand(1, 0, 1, 16)
    res = flash_attn_forward(q, k, v)
    assert torch.isinf(res.lse).all()
    dq = torch.full_like(q, float("nan"))
    flash_attn_backward(torch.randn_like(res.out), q, k, v, res.out, res.lse, dq)
    assert torch.equal(dq, torch.zeros_like(dq))


# ------------------------------------------------------------------------------------------------ gradcheck
class _RefFwdKernelBwd(torch.autograd.Function):
    """float64 reference forward (exact out and lse), our kernels' backward: gradcheck tests the backward."""

    @staticmethod
    def forward(ctx, q, k, v, kw, mask, rng_state, varlen):
        ref_kw = {
            key: kw[key] for key in ("softmax_scale", "causal", "window_size", "softcap", "alibi_slopes")
        }
        if varlen is None:
            out, lse = attention_ref(
                q, k, v, upcast=False, dropout_p=kw["dropout_p"], dropout_mask=mask, **ref_kw
            )
        else:
            out, lse = attention_varlen_ref(
                q,
                k,
                v,
                varlen[0],
                varlen[1],
                seqused_k=varlen[4],
                upcast=False,
                dropout_p=kw["dropout_p"],
                dropout_mask=mask,
                **ref_kw,
            )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kw, ctx.rng_state, ctx.varlen = kw, rng_state, varlen
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        kw = ctx.kw
        args = dict(
            dropout_p=kw["dropout_p"],
            softmax_scale=kw["softmax_scale"],
            causal=kw["causal"],
            window_size_left=kw["window_size"][0],
            window_size_right=kw["window_size"][1],
            softcap=kw["softcap"],
            alibi_slopes=kw["alibi_slopes"],
            rng_state=ctx.rng_state,
        )
        if ctx.varlen is None:
            r = flash_attn_backward(dout, q, k, v, out, lse, **args)
        else:
            cu_q, cu_k, mq, mk, seqused = ctx.varlen
            r = flash_attn_varlen_backward(
                dout, q, k, v, out, lse, None, None, None, cu_q, cu_k, mq, mk, seqused_k=seqused, **args
            )
        return r.dq, r.dk, r.dv, None, None, None, None


GRADCHECK_CASES = {
    "plain": {},
    "causal_gqa": {"causal": True},
    "window_softcap_alibi": {"window_size": (2, 1), "softcap": 1.5, "alibi_slopes": True},
    "dropout": {"dropout_p": 0.3, "causal": True},
}


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 kernels only under the CPU interpreter")
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck_float64(case):
    torch.manual_seed(5)
    kw = dict(
        dropout_p=0.0, softmax_scale=0.7, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None
    )
    kw.update(GRADCHECK_CASES[case])
    batch, sq, sk, h, hk, d = 1, 5, 7, 2, 1, 4
    if kw["alibi_slopes"]:
        kw["alibi_slopes"] = torch.rand(h) * 0.5
    q, k, v = (
        torch.randn(batch, s, n, d, dtype=torch.float64, requires_grad=True)
        for s, n in ((sq, h), (sk, hk), (sk, hk))
    )
    mask, rng_state = None, None
    if kw["dropout_p"] > 0:
        res = flash_attn_forward(
            q.detach().float(),
            k.detach().float(),
            v.detach().float(),
            dropout_p=kw["dropout_p"],
            causal=kw["causal"],
            return_probs=True,
        )
        mask, rng_state = keep_mask(res.probs), res.rng_state
    fn = lambda q, k, v: _RefFwdKernelBwd.apply(q, k, v, kw, mask, rng_state, None)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 kernels only under the CPU interpreter")
def test_gradcheck_float64_varlen_seqused():
    torch.manual_seed(6)
    kw = dict(
        dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, alibi_slopes=None
    )
    q_lens, k_lens = [3, 0, 5], [4, 2, 6]
    seqused = torch.tensor([4, 0, 3], dtype=torch.int32)
    varlen = (cu_seqlens(q_lens), cu_seqlens(k_lens), 5, 6, seqused)
    q = torch.randn(sum(q_lens), 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(k_lens), 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(k_lens), 1, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: _RefFwdKernelBwd.apply(q, k, v, kw, None, None, varlen)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="fp32 kernels only under the CPU interpreter")
@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
def test_gradcheck_fp32_end_to_end():
    """Through the real forward kernel in fp32: finite differences are noisy in fp32, so eps = 1e-2 and the
    tolerance is ~ eps^2 curvature + fp32 rounding / eps (both ~1e-3 at these magnitudes)."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 6, 2, 16, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: flash_attn_func(q, k, v, causal=True, softcap=2.0)
    assert torch.autograd.gradcheck(
        fn, (q, k, v), fast_mode=True, eps=1e-2, atol=5e-3, rtol=5e-2, raise_exception=True
    )


def test_varlen_forward_backward_roundtrip_lse_inf_rows():
    """Rows of a sequence with no key (lse = +inf) and sequences with no query: all gradients finite."""
    torch.manual_seed(8)
    q_lens, k_lens = [4, 0, 6], [0, 5, 3]
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)
    q, k, v = rand(10, 2, 16), rand(8, 2, 16), rand(8, 2, 16)
    res = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 6, 5, causal=True)
    r = flash_attn_varlen_backward(
        torch.randn_like(res.out), q, k, v, res.out, res.lse, None, None, None, cu_q, cu_k, 6, 5, causal=True
    )
    for g in r[:3]:
        assert torch.isfinite(g).all()
    assert torch.equal(r.dq[:4], torch.zeros_like(r.dq[:4]))  # sequence 0 has no key
    assert torch.equal(r.dk[:5], torch.zeros_like(r.dk[:5]))  # sequence 1 has no query
