"""Tests for flash_attn.utils.testing (pure PyTorch).

``attention_ref`` is held against ``torch.nn.functional.scaled_dot_product_attention`` in float64 (outputs and
the gradients of q / k / v) with a visibility mask built here by explicit loops from the documented rules
(padding, causal / sliding window with sink tokens, chunks, left padding of the keys); the ``qv`` term is
SDPA on concatenated head dims, a learnable sink an extra column of the softmax, the attention probabilities
SDPA applied to an identity ``v``. The masks of ``construct_local_mask`` / ``construct_chunk_mask`` are held
against band matrices (``tril`` / ``triu``) and per-sequence slices, ``generate_qkv`` against boolean
indexing and cumulative sums, ``generate_random_padding_mask`` against its documented ranges and draws.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flash_attn.utils.testing import (
    attention_ref,
    construct_chunk_mask,
    construct_local_mask,
    generate_qkv,
    generate_random_padding_mask,
)

F64 = torch.float64
#: float64 reference vs float64 implementation: summation order only
TOL = {"atol": 1e-10, "rtol": 1e-9}


def _lengths(mask: torch.Tensor | None, batch: int, seqlen: int) -> list[int]:
    return mask.sum(-1).tolist() if mask is not None else [seqlen] * batch


def _mask_from_lengths(lengths: list[int], seqlen: int, leftpad: list[int] | None = None) -> torch.Tensor:
    start = torch.tensor(leftpad or [0] * len(lengths))[:, None]
    pos = torch.arange(seqlen)[None, :]
    return (pos >= start) & (pos < start + torch.tensor(lengths)[:, None])


# ------------------------------------------------------------------------------- padding masks
@pytest.mark.parametrize("mode", ["full", "random", "third"])
@pytest.mark.parametrize("zero_lengths", [False, True])
def test_generate_random_padding_mask_ranges(mode, zero_lengths):
    torch.manual_seed(0)
    max_seqlen, batch = 50, 12
    for _ in range(20):
        mask = generate_random_padding_mask(max_seqlen, batch, "cpu", mode=mode, zero_lengths=zero_lengths)
        assert mask.dtype == torch.bool and mask.shape == (batch, max_seqlen)
        lengths = mask.sum(-1)
        # left-aligned: the valid tokens are the first `length` positions
        assert torch.equal(mask, torch.arange(max_seqlen)[None, :] < lengths[:, None])
        if zero_lengths:
            zeroed = [i for i in range(batch) if i % 5 == 0] + [batch - 1]
            assert lengths[zeroed].eq(0).all()
            lengths = lengths[[i for i in range(batch) if i not in zeroed]]
        if mode == "full":
            assert lengths.eq(max_seqlen).all()
        elif mode == "random":
            assert lengths.min() >= max_seqlen - 20 and lengths.max() <= max_seqlen
        else:
            assert lengths.min() >= max_seqlen // 3 and lengths.max() <= max_seqlen


def test_generate_random_padding_mask_draws_and_small_lengths():
    # the draws are flash-attn's: one randint of shape (batch, 1) over the documented range
    for mode, low in (("random", 30), ("third", 50 // 3)):
        torch.manual_seed(3)
        mask = generate_random_padding_mask(50, 7, "cpu", mode=mode)
        torch.manual_seed(3)
        expected = torch.randint(low, 51, (7, 1))
        assert mask.sum(-1).tolist() == expected.flatten().tolist()
    torch.manual_seed(3)
    mask = generate_random_padding_mask(50, 7, "cpu", mode="random", zero_lengths=True)
    torch.manual_seed(3)
    expected = torch.randint(30, 51, (7, 1)).flatten()
    expected[[0, 5, 6]] = 0
    assert mask.sum(-1).tolist() == expected.tolist()
    # below 20 tokens the random lengths start at 1 (0 with zero_lengths); a zero length is allowed
    for _ in range(10):
        assert generate_random_padding_mask(3, 16, "cpu").sum(-1).min() >= 1
    assert generate_random_padding_mask(0, 4, "cpu").shape == (4, 0)
    assert generate_random_padding_mask(5, 0, "cpu", zero_lengths=True).shape == (0, 5)


def test_generate_random_padding_mask_errors():
    with pytest.raises(ValueError, match="mode"):
        generate_random_padding_mask(8, 2, "cpu", mode="half")
    with pytest.raises(ValueError, match=">= 0"):
        generate_random_padding_mask(-1, 2, "cpu")


# -------------------------------------------------------------------------------- generate_qkv
def _qkv(batch=3, sq=7, sk=9, h=4, hk=2, d=8, dv=6):
    return (
        torch.randn(batch, sq, h, d, dtype=F64),
        torch.randn(batch, sk, hk, d, dtype=F64),
        torch.randn(batch, sk, hk, dv, dtype=F64),
    )


def _cu(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _check_leaf(t: torch.Tensor, value: torch.Tensor) -> None:
    assert t.is_leaf and t.requires_grad and torch.equal(t.detach(), value)


def test_generate_qkv_separate_with_padding():
    torch.manual_seed(0)
    q, k, v = _qkv()
    q.requires_grad_()  # the returned tensors are fresh leaves, cut from q's graph
    qv = torch.randn(3, 7, 4, 6, dtype=F64)
    qmask = _mask_from_lengths([7, 3, 5], 7)
    kmask = _mask_from_lengths([2, 9, 6], 9)
    out = generate_qkv(q, k, v, qmask, kmask, qv)
    assert len(out) == 17
    (q_unpad, k_unpad, v_unpad, qv_unpad, cu_q, cu_k, used_q, used_k, max_q, max_k, q2, k2, v2, qv2,
     output_pad_fn, dq_pad_fn, dk_pad_fn) = out  # fmt: skip
    _check_leaf(q_unpad, q.detach()[qmask])
    _check_leaf(k_unpad, k[kmask])
    _check_leaf(v_unpad, v[kmask])
    assert not qv_unpad.requires_grad and torch.equal(qv_unpad, qv[qmask])
    assert cu_q.dtype == cu_k.dtype == torch.int32
    assert cu_q.tolist() == _cu([7, 3, 5]) and cu_k.tolist() == _cu([2, 9, 6])
    assert used_q.tolist() == [7, 3, 5] and used_k.tolist() == [2, 9, 6]
    assert (max_q, max_k) == (7, 9)
    for leaf, value in ((q2, q.detach()), (k2, k), (v2, v)):
        _check_leaf(leaf, value)
    assert not qv2.requires_grad and torch.equal(qv2, qv)
    # the pad functions scatter back, zeros at the padding, and are differentiable
    torch.testing.assert_close(output_pad_fn(q_unpad), q.detach() * qmask[:, :, None, None], **TOL)
    torch.testing.assert_close(dq_pad_fn(q_unpad), q.detach() * qmask[:, :, None, None], **TOL)
    torch.testing.assert_close(dk_pad_fn(k_unpad), k * kmask[:, :, None, None], **TOL)
    g = torch.randn(3, 7, 4, 8, dtype=F64)
    (output_pad_fn(q_unpad) * g).sum().backward()
    torch.testing.assert_close(q_unpad.grad, g[qmask], **TOL)


def test_generate_qkv_without_padding_and_with_unused_tokens():
    torch.manual_seed(1)
    q, k, v = _qkv(batch=2, sq=5, sk=4)
    out = generate_qkv(q, k, v)
    q_unpad, k_unpad, v_unpad, qv_unpad, cu_q, cu_k, used_q, used_k, max_q, max_k = out[:10]
    assert torch.equal(q_unpad.detach(), q.reshape(10, 4, 8)) and torch.equal(
        v_unpad.detach(), v.reshape(8, 2, 6)
    )
    assert qv_unpad is None and out[13] is None
    assert cu_q.tolist() == [0, 5, 10] and cu_k.tolist() == [0, 4, 8] and cu_q.dtype == torch.int32
    assert used_q is None and used_k is None and (max_q, max_k) == (5, 4)
    torch.testing.assert_close(out[14](q_unpad), q, **TOL)
    torch.testing.assert_close(out[16](k_unpad), k, **TOL)

    # unused tokens: kept in the unpadded tensors and cu_seqlens, left out of seqused
    qmask, kmask = _mask_from_lengths([2, 3], 5), _mask_from_lengths([1, 4], 4)
    qunused = torch.zeros(2, 5, dtype=torch.bool)
    qunused[0, 2:4] = True
    kunused = torch.zeros(2, 4, dtype=torch.bool)
    kunused[0, 1] = True
    out = generate_qkv(q, k, v, qmask, kmask, query_unused_mask=qunused, key_unused_mask=kunused)
    q_unpad, k_unpad, _, _, cu_q, cu_k, used_q, used_k, max_q, max_k = out[:10]
    assert torch.equal(q_unpad.detach(), q[qmask | qunused]) and torch.equal(
        k_unpad.detach(), k[kmask | kunused]
    )
    assert cu_q.tolist() == [0, 4, 7] and cu_k.tolist() == [0, 2, 6]
    assert used_q.tolist() == [2, 3] and used_k.tolist() == [1, 4] and (max_q, max_k) == (4, 4)


@pytest.mark.parametrize("padded", [False, True])
def test_generate_qkv_kvpacked(padded):
    torch.manual_seed(2)
    q, k, v = _qkv(dv=8)
    qmask = _mask_from_lengths([7, 2, 4], 7) if padded else None
    kmask = _mask_from_lengths([9, 1, 5], 9) if padded else None
    out = generate_qkv(q, k, v, qmask, kmask, kvpacked=True)
    assert len(out) == 11
    q_unpad, kv_unpad, cu_q, cu_k, max_q, max_k, q2, kv, output_pad_fn, dq_pad_fn, dkv_pad_fn = out
    kv_ref = torch.stack([k, v], dim=2)
    _check_leaf(kv, kv_ref)
    _check_leaf(q2, q)
    kmask_ = kmask if padded else torch.ones(3, 9, dtype=torch.bool)
    qmask_ = qmask if padded else torch.ones(3, 7, dtype=torch.bool)
    _check_leaf(kv_unpad, kv_ref[kmask_])
    _check_leaf(q_unpad, q[qmask_])
    assert cu_k.tolist() == _cu(kmask_.sum(-1).tolist()) and cu_q.tolist() == _cu(qmask_.sum(-1).tolist())
    assert (max_q, max_k) == (int(qmask_.sum(-1).max()), int(kmask_.sum(-1).max()))
    torch.testing.assert_close(dkv_pad_fn(kv_unpad), kv_ref * kmask_[:, :, None, None, None], **TOL)
    torch.testing.assert_close(dq_pad_fn(q_unpad), q * qmask_[:, :, None, None], **TOL)
    torch.testing.assert_close(output_pad_fn(q_unpad), q * qmask_[:, :, None, None], **TOL)


@pytest.mark.parametrize("padded", [False, True])
def test_generate_qkv_qkvpacked(padded):
    torch.manual_seed(3)
    q, k, v = _qkv(sq=6, sk=6, hk=4, dv=8)
    mask = _mask_from_lengths([6, 3, 1], 6) if padded else None
    out = generate_qkv(q, k, v, mask, mask, qkvpacked=True)
    assert len(out) == 6
    qkv_unpad, cu, max_seqlen, qkv, output_pad_fn, dqkv_pad_fn = out
    qkv_ref = torch.stack([q, k, v], dim=2)
    mask_ = mask if padded else torch.ones(3, 6, dtype=torch.bool)
    _check_leaf(qkv, qkv_ref)
    _check_leaf(qkv_unpad, qkv_ref[mask_])
    assert cu.tolist() == _cu(mask_.sum(-1).tolist()) and max_seqlen == 6
    torch.testing.assert_close(dqkv_pad_fn(qkv_unpad), qkv_ref * mask_[:, :, None, None, None], **TOL)
    torch.testing.assert_close(output_pad_fn(qkv_unpad[:, 0]), q * mask_[:, :, None, None], **TOL)


def test_generate_qkv_errors():
    q, k, v = _qkv()
    mask_q, mask_k = _mask_from_lengths([1, 2, 3], 7), _mask_from_lengths([1, 2, 3], 9)
    with pytest.raises(ValueError, match="both"):
        generate_qkv(q, k, v, kvpacked=True, qkvpacked=True)
    with pytest.raises(ValueError, match="unused"):
        generate_qkv(q, k, v[..., :8].contiguous(), mask_q, mask_k, kvpacked=True, key_unused_mask=~mask_k)
    with pytest.raises(ValueError, match="head dim"):
        generate_qkv(q, k, v, kvpacked=True)
    with pytest.raises(ValueError, match="one shape"):
        generate_qkv(q, k, v, qkvpacked=True)
    q6, k6, v6 = _qkv(sq=6, sk=6, hk=4, dv=8)
    with pytest.raises(ValueError, match="query_padding_mask == key_padding_mask"):
        generate_qkv(
            q6, k6, v6, _mask_from_lengths([1, 2, 3], 6), _mask_from_lengths([1, 2, 4], 6), qkvpacked=True
        )
    with pytest.raises(ValueError, match="query_padding_mask == key_padding_mask"):
        generate_qkv(q6, k6, v6, _mask_from_lengths([1, 2, 3], 6), None, qkvpacked=True)
    with pytest.raises(ValueError, match="k must have shape"):
        generate_qkv(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v must have shape"):
        generate_qkv(q, k, v[:, :3])
    with pytest.raises(ValueError, match="4-D"):
        generate_qkv(q[0], k, v)


# ---------------------------------------------------------------------------------------- masks
def _band_visible(sq: int, sk: int, left: int | None, right: int | None, sink: int = 0) -> torch.Tensor:
    """(sq, sk) bool: key j visible for query i when d - left <= j <= d + right (d = i + sk - sq), or j < sink."""
    ones = torch.ones(sq, sk, dtype=torch.bool)
    vis = ones.tril(sk - sq + right) if right is not None else ones
    if left is not None:
        in_left = ones.triu(sk - sq - left)
        in_left[:, :sink] = True
        vis = vis & in_left
    return vis


@pytest.mark.parametrize(
    "window,sink",
    [
        ((None, 0), 0),
        ((None, 2), 0),
        ((2, 0), 0),
        ((3, 1), 0),
        ((0, 0), 0),
        ((1, 0), 2),
        ((2, None), 1),
        ((4, 3), 3),
    ],
)
@pytest.mark.parametrize("sq,sk", [(5, 5), (3, 8), (8, 3)])
def test_construct_local_mask_is_the_band(window, sink, sq, sk):
    mask = construct_local_mask(sq, sk, window, sink)
    assert mask.shape == (sq, sk) and mask.dtype == torch.bool
    assert torch.equal(~mask, _band_visible(sq, sk, *window, sink=sink))


def test_construct_local_mask_no_window_and_padding():
    assert not construct_local_mask(4, 6).any()
    assert construct_local_mask(4, 6).shape == (4, 6)
    torch.manual_seed(0)
    qlens, klens = [5, 2, 4], [6, 7, 1]
    qmask, kmask = _mask_from_lengths(qlens, 5), _mask_from_lengths(klens, 7)
    for window, sink in (((None, 0), 0), ((2, 1), 1), ((1, None), 0)):
        mask = construct_local_mask(5, 7, window, sink, qmask, kmask)
        assert mask.shape == (3, 1, 5, 7)
        for b, (ql, kl) in enumerate(zip(qlens, klens)):
            # the sequence's own rows / keys follow the unpadded mask of its lengths
            torch.testing.assert_close(mask[b, 0, :ql, :kl], ~_band_visible(ql, kl, *window, sink=sink))


def test_construct_local_mask_key_leftpad():
    leftpad = torch.tensor([0, 2, 3])
    klens = [5, 3, 2]
    kmask = _mask_from_lengths(klens, 5, leftpad.tolist())
    for window in ((None, 0), (1, 0), (2, 2)):
        mask = construct_local_mask(4, 5, window, 0, None, kmask, key_leftpad=leftpad)
        assert mask.shape == (3, 1, 4, 5)
        for b, (p, kl) in enumerate(zip(leftpad.tolist(), klens)):
            assert mask[b, 0, :, :p].all()  # left-padding slots are never visible
            torch.testing.assert_close(mask[b, 0, :, p : p + kl], ~_band_visible(4, kl, *window))


@pytest.mark.parametrize("chunk", [1, 2, 3, 8])
@pytest.mark.parametrize("sq,sk", [(6, 6), (3, 7), (7, 3)])
def test_construct_chunk_mask(chunk, sq, sk):
    mask = construct_chunk_mask(sq, sk, chunk)
    assert mask.shape == (sq, sk)
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    d = i + sk - sq  # the query's key position; its chunk is floor(d / chunk)
    expected_visible = torch.div(d, chunk, rounding_mode="floor") == torch.div(
        j, chunk, rounding_mode="floor"
    )
    assert torch.equal(~mask, expected_visible)
    qlens, klens = [sq, max(sq - 2, 1)], [sk, max(sk - 1, 1)]
    mask = construct_chunk_mask(sq, sk, chunk, _mask_from_lengths(qlens, sq), _mask_from_lengths(klens, sk))
    for b, (ql, kl) in enumerate(zip(qlens, klens)):
        torch.testing.assert_close(mask[b, 0, :ql, :kl], construct_chunk_mask(ql, kl, chunk))
    with pytest.raises(ValueError, match="attention_chunk"):
        construct_chunk_mask(sq, sk, 0)


# --------------------------------------------------------------------------------- attention_ref
def _visibility(
    batch, sq, sk, qmask, kmask, window=(None, None), causal=False, sink=0, chunk=0, leftpad=None
) -> torch.Tensor:
    """(batch, sq, sk) bool by the documented rules, element by element."""
    left, right = window
    if causal:
        right = 0
    qlens, klens = _lengths(qmask, batch, sq), _lengths(kmask, batch, sk)
    vis = torch.zeros(batch, sq, sk, dtype=torch.bool)
    for b in range(batch):
        p = int(leftpad[b]) if leftpad is not None else 0
        for i in range(sq):
            if qmask is not None and not qmask[b, i]:
                continue
            d = i + klens[b] - qlens[b]
            for j in range(sk):
                if kmask is not None and not kmask[b, j]:
                    continue
                pos = j - p
                if pos < 0:
                    continue
                if right is not None and pos > d + right:
                    continue
                if left is not None and pos < d - left and pos >= sink:
                    continue
                if chunk and not (d - d % chunk <= pos < d - d % chunk + chunk):
                    continue
                vis[b, i, j] = True
    return vis


def _sdpa(q, k, v, vis, bias=None, scale=None):
    """SDPA (math, float64) with a (batch, sq, sk) visibility mask; rows without a visible key give 0."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    empty = ~vis.any(-1)
    allowed = (vis | empty[..., None])[:, None]  # empty rows: anything finite, zeroed below
    mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
    if bias is not None:
        mask = mask + bias
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    ).transpose(1, 2)
    return out.masked_fill(empty[:, :, None, None], 0.0)


def _probabilities(q, k, vis, bias=None, scale=None):
    """SDPA's attention probabilities (batch, nheads, sq, sk): SDPA of an identity value matrix."""
    batch, sk, hk = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(sk, dtype=q.dtype).expand(batch, hk, sk, sk).transpose(1, 2)  # (b, sk, hk, sk)
    return _sdpa(q, k, eye, vis, bias, scale).transpose(1, 2)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "causal_sq_lt_sk": {"causal": True, "sq": 4, "sk": 9},
    "causal_sq_gt_sk": {"causal": True, "sq": 9, "sk": 4},
    "window": {"window": (2, 1), "sk": 10},
    "window_right_only": {"window": (None, 2)},
    "window_left_only": {"window": (3, None)},
    "window_sink": {"window": (1, 0), "sink": 2, "sk": 10},
    "chunk": {"chunk": 3, "sk": 10},
    "chunk_causal": {"chunk": 4, "causal": True},
    "padding": {"padding": True},
    "padding_causal_window": {"padding": True, "causal": True, "window": (3, None)},
    "gqa": {"h": 6, "hk": 2, "causal": True},
    "mqa": {"h": 4, "hk": 1, "padding": True},
    "leftpad_window": {"leftpad": True, "window": (2, 0)},
    "leftpad_chunk": {"leftpad": True, "chunk": 2, "causal": True},
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_ref_matches_sdpa(name):
    case = CASES[name]
    torch.manual_seed(len(name))
    batch, sq, sk = 3, case.get("sq", 7), case.get("sk", 8)
    h, hk = case.get("h", 4), case.get("hk", 2)
    q = torch.randn(batch, sq, h, 16, dtype=F64, requires_grad=True)
    k = torch.randn(batch, sk, hk, 16, dtype=F64, requires_grad=True)
    v = torch.randn(batch, sk, hk, 12, dtype=F64, requires_grad=True)
    qmask = kmask = leftpad = None
    if case.get("padding"):
        qmask = _mask_from_lengths([sq, 2, 0][:batch], sq)
        kmask = _mask_from_lengths([sk - 3, sk, 1], sk)
    if case.get("leftpad"):
        leftpad = torch.tensor([0, 2, 5])
        kmask = _mask_from_lengths([sk, sk - 2, 3], sk, leftpad.tolist())
    window = case.get("window", (None, None))
    kwargs = {
        "causal": case.get("causal", False),
        "window_size": window,
        "sink_token_length": case.get("sink", 0),
        "attention_chunk": case.get("chunk", 0),
    }
    out, attn = attention_ref(q, k, v, qmask, kmask, key_leftpad=leftpad, **kwargs)
    vis = _visibility(
        batch, sq, sk, qmask, kmask, window, kwargs["causal"], kwargs["sink_token_length"],
        kwargs["attention_chunk"], leftpad,
    )  # fmt: skip
    assert vis.any() and (name == "plain" or not vis.all())  # the case masks something and leaves something
    ref = _sdpa(q, k, v, vis)
    assert out.dtype == F64 and out.shape == (batch, sq, h, 12) and attn.shape == (batch, h, sq, sk)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(attn, _probabilities(q.detach(), k.detach(), vis), **TOL)
    g = torch.randn_like(out)
    for ours, theirs in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, **TOL)


def _inputs(batch=2, sq=6, sk=7, h=4, hk=2, d=8, dv=8, requires_grad=True):
    torch.manual_seed(batch * 100 + sq * 10 + sk)
    return (
        torch.randn(batch, sq, h, d, dtype=F64, requires_grad=requires_grad),
        torch.randn(batch, sk, hk, d, dtype=F64, requires_grad=requires_grad),
        torch.randn(batch, sk, hk, dv, dtype=F64, requires_grad=requires_grad),
    )


def test_attention_ref_qv_term():
    q, k, v = _inputs(dv=6)
    qv = torch.randn(2, 6, 4, 6, dtype=F64, requires_grad=True)
    out, _ = attention_ref(q, k, v, qv=qv, causal=True)
    vis = _visibility(2, 6, 7, None, None, causal=True)
    # q . k + qv . v is one product over the concatenated head dims, scaled by 1 / sqrt(d + dv)
    ref = _sdpa(torch.cat([q, qv], dim=-1), torch.cat([k, v], dim=-1), v, vis, scale=1 / math.sqrt(8 + 6))
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    for ours, theirs in zip(_grads(out, (q, k, v, qv), g), _grads(ref, (q, k, v, qv), g)):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_attention_ref_softcap_bias_and_learnable_sink():
    q, k, v = _inputs()
    kmask = _mask_from_lengths([7, 4], 7)
    bias = torch.randn(2, 4, 6, 7, dtype=F64)
    sink = torch.randn(4, dtype=F64, requires_grad=True)
    softcap = 0.7
    out, attn = attention_ref(
        q,
        k,
        v,
        key_padding_mask=kmask,
        attn_bias=bias,
        softcap=softcap,
        learnable_sink=sink,
        window_size=(2, 0),
    )
    vis = _visibility(2, 6, 7, None, kmask, (2, 0))
    # the definition: capped scores, masked, plus bias; one extra softmax column per head holding the sink
    kr, vr = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, kr) / math.sqrt(8)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~vis[:, None], float("-inf")) + bias
    sink_col = sink[None, :, None, None].expand(2, 4, 6, 1)
    probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    ref = torch.einsum("bhts,bshd->bthd", probs, vr)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(attn, probs, **TOL)
    g = torch.randn_like(out)
    for ours, theirs in zip(_grads(out, (q, k, v, sink), g), _grads(ref, (q, k, v, sink), g)):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_attention_ref_fully_masked_rows_and_sink_rows():
    q, k, v = _inputs()
    kmask = _mask_from_lengths([7, 0], 7)  # the second sequence has no key
    for sink in (None, torch.zeros(4, dtype=F64)):
        out, attn = attention_ref(q, k, v, key_padding_mask=kmask, learnable_sink=sink)
        assert torch.isfinite(out).all() and torch.isfinite(attn).all()
        assert out[1].eq(0).all() and attn[1].eq(0).all()
        g = torch.randn_like(out)
        assert all(torch.isfinite(t).all() for t in _grads(out, (q, k, v), g))


def test_attention_ref_descales():
    q, k, v = _inputs(h=6, hk=3)
    qd, kd, vd = (torch.rand(2, 3, dtype=F64) + 0.5 for _ in range(3))
    out, _ = attention_ref(q, k, v, q_descale=qd, k_descale=kd, v_descale=vd, causal=True)
    vis = _visibility(2, 6, 7, None, None, causal=True)
    # q's descale is per kv head: query head j belongs to kv head j // (nheads / nheads_k)
    q_scaled = q * qd.repeat_interleave(2, dim=1)[:, None, :, None]
    ref = _sdpa(q_scaled, k * kd[:, None, :, None], v * vd[:, None, :, None], vis)
    torch.testing.assert_close(out, ref, **TOL)


def test_attention_ref_dropout_mask():
    q, k, v = _inputs()
    qmask = _mask_from_lengths([6, 3], 6)
    torch.manual_seed(5)
    keep = torch.rand(2, 4, 6, 7) > 0.3
    out, attn = attention_ref(q, k, v, query_padding_mask=qmask, dropout_p=0.3, dropout_mask=keep)
    vis = _visibility(2, 6, 7, qmask, None)
    probs = _probabilities(q, k, vis)
    torch.testing.assert_close(attn, probs, **TOL)  # before dropout
    ref = torch.einsum("bhts,bshd->bthd", probs * keep, v.repeat_interleave(2, 2)) / 0.7
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    for ours, theirs in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_attention_ref_dtypes_and_options():
    q, k, v = _inputs(requires_grad=False)
    vis = _visibility(2, 6, 7, None, None, causal=True)
    ref = _sdpa(q, k, v, vis)
    # reorder_ops and upcast=False: the same math in float64
    for kwargs in ({"reorder_ops": True}, {"upcast": False}):
        torch.testing.assert_close(attention_ref(q, k, v, causal=True, **kwargs)[0], ref, **TOL)
    # float32 inputs: computed in float32 (upcast) and returned in float32
    out32, attn32 = attention_ref(q.float(), k.float(), v.float(), causal=True)
    assert out32.dtype == attn32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-5)
    # float16 inputs: returned in float16, computed in float32 (closer than a float16 computation)
    out16, _ = attention_ref(q.half(), k.half(), v.half(), causal=True)
    ref16 = _sdpa(q.half().double(), k.half().double(), v.half().double(), vis)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.double(), ref16, atol=2e-3, rtol=2e-3)
    # intermediate_dtype: the probabilities rounded through it before the product with v
    out_bf, attn = attention_ref(q, k, v, causal=True, intermediate_dtype=torch.bfloat16)
    probs = _probabilities(q, k, vis)
    expected = torch.einsum("bhts,bshd->bthd", probs.bfloat16().double(), v.repeat_interleave(2, 2))
    torch.testing.assert_close(out_bf, expected, **TOL)
    assert not torch.allclose(out_bf, ref, atol=1e-6)


def test_attention_ref_errors():
    q, k, v = _inputs(requires_grad=False)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_ref(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="multiple"):
        attention_ref(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="expected"):
        attention_ref(q, k, v[:, :4])
    with pytest.raises(ValueError, match="expected"):
        attention_ref(q, k[..., :4], v)
