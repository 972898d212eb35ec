"""Varlen (cu_seqlens, seqused_k, empty sequences) and dropout backward against the reference (2x rule)."""

from __future__ import annotations

import pytest
import torch
from fa_backward_testutils import DEVICE, DTYPES, FP, check_2x, cu_seqlens, keep_mask, rand, ref_grads

from fa_backward import flash_attn_func, flash_attn_varlen_backward, flash_attn_varlen_func
from fa_core import flash_attn_varlen_forward

Q_LENS = [5, 0, 17, 33]
K_LENS = [9, 4, 0, 20]

VARLEN_CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window_softcap_alibi": {"window_size": (4, 6), "softcap": 2.5, "alibi_slopes": "batch"},
}


def _varlen_inputs(q_lens, k_lens, h, hk, d, dtype, dv=None):
    q = rand(sum(q_lens), h, d, dtype=dtype).requires_grad_()
    k = rand(sum(k_lens), hk, d, dtype=dtype).requires_grad_()
    v = rand(sum(k_lens), hk, dv or d, dtype=dtype).requires_grad_()
    return q, k, v, cu_seqlens(q_lens), cu_seqlens(k_lens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(VARLEN_CASES))
def test_varlen(case, dtype):
    torch.manual_seed(len(case))
    kw = dict(VARLEN_CASES[case])
    if kw.get("alibi_slopes") == "batch":
        kw["alibi_slopes"] = torch.rand(len(Q_LENS), 4, device=DEVICE) * 0.5
    q, k, v, cu_q, cu_k = _varlen_inputs(Q_LENS, K_LENS, 4, 2, 40, dtype)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(Q_LENS), max(K_LENS), **kw)
    dout = rand(*out.shape, dtype=dtype)
    out.backward(dout)
    _, _, truth = ref_grads(q, k, v, dout, varlen=(cu_q, cu_k, None), **kw)
    _, _, lowp = ref_grads(q, k, v, dout, varlen=(cu_q, cu_k, None), upcast=False, **kw)
    check_2x((q.grad, k.grad, v.grad), truth, lowp, dtype)
    # sequence 1 has no query (dk = dv = 0 for its keys), sequence 2 no key (dq = 0 for its queries)
    assert torch.equal(k.grad[9:13], torch.zeros_like(k.grad[9:13]))
    assert torch.equal(q.grad[5:22], torch.zeros_like(q.grad[5:22]))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_seqused_k(causal):
    """seqused_k (low-level API): keys past seqused_k[b] get exactly zero gradient."""
    torch.manual_seed(3)
    k_lens, used = [12, 4, 7, 40], [9, 0, 7, 13]
    q, k, v, cu_q, cu_k = _varlen_inputs(Q_LENS, k_lens, 2, 1, 16, FP, dv=24)
    seqused = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        res = flash_attn_varlen_forward(
            q, k, v, cu_q, cu_k, max(Q_LENS), max(k_lens), causal=causal, seqused_k=seqused
        )
    dout = rand(*res.out.shape)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    flash_attn_varlen_backward(
        dout,
        q.detach(),
        k.detach(),
        v.detach(),
        res.out,
        res.lse,
        dq,
        dk,
        dv,
        cu_q,
        cu_k,
        max(Q_LENS),
        max(k_lens),
        causal=causal,
        seqused_k=seqused,
    )
    _, _, truth = ref_grads(q, k, v, dout, varlen=(cu_q, cu_k, seqused), causal=causal)
    _, _, lowp = ref_grads(q, k, v, dout, varlen=(cu_q, cu_k, seqused), causal=causal, upcast=False)
    check_2x((dq, dk, dv), truth, lowp, FP)
    starts = cu_k.tolist()
    for b, u in enumerate(used):
        unused = slice(starts[b] + u, starts[b + 1])
        assert torch.equal(dk[unused], torch.zeros_like(dk[unused]))
        assert torch.equal(dv[unused], torch.zeros_like(dv[unused]))


DROPOUT_CASES = {
    "plain": (1, 33, 47, 2, 1, 16, {}),
    "causal_gqa": (2, 40, 24, 4, 2, 16, {"causal": True}),
    "all": (1, 33, 33, 2, 2, 40, {"window_size": (6, 3), "softcap": 2.0, "alibi_slopes": True}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(DROPOUT_CASES))
def test_dropout_dense(case, dtype):
    """Gradients consistent with the forward's dropout mask (recovered from S_dmask, dropped = negative)."""
    torch.manual_seed(7)
    batch, sq, sk, h, hk, d, kw = DROPOUT_CASES[case]
    kw = dict(kw)
    if kw.get("alibi_slopes"):
        kw["alibi_slopes"] = torch.rand(h, device=DEVICE) * 0.5
    p = 0.3
    q = rand(batch, sq, h, d, dtype=dtype).requires_grad_()
    k = rand(batch, sk, hk, d, dtype=dtype).requires_grad_()
    v = rand(batch, sk, hk, d, dtype=dtype).requires_grad_()
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **kw)
    mask = keep_mask(s_dmask)
    assert 0.5 < mask.float().mean().item() < 0.9
    dout = rand(*out.shape, dtype=dtype)
    out.backward(dout)
    ref_out, _, truth = ref_grads(q, k, v, dout, dropout_p=p, dropout_mask=mask, **kw)
    _, _, lowp = ref_grads(q, k, v, dout, dropout_p=p, dropout_mask=mask, upcast=False, **kw)
    assert (out.double() - ref_out).abs().max().item() < (1e-4 if dtype == torch.float32 else 1e-2)
    check_2x((q.grad, k.grad, v.grad), truth, lowp, dtype)


def test_dropout_varlen():
    torch.manual_seed(8)
    p = 0.25
    q, k, v, cu_q, cu_k = _varlen_inputs(Q_LENS, K_LENS, 2, 1, 16, FP)
    out, _, s_dmask = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(Q_LENS), max(K_LENS), dropout_p=p, causal=True, return_attn_probs=True
    )
    keep = keep_mask(s_dmask)
    masks = [keep[b, :, :sq, :sk] for b, (sq, sk) in enumerate(zip(Q_LENS, K_LENS))]
    dout = rand(*out.shape)
    out.backward(dout)
    kw = dict(varlen=(cu_q, cu_k, None), causal=True, dropout_p=p, dropout_mask=masks)
    _, _, truth = ref_grads(q, k, v, dout, **kw)
    _, _, lowp = ref_grads(q, k, v, dout, upcast=False, **kw)
    check_2x((q.grad, k.grad, v.grad), truth, lowp, FP)
