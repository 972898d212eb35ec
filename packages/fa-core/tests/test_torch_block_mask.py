"""PyTorch's FlexAttention ``BlockMask`` (``torch.nn.attention.flex_attention.create_block_mask``) as the
block mask of our kernels: converted by :func:`fa_core.block_sparse.as_block_mask`, the forward (and, with
fa-backward, the gradients) equal the reference with the same element mask."""

from __future__ import annotations

import pytest
import torch
import triton

from fa_core import attention_ref, flash_attn_forward
from fa_core.block_sparse import (
    BlockMask,
    as_block_mask,
    block_mask_to_dense,
    from_torch_block_mask,
    is_torch_block_mask,
    transpose_block_mask,
)
from fa_core.errors import FlashAttnValueError
from fa_core.score_mods import prefix_lm, prefix_lm_torch
from fa_core.testing import DEVICE, assert_close_2x, poisoned

flex = pytest.importorskip("torch.nn.attention.flex_attention")

DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
HI = torch.float64 if DEVICE == "cpu" else torch.float32
WINDOW = 20
#: documents per batch row, boundaries on multiples of 32 (so the block mask alone is exact at block 32)
DOCS = torch.tensor([[0] * 32 + [1] * 64, [0] * 64 + [1] * 32], device=DEVICE)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _sliding(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)


def _document(b, h, q_idx, kv_idx):
    return DOCS[b, q_idx] == DOCS[b, kv_idx]


def _document_causal(b, h, q_idx, kv_idx):
    return (DOCS[b, q_idx] == DOCS[b, kv_idx]) & (q_idx >= kv_idx)


def _everything(b, h, q_idx, kv_idx):
    return q_idx >= 0


# name: (mask fn, B of the mask (None = broadcast), (seqlen_q, seqlen_k), torch BLOCK_SIZE, built-in rules)
CASES = {
    "causal": (_causal, None, (96, 96), 32, {"causal": True}),
    "causal_block16_ragged": (_causal, None, (75, 75), 16, {"causal": True}),
    "sliding_window": (_sliding, None, (96, 96), 32, {"window_size": (WINDOW, 0)}),
    "document": (_document, 2, (96, 96), 32, {}),
    "document_causal": (_document_causal, 2, (96, 96), 32, {"causal": True}),
    "no_mask_ragged_lengths": (_everything, None, (70, 90), 32, {}),
    "causal_block48": (_causal, None, (100, 100), 48, {"causal": True}),
}


def _inputs(sq, sk, dtype, batch=2, h=2, hk=1, d=16, grad=False):
    q = torch.randn(batch, sq, h, d, device=DEVICE, dtype=dtype, requires_grad=grad)
    k = torch.randn(batch, sk, hk, d, device=DEVICE, dtype=dtype, requires_grad=grad)
    v = torch.randn(batch, sk, hk, d, device=DEVICE, dtype=dtype, requires_grad=grad)
    return q, k, v


def _element_mask_fn(fn, mask_batch, sq, sk):
    """The torch mask as an element mask function for the reference (FlexAttention's create_mask)."""
    dense = flex.create_mask(fn, mask_batch, 1, sq, sk, device=DEVICE)  # (B|1, 1, sq, sk)

    def mask(b, h, q_idx, kv_idx):
        return dense[b if dense.shape[0] > 1 else b * 0, h * 0, q_idx, kv_idx]

    return mask


@pytest.mark.parametrize(
    "case,dtype",
    [(c, torch.float32) for c in CASES]
    + [("causal_block16_ragged", torch.float16), ("document", torch.float16)],
)
def test_forward_matches_reference(case, dtype):
    if DEVICE == "cuda":
        dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    torch.manual_seed(len(case) * 7 + (dtype == torch.float16))
    fn, mb, (sq, sk), bs, rules = CASES[case]
    tbm = flex.create_block_mask(fn, mb, None, sq, sk, device=DEVICE, BLOCK_SIZE=bs)
    q, k, v = _inputs(sq, sk, dtype)
    bm = as_block_mask(tbm, 2, 2, sq, sk, **rules)
    assert isinstance(bm, BlockMask) and min(bm.block_size) >= 32
    res = flash_attn_forward(q, k, v, block_mask=bm, out=poisoned(q.shape, dtype, DEVICE), **rules)
    mask = _element_mask_fn(fn, mb, sq, sk)
    ref, ref_lse = attention_ref(q, k, v, mask_mod=mask, dtype=HI, **rules)
    low, low_lse = attention_ref(q, k, v, mask_mod=mask, upcast=False, **rules)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-3)
    # the listed blocks cover every element the torch mask lets through, and skip whole blocks it hides
    listed = block_mask_to_dense(bm, sq, sk)
    dense = flex.create_mask(fn, mb, 1, sq, sk, device=DEVICE)
    assert bool((listed | ~dense).all())
    if case in ("causal", "document"):
        assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) < bm.kv_indices[..., 0].numel() * 3


@pytest.mark.parametrize("case", ["causal_block16_ragged", "document_causal", "sliding_window"])
def test_backward_matches_reference(case):
    prog = pytest.importorskip("fa_backward.programmable")
    torch.manual_seed(len(case) + 100)
    fn, mb, (sq, sk), bs, rules = CASES[case]
    tbm = flex.create_block_mask(fn, mb, None, sq, sk, device=DEVICE, BLOCK_SIZE=bs)
    q, k, v = _inputs(sq, sk, DTYPE, grad=True)
    bm = as_block_mask(tbm, 2, 2, sq, sk, **rules)
    out, _ = prog.attention(q, k, v, block_mask=bm, **rules)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    mask = _element_mask_fn(fn, mb, sq, sk)
    grads = {}
    for name, kw in (("ref", {"dtype": HI}), ("low", {"upcast": False})):
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o, _ = attention_ref(qr, kr, vr, mask_mod=mask, **rules, **kw)
        grads[name] = torch.autograd.grad(o, (qr, kr, vr), g.to(o.dtype))
    for i, (name, ours) in enumerate((("dq", dq), ("dk", dk), ("dv", dv))):
        assert_close_2x(ours, grads["ref"][i], grads["low"][i], name)


def test_torch_block_mask_passed_directly():
    """``block_mask=`` takes the torch mask itself wherever it takes ours (the entry points normalize it)."""
    torch.manual_seed(3)
    tbm = flex.create_block_mask(_causal, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)
    q, k, v = _inputs(64, 64, DTYPE)
    res = flash_attn_forward(q, k, v, causal=True, block_mask=tbm)
    ref, ref_lse = attention_ref(q, k, v, causal=True, dtype=HI)
    low, low_lse = attention_ref(q, k, v, causal=True, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-3)


def test_python_mask_mod_not_expressible_raises_then_triton_twin_is_exact():
    """A prefix-LM mask is neither causal nor a window: without a kernel mask_mod its partial blocks would be
    wrong, so the conversion refuses (naming block_mask and mask_mod), unless the built-in rules already hide
    what it hides (with causal=True); with the @triton.jit twin it is exact."""
    torch.manual_seed(5)
    sq = sk = 96
    tbm = flex.create_block_mask(prefix_lm_torch, None, None, sq, sk, device=DEVICE, BLOCK_SIZE=32)
    with pytest.raises(FlashAttnValueError, match="block_mask.*mask_mod"):
        as_block_mask(tbm, 2, 2, sq, sk)
    with pytest.raises(FlashAttnValueError, match="block_mask"):  # a window reaching ahead does not either
        as_block_mask(tbm, 2, 2, sq, sk, window_size=(-1, 8))
    as_block_mask(tbm, 2, 2, sq, sk, causal=True)  # within causal the prefix adds nothing: exact, accepted
    q, k, v = _inputs(sq, sk, DTYPE)
    bm = as_block_mask(tbm, 2, 2, sq, sk, mask_mod=prefix_lm)
    res = flash_attn_forward(q, k, v, block_mask=bm, mask_mod=prefix_lm)
    ref, ref_lse = attention_ref(q, k, v, mask_mod=prefix_lm_torch, dtype=HI)
    low, low_lse = attention_ref(q, k, v, mask_mod=prefix_lm_torch, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-3)


def test_merging_small_blocks_checks_unlisted_neighbours():
    """BLOCK_SIZE 16 merges into 32: a hand-made mask whose 16-blocks come in listed pairs converts exactly;
    one that lists a single 16-block of a pair would expose its unlisted neighbour, and raises."""
    torch.manual_seed(9)
    sq = sk = 64
    pairs = torch.zeros(1, 1, 4, 4, dtype=torch.bool, device=DEVICE)
    pairs[..., 0:2, 0:2] = True
    pairs[..., 2:4, 0:4] = True

    def from_dense(blocks):
        num = blocks.sum(-1, dtype=torch.int32)
        idx = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return flex.BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16, seq_lengths=(sq, sk))

    bm = as_block_mask(from_dense(pairs), 1, 2, sq, sk)
    assert bm.block_size == (32, 32)
    q, k, v = _inputs(sq, sk, DTYPE, batch=1)
    res = flash_attn_forward(q, k, v, block_mask=bm)
    element = pairs.repeat_interleave(16, 2).repeat_interleave(16, 3)

    def mask(b, h, q_idx, kv_idx):
        return element[b * 0, h * 0, q_idx, kv_idx]

    ref, _ = attention_ref(q, k, v, mask_mod=mask, dtype=HI)
    low, _ = attention_ref(q, k, v, mask_mod=mask, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    single = pairs.clone()
    single[..., 0, 1] = False
    with pytest.raises(FlashAttnValueError, match=r"BLOCK_SIZE \(16, 16\)"):
        as_block_mask(from_dense(single), 1, 2, sq, sk)


def test_lengths_cached_and_transposed_index():
    """A mask built for longer sequences is cut to the call's blocks (FlexAttention does the same), one built
    for shorter ones raises; conversions are cached per torch mask and call, so the backward's transposed
    index is built once."""
    tbm = flex.create_block_mask(_causal, None, None, 128, 128, device=DEVICE, BLOCK_SIZE=32)
    bm = as_block_mask(tbm, 1, 1, 96, 96, causal=True)
    assert bm.kv_indices.shape[-2:] == (3, 3)
    assert as_block_mask(tbm, 1, 1, 96, 96, causal=True) is bm
    assert as_block_mask(tbm, 1, 1, 128, 128, causal=True) is not bm
    assert transpose_block_mask(bm, 3) is transpose_block_mask(
        as_block_mask(tbm, 1, 1, 96, 96, causal=True), 3
    )
    with pytest.raises(FlashAttnValueError, match="block_mask was built for seq_lengths"):
        as_block_mask(tbm, 1, 1, 160, 128, causal=True)
    assert is_torch_block_mask(tbm) and not is_torch_block_mask(bm)
    assert as_block_mask(bm, 1, 1, 96, 96) is bm and as_block_mask(None, 1, 1, 96, 96) is None


def test_document_misaligned_with_blocks_raises():
    """Document boundaries inside a block make that block partial with a document mask_mod, which no
    built-in rule expresses: refused rather than computed wrong."""
    docs = torch.tensor([[0] * 40 + [1] * 56], device=DEVICE)

    def doc(b, h, q_idx, kv_idx):
        return docs[b * 0, q_idx] == docs[b * 0, kv_idx]

    tbm = flex.create_block_mask(doc, None, None, 96, 96, device=DEVICE, BLOCK_SIZE=32)
    with pytest.raises(FlashAttnValueError, match="block_mask"):
        from_torch_block_mask(tbm, 1, 1, 96, 96)


@triton.jit
def _never(b, h, q_idx, kv_idx):
    return q_idx < 0


def test_kernel_mask_mod_is_trusted_without_check():
    """With a kernel mask_mod the conversion does not evaluate the torch one (the kernel's decides)."""
    tbm = flex.create_block_mask(prefix_lm_torch, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=32)
    bm = as_block_mask(tbm, 1, 1, 64, 64, mask_mod=_never)
    assert int(bm.kv_num_blocks.sum()) > 0


def test_torch_block_mask_through_autograd_and_backward():
    """The differentiable path (fa_backward.programmable.attention) and the standalone backward take the
    torch mask too: gradients match the reference and the standalone backward's."""
    prog = pytest.importorskip("fa_backward.programmable")
    from fa_backward.backward import flash_attn_backward

    torch.manual_seed(4)
    fn, mb, (sq, sk), bs, rules = CASES["document_causal"]
    tbm = flex.create_block_mask(fn, mb, None, sq, sk, device=DEVICE, BLOCK_SIZE=bs)
    q, k, v = _inputs(sq, sk, DTYPE, grad=True)
    out, lse = prog.attention(q, k, v, block_mask=tbm, **rules)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    mask = _element_mask_fn(fn, mb, sq, sk)
    grads, outs = {}, {}
    for name, kw in (("ref", {"dtype": HI}), ("low", {"upcast": False})):
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o, _ = attention_ref(qr, kr, vr, mask_mod=mask, **rules, **kw)
        outs[name] = o
        grads[name] = torch.autograd.grad(o, (qr, kr, vr), g.to(o.dtype))
    assert_close_2x(out, outs["ref"], outs["low"], "out")
    for i, (name, ours) in enumerate((("dq", dq), ("dk", dk), ("dv", dv))):
        assert_close_2x(ours, grads["ref"][i], grads["low"][i], name)
    res = flash_attn_backward(
        g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, None, None, 0.0,
        causal=bool(rules.get("causal", False)), block_mask=tbm,
    )  # fmt: skip
    for ours, standalone in zip((dq, dk, dv), res[:3], strict=True):
        torch.testing.assert_close(standalone, ours, rtol=0, atol=0)
