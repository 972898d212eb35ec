"""Beyond flash-attn 2 in the forward: attention chunks, learnable sinks, V head dim != QK head dim."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fa_core import attention_ref, attention_varlen_ref, flash_attn_forward, flash_attn_varlen_forward
from fa_core.block_sparse import block_mask_from_dense, block_mask_to_dense, create_block_mask
from fa_core.testing import DEVICE, assert_close_2x, poisoned

DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
HI = torch.float64 if DEVICE == "cpu" else torch.float32

CASES = {
    "chunk": {"attention_chunk": 16},
    "chunk_causal": {"attention_chunk": 24, "causal": True},
    "chunk_window_sq_gt_sk": {"attention_chunk": 8, "window_size": (5, 3), "_shape": (70, 41)},
    "sink": {"sink": True},
    "sink_causal_empty_rows": {"sink": True, "causal": True, "_shape": (60, 20)},
    "sink_chunk_softcap_vdim": {"sink": True, "attention_chunk": 32, "softcap": 4.0, "_dv": 24},
}


@pytest.mark.parametrize("case", list(CASES))
def test_programmable_dense(case):
    torch.manual_seed(hash(case) % 2**31)
    kw = dict(CASES[case])
    sq, sk = kw.pop("_shape", (45, 77))
    dv = kw.pop("_dv", 32)
    h, hk, d = 4, 2, 32
    q = torch.randn(2, sq, h, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(2, sk, hk, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(2, sk, hk, dv, device=DEVICE, dtype=DTYPE)
    if kw.pop("sink", False):
        kw["learnable_sink"] = torch.randn(h, device=DEVICE) * 2
    res = flash_attn_forward(q, k, v, out=poisoned((2, sq, h, dv), DTYPE, DEVICE), **kw)
    ref, ref_lse = attention_ref(q, k, v, dtype=HI, **kw)
    low, low_lse = attention_ref(q, k, v, upcast=False, **kw)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-3)
    if "learnable_sink" in kw:
        assert torch.isfinite(res.lse).all()


def test_programmable_varlen_sink_chunk():
    torch.manual_seed(11)
    lens = [5, 40, 0, 33]
    cu = torch.tensor([0, 5, 45, 45, 78], dtype=torch.int32, device=DEVICE)
    q = torch.randn(78, 4, 16, device=DEVICE, dtype=DTYPE)
    k = torch.randn(78, 1, 16, device=DEVICE, dtype=DTYPE)
    v = torch.randn(78, 1, 16, device=DEVICE, dtype=DTYPE)
    sink = torch.randn(4, device=DEVICE)
    kw = {"causal": True, "attention_chunk": 16, "learnable_sink": sink}
    res = flash_attn_varlen_forward(q, k, v, cu, cu, max(lens), max(lens), **kw)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu, cu, dtype=HI, **kw)
    low, low_lse = attention_varlen_ref(q, k, v, cu, cu, upcast=False, **kw)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-3)


def test_programmable_bad_input():
    q = torch.randn(1, 8, 2, 16, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="attention_chunk"):
        flash_attn_forward(q, q, q, attention_chunk=-1)
    with pytest.raises(ValueError, match="learnable_sink must have shape"):
        flash_attn_forward(q, q, q, learnable_sink=torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="learnable_sink must be"):
        flash_attn_forward(q, q, q, learnable_sink=torch.zeros(2, device=DEVICE, dtype=torch.int32))


# ----------------------------------------------------------------------------- user score_mod / mask_mod
@triton.jit
def _rel_bias(score, b, h, q_idx, kv_idx):
    # a per-head relative-position bias, T5/ALiBi-like, plus a per-batch offset
    return score + 0.05 * (h + 1) * (kv_idx - q_idx).to(tl.float32) / 16.0 + 0.1 * b


def _rel_bias_ref(score, b, h, q_idx, kv_idx):
    return score + 0.05 * (h + 1) * (kv_idx - q_idx).to(score.dtype) / 16.0 + 0.1 * b


@triton.jit
def _striped_mask(b, h, q_idx, kv_idx):
    # drop every third key, and for odd heads keys ahead of the query by more than 5
    keep = (kv_idx % 3) != 1
    return keep & ((h % 2 == 0) | (kv_idx <= q_idx + 5))


def _striped_mask_ref(b, h, q_idx, kv_idx):
    keep = (kv_idx % 3) != 1
    return keep & ((h % 2 == 0) | (kv_idx <= q_idx + 5))


MOD_CASES = {
    "score_mod": {"score_mod": (_rel_bias, _rel_bias_ref)},
    "mask_mod": {"mask_mod": (_striped_mask, _striped_mask_ref)},
    "both_causal_softcap": {
        "score_mod": (_rel_bias, _rel_bias_ref),
        "mask_mod": (_striped_mask, _striped_mask_ref),
        "causal": True,
        "softcap": 5.0,
    },
}


@pytest.mark.parametrize("case", list(MOD_CASES))
def test_user_mods(case):
    torch.manual_seed(hash(case) % 2**31)
    kw = dict(MOD_CASES[case])
    kern_kw = {k_: (v_[0] if isinstance(v_, tuple) else v_) for k_, v_ in kw.items()}
    ref_kw = {k_: (v_[1] if isinstance(v_, tuple) else v_) for k_, v_ in kw.items()}
    q = torch.randn(2, 37, 4, 32, device=DEVICE, dtype=DTYPE)
    k = torch.randn(2, 50, 2, 32, device=DEVICE, dtype=DTYPE)
    v = torch.randn(2, 50, 2, 32, device=DEVICE, dtype=DTYPE)
    res = flash_attn_forward(q, k, v, out=poisoned(q.shape, DTYPE, DEVICE), return_probs=True, **kern_kw)
    ref, ref_lse = attention_ref(q, k, v, dtype=HI, **ref_kw)
    low, low_lse = attention_ref(q, k, v, upcast=False, **ref_kw)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-3)
    assert torch.isfinite(res.probs).all()


def test_mods_must_be_triton_functions():
    q = torch.randn(1, 8, 2, 16, device=DEVICE, dtype=DTYPE)
    with pytest.raises(TypeError, match="score_mod must be a @triton.jit function"):
        flash_attn_forward(q, q, q, score_mod=_rel_bias_ref)
    with pytest.raises(TypeError, match="mask_mod must be a @triton.jit function"):
        flash_attn_forward(q, q, q, mask_mod=lambda b, h, i, j: True)


# ----------------------------------------------------------------------------- block-sparse masks
def _sliding_blocks(b, h, q_idx, kv_idx):
    # a "local + global" pattern: the first 32 keys, plus keys within 40 positions of the query
    return (kv_idx < 32) | ((q_idx - kv_idx).abs() <= 40)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_from_mask_fn(causal):
    torch.manual_seed(21 + causal)
    sq, sk = 150, 170
    q = torch.randn(2, sq, 4, 16, device=DEVICE, dtype=DTYPE)
    k = torch.randn(2, sk, 2, 16, device=DEVICE, dtype=DTYPE)
    v = torch.randn(2, sk, 2, 16, device=DEVICE, dtype=DTYPE)
    bm = create_block_mask(
        _sliding_blocks, None, None, sq, sk, block_size=(32, 32), device=DEVICE, full_blocks=False
    )
    assert 0 < int(bm.kv_num_blocks.sum()) < bm.kv_indices.numel()  # really sparse
    res = flash_attn_forward(q, k, v, causal=causal, block_mask=bm, out=poisoned(q.shape, DTYPE, DEVICE))
    ref, ref_lse = attention_ref(q, k, v, causal=causal, block_mask=bm, dtype=HI)
    low, low_lse = attention_ref(q, k, v, causal=causal, block_mask=bm, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-3)


@triton.jit
def _sliding_blocks_jit(b, h, q_idx, kv_idx):
    rel = q_idx - kv_idx
    return (kv_idx < 32) | ((rel <= 40) & (rel >= -40))


@pytest.mark.parametrize(
    "with_mask_mod,rules",
    [(False, {}), (True, {}), (False, {"causal": True}), (True, {"window_size": (40, 8)})],
    ids=["plain", "mask_mod", "causal", "mask_mod_window"],
)
def test_block_sparse_full_blocks_forward(with_mask_mod, rules):
    """Full blocks (``full_kv_*``: no mask_mod evaluation) and partial blocks through the forward; the
    reference honours the same split (FlexAttention's semantics). With causal / window, the full blocks'
    tiles that cut the band edge (and the ragged last key block) must still be masked."""
    torch.manual_seed(25 + with_mask_mod + 2 * len(rules))
    sq, sk = 128, 112
    q = torch.randn(1, sq, 2, 16, device=DEVICE, dtype=DTYPE)
    k = torch.randn(1, sk, 1, 16, device=DEVICE, dtype=DTYPE)
    v = torch.randn(1, sk, 1, 16, device=DEVICE, dtype=DTYPE)
    bm = create_block_mask(_sliding_blocks, None, None, sq, sk, block_size=(32, 32), device=DEVICE)
    assert bm.full_kv_num_blocks is not None and int(bm.full_kv_num_blocks.sum()) > 0
    kern = {"mask_mod": _sliding_blocks_jit} if with_mask_mod else {}
    ref_kw = {"mask_mod": _sliding_blocks} if with_mask_mod else {}
    res = flash_attn_forward(q, k, v, block_mask=bm, out=poisoned(q.shape, DTYPE, DEVICE), **kern, **rules)
    ref, ref_lse = attention_ref(q, k, v, block_mask=bm, dtype=HI, **ref_kw, **rules)
    low, low_lse = attention_ref(q, k, v, block_mask=bm, upcast=False, **ref_kw, **rules)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-3)


def test_block_sparse_per_head_dense_blocks_with_mask_mod():
    """Per-(batch, head) block lists from a dense boolean block mask, combined with a mask_mod."""
    torch.manual_seed(23)
    sq = sk = 96
    q = torch.randn(2, sq, 2, 16, device=DEVICE, dtype=DTYPE)
    k = torch.randn(2, sk, 2, 16, device=DEVICE, dtype=DTYPE)
    v = torch.randn(2, sk, 2, 16, device=DEVICE, dtype=DTYPE)
    blocks = torch.rand(2, 2, 3, 3, device=DEVICE) > 0.4
    blocks[..., 0] = True  # every query block sees at least its first key block
    bm = block_mask_from_dense(blocks, block_size=(32, 32))
    dense = block_mask_to_dense(bm, sq, sk)
    res = flash_attn_forward(q, k, v, block_mask=bm, mask_mod=_striped_mask)

    def both(b, h, q_idx, kv_idx):
        return dense & _striped_mask_ref(b, h, q_idx, kv_idx)

    ref, ref_lse = attention_ref(q, k, v, mask_mod=both, dtype=HI)
    low, low_lse = attention_ref(q, k, v, mask_mod=both, upcast=False)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=1e-3)


def test_block_mask_bad_input():
    q = torch.randn(1, 64, 2, 16, device=DEVICE, dtype=DTYPE)
    bm = create_block_mask(_sliding_blocks, None, None, 64, 64, block_size=(32, 32), device=DEVICE)
    with pytest.raises(TypeError, match="kv_num_blocks must be int32"):
        flash_attn_forward(q, q, q, block_mask=bm._replace(kv_num_blocks=bm.kv_num_blocks.long()))
    with pytest.raises(ValueError, match="kv_indices entries must lie"):
        flash_attn_forward(q, q, q, block_mask=bm._replace(kv_indices=bm.kv_indices + 5))
    with pytest.raises(ValueError, match="block_size"):
        flash_attn_forward(q, q, q, block_mask=bm._replace(block_size=(48, 32)))
    with pytest.raises(ValueError, match="query blocks"):
        flash_attn_forward(torch.randn(1, 200, 2, 16, device=DEVICE, dtype=DTYPE), q, q, block_mask=bm)
