"""Garbage index values never make the forward kernel read or write outside its tensors.

With host value checks off (``fa_core.settings.override(value_checks=False)``, as under CUDA-graph capture or
``torch.compile``), ``cu_seqlens_q`` / ``cu_seqlens_k`` (non-monotone, negative, past the total),
``seqused_k`` (negative, past the sequence), ``leftpad_k``, block-sparse ``kv_num_blocks`` / ``kv_indices`` and
block-table entries out of range give garbage out, and nothing else: every input is a view into a larger
buffer whose guard regions hold NaN (a read there would put a NaN into the output), and every output is a view
into a larger buffer whose guards must keep their sentinel (a write there would change it).
"""

from __future__ import annotations

import pytest
import torch

from fa_core import flash_attn_forward, flash_attn_varlen_forward, settings
from fa_core.block_sparse import BlockMask
from fa_core.forward_launch import launch_forward
from fa_core.testing import DEVICE

#: float32 under the interpreter, float16 on a GPU
DT = torch.float32 if DEVICE == "cpu" else torch.float16
G = 48  # guard rows / pages on each side: larger than any garbage excursion below
SENTINEL = 7.25
H, HK, D = 4, 2, 32


def guarded(shape, dim=0, fill=float("nan"), dtype=DT):
    """``(buffer, view)``: ``view`` has ``shape`` and sits ``G`` entries into ``buffer`` along ``dim``; the
    buffer is filled with ``fill`` and the view with random values."""
    big_shape = list(shape)
    big_shape[dim] += 2 * G
    buf = torch.full(big_shape, fill, dtype=dtype, device=DEVICE)
    view = buf.narrow(dim, G, shape[dim])
    view.copy_(torch.randn(shape, dtype=dtype, device=DEVICE))
    return buf, view


def out_buffer(shape, dim=0, dtype=DT):
    """An output view into a sentinel-filled buffer: ``(buffer, view)``."""
    big_shape = list(shape)
    big_shape[dim] += 2 * G
    buf = torch.full(big_shape, SENTINEL, dtype=dtype, device=DEVICE)
    return buf, buf.narrow(dim, G, shape[dim])


def assert_guards(buf, n, dim=0):
    """The ``G`` entries on each side of the view along ``dim`` still hold the sentinel."""
    lo = buf.narrow(dim, 0, G)
    hi = buf.narrow(dim, G + n, G)
    assert bool((lo == SENTINEL).all()) and bool((hi == SENTINEL).all()), "a write left the output tensor"


def assert_no_stray_read(*outs):
    for o in outs:
        assert not bool(torch.isnan(o).any()), "a read left the input tensors (NaN guard reached the output)"


LENS = [5, 12, 0, 9]  # q and k lengths per sequence
TOTAL = sum(LENS)

# name -> (cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k)
BAD = {
    "cu_q_non_monotone": ([0, 12, 3, 20, TOTAL], None, None, None),
    "cu_q_negative_and_past_total": ([-9, 5, 17, TOTAL + 11, TOTAL + 30], None, None, None),
    "cu_k_non_monotone": (None, [0, 20, 4, 4, TOTAL], None, None),
    "cu_k_negative_and_past_total": (None, [-20, 5, 17, 17, TOTAL + 25], None, None),
    "cu_k_int_extremes": (None, [0, 2**31 - 1, -(2**31), 17, TOTAL], None, None),
    "seqused_past_capacity": (None, None, [40, -3, 2**30, TOTAL + 9], None),
    "leftpad_out_of_range": (None, None, None, [-20, 40, -(2**31), 3]),
    "leftpad_past_seqused": (None, None, [5, 12, 0, 9], [6, 13, 1, 10]),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(BAD))
def test_varlen_garbage_indices(case, causal):
    cu_q_bad, cu_k_bad, used_bad, pad_bad = BAD[case]
    torch.manual_seed(1)
    ref_cu = [0, *torch.tensor(LENS).cumsum(0).tolist()]

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=DEVICE)

    cu_q = i32(cu_q_bad or ref_cu)
    cu_k = i32(cu_k_bad or ref_cu)
    seqused = None if used_bad is None else i32(used_bad)
    leftpad = None if pad_bad is None else i32(pad_bad)
    _, q = guarded((TOTAL, H, D))
    _, k = guarded((TOTAL, HK, D))
    _, v = guarded((TOTAL, HK, D))
    out_buf, out = out_buffer((TOTAL, H, D))
    lse_buf, lse = out_buffer((H, TOTAL), dim=1, dtype=torch.float32)
    with settings.override(value_checks=False):
        if leftpad is None:
            res = flash_attn_varlen_forward(
                q, k, v, cu_q, cu_k, max(LENS), max(LENS), causal=causal, seqused_k=seqused, out=out
            )
            assert res.out.data_ptr() == out.data_ptr()
        # the launcher too, where the lse can be a guarded view
        launch_forward(
            q,
            k,
            v,
            out,
            lse,
            varlen=True,
            batch=len(LENS),
            max_seqlen_q=max(LENS),
            max_seqlen_k=max(LENS),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            seqused_k=seqused,
            leftpad_k=leftpad,
            softmax_scale=D**-0.5,
            causal=causal,
            window_size=(-1, -1),
            softcap=0.0,
            alibi_slopes=None,
            dropout_p=0.0,
            rng_state=torch.zeros(2, dtype=torch.int64),
        )
    assert_guards(out_buf, TOTAL)
    assert_guards(lse_buf, TOTAL, dim=1)
    assert_no_stray_read(out, lse)


@pytest.mark.parametrize("with_leftpad", [False, True])
def test_paged_garbage_indices(with_leftpad):
    """Block-table entries outside [0, num_pages) (within the guard pages, so that a stray read shows as NaN),
    lengths past the table's capacity, garbage seqused_k / leftpad_k."""
    torch.manual_seed(2)
    page, n_pages, cols = 16, 6, 3
    kbuf, kc = guarded((n_pages, page, HK, D))
    vbuf, vc = guarded((n_pages, page, HK, D))
    table = torch.tensor(
        [[-3, 7, 2], [5, n_pages, -2], [n_pages + 1, 0, 1], [1, -1, n_pages + 4]],
        dtype=torch.int32,
        device=DEVICE,
    )
    cu_q = torch.tensor([0, 5, 17, 17, 26], dtype=torch.int32, device=DEVICE)
    # lengths: past the capacity (3 pages = 48 keys), negative, huge
    cu_k = torch.tensor([0, 100, 90, 2**31 - 1, 5], dtype=torch.int32, device=DEVICE)
    seqused = torch.tensor([60, -5, 47, 2**30], dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor([-7, 50, 3, 2**30], dtype=torch.int32, device=DEVICE) if with_leftpad else None
    _, q = guarded((26, H, D))
    out_buf, out = out_buffer((26, H, D))
    lse_buf, lse = out_buffer((H, 26), dim=1, dtype=torch.float32)
    for used in (None, seqused):
        launch_forward(
            q,
            kc,
            vc,
            out,
            lse,
            varlen=True,
            batch=4,
            max_seqlen_q=12,
            max_seqlen_k=cols * page,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            seqused_k=used,
            leftpad_k=leftpad,
            block_table=table,
            softmax_scale=D**-0.5,
            causal=False,
            window_size=(-1, -1),
            softcap=0.0,
            alibi_slopes=None,
            dropout_p=0.0,
            rng_state=torch.zeros(2, dtype=torch.int64),
        )
        assert_guards(out_buf, 26)
        assert_guards(lse_buf, 26, dim=1)
        assert_no_stray_read(out, lse)


@pytest.mark.parametrize("with_full", [False, True])
def test_block_sparse_garbage_indices(with_full):
    """kv_num_blocks outside [0, kv_indices.shape[-1]] and kv_indices outside the key blocks."""
    torch.manual_seed(3)
    b, sq, sk, bs = 2, 64, 96, 32
    nq, nk = sq // bs, sk // bs
    _, q = guarded((b, sq, H, D), dim=1)
    _, k = guarded((b, sk, HK, D), dim=1)
    _, v = guarded((b, sk, HK, D), dim=1)
    num = torch.tensor([[[-2, 9]], [[3, 2**31 - 1]]], dtype=torch.int32, device=DEVICE).expand(b, H, nq)
    # a block id of -1 would read the 32 rows before the keys (in the guard), ids >= nk the rows after
    idx = torch.randint(-1, nk + 6, (b, H, nq, nk), dtype=torch.int32, device=DEVICE)
    idx[:, :, :, 0] = -1
    extra = {}
    if with_full:
        extra = dict(
            full_kv_num_blocks=torch.full((b, H, nq), 50, dtype=torch.int32, device=DEVICE),
            full_kv_indices=torch.randint(-1, nk + 6, (b, H, nq, nk), dtype=torch.int32, device=DEVICE),
        )
    mask = BlockMask(num.contiguous(), idx, (bs, bs), **extra)
    out_buf, out = out_buffer((b, sq, H, D), dim=1)
    with settings.override(value_checks=False):
        flash_attn_forward(q, k, v, causal=True, block_mask=mask, out=out)
    assert_guards(out_buf, sq, dim=1)
    assert_no_stray_read(out)
