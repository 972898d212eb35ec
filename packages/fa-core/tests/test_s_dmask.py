"""flash-attn's ``S_dmask`` form (fa_core.probs_kernel.flash_attn_s_dmask) passes flash-attn's own test logic.

flash-attn's ``test_flash_attn_output`` turns ``S_dmask`` into probabilities with
``convert_flash_attn_S_to_softmax`` (crop, zero the masked entries), reads the dropout mask from the sign,
normalises with ``normalize_flash_attn_S`` (per key block of ``_get_block_size_n`` columns: multiply by
``exp(reverse-cummax of the block maxima - lse)``, both recomputed from q and k) and checks the result against
the reference probabilities (``<= 2x`` the low-precision reference's error) and the dropout fraction. The
helpers below re-implement those three functions; the tests also check that the regenerated dropout mask is
the forward's (the output rebuilt from the recovered probabilities equals the forward's output).
"""

from __future__ import annotations

import math

import pytest
import torch

from fa_core import flash_attn_forward, flash_attn_varlen_forward
from fa_core.probs_kernel import flash_attn_s_dmask, get_block_size_n
from fa_core.reference import visible_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16


# ------------------------------------------------------------------------------- flash-attn's test helpers
def _scores(q, k, softmax_scale, causal, window_size, alibi_slopes):
    """fp32 scores ``(b, h, sq, sk)``, -inf where masked (flash-attn's test: einsum of the upcast q, k)."""
    q, k = q.float(), k.float()
    g = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q * softmax_scale, k)
    sq, sk = q.shape[1], k.shape[1]
    if alibi_slopes is not None:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        dist = (i + sk - sq - j).abs().float()
        s = s - alibi_slopes.float().reshape(1, -1, 1, 1) * dist
    ok = visible_mask(sq, sk, causal, window_size, q.device)
    return s.masked_fill(~ok, float("-inf")), ok


def normalize_flash_attn_S(attn_unnorm, scores, block_size_n):
    """flash-attn's ``normalize_flash_attn_S`` on precomputed masked scores."""
    blocks = scores.split(block_size_n, dim=-1)
    lse_block = torch.stack([torch.logsumexp(s, dim=-1) for s in blocks], dim=-1)
    lse = torch.logsumexp(lse_block, dim=-1)
    lse[lse == float("-inf")] = float("inf")
    max_block = torch.stack([torch.amax(s, dim=-1) for s in blocks], dim=-1)
    cummax = torch.cummax(max_block.flip(-1), dim=-1).values.flip(-1).unbind(dim=-1)
    parts = [
        a * torch.exp(m - lse)[..., None] for a, m in zip(attn_unnorm.split(block_size_n, dim=-1), cummax)
    ]
    return torch.cat(parts, dim=-1).to(attn_unnorm.dtype)


def convert_flash_attn_S_to_softmax(S, seqlen_q, seqlen_k, visible):
    """flash-attn's ``convert_flash_attn_S_to_softmax``: zero the masked entries, crop the 128-padding."""
    S = S[:, :, :seqlen_q, :seqlen_k]
    return S.masked_fill(~visible, 0.0)


def dropout_fraction(keep, visible):
    """flash-attn's ``get_dropout_fraction``: dropped / visible entries."""
    vis = visible.expand_as(keep)
    return ((~keep) & vis).sum().item() / vis.sum().item()


# ------------------------------------------------------------------------------------------------- tests
def _flash_attn_block_size_n(major, minor, head_dim, is_dropout, is_causal):
    """flash-attn 2.8's table, as written in flash_attn_interface._get_block_size_n."""
    is_sm8x = major == 8 and minor > 0
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 128 if not is_dropout else 64
    elif head_dim <= 96:
        return 64
    elif head_dim <= 128:
        if is_sm8x:
            return 64 if (not is_dropout and is_causal) else 32
        else:
            return 64 if not is_dropout else 32
    else:  # 129..256
        return 64


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9), (9, 0)])
def test_block_size_n_table(monkeypatch, cap):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    for d in range(1, 257):
        for drop in (False, True):
            for causal in (False, True):
                want = _flash_attn_block_size_n(*cap, d, drop, causal)
                assert get_block_size_n("cuda", d, drop, causal) == want, (cap, d, drop, causal)
                assert get_block_size_n("cpu", d, drop, causal) == _flash_attn_block_size_n(
                    8, 0, d, drop, causal
                )
    with pytest.raises(ValueError, match="head_dim"):
        get_block_size_n("cpu", 257, True, False)


CASES = {
    # name: (batch, sq, sk, nheads, nheads_k, d, causal, window, alibi)
    "d64-4blocks": (2, 37, 200, 2, 1, 64, False, (-1, -1), False),
    "d128-causal": (1, 70, 100, 2, 2, 128, True, (-1, -1), False),
    "d32-window": (1, 45, 150, 2, 1, 32, False, (20, 7), False),
    "d64-alibi-causal": (1, 50, 130, 2, 1, 64, True, (-1, -1), True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_s_dmask_round_trip(name):
    batch, sq, sk, h, hk, d, causal, window, alibi = CASES[name]
    p = 0.17
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    q = torch.randn(batch, sq, h, d, generator=g).to(DTYPE).to(DEVICE)
    k = torch.randn(batch, sk, hk, d, generator=g).to(DTYPE).to(DEVICE)
    v = torch.randn(batch, sk, hk, d, generator=g).to(DTYPE).to(DEVICE)
    slopes = (torch.rand(h, generator=g) * 0.3).to(DEVICE) if alibi else None
    scale = 1.0 / math.sqrt(d)
    res = flash_attn_forward(q, k, v, p, causal=causal, window_size=window, alibi_slopes=slopes)
    S = flash_attn_s_dmask(
        q, k, dropout_p=p, rng_state=res.rng_state, causal=causal, window_size=window, alibi_slopes=slopes
    )
    assert S.shape == (batch, h, 128 * math.ceil(sq / 128), 128 * math.ceil(sk / 128)) and S.dtype == DTYPE
    block_n = get_block_size_n(q.device, d, True, causal)

    scores, visible = _scores(q, k, scale, causal, window, slopes)
    S_conv = convert_flash_attn_S_to_softmax(S, sq, sk, visible)
    keep = S_conv >= 0
    attn = normalize_flash_attn_S(S_conv.abs(), scores, block_n)

    # reference probabilities in float64, and the same computed in the low precision (flash-attn's attn_pt)
    s64, _ = _scores(q.double(), k.double(), scale, causal, window, slopes)
    attn_ref = torch.softmax(s64.double(), dim=-1).nan_to_num(0.0)
    s_low = scores.to(DTYPE).float()
    attn_pt = torch.softmax(s_low, dim=-1).to(DTYPE).double().nan_to_num(0.0)
    err = (attn.double() - attn_ref).abs().max().item()
    err_pt = (attn_pt - attn_ref).abs().max().item()
    assert err <= 2 * err_pt + 1e-4, (err, err_pt)

    # the entries are exp(s - running block max) <= 1, and the block holding a row's max has an exact +-1
    assert S_conv.abs().max() <= 1.0
    rows = visible.any(-1).expand(batch, h, sq)
    assert (S_conv.abs().amax(-1)[rows] == 1.0).all()
    # dropout fraction (flash-attn: within 0.01 of p, on its larger shapes; 0.03 here)
    frac = dropout_fraction(keep, visible)
    assert abs(frac - p) <= 0.03, frac
    # the regenerated mask is the forward's: the output rebuilt from the recovered probabilities matches
    g_ = h // hk
    v_rep = v.double().repeat_interleave(g_, dim=2)
    out = torch.einsum("bhts,bshd->bthd", attn.double() * keep / (1 - p), v_rep)
    out_ref = torch.einsum("bhts,bshd->bthd", attn_ref * keep / (1 - p), v_rep)
    err_out = (res.out.double() - out_ref).abs().max().item()
    assert (out - out_ref).abs().max().item() <= 2 * err_out + 2e-3
    # outside the sequences, and at masked entries: zero
    assert (S[:, :, sq:] == 0).all() and (S[:, :, :, sk:] == 0).all()
    assert (S[:, :, :sq, :sk][~visible.expand_as(S_conv)] == 0).all()


def test_s_dmask_is_block_scaled_not_normalized():
    """Without the block rescale the recovered probabilities would be wrong: a mutation check of the form
    (the last key block's entries are relative to that block's own max, not the row's)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 20, 1, 64, generator=g).to(DTYPE).to(DEVICE)
    k = torch.randn(1, 256, 1, 64, generator=g).to(DTYPE).to(DEVICE)
    S = flash_attn_s_dmask(q, k, dropout_p=0.0, rng_state=torch.tensor([1, 0]))
    scores, _ = _scores(q, k, 1 / 8, False, (-1, -1), None)
    blocks = scores.split(get_block_size_n(q.device, 64, False, False), dim=-1)
    assert len(blocks) == 2
    last_max = blocks[1].amax(-1, keepdim=True)
    torch.testing.assert_close(
        S[..., :20, 128:256].float(), torch.exp(blocks[1] - last_max), atol=2e-3, rtol=2e-3
    )
    both_max = torch.maximum(blocks[0].amax(-1, keepdim=True), last_max)
    torch.testing.assert_close(
        S[..., :20, :128].float(), torch.exp(blocks[0] - both_max), atol=2e-3, rtol=2e-3
    )


def test_s_dmask_varlen_matches_dense_per_sequence():
    p = 0.2
    lens_q, lens_k = [5, 17, 0], [30, 70, 9]
    g = torch.Generator().manual_seed(9)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lens_q), 2, 64, generator=g).to(DTYPE).to(DEVICE)
    k = torch.randn(sum(lens_k), 1, 64, generator=g).to(DTYPE).to(DEVICE)
    v = torch.randn(sum(lens_k), 1, 64, generator=g).to(DTYPE).to(DEVICE)
    res = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), p, causal=True)
    S = flash_attn_s_dmask(
        q,
        k,
        dropout_p=p,
        rng_state=res.rng_state,
        causal=True,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k),
    )
    assert S.shape == (3, 2, 128, 128)
    block_n = get_block_size_n(q.device, 64, True, True)
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        qb = q[int(cu_q[b]) : int(cu_q[b + 1])][None]
        kb = k[int(cu_k[b]) : int(cu_k[b + 1])][None]
        scores, visible = _scores(qb, kb, 1 / 8, True, (-1, -1), None)
        S_conv = convert_flash_attn_S_to_softmax(S[b : b + 1], lq, lk, visible)
        attn = normalize_flash_attn_S(S_conv.abs(), scores, block_n)
        ref = torch.softmax(scores.double(), dim=-1).nan_to_num(0.0)
        assert attn.numel() == 0 or (attn.double() - ref).abs().max().item() <= 2e-3
        assert (S[b, :, lq:] == 0).all() and (S[b, :, :, lk:] == 0).all()


def test_s_dmask_garbage_lengths_stay_in_bounds():
    """cu_seqlens past the totals, negative, non-monotone, max_seqlen smaller than a sequence, seqused_k out of
    range: clamped in the kernel (no read or write outside q, k and S), finite entries."""
    q = torch.randn(20, 2, 32, dtype=DTYPE, device=DEVICE)
    k = torch.randn(30, 1, 32, dtype=DTYPE, device=DEVICE)
    for cu_q, cu_k, used in (
        ([0, 100, -5, 20], [0, 2**31 - 1, 5, 30], None),
        ([-(2**31), 15, 3, 20], [0, 40, 30, -7], [50, -3, 2**31 - 1]),
    ):
        S = flash_attn_s_dmask(
            q,
            k,
            dropout_p=0.3,
            rng_state=torch.tensor([3, 0]),
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=DEVICE),
            cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=DEVICE),
            max_seqlen_q=8,
            max_seqlen_k=12,
            seqused_k=None if used is None else torch.tensor(used, dtype=torch.int32, device=DEVICE),
        )
        assert S.shape == (3, 2, 128, 128) and torch.isfinite(S).all()
        assert (S[:, :, 8:] == 0).all() and (S[:, :, :, 12:] == 0).all()


# ------------------------------------------------------------------------- the public API returns this form
def _recover_and_check(S, out, q, k, v, p, causal):
    """flash-attn's test logic on a public call's ``S_dmask`` (dense ``(b, s, h, d)`` q/k/v): the recovered
    probabilities match the reference (2x rule), the dropout fraction is near ``p`` and the output rebuilt from
    the recovered probabilities and the sign mask is the call's output."""
    batch, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    assert S.shape == (batch, h, 128 * math.ceil(sq / 128), 128 * math.ceil(sk / 128)) and S.dtype == q.dtype
    scale = 1.0 / math.sqrt(d)
    scores, visible = _scores(q, k, scale, causal, (-1, -1), None)
    S_conv = convert_flash_attn_S_to_softmax(S, sq, sk, visible)
    keep = S_conv >= 0
    attn = normalize_flash_attn_S(S_conv.abs(), scores, get_block_size_n(q.device, d, p > 0, causal))
    s64, _ = _scores(q.double(), k.double(), scale, causal, (-1, -1), None)
    attn_ref = torch.softmax(s64.double(), dim=-1).nan_to_num(0.0)
    attn_pt = torch.softmax(scores.to(q.dtype).float(), dim=-1).to(q.dtype).double().nan_to_num(0.0)
    err_pt = (attn_pt - attn_ref).abs().max().item()
    assert (attn.double() - attn_ref).abs().max().item() <= 2 * err_pt + 1e-4
    if p > 0:
        assert abs(dropout_fraction(keep, visible) - p) <= 0.05
    v_rep = v.double().repeat_interleave(h // hk, dim=2)
    rebuilt = torch.einsum("bhts,bshd->bthd", attn.double() * keep / (1 - p), v_rep)
    out_ref = torch.einsum("bhts,bshd->bthd", attn_ref * keep / (1 - p), v_rep)
    err_out = (out.double() - out_ref).abs().max().item()
    assert err_out <= 5e-3 and (rebuilt - out_ref).abs().max().item() <= 2 * err_out + 2e-3
    assert (S[:, :, sq:] == 0).all() and (S[:, :, :, sk:] == 0).all()


def _dense(batch, sq, sk, h, hk, d, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, s, n, d, generator=g).to(DTYPE).to(DEVICE)
        for s, n in ((sq, h), (sk, hk), (sk, hk))
    )


@pytest.mark.parametrize("causal", [False, True])
def test_call_path_returns_flash_attn_form(causal):
    """fa_core.ops.attention (the one call path behind every public function): S_dmask in flash-attn's form."""
    from fa_core import ops

    p = 0.2
    q, k, v = _dense(2, 40, 150, 2, 1, 64, seed=11 + causal)
    out, lse, S = ops.attention(
        q, k, v, autograd=None, dropout_p=p, causal=causal, return_softmax=True
    )  # fmt: skip
    _recover_and_check(S, out, q, k, v, p, causal)


def test_flash_attn_public_functions_return_flash_attn_form():
    """flash_attn's public functions (dense, packed, varlen) and low-level forwards give flash-attn's S_dmask;
    the low-level ones equal flash_attn_s_dmask of their rng_state exactly."""
    fai = pytest.importorskip("flash_attn.flash_attn_interface")
    p = 0.25
    q, k, v = _dense(1, 33, 140, 2, 2, 64, seed=21)
    out, _, S = fai.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    _recover_and_check(S, out, q, k, v, p, True)
    qkv = torch.stack(_dense(1, 70, 70, 2, 2, 64, seed=22), dim=2)
    out, _, S = fai.flash_attn_qkvpacked_func(qkv, dropout_p=p, return_attn_probs=True)
    _recover_and_check(S, out, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], p, False)
    # varlen: each sequence's block of S_dmask is its dense S_dmask
    lens_q, lens_k = [7, 30], [90, 41]
    parts = [_dense(1, lq, lk, 2, 1, 64, seed=30 + i) for i, (lq, lk) in enumerate(zip(lens_q, lens_k))]
    qv, kv, vv = (torch.cat([t[j][0] for t in parts]) for j in range(3))
    cu_q = torch.tensor([0, 7, 37], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 90, 131], dtype=torch.int32, device=DEVICE)
    out, _, S = fai.flash_attn_varlen_func(
        qv, kv, vv, cu_q, cu_k, 30, 90, dropout_p=p, return_attn_probs=True
    )
    assert S.shape == (2, 2, 128, 128)
    for b, (qb, kb, vb) in enumerate(parts):
        out_b = out[int(cu_q[b]) : int(cu_q[b + 1])][None]
        _recover_and_check(S[b : b + 1, :, :, :], out_b, qb, kb, vb, p, False)
    # low level: exactly flash_attn_s_dmask of the returned rng_state (dropout and no dropout)
    for drop in (0.0, p):
        out, lse, S, rng = fai._flash_attn_forward(q, k, v, drop, None, True, -1, -1, 0.0, None, True)
        want = flash_attn_s_dmask(q, k, dropout_p=drop, rng_state=rng, causal=True)
        torch.testing.assert_close(S, want, rtol=0, atol=0)
        out, lse, S, rng = fai._flash_attn_varlen_forward(
            qv, kv, vv, cu_q, cu_k, 30, 90, drop, None, False, return_softmax=True
        )
        want = flash_attn_s_dmask(
            qv, kv, dropout_p=drop, rng_state=rng, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=30,
            max_seqlen_k=90,
        )  # fmt: skip
        torch.testing.assert_close(S, want, rtol=0, atol=0)
    assert fai._get_block_size_n(q.device, 64, True, False) == get_block_size_n(q.device, 64, True, False)
