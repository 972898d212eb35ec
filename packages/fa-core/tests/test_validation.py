"""Every input check of the forward raises a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

from fa_core import flash_attn_forward, flash_attn_varlen_forward
from fa_core.testing import DEVICE


def _qkv(b=1, s=8, h=2, hk=2, d=16, dtype=torch.float16, device=DEVICE):
    return (
        torch.randn(b, s, h, d, dtype=dtype, device=device),
        torch.randn(b, s, hk, d, dtype=dtype, device=device),
        torch.randn(b, s, hk, d, dtype=dtype, device=device),
    )


def _dense_cases():
    q, k, v = _qkv()
    return {
        "int_dtype": (dict(q=q.int(), k=k, v=v), TypeError, "q has dtype"),
        "float64": (dict(q=q.double(), k=k.double(), v=v.double()), TypeError, "q has dtype"),
        "mixed_dtype": (dict(q=q, k=k.float(), v=v), TypeError, "k has dtype"),
        "v_dtype": (dict(q=q, k=k, v=v.float()), TypeError, "v has dtype"),
        "not_tensor": (dict(q=q.tolist(), k=k, v=v), TypeError, "q must be a torch.Tensor"),
        "rank": (dict(q=q[0], k=k, v=v), ValueError, "q must have 4 dimensions"),
        "headdim_too_big": (
            dict(q=_qkv(d=264)[0], k=_qkv(d=264)[1], v=_qkv(d=264)[2]),
            ValueError,
            "head dim",
        ),
        "headdim_mismatch": (dict(q=q, k=_qkv(d=32)[1], v=v), ValueError, "k head dim"),
        "gqa_ratio": (dict(q=_qkv(h=3)[0], k=k, v=v), ValueError, "multiple of nheads_k"),
        "batch_mismatch": (dict(q=_qkv(b=2)[0], k=k, v=v), ValueError, "k batch"),
        "v_shape": (dict(q=q, k=k, v=v[:, :4]), ValueError, "v shape"),
        "last_dim_stride": (
            dict(q=q.transpose(-1, -2).contiguous().transpose(-1, -2), k=k, v=v),
            ValueError,
            "contiguous last dimension",
        ),
        "window": (dict(q=q, k=k, v=v, window_size=(-2, 0)), ValueError, "window_size left"),
        "window_pair": (dict(q=q, k=k, v=v, window_size=(1, 2, 3)), ValueError, "window_size must be a pair"),
        "dropout_high": (dict(q=q, k=k, v=v, dropout_p=1.0), ValueError, "dropout_p"),
        "dropout_neg": (dict(q=q, k=k, v=v, dropout_p=-0.1), ValueError, "dropout_p"),
        "softcap_neg": (dict(q=q, k=k, v=v, softcap=-1.0), ValueError, "softcap"),
        "alibi_shape": (
            dict(q=q, k=k, v=v, alibi_slopes=torch.ones(3, device=DEVICE)),
            ValueError,
            "alibi_slopes",
        ),
        "alibi_dtype": (
            dict(q=q, k=k, v=v, alibi_slopes=torch.ones(2, device=DEVICE, dtype=torch.float16)),
            TypeError,
            "alibi_slopes must be float32",
        ),
        "out_shape": (
            dict(q=q, k=k, v=v, out=torch.empty(1, 8, 2, 8, dtype=q.dtype, device=DEVICE)),
            ValueError,
            "out must be",
        ),
        "rng_state": (
            dict(q=q, k=k, v=v, rng_state=torch.zeros(3, dtype=torch.int64)),
            ValueError,
            "rng_state",
        ),
    }


def test_row_stride_too_large():
    """Tiles are addressed as a 64-bit row base plus 32-bit in-tile offsets: a sequence stride that could
    overflow them is refused, not silently wrapped."""
    q, _, v = _qkv(s=2)
    stride = 1 << 23
    storage = torch.randn(stride + 64, dtype=q.dtype, device=DEVICE)
    k = storage.as_strided((1, 2, 2, 16), (2 * stride, stride, 16, 1))
    with pytest.raises(ValueError, match="k has a sequence stride"):
        flash_attn_forward(q, k, v)


@pytest.mark.parametrize("case", list(_dense_cases()))
def test_dense_bad_input(case):
    kwargs, exc, match = _dense_cases()[case]
    with pytest.raises(exc, match=match):
        flash_attn_forward(**kwargs)


def test_different_devices():
    q, k, v = _qkv()
    meta = torch.empty_like(k, device="meta")
    with pytest.raises(ValueError, match="k is on meta"):
        flash_attn_forward(q, meta, v)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-without-interpreter message")
def test_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q is a CPU tensor"):
        flash_attn_forward(q, k, v)


def _varlen_inputs():
    q = torch.randn(10, 2, 16, dtype=torch.float16, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    return q, cu


def _varlen_cases():
    q, cu = _varlen_inputs()
    return {
        "cu_int64": (dict(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q must be int32"),
        "cu_rank": (dict(cu_seqlens_k=cu[None]), ValueError, "cu_seqlens_k must have 1 dimensions"),
        "cu_decreasing": (
            dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=DEVICE)),
            ValueError,
            "non-decreasing",
        ),
        "cu_total": (
            dict(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)),
            ValueError,
            "does not match the total",
        ),
        "cu_start": (
            dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32, device=DEVICE)),
            ValueError,
            r"cu_seqlens_q\[0\] must be 0",
        ),
        "cu_len": (
            dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32, device=DEVICE), max_seqlen_k=10),
            ValueError,
            "cu_seqlens_k has 2 entries",
        ),
        "max_seqlen_small": (dict(max_seqlen_q=5), ValueError, "max_seqlen_q = 5"),
        "seqused_dtype": (
            dict(seqused_k=torch.tensor([1, 2], device=DEVICE)),
            TypeError,
            "seqused_k must be int32",
        ),
        "seqused_len": (
            dict(seqused_k=torch.tensor([1], dtype=torch.int32, device=DEVICE)),
            ValueError,
            "seqused_k must have 2",
        ),
        "seqused_range": (
            dict(seqused_k=torch.tensor([5, 2], dtype=torch.int32, device=DEVICE)),
            ValueError,
            "seqused_k must lie",
        ),
        "rank": (dict(q=q[None]), ValueError, "q must have 3 dimensions"),
    }


@pytest.mark.parametrize("case", list(_varlen_cases()))
def test_varlen_bad_input(case):
    q, cu = _varlen_inputs()
    kwargs = dict(
        q=q, k=q.clone(), v=q.clone(), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6
    )
    override, exc, match = _varlen_cases()[case]
    kwargs.update(override)
    with pytest.raises(exc, match=match):
        flash_attn_varlen_forward(**kwargs)


def _full_mask(lead_partial=(1, 2), lead_full=(1, 2), nq=2, nk=2):
    """A 32x32-block mask for seqlen 64: partial lists with leading dims ``lead_partial``, full lists with
    ``lead_full`` (empty: no block listed, so only the layout is under test)."""
    from fa_core.block_sparse import BlockMask

    def lists(lead):
        return (
            torch.zeros(*lead, nq, dtype=torch.int32, device=DEVICE),
            torch.zeros(*lead, nq, nk, dtype=torch.int32, device=DEVICE),
        )

    pn, pi = lists(lead_partial)
    fn, fi = lists(lead_full)
    return BlockMask(pn, pi, (32, 32), fn, fi)


def _check(mask, **kw):
    from fa_core import validation as V

    q = torch.empty(1, 64, 2, 16, device=DEVICE)
    V.check_block_mask(mask, 1, 2, 64, 64, q, False, **kw)


def test_full_blocks_checked_by_check_block_mask():
    from types import SimpleNamespace

    good = _full_mask()
    _check(good)
    _check(good, full_like_partial=True)
    # a mask type without the full-block fields passes (read with getattr)
    _check(SimpleNamespace(kv_num_blocks=good.kv_num_blocks, kv_indices=good.kv_indices, block_size=(32, 32)))
    with pytest.raises(ValueError, match="must be given together"):
        _check(good._replace(full_kv_indices=None))
    with pytest.raises(TypeError, match="block_mask.full_kv_indices must be int32"):
        _check(good._replace(full_kv_indices=good.full_kv_indices.long()))
    with pytest.raises(TypeError, match="block_mask.full_kv_num_blocks must be a torch.Tensor"):
        _check(good._replace(full_kv_num_blocks=[0, 0]))
    with pytest.raises(ValueError, match="block_mask.full_kv_indices must have the partial lists' layout"):
        _check(good._replace(full_kv_indices=good.full_kv_indices[..., :1]))
    with pytest.raises(ValueError, match="block_mask.full_kv_num_blocks must have a contiguous last"):
        strided = torch.zeros(1, 2, 4, dtype=torch.int32, device=DEVICE)[..., ::2]
        _check(good._replace(full_kv_num_blocks=strided))
    bad = good.full_kv_num_blocks.clone()
    bad[0, 1, 1] = 3  # > full_kv_indices.shape[-1] = 2
    with pytest.raises(ValueError, match="full_kv_num_blocks entries must lie"):
        _check(good._replace(full_kv_num_blocks=bad))


def test_full_blocks_layout_forward_vs_backward():
    """The forward reads the full lists with their own strides (they may broadcast where the partial lists do
    not); ``full_like_partial`` (the backward) wants the partial lists' exact shapes."""
    mixed = _full_mask(lead_partial=(1, 2), lead_full=(1, 1))
    _check(mixed)
    with pytest.raises(
        ValueError, match="block_mask.full_kv_num_blocks must be shaped like the partial list"
    ):
        _check(mixed, full_like_partial=True)


def test_full_blocks_count_range_in_forward():
    q = torch.randn(1, 64, 2, 16, device=DEVICE)
    good = _full_mask()
    bad = good.full_kv_num_blocks.clone()
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="full_kv_num_blocks entries must lie"):
        flash_attn_forward(q, q, q, block_mask=good._replace(full_kv_num_blocks=bad))


def test_check_packed_names_the_argument():
    from fa_core.validation import check_packed

    good = torch.zeros(2, 5, 3, 4, 8)
    assert check_packed("qkv", good, 5, 2, 3) is good
    with pytest.raises(ValueError, match=r"qkv must have 3 slices along dim 2"):
        check_packed("qkv", torch.zeros(2, 5, 2, 4, 8), 5, 2, 3)
    with pytest.raises(ValueError, match="kv must have 4 dimensions"):
        check_packed("kv", good, 4, 1, 2)
    with pytest.raises(TypeError, match="kv must be a torch.Tensor"):
        check_packed("kv", [1, 2], 4, 1, 2)
