"""Forward kernels vs the reference (CPU interpreter: fp32/fp16, small odd shapes)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs it visible to @triton.jit functions)

from fa_core import attention_ref, attention_varlen_ref, flash_attn_forward, flash_attn_varlen_forward
from fa_core.testing import DEVICE, assert_close_2x, poisoned

DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]

# name -> kwargs of the feature combination
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (8, 3)},
    "window_left_causal": {"causal": True, "window_size": (5, -1)},
    "softcap": {"softcap": 3.0},
    "alibi": {"alibi": True},
    "causal_softcap_alibi": {"causal": True, "softcap": 5.0, "alibi": True},
    "window_alibi_scale": {"window_size": (-1, 4), "alibi": True, "softmax_scale": 0.3},
    # the plain-score path folds the scale into exp2: a negative scale flips q, a zero one must not NaN
    "causal_negative_scale": {"causal": True, "softmax_scale": -0.4},
    "window_zero_scale": {"window_size": (6, 2), "softmax_scale": 0.0},
}

# (seqlen_q, seqlen_k, nheads, nheads_k, headdim)
SHAPES = [
    (1, 1, 2, 1, 16),
    (17, 17, 4, 2, 40),
    (113, 33, 3, 1, 64),
    (33, 113, 4, 4, 24),
    (1, 113, 4, 2, 32),
]


def _slopes(batch: int, nheads: int, per_batch: bool) -> torch.Tensor:
    shape = (batch, nheads) if per_batch else (nheads,)
    return (torch.rand(shape, device=DEVICE) * 0.3 + 0.05).float()


def _check(q, k, v, res, feature_kwargs, slopes, dtype):
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    kw = {k_: v_ for k_, v_ in feature_kwargs.items() if k_ != "alibi"}
    ref, ref_lse = attention_ref(q, k, v, alibi_slopes=slopes, dtype=hi, **kw)
    low, low_lse = attention_ref(q, k, v, alibi_slopes=slopes, upcast=False, **kw)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-4 if dtype == torch.float32 else 2e-3)


def _run_checked(shape, fkw, dtype, seed, per_batch_slopes):
    """Dense forward (batch 2) of ``(seqlen_q, seqlen_k, nheads, nheads_k, headdim)`` with the feature kwargs
    ``fkw`` into a NaN-poisoned output, checked against the reference; returns ``(result, out)``."""
    sq, sk, h, hk, d = shape
    torch.manual_seed(seed)
    q = torch.randn(2, sq, h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(2, sk, hk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(2, sk, hk, d, device=DEVICE, dtype=dtype)
    slopes = _slopes(2, h, per_batch=per_batch_slopes) if fkw.get("alibi") else None
    kw = {k_: v_ for k_, v_ in fkw.items() if k_ != "alibi"}
    out = poisoned((2, sq, h, d), dtype, DEVICE)
    res = flash_attn_forward(q, k, v, alibi_slopes=slopes, out=out, **kw)
    _check(q, k, v, res, fkw, slopes, dtype)
    return res, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("feature", list(FEATURES))
def test_dense(feature, shape, dtype):
    res, out = _run_checked(
        shape, FEATURES[feature], dtype, hash((feature, shape)) % 2**31, shape[0] % 2 == 1
    )
    assert res.out.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", ["plain", "softcap", "alibi", "window_alibi_scale"])
@pytest.mark.parametrize(
    "shape", [(33, 128, 2, 1, 32), (1, 256, 4, 2, 16)], ids=lambda s: "x".join(map(str, s))
)
def test_keys_in_whole_tiles(feature, shape, dtype):
    """seqlen_k a multiple of 128 without a band rule: the kernel is compiled without its right-edge loop."""
    from fa_core.masking import has_right_edge

    sq, sk = shape[:2]
    fkw = FEATURES[feature]
    is_local = "window_size" in fkw
    assert has_right_edge(False, is_local, 0, None, None, sk) == is_local
    _run_checked(shape, fkw, dtype, sk + sq, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "causal_softcap_alibi"])
@pytest.mark.parametrize(
    "shape",
    [(128, 47, 2, 1, 32), (256, 256, 2, 2, 16), (129, 64, 2, 1, 16)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_full_query_blocks(feature, shape, dtype):
    """seqlen_q a multiple of 128 (dense): the kernel drops the row masks of the Q load and the O / LSE stores
    (EVEN_M); 129 rows keep them. Both against the reference, output poisoned."""
    _run_checked(shape, FEATURES[feature], dtype, shape[0] * 7 + shape[1], True)


def test_right_edge_rule():
    """The right-edge loop may be dropped only when every tile is whole and nothing cuts the band; every
    BLOCK_N of the autotune space must divide 128 for that rule to hold."""
    from fa_core.forward_configs import FALLBACK_TILE, FP8_TILES, FWD_TILES
    from fa_core.masking import has_right_edge

    assert all(128 % t[1] == 0 for t in [*FWD_TILES, *FP8_TILES, FALLBACK_TILE])
    assert not has_right_edge(False, False, 0, None, None, 4096)
    assert has_right_edge(False, False, 0, None, None, 4000)  # ragged end
    assert has_right_edge(True, False, 0, None, None, 4096)  # varlen: per-sequence lengths
    assert has_right_edge(False, True, 0, None, None, 4096)  # causal / window
    assert has_right_edge(False, False, 64, None, None, 4096)  # chunks
    assert has_right_edge(False, False, 0, object(), None, 4096)  # mask_mod
    assert has_right_edge(False, False, 0, None, torch.zeros(1), 4096)  # seqused_k


@pytest.mark.parametrize("d", [1, 8, 96, 200, 256])
def test_head_dims(d):
    torch.manual_seed(d)
    q = torch.randn(1, 19, 2, d, device=DEVICE, dtype=torch.float16)
    k = torch.randn(1, 23, 1, d, device=DEVICE, dtype=torch.float16)
    v = torch.randn(1, 23, 1, d, device=DEVICE, dtype=torch.float16)
    res = flash_attn_forward(q, k, v, causal=True, out=poisoned(q.shape, q.dtype, DEVICE))
    _check(q, k, v, res, {"causal": True}, None, torch.float16)


def test_v_headdim_differs():
    torch.manual_seed(1)
    q = torch.randn(2, 21, 4, 48, device=DEVICE)
    k = torch.randn(2, 30, 2, 48, device=DEVICE)
    v = torch.randn(2, 30, 2, 24, device=DEVICE)
    res = flash_attn_forward(q, k, v, causal=True)
    assert res.out.shape == (2, 21, 4, 24)
    _check(q, k, v, res, {"causal": True}, None, torch.float32)


def test_non_contiguous_strides():
    """Views of a packed qkv and a (b, h, s, d) tensor transposed: any strides, last dim contiguous."""
    torch.manual_seed(2)
    qkv = torch.randn(2, 37, 3, 4, 32, device=DEVICE, dtype=torch.float16)
    q, k, v = qkv.unbind(2)
    out = torch.full((2, 4, 37, 32), float("nan"), device=DEVICE, dtype=torch.float16).transpose(1, 2)
    res = flash_attn_forward(q, k, v, causal=True, out=out)
    assert not q.is_contiguous() and not out.is_contiguous()
    _check(q, k, v, res, {"causal": True}, None, torch.float16)


def test_empty_rows_give_zero_and_inf_lse():
    """seqlen_q > seqlen_k with causal: the first rows see no key; a window can empty rows too."""
    torch.manual_seed(3)
    q = torch.randn(1, 40, 2, 16, device=DEVICE)
    k = torch.randn(1, 10, 2, 16, device=DEVICE)
    v = torch.randn(1, 10, 2, 16, device=DEVICE)
    res = flash_attn_forward(q, k, v, causal=True, out=poisoned(q.shape, q.dtype, DEVICE))
    assert torch.all(res.out[:, :30] == 0)
    assert torch.all(torch.isinf(res.lse[:, :, :30])) and torch.all(res.lse[:, :, :30] > 0)
    assert torch.isfinite(res.out).all() and torch.isfinite(res.lse[:, :, 30:]).all()
    _check(q, k, v, res, {"causal": True}, None, torch.float32)
    res = flash_attn_forward(q, k, v, window_size=(0, 0))  # each row sees exactly one key or none
    _check(q, k, v, res, {"window_size": (0, 0)}, None, torch.float32)


def test_zero_length_inputs():
    q = torch.randn(2, 0, 2, 16, device=DEVICE)
    k = torch.randn(2, 5, 2, 16, device=DEVICE)
    res = flash_attn_forward(q, k, k)
    assert res.out.shape == (2, 0, 2, 16) and res.lse.shape == (2, 2, 0)
    q = torch.randn(1, 7, 2, 16, device=DEVICE)
    k = torch.randn(1, 0, 2, 16, device=DEVICE)
    res = flash_attn_forward(q, k, k)
    assert torch.all(res.out == 0) and torch.all(torch.isinf(res.lse))


def _cu(lengths):
    return torch.tensor(
        [0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE
    )


VARLEN_CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window_softcap": {"window_size": (6, 2), "softcap": 4.0},
    "causal_alibi_seqused": {"causal": True, "alibi": True, "seqused": True},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen(case, dtype):
    torch.manual_seed(hash(case) % 2**31)
    lens_q = [1, 17, 0, 45, 3]
    lens_k = [5, 17, 9, 30, 70]
    h, hk, d = 4, 2, 40
    cq, ck = _cu(lens_q), _cu(lens_k)
    q = torch.randn(sum(lens_q), h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device=DEVICE, dtype=dtype)
    fkw = dict(VARLEN_CASES[case])
    slopes = _slopes(len(lens_q), h, per_batch=True) if fkw.pop("alibi", False) else None
    seqused = (
        torch.tensor([3, 17, 0, 30, 41], dtype=torch.int32, device=DEVICE)
        if fkw.pop("seqused", False)
        else None
    )
    out = poisoned(q.shape, dtype, DEVICE)
    res = flash_attn_varlen_forward(
        q, k, v, cq, ck, max(lens_q), max(lens_k), alibi_slopes=slopes, seqused_k=seqused, out=out, **fkw
    )
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    ref, ref_lse = attention_varlen_ref(
        q, k, v, cq, ck, seqused_k=seqused, alibi_slopes=slopes, dtype=hi, **fkw
    )
    low, low_lse = attention_varlen_ref(
        q, k, v, cq, ck, seqused_k=seqused, alibi_slopes=slopes, upcast=False, **fkw
    )
    assert res.lse.shape == (h, sum(lens_q))
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=2e-3)


def test_probs_match_softmax():
    torch.manual_seed(4)
    q = torch.randn(2, 29, 2, 32, device=DEVICE)
    k = torch.randn(2, 41, 1, 32, device=DEVICE)
    v = torch.randn(2, 41, 1, 32, device=DEVICE)
    res = flash_attn_forward(q, k, v, causal=True, softcap=2.0, return_probs=True)
    scores = torch.einsum("bthd,bshd->bhts", q.double() / math.sqrt(32), k.double().expand(-1, -1, 2, -1))
    scores = torch.tanh(scores / 2.0) * 2.0
    from fa_core.reference import visible_mask

    scores = scores.masked_fill(~visible_mask(29, 41, causal=True, device=DEVICE), float("-inf"))
    torch.testing.assert_close(res.probs.double(), torch.softmax(scores, -1), atol=1e-5, rtol=1e-4)


def test_dropout_mask_and_rate():
    torch.manual_seed(5)
    p = 0.3
    q = torch.randn(2, 64, 2, 32, device=DEVICE)
    k = torch.randn(2, 48, 2, 32, device=DEVICE)
    v = torch.randn(2, 48, 2, 32, device=DEVICE)
    res = flash_attn_forward(q, k, v, dropout_p=p, causal=True, return_probs=True)
    keep = res.probs >= 0
    vis = res.probs != 0
    rate = (keep & vis).sum().item() / vis.sum().item()
    assert abs(rate - (1 - p)) < 0.03, rate
    ref, _ = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep, dtype=torch.float64)
    low, _ = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    # reproducible from the returned rng_state, and a new draw gives a new mask
    again = flash_attn_forward(q, k, v, dropout_p=p, causal=True, rng_state=res.rng_state)
    assert torch.equal(again.out, res.out)
    other = flash_attn_forward(q, k, v, dropout_p=p, causal=True)
    assert not torch.equal(other.out, res.out)
    torch.manual_seed(123)
    a = flash_attn_forward(q, k, v, dropout_p=p)
    torch.manual_seed(123)
    b = flash_attn_forward(q, k, v, dropout_p=p)
    assert torch.equal(a.out, b.out) and torch.equal(a.rng_state, b.rng_state)


def test_dropout_varlen_matches_probs_mask():
    torch.manual_seed(6)
    p = 0.2
    lens = [13, 30]
    cu = _cu(lens)
    q = torch.randn(sum(lens), 2, 16, device=DEVICE)
    k = torch.randn(sum(lens), 2, 16, device=DEVICE)
    v = torch.randn(sum(lens), 2, 16, device=DEVICE)
    res = flash_attn_varlen_forward(q, k, v, cu, cu, 30, 30, dropout_p=p, return_probs=True)
    masks = [res.probs[b, :, :n, :n] >= 0 for b, n in enumerate(lens)]
    ref, _ = attention_varlen_ref(q, k, v, cu, cu, dropout_p=p, dropout_mask=masks, dtype=torch.float64)
    low, _ = attention_varlen_ref(q, k, v, cu, cu, dropout_p=p, dropout_mask=masks, upcast=False)
    assert_close_2x(res.out, ref, low, "out")


def test_grad_guard_names_fa_backward():
    q = torch.randn(1, 4, 1, 16, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="fa-backward"):
        flash_attn_forward(q, q.detach(), q.detach())
    with torch.no_grad():
        flash_attn_forward(q, q.detach(), q.detach())


# ----------------------------------------------------------------------------- block-sparse full blocks
@triton.jit
def _diag_stripes(b, h, q_idx, kv_idx):
    # an element mask that really cuts: full blocks must NOT evaluate it
    return ((q_idx + kv_idx + h) % 3) != 0


def _diag_stripes_ref(b, h, q_idx, kv_idx):
    return ((q_idx + kv_idx + h) % 3) != 0


def _compact(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(B, H, nq, nk)`` -> FlexAttention's ``(num, indices)`` int32, listed blocks first."""
    num = blocks.sum(-1, dtype=torch.int32).contiguous()
    idx = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
    return num, idx


def _block_mask_with_full(part, full, block_size):
    pn, pi = _compact(part)
    fn, fi = _compact(full)
    try:
        from fa_core.block_sparse import BlockMask

        return BlockMask(pn, pi, block_size, full_kv_num_blocks=fn, full_kv_indices=fi)
    except TypeError:  # a BlockMask without the full-block fields: a duck-typed one
        return SimpleNamespace(
            kv_num_blocks=pn, kv_indices=pi, block_size=block_size, full_kv_num_blocks=fn, full_kv_indices=fi
        )


@pytest.mark.parametrize(
    "with_mask_mod, causal, lead",
    [(True, True, (2, 4)), (True, False, (1, 1)), (False, False, (2, 4)), (False, True, (1, 4))],
    ids=["mod-causal-per_bh", "mod-broadcast", "plain-per_bh", "causal-per_head"],
)
def test_block_sparse_full_blocks(with_mask_mod, causal, lead):
    """Partial blocks get the element mask, full blocks skip it; causal and the ragged key end still apply
    in both. Compared with the reference on the equivalent dense mask."""
    torch.manual_seed(hash((with_mask_mod, causal, lead)) % 2**31)
    batch, h, hk, d, sq, sk, bs = 2, 4, 2, 32, 70, 90, 32
    nq, nk = -(-sq // bs), -(-sk // bs)
    cls = torch.randint(0, 3, (*lead, nq, nk), device=DEVICE)  # 0 skipped, 1 partial, 2 full
    cls[..., -1, -1] = 2  # the ragged corner block is full somewhere
    part, full = cls == 1, cls == 2
    bm = _block_mask_with_full(part, full, (bs, bs))
    q = torch.randn(batch, sq, h, d, device=DEVICE)
    k = torch.randn(batch, sk, hk, d, device=DEVICE)
    v = torch.randn(batch, sk, hk, d, device=DEVICE)

    def expand(blocks):
        dense = blocks.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :sq, :sk]
        return dense.expand(batch, h, sq, sk)

    bi = torch.arange(batch, device=DEVICE).view(-1, 1, 1, 1)
    hi = torch.arange(h, device=DEVICE).view(1, -1, 1, 1)
    qi = torch.arange(sq, device=DEVICE).view(1, 1, -1, 1)
    ki = torch.arange(sk, device=DEVICE).view(1, 1, 1, -1)
    elem = _diag_stripes_ref(bi, hi, qi, ki) if with_mask_mod else torch.ones(1, 1, 1, 1, dtype=torch.bool)
    dense = (expand(part) & elem) | expand(full)

    def mask_ref(b_, h_, q_, k_):
        return dense[b_, h_, q_, k_]

    res = flash_attn_forward(
        q,
        k,
        v,
        causal=causal,
        block_mask=bm,
        mask_mod=_diag_stripes if with_mask_mod else None,
        out=poisoned(q.shape, q.dtype, DEVICE),
    )
    ref, ref_lse = attention_ref(q, k, v, causal=causal, mask_mod=mask_ref, dtype=torch.float64)
    low, low_lse = attention_ref(q, k, v, causal=causal, mask_mod=mask_ref, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-4)


def test_block_sparse_full_blocks_bad_input():
    blocks = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE)
    pn, pi = _compact(blocks)
    q = torch.randn(1, 64, 2, 16, device=DEVICE)

    def mask(**full):
        return SimpleNamespace(kv_num_blocks=pn, kv_indices=pi, block_size=(32, 32), **full)

    # messages name the field (validation.check_block_mask may catch these first, in its own words)
    with pytest.raises(ValueError, match="full_kv"):
        flash_attn_forward(q, q, q, block_mask=mask(full_kv_num_blocks=pn, full_kv_indices=None))
    with pytest.raises(TypeError, match="full_kv_num_blocks"):
        flash_attn_forward(q, q, q, block_mask=mask(full_kv_num_blocks=pn.long(), full_kv_indices=pi))
    with pytest.raises(ValueError, match="full_kv_indices"):
        flash_attn_forward(q, q, q, block_mask=mask(full_kv_num_blocks=pn, full_kv_indices=pi[..., :1]))
    with pytest.raises(ValueError, match="full_kv_num_blocks"):
        bad = torch.zeros(3, 1, 2, dtype=torch.int32, device=DEVICE)
        flash_attn_forward(q, q, q, block_mask=mask(full_kv_num_blocks=bad, full_kv_indices=pi))


def test_autotuner_arg_names_are_fast_and_unchanged():
    """The forward's autotuner gets O(1) argument-name lookups (launch overhead) without changing the names."""
    from fa_core.forward_configs import ArgNames, fast_autotuner
    from fa_core.forward_kernel import fwd_kernel

    assert isinstance(fwd_kernel.arg_names, ArgNames)
    assert list(fwd_kernel.arg_names) == list(fwd_kernel.fn.arg_names)
    assert "Q" in fwd_kernel.arg_names and "not_an_argument" not in fwd_kernel.arg_names
    assert dict(zip(fwd_kernel.arg_names, range(3))) == {"Q": 0, "K": 1, "V": 2}
    assert fast_autotuner(fwd_kernel) is fwd_kernel
