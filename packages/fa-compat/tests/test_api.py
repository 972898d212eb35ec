"""Every exported attention function of ``flash_attn`` against fa_core's reference (2x rule).

Forward tests need only fa-core; gradient tests need the ``backward`` extra, kvcache tests the ``kvcache``
extra (skipped otherwise: see test_subsets.py for the error raised then). Outputs are poisoned: every
``torch.empty`` returns NaN here (deterministic mode fills uninitialized memory), so a row the kernels forget
to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from fa_compat_testutils import (
    ATOL,
    DEVICE,
    DTYPES,
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

from fa_core.testing import poisoned
from flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from flash_attn.flash_attn_interface import (
    _flash_attn_backward,
    _flash_attn_forward,
    _flash_attn_varlen_backward,
    _flash_attn_varlen_forward,
)

DENSE_CASES = [
    dict(),
    dict(causal=True),
    dict(window_size=(7, 3)),
    dict(causal=True, window_size=(5, -1)),
    dict(softcap=2.0, causal=True),
    dict(alibi=True),
]


def _kw(case: dict, nheads: int, batch: int) -> dict:
    kw = {k: v for k, v in case.items() if k != "alibi"}
    if case.get("alibi"):
        kw["alibi_slopes"] = torch.rand(batch, nheads, device=DEVICE) * 0.3
    return kw


# ---------------------------------------------------------------------------------------------- dense
# fa-core's tests cover the kernels' numerics in depth; here each option is checked once through the API
# (fp32), and the fp16 path on the plain and the causal cases: the interpreter is slow.
DENSE_PARAMS = [(HI, c) for c in DENSE_CASES] + [(LOWP, DENSE_CASES[0]), (LOWP, DENSE_CASES[1])]


@pytest.mark.parametrize(
    ("dtype", "case"),
    DENSE_PARAMS,
    ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else "-".join(x) or "plain",
)
def test_flash_attn_func(dtype, case):
    torch.manual_seed(0)
    b, sq, sk, h, hk, d = 2, 19, 27, 2, 1, 40
    q, k, v = rand(b, sq, h, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype)
    kw = _kw(case, h, b)
    out, lse, s_dmask = flash_attn_func(q, k, v, **kw, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (b, h, sq) and lse.dtype == torch.float32
    assert s_dmask.shape == (0,) and s_dmask.dtype == dtype  # no dropout: empty, as flash-attn
    check_out_lse(out, lse, q, k, v, **kw)
    assert torch.equal(flash_attn_func(q, k, v, **kw), out)  # return_attn_probs=False: the tensor only


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_dense(dtype):
    torch.manual_seed(1)
    b, s, h, d = 1, 21, 2, 32
    qkv = rand(b, s, 3, h, d, dtype=dtype)
    out = flash_attn_qkvpacked_func(qkv, causal=True, softmax_scale=0.3)
    check_out_lse(out, None, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True, softmax_scale=0.3)
    q, kv = rand(b, s + 3, h, d, dtype=dtype), rand(b, s, 2, 2, d, dtype=dtype)
    out, lse, _ = flash_attn_kvpacked_func(q, kv, window_size=(4, 4), return_attn_probs=True)
    check_out_lse(out, lse, q, kv[:, :, 0], kv[:, :, 1], window_size=(4, 4))


def test_strided_last_dim_is_made_contiguous():
    torch.manual_seed(2)
    q = rand(1, 16, 2, 32).transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
    k, v = rand(1, 16, 2, 32), rand(1, 16, 2, 32)
    check_out_lse(flash_attn_func(q, k, v), None, q, k, v)


# --------------------------------------------------------------------------------------------- varlen
@pytest.mark.parametrize(
    ("dtype", "case"),
    [(LOWP, dict()), (HI, dict(causal=True)), (HI, dict(causal=True, window_size=(6, 0), alibi=True))],
    ids=["lowp-plain", "causal", "causal-window-alibi"],
)
def test_flash_attn_varlen_func(dtype, case):
    torch.manual_seed(3)
    lq, lk, h, hk, d = [5, 17, 0, 20], [9, 17, 4, 21], 2, 1, 24
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    q, k, v = (
        rand(sum(lq), h, d, dtype=dtype),
        rand(sum(lk), hk, d, dtype=dtype),
        rand(sum(lk), hk, d, dtype=dtype),
    )
    kw = _kw(case, h, len(lq))
    # max_seqlen as a 0-dim tensor, as HF transformers passes it
    out, lse, s_dmask = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, torch.tensor(max(lq)), max(lk), **kw, return_attn_probs=True
    )
    assert out.shape == q.shape and lse.shape == (h, sum(lq)) and s_dmask.shape == (0,)
    check_out_lse(out, lse, q, k, v, varlen=(cu_q, cu_k), **kw)


def test_varlen_packed():
    torch.manual_seed(4)
    lens, h, d = [7, 20, 13], 2, 16
    cu = cu_seqlens(lens)
    qkv = rand(sum(lens), 3, h, d)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True)
    check_out_lse(out, None, qkv[:, 0], qkv[:, 1], qkv[:, 2], varlen=(cu, cu), causal=True)
    lq = [3, 9, 1]
    q, kv = rand(sum(lq), h, d), rand(sum(lens), 2, 1, d)
    out = flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens(lq), cu, max(lq), max(lens), causal=True)
    check_out_lse(out, None, q, kv[:, 0], kv[:, 1], varlen=(cu_seqlens(lq), cu), causal=True)


def test_varlen_block_table_matches_contiguous():
    """Paged keys (forward only): same result as the same keys laid out contiguously."""
    torch.manual_seed(5)
    lens, page, h, d = [5, 19, 11], 8, 2, 16
    n_blocks = 12
    k_cache, v_cache = rand(n_blocks, page, h, d), rand(n_blocks, page, h, d)
    perm = torch.randperm(n_blocks).to(torch.int32)
    block_table = perm[: 3 * 3].reshape(3, 3).to(DEVICE)
    ks, vs = [], []
    for b, n in enumerate(lens):
        rows = torch.cat([k_cache[block_table[b, c]] for c in range(3)])[:n]
        ks.append(rows)
        vs.append(torch.cat([v_cache[block_table[b, c]] for c in range(3)])[:n])
    k, v = torch.cat(ks), torch.cat(vs)
    q = rand(sum(lens), h, d)
    cu = cu_seqlens(lens)
    out = flash_attn_varlen_func(
        q, k_cache, v_cache, cu, cu, max(lens), max(lens), causal=True, block_table=block_table
    )
    check_out_lse(out, None, q, k, v, varlen=(cu, cu), causal=True)
    low = _flash_attn_varlen_forward(
        q, k_cache, v_cache, cu, cu, max(lens), max(lens), 0.0, None, True, block_table=block_table
    )
    torch.testing.assert_close(low[0], out, rtol=0, atol=0)


def _paged(lens, page, h, d, n_blocks, seed, leftpad=None):
    """A paged cache with a shuffled block table and the packed keys it holds per sequence (from
    ``leftpad[b]`` on, flash-attn's rule): ``(k_cache, v_cache, block_table, k, v)``."""
    torch.manual_seed(seed)
    k_cache, v_cache = rand(n_blocks, page, h, d), rand(n_blocks, page, h, d)
    cols = max(-(-n // page) for n in lens)
    block_table = torch.randperm(n_blocks)[: len(lens) * cols].reshape(len(lens), cols).to(torch.int32)
    block_table = block_table.to(DEVICE)
    ks, vs = [], []
    for b, n in enumerate(lens):
        start = 0 if leftpad is None else leftpad[b]
        ks.append(torch.cat([k_cache[int(i)] for i in block_table[b]])[start:n])
        vs.append(torch.cat([v_cache[int(i)] for i in block_table[b]])[start:n])
    return k_cache, v_cache, block_table, torch.cat(ks), torch.cat(vs)


def test_varlen_paged_read_in_kernel(monkeypatch):
    """Page size 16 without a gradient: the pages are read in the kernel (no gathered copy), through the
    public function, the low-level forward (with seqused_k, and leftpad_k with a block table) and
    FlashAttnVarlenFunc.apply."""
    import flash_attn._lowlevel as low
    import flash_attn.flash_attn_interface as fai

    def no_gather(*args, **kwargs):
        raise AssertionError("the pages were gathered")

    monkeypatch.setattr(low, "_gather_pages", no_gather)
    monkeypatch.setattr(fai, "_gather_pages", no_gather)
    lens, lq, h, hk, d = [5, 40, 17], [3, 9, 1], 2, 1, 16
    k_cache, v_cache, table, k, v = _paged(lens, 16, hk, d, 12, seed=41)
    q, cu_q, cu_k = rand(sum(lq), h, d), cu_seqlens(lq), cu_seqlens(lens)
    out, lse, s_dmask = flash_attn_varlen_func(
        q, k_cache, v_cache, cu_q, cu_k, max(lq), max(lens), causal=True, block_table=table,
        return_attn_probs=True,
    )  # fmt: skip
    check_out_lse(out, lse, q, k, v, varlen=(cu_q, cu_k), causal=True)
    assert s_dmask.shape == (0,)
    view = fai.FlashAttnVarlenFunc.apply(
        q, k_cache, v_cache, cu_q, cu_k, max(lq), max(lens), 0.0, None, True, (-1, -1), 0.0, None, False,
        False, table, False,
    )  # fmt: skip
    torch.testing.assert_close(view, out, rtol=0, atol=0)
    # seqused_k shorter than cu_seqlens_k's lengths, and leftpad_k inside the pages
    used, pad = [4, 33, 17], [1, 5, 0]
    _, _, _, k_used, v_used = _paged(lens, 16, hk, d, 12, seed=41, leftpad=pad)
    seqused = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor(pad, dtype=torch.int32, device=DEVICE)
    out, lse, _, _ = _flash_attn_varlen_forward(
        q, k_cache, v_cache, cu_q, cu_k, max(lq), max(lens), 0.0, None, False, block_table=table,
        seqused_k=seqused, leftpad_k=leftpad,
    )  # fmt: skip
    ks, vs, off = [], [], 0
    for b, n in enumerate(lens):  # keys leftpad[b] .. used[b] of each sequence
        ks.append(k_used[off : off + used[b] - pad[b]])
        vs.append(v_used[off : off + used[b] - pad[b]])
        off += n - pad[b]
    cu_used = cu_seqlens([u - p for u, p in zip(used, pad)])
    check_out_lse(out, lse, q, torch.cat(ks), torch.cat(vs), varlen=(cu_q, cu_used))


def test_varlen_leftpad_k_is_checked_and_read_in_kernel():
    """_flash_attn_varlen_forward(leftpad_k=) on packed keys: validated (errors name leftpad_k), and equal to
    the reference on the keys after the padding."""
    from fa_core.errors import FlashAttnValueError

    torch.manual_seed(43)
    lens, lq, h, d = [9, 20], [4, 6], 2, 16
    k, v, q = rand(sum(lens), 1, d), rand(sum(lens), 1, d), rand(sum(lq), h, d)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lens)
    pad = [3, 0]
    leftpad = torch.tensor(pad, dtype=torch.int32, device=DEVICE)
    out, lse, _, _ = _flash_attn_varlen_forward(
        q, k, v, cu_q, cu_k, max(lq), max(lens), 0.0, None, True, leftpad_k=leftpad
    )
    keep = torch.cat([torch.arange(int(cu_k[b]) + pad[b], int(cu_k[b + 1])) for b in range(2)]).to(DEVICE)
    cu_eq = cu_seqlens([n - p for n, p in zip(lens, pad)])
    check_out_lse(out, lse, q, k[keep], v[keep], varlen=(cu_q, cu_eq), causal=True)
    with pytest.raises(FlashAttnValueError, match="leftpad_k"):
        _flash_attn_varlen_forward(
            q, k, v, cu_q, cu_k, max(lq), max(lens), 0.0, None, False,
            leftpad_k=torch.tensor([10, 0], dtype=torch.int32, device=DEVICE),
        )  # fmt: skip
    with pytest.raises(FlashAttnValueError, match="leftpad_k"):
        _flash_attn_varlen_forward(
            q, k, v, cu_q, cu_k, max(lq), max(lens), 0.0, None, False, return_softmax=True, leftpad_k=leftpad
        )


@needs_backward
def test_varlen_paged_with_grad_gathers():
    """A gradient through paged keys (beyond flash-attn, whose paged varlen is forward-only): the pages are
    gathered into a differentiable copy; the cache gets the gradient of the keys it holds."""
    lens, lq, h, d = [5, 30], [4, 7], 2, 16
    k_cache, v_cache, table, k, v = _paged(lens, 16, 1, d, 6, seed=45)
    q, cu_q, cu_k = rand(sum(lq), h, d), cu_seqlens(lq), cu_seqlens(lens)
    kc, vc, qg = (t.clone().requires_grad_() for t in (k_cache, v_cache, q))
    out = flash_attn_varlen_func(qg, kc, vc, cu_q, cu_k, max(lq), max(lens), block_table=table)
    check_out_lse(out, None, q, k, v, varlen=(cu_q, cu_k))
    dout = torch.randn_like(out)
    dq, dkc, dvc = torch.autograd.grad(out, (qg, kc, vc), dout)
    kr, vr, qr = (t.detach().clone().requires_grad_() for t in (k, v, q))
    want = torch.autograd.grad(
        flash_attn_varlen_func(qr, kr, vr, cu_q, cu_k, max(lq), max(lens)), (qr, kr, vr), dout
    )
    torch.testing.assert_close(dq, want[0], atol=ATOL, rtol=1e-3)
    for b, n in enumerate(lens):  # the cache rows sequence b reads hold its key gradients
        rows = torch.cat([dkc[int(i)] for i in table[b]])[:n]
        torch.testing.assert_close(rows, want[1][int(cu_k[b]) : int(cu_k[b + 1])], atol=ATOL, rtol=1e-3)
        rows = torch.cat([dvc[int(i)] for i in table[b]])[:n]
        torch.testing.assert_close(rows, want[2][int(cu_k[b]) : int(cu_k[b + 1])], atol=ATOL, rtol=1e-3)


# ------------------------------------------------------------------------------------------- low level
def test_low_level_forward_shapes_and_values():
    torch.manual_seed(6)
    q, k, v = rand(2, 20, 2, 32), rand(2, 30, 2, 32), rand(2, 30, 2, 32)
    out, lse, s_dmask, rng_state = _flash_attn_forward(q, k, v, 0.0, 0.25, True, -1, -1, 0.0, None, False)
    assert s_dmask.shape == (0,) and rng_state.shape == (2,) and rng_state.dtype == torch.int64
    check_out_lse(out, lse, q, k, v, softmax_scale=0.25, causal=True)
    lens = [20, 20]
    out_v, lse_v, _, _ = _flash_attn_varlen_forward(
        q.reshape(40, 2, 32), k[:, :20].reshape(40, 2, 32), v[:, :20].reshape(40, 2, 32),
        cu_seqlens(lens), cu_seqlens(lens), 20, 20, 0.0, 0.25, True,
    )  # fmt: skip
    check_out_lse(out_v.reshape(2, 20, 2, 32), None, q, k[:, :20], v[:, :20], softmax_scale=0.25, causal=True)
    # leftpad_k: sequence b's keys start leftpad_k[b] rows into its slice of k / v
    pad = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    kv_, vv_ = k[:, :15].reshape(30, 2, 32), v[:, :15].reshape(30, 2, 32)
    out_p, lse_p, _, _ = _flash_attn_varlen_forward(
        q[:, :10].reshape(20, 2, 32), kv_, vv_, cu_seqlens([10, 10]), cu_seqlens([15, 15]), 10, 15, 0.0, None,
        True, leftpad_k=pad,
    )  # fmt: skip
    for i, p in enumerate(pad.tolist()):
        qi, ki, vi = q[i : i + 1, :10], k[i : i + 1, p:15], v[i : i + 1, p:15]
        lse_i = lse_p[:, i * 10 : (i + 1) * 10].unsqueeze(0)
        check_out_lse(out_p[i * 10 : (i + 1) * 10].unsqueeze(0), lse_i, qi, ki, vi, causal=True)


@needs_backward
def test_low_level_backward():
    torch.manual_seed(7)
    b, sq, sk, h, d = 2, 24, 18, 2, 16
    q, k, v = rand(b, sq, h, d), rand(b, sk, h, d), rand(b, sk, h, d)
    out, lse, _, rng = _flash_attn_forward(q, k, v, 0.0, None, True, -1, -1, 0.0, None, False)
    dout = rand(b, sq, h, d)
    dq, dk, dv = (poisoned(t.shape, t.dtype, t.device) for t in (q, k, v))
    softmax_d = _flash_attn_backward(
        dout, q, k, v, out, lse, dq, dk, dv, 0.0, None, True, -1, -1, 0.0, None, False, rng
    )
    assert softmax_d.shape == (b, h, 128) and softmax_d.dtype == torch.float32
    expected = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(softmax_d[:, :, :sq], expected, atol=ATOL, rtol=1e-3)
    check_grads((dq, dk, dv), q, k, v, dout, causal=True)
    # varlen: the same problem as one packed batch
    cu_q, cu_k = cu_seqlens([sq] * b), cu_seqlens([sk] * b)
    flat = [t.reshape(-1, h, d) for t in (q, k, v, out, dout)]
    lse_v = lse.permute(1, 0, 2).reshape(h, b * sq)
    dqv, dkv, dvv = (poisoned(t.shape, t.dtype, t.device) for t in flat[:3])
    sd = _flash_attn_varlen_backward(
        flat[4],
        *flat[:3],
        flat[3],
        lse_v,
        dqv,
        dkv,
        dvv,
        cu_q,
        cu_k,
        sq,
        sk,
        0.0,
        None,
        True,
        -1,
        -1,
        0.0,
        None,
        False,
        rng,
    )
    assert sd.shape == (h, b * sq + 128 * b)
    for g, g_dense in zip((dqv, dkv, dvv), (dq, dk, dv)):
        torch.testing.assert_close(g, g_dense.reshape(g.shape), atol=ATOL, rtol=1e-3)


# ----------------------------------------------------------------------------------------------- dropout
def test_dropout_probs_and_output():
    """return_attn_probs with dropout: S_dmask has flash-attn's padded shape and form (block-scaled
    ``exp(s - running max)`` <= 1, see fa-core's test_s_dmask.py), dropped entries negative; the output
    equals the reference with that dropout mask."""
    torch.manual_seed(8)
    b, sq, sk, h, d, p = 1, 20, 36, 2, 16, 0.3
    q, k, v = rand(b, sq, h, d), rand(b, sk, h, d), rand(b, sk, h, d)
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    assert s_dmask.shape == (b, h, 128, 128) and s_dmask.dtype == q.dtype
    s = s_dmask[:, :, :sq, :sk]
    assert torch.all(s_dmask[:, :, sq:] == 0) and torch.all(s_dmask[:, :, :, sk:] == 0)
    assert s.abs().max() <= 1.0 and (s.abs().amax(-1) == 1.0).all()  # each row's max entry is exp(0)
    keep = s >= 0
    assert 0.5 < keep.float().mean() < 0.9
    check_out_lse(out, lse, q, k, v, causal=True, dropout_p=p, dropout_mask=keep)
    out2 = flash_attn_func(q, k, v, dropout_p=p, causal=True)
    assert not torch.equal(out, out2)  # a fresh seed per call


# --------------------------------------------------------------------------------------------- backward
@needs_backward
@pytest.mark.parametrize(
    ("dtype", "case"),
    [(LOWP, dict(causal=True)), (HI, dict(window_size=(5, 2), softcap=3.0, alibi=True))],
    ids=["lowp-causal", "window-softcap-alibi"],
)
def test_flash_attn_func_grads(dtype, case):
    torch.manual_seed(9)
    b, sq, sk, h, hk, d = 2, 21, 17, 2, 1, 24
    q, k, v = (rand(b, s, n, d, dtype=dtype, requires_grad=True) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    kw = _kw(case, h, b)
    out = flash_attn_func(q, k, v, **kw, deterministic=True)
    dout = rand(b, sq, h, d, dtype=dtype)
    out.backward(dout)
    check_grads((q.grad, k.grad, v.grad), q, k, v, dout, **kw)


@needs_backward
def test_packed_grads():
    torch.manual_seed(10)
    b, s, h, d = 2, 21, 2, 16
    qkv = rand(b, s, 3, h, d, requires_grad=True)
    dout = rand(b, s, h, d)
    flash_attn_qkvpacked_func(qkv, causal=True).backward(dout)
    check_grads(qkv.grad.unbind(2), qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dout, causal=True)
    q, kv = rand(b, s, h, d, requires_grad=True), rand(b, s + 4, 2, 1, d, requires_grad=True)
    flash_attn_kvpacked_func(q, kv, causal=True).backward(dout)
    check_grads((q.grad, kv.grad[:, :, 0], kv.grad[:, :, 1]), q, kv[:, :, 0], kv[:, :, 1], dout, causal=True)


@needs_backward
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_grads(dtype):
    torch.manual_seed(11)
    lq, lk, h, d = [6, 19, 11], [6, 21, 3], 2, 16
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    q = rand(sum(lq), h, d, dtype=dtype, requires_grad=True)
    k, v = (rand(sum(lk), 1, d, dtype=dtype, requires_grad=True) for _ in range(2))
    dout = rand(sum(lq), h, d, dtype=dtype)
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True).backward(dout)
    check_grads((q.grad, k.grad, v.grad), q, k, v, dout, varlen=(cu_q, cu_k), causal=True)
    cu = cu_seqlens(lq)
    qkv = rand(sum(lq), 3, h, d, dtype=dtype, requires_grad=True)
    flash_attn_varlen_qkvpacked_func(qkv, cu, max(lq)).backward(dout)
    check_grads(qkv.grad.unbind(1), qkv[:, 0], qkv[:, 1], qkv[:, 2], dout, varlen=(cu, cu))
    kv = rand(sum(lk), 2, 1, d, dtype=dtype, requires_grad=True)
    q.grad = None
    flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lq), max(lk)).backward(dout)
    check_grads((q.grad, kv.grad[:, 0], kv.grad[:, 1]), q, kv[:, 0], kv[:, 1], dout, varlen=(cu_q, cu_k))


@needs_backward
def test_dropout_grads_match_reference_with_mask():
    torch.manual_seed(12)
    b, s, h, d, p = 1, 24, 2, 16, 0.25
    q, k, v = (rand(b, s, h, d, requires_grad=True) for _ in range(3))
    out, _, s_dmask = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    keep = s_dmask[:, :, :s, :s] >= 0
    dout = rand(b, s, h, d)
    out.backward(dout)
    check_grads((q.grad, k.grad, v.grad), q, k, v, dout, dropout_p=p, dropout_mask=keep)


# ---------------------------------------------------------------------------------------------- kvcache
@needs_kvcache
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_flash_attn_with_kvcache(paged):
    torch.manual_seed(13)
    b, s_new, h, hk, d, cap = 2, 3, 4, 2, 32, 48
    lens = [10, 29]
    k_full, v_full = rand(b, cap, hk, d), rand(b, cap, hk, d)
    k_new, v_new = rand(b, s_new, hk, d), rand(b, s_new, hk, d)
    q = rand(b, s_new, h, d)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    if paged:
        page = 16
        k_cache = k_full.reshape(b * cap // page, page, hk, d).clone()
        v_cache = v_full.reshape(b * cap // page, page, hk, d).clone()
        block_table = torch.arange(b * cap // page, dtype=torch.int32, device=DEVICE).reshape(b, -1)
    else:
        k_cache, v_cache, block_table = k_full.clone(), v_full.clone(), None
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        cache_seqlens=seqlens,
        block_table=block_table,
        causal=True,
        return_softmax_lse=True,
    )
    assert out.shape == q.shape and lse.shape == (b, h, s_new) and not out.requires_grad
    k_after = k_cache.reshape(b, cap, hk, d)
    for i, n in enumerate(lens):
        torch.testing.assert_close(k_after[i, n : n + s_new], k_new[i], rtol=0, atol=0)  # appended in place
        k_ref = torch.cat([k_full[i, :n], k_new[i]])[None]
        v_ref = torch.cat([v_full[i, :n], v_new[i]])[None]
        check_out_lse(out[i : i + 1], lse[i : i + 1], q[i : i + 1], k_ref, v_ref, causal=True)
    # int cache_seqlens, no append, out only
    out2 = flash_attn_with_kvcache(q, k_full, v_full, cache_seqlens=cap)
    check_out_lse(out2, None, q, k_full, v_full)


@needs_kvcache
def test_flash_attn_with_kvcache_cache_leftpad():
    """cache_leftpad reaches fa-kvcache on the eager path: sequence b's keys are cache rows
    ``[cache_leftpad[b], cache_seqlens[b])``, checked against the reference on those rows."""
    torch.manual_seed(17)
    b, sq, h, hk, d, cap = 2, 2, 2, 1, 16, 40
    lens, pad = [25, 37], [6, 0]
    k_cache, v_cache, q = rand(b, cap, hk, d), rand(b, cap, hk, d), rand(b, sq, h, d)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor(pad, dtype=torch.int32, device=DEVICE)
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=seqlens,
        cache_leftpad=leftpad,
        causal=True,
        return_softmax_lse=True,
    )
    for i in range(b):
        k_ref, v_ref = k_cache[i : i + 1, pad[i] : lens[i]], v_cache[i : i + 1, pad[i] : lens[i]]
        check_out_lse(out[i : i + 1], lse[i : i + 1], q[i : i + 1], k_ref, v_ref, causal=True)
    plain = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True)
    assert not torch.allclose(plain[0], out[0])  # the padding changes sequence 0


# ------------------------------------------------------------------------------ flash-attn interface details
@pytest.mark.parametrize(
    "window",
    [(3, 2), [3, 2], "tensor", "numpy"],
    ids=["tuple", "list", "tensor", "numpy"],
)
def test_window_size_any_pair_of_ints(window):
    """A tuple, list, torch tensor or numpy array of two ints gives the tuple's result."""
    np = pytest.importorskip("numpy")
    if window == "tensor":
        window = torch.tensor([3, 2])
    elif window == "numpy":
        window = np.array([3, 2])
    q, k, v = rand(1, 12, 2, 16), rand(1, 12, 2, 16), rand(1, 12, 2, 16)
    out = flash_attn_func(q, k, v, window_size=window)
    check_out_lse(out, None, q, k, v, window_size=(3, 2))


@pytest.mark.parametrize(
    "window", [(3.5, 2), (3, 2.0), (True, 1), "float-tensor", "bool-tensor", "float-numpy"]
)
def test_window_size_refuses_floats_and_bools(window):
    np = pytest.importorskip("numpy")
    window = (
        {
            "float-tensor": torch.tensor([3.0, 2.0]),
            "bool-tensor": torch.tensor([True, False]),
            "float-numpy": np.array([3.5, 2.0]),
        }.get(window, window)
        if isinstance(window, str)
        else window
    )
    q = rand(1, 8, 2, 16)
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, q, q, window_size=window)


def test_bad_values_raise_flash_attn_value_error():
    from fa_core.errors import FlashAttnValueError

    q = rand(1, 8, 2, 16)
    for kw in (dict(window_size=(-2, 0)), dict(dropout_p=1.5), dict(softcap=-1.0)):
        with pytest.raises(FlashAttnValueError):
            flash_attn_func(q, q, q, **kw)
    with pytest.raises(RuntimeError):  # flash-attn's TORCH_CHECK errors are RuntimeErrors
        flash_attn_func(q, q, q, window_size=(0, -3))


def test_lowlevel_forwards_accept_num_splits():
    q, k, v = rand(1, 10, 2, 16), rand(1, 12, 1, 16), rand(1, 12, 1, 16)
    out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, None, True, -1, -1, 0.0, None, False, num_splits=4)
    check_out_lse(out, lse, q, k, v, causal=True)
    cu_q, cu_k = cu_seqlens([4, 6]), cu_seqlens([5, 7])
    qv, kv, vv = rand(10, 2, 16), rand(12, 1, 16), rand(12, 1, 16)
    out, lse, _, _ = _flash_attn_varlen_forward(qv, kv, vv, cu_q, cu_k, 6, 7, 0.0, None, False, num_splits=2)
    check_out_lse(out, lse, qv, kv, vv, varlen=(cu_q, cu_k))


def test_use_triton_rocm_flag():
    from flash_attn import flash_attn_interface

    assert flash_attn_interface.USE_TRITON_ROCM is False


def test_lowlevel_paged_varlen_refuses_num_splits():
    """flash-attn main: a paged varlen forward takes num_splits 0 / 1 (same output), refuses > 1."""
    from fa_core.errors import FlashAttnValueError

    torch.manual_seed(9)
    lens, page, h, d = [5, 12], 4, 2, 16
    k_cache, v_cache = rand(8, page, h, d), rand(8, page, h, d)
    block_table = torch.randperm(8, dtype=torch.int32).reshape(2, 4).to(DEVICE)
    q, cu_q = rand(2, h, d), cu_seqlens([1, 1])
    cu_k, seqused = cu_seqlens(lens), torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kw = dict(block_table=block_table, seqused_k=seqused)
    args = (q, k_cache, v_cache, cu_q, cu_k, 1, max(lens), 0.0, None, False)
    out0 = _flash_attn_varlen_forward(*args, **kw)[0]
    out1 = _flash_attn_varlen_forward(*args, **kw, num_splits=1)[0]
    torch.testing.assert_close(out0, out1, rtol=0, atol=0)
    assert not out0.isnan().any()
    with pytest.raises(RuntimeError, match="num_splits > 1 is not supported"):
        _flash_attn_varlen_forward(*args, **kw, num_splits=2)
    with pytest.raises(FlashAttnValueError, match="num_splits"):
        _flash_attn_varlen_forward(*args, **kw, num_splits=3)


def test_get_block_size_n_follows_flash_attn():
    from flash_attn.flash_attn_interface import _get_block_size_n

    dev = torch.device(DEVICE)
    for d in (16, 32, 64, 96, 128, 160, 192, 256):
        for dropout in (False, True):
            for causal in (False, True):
                n = _get_block_size_n(dev, d, dropout, causal)
                assert n in (32, 64, 128)
    # flash-attn 2.8's rule on sm80 (the CPU's stand-in): 128 up to d32, 64 with dropout at d64, ...
    rule = _get_block_size_n
    cpu = torch.device("cpu")
    assert rule(cpu, 32, True, False) == 128
    assert rule(cpu, 64, False, False) == 128 and rule(cpu, 64, True, False) == 64
    assert rule(cpu, 128, False, True) == 64 and rule(cpu, 128, True, True) == 32
    assert rule(cpu, 160, False, False) == 64 and rule(cpu, 256, True, True) == 64


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bf16 refusal is a CPU-only rule")
def test_bf16_refused_under_the_interpreter():
    q = rand(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 needs a GPU"):
        flash_attn_func(q, q, q)
