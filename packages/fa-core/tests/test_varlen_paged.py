"""Varlen forward with ``leftpad_k`` and with K/V read through a block table (paged cache), against the
reference on the equivalent packed keys (CPU interpreter: fp32 / fp16, small shapes).

flash-attn's rule (csrc/flash_attn/src/block_info.h): sequence b's keys start at ``cu_seqlens_k[b] +
leftpad_k[b]`` and number ``(seqused_k[b] or cu_seqlens_k[b + 1] - cu_seqlens_k[b]) - leftpad_k[b]``. Paged:
key j of sequence b is row ``(leftpad_k[b] + j) % page`` of page ``block_table[b, (leftpad_k[b] + j) // page]``
of the cache ``(num_pages, page, nheads_k, d)``; ``cu_seqlens_k`` / ``seqused_k`` give the lengths.
"""

from __future__ import annotations

import pytest
import torch

from fa_core import attention_varlen_ref, flash_attn_varlen_forward, forward_launch, settings
from fa_core.errors import FlashAttnValueError
from fa_core.forward_configs import force_tile
from fa_core.forward_kernel import fwd_kernel
from fa_core.forward_launch import launch_forward
from fa_core.paged_varlen import check_leftpad_and_pages
from fa_core.testing import DEVICE, assert_close_2x, poisoned

DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]
#: one-dtype tests: float32 under the interpreter, float16 on a GPU (whose float32 dot rounds to TF32)
DT = torch.float32 if DEVICE == "cpu" else torch.float16

H, HK, D = 4, 2, 32
LENS_Q = [3, 17, 0, 9, 1]
LENS_K = [21, 17, 9, 40, 6]


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def varlen_launch(q, k, v, cu_q, cu_k, max_q, max_k, *, out=None, lse=None, **kw):
    """The varlen forward kernel through its launcher (what fa_core.flash_attn_varlen_forward runs after its
    checks), with ``leftpad_k`` / ``block_table``; returns ``(out, lse)``."""
    total_q, h = q.shape[0], q.shape[1]
    out = poisoned((*q.shape[:-1], v.shape[-1]), q.dtype, q.device) if out is None else out
    lse = poisoned((h, total_q), torch.float32, q.device) if lse is None else lse
    args = dict(
        varlen=True,
        batch=cu_q.numel() - 1,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        seqused_k=None,
        softmax_scale=q.shape[-1] ** -0.5,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        dropout_p=0.0,
        rng_state=torch.zeros(2, dtype=torch.int64),
    )
    args.update(kw)
    launch_forward(q, k, v, out, lse, **args)
    return out, lse


def used_keys(k, v, cu_k, seqused, leftpad):
    """The keys each sequence attends to, packed: ``(k, v, cu_seqlens_k)`` of the equivalent plain varlen
    problem (flash-attn's leftpad / seqused rule)."""
    ks, vs, lens = [], [], []
    cu = cu_k.tolist()
    for b in range(len(cu) - 1):
        end = cu[b + 1] if seqused is None else cu[b] + int(seqused[b])
        start = cu[b] + (0 if leftpad is None else int(leftpad[b]))
        ks.append(k[start:end])
        vs.append(v[start:end])
        lens.append(end - start)
    return torch.cat(ks), torch.cat(vs), _cu(lens)


def to_pages(k, v, cu_k, page, leftpad=None, spare=3, seed=0, stale=0.0):
    """Scatter packed keys into a shuffled paged cache: sequence b's row ``leftpad[b] + j`` holds its key j.
    Returns ``(k_cache, v_cache, block_table)``; unused table slots hold -1 (never read for valid lengths).
    ``stale``: a value (NaN) for every cache row no sequence uses, else random rows."""
    cu = cu_k.tolist()
    batch = len(cu) - 1
    pad = [0] * batch if leftpad is None else [int(x) for x in leftpad]
    need = [-(-(pad[b] + cu[b + 1] - cu[b]) // page) for b in range(batch)]
    cols = max(max(need), 1) + 1
    n_pages = sum(need) + spare
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pages, generator=g).tolist()
    kc = torch.randn(n_pages, page, *k.shape[1:], generator=g).to(k.dtype).to(DEVICE)
    vc = torch.randn(n_pages, page, *v.shape[1:], generator=g).to(v.dtype).to(DEVICE)
    if stale != 0.0:
        kc.fill_(stale)
        vc.fill_(stale)
    table = torch.full((batch, cols), -1, dtype=torch.int32)
    nxt = 0
    for b in range(batch):
        for c in range(need[b]):
            table[b, c] = perm[nxt]
            nxt += 1
        for j in range(cu[b + 1] - cu[b]):
            row = pad[b] + j
            kc[table[b, row // page], row % page] = k[cu[b] + j]
            vc[table[b, row // page], row % page] = v[cu[b] + j]
    return kc, vc, table.to(DEVICE)


def _inputs(dtype, seed, lens_q=LENS_Q, lens_k=LENS_K):
    torch.manual_seed(seed)
    q = torch.randn(sum(lens_q), H, D, device=DEVICE, dtype=dtype)
    k = torch.randn(sum(lens_k), HK, D, device=DEVICE, dtype=dtype)
    v = torch.randn(sum(lens_k), HK, D, device=DEVICE, dtype=dtype)
    return q, k, v, _cu(lens_q), _cu(lens_k)


def _check_ref(q, k_eq, v_eq, cu_q, cu_eq, out, lse, dtype, **rules):
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    ref, ref_lse = attention_varlen_ref(q, k_eq, v_eq, cu_q, cu_eq, dtype=hi, **rules)
    low, low_lse = attention_varlen_ref(q, k_eq, v_eq, cu_q, cu_eq, upcast=False, **rules)
    assert_close_2x(out, ref, low, "out")
    assert_close_2x(lse, ref_lse, low_lse, "lse", slack=1e-4 if dtype == torch.float32 else 2e-3)


RULES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (5, 2)},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("with_seqused", [False, True])
def test_leftpad_k(rule, with_seqused, dtype):
    q, k, v, cu_q, cu_k = _inputs(dtype, seed=11)
    leftpad = torch.tensor([4, 0, 9, 13, 6], dtype=torch.int32, device=DEVICE)
    seqused = torch.tensor([19, 17, 9, 31, 6], dtype=torch.int32, device=DEVICE) if with_seqused else None
    out, lse = varlen_launch(
        q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), leftpad_k=leftpad, seqused_k=seqused, **RULES[rule]
    )
    k_eq, v_eq, cu_eq = used_keys(k, v, cu_k, seqused, leftpad)
    _check_ref(q, k_eq, v_eq, cu_q, cu_eq, out, lse, dtype, **RULES[rule])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("rule", ["plain", "causal"])
def test_paged(page, rule, dtype):
    q, k, v, cu_q, cu_k = _inputs(dtype, seed=page)
    kc, vc, table = to_pages(k, v, cu_k, page, seed=page)
    out, lse = varlen_launch(
        q, kc, vc, cu_q, cu_k, max(LENS_Q), max(LENS_K), block_table=table, **RULES[rule]
    )
    _check_ref(q, k, v, cu_q, cu_k, out, lse, dtype, **RULES[rule])


@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("rule", ["causal", "window"])
def test_paged_pages_smaller_than_the_tile(page, rule):
    """A 64-key tile over 16- / 32-row pages: one block-table read per key (several pages per tile), several
    tiles per sequence."""
    lens_q, lens_k = [7, 33, 1], [150, 70, 131]
    q, k, v, cu_q, cu_k = _inputs(DT, seed=page + 1, lens_q=lens_q, lens_k=lens_k)
    kc, vc, table = to_pages(k, v, cu_k, page, seed=page + 1)
    with force_tile((32, 64, 4, 1, False)):
        out, lse = varlen_launch(
            q, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k), block_table=table, **RULES[rule]
        )
    _check_ref(q, k, v, cu_q, cu_k, out, lse, DT, **RULES[rule])


@pytest.mark.parametrize("page", [16, 64])
def test_paged_with_seqused_and_leftpad(page):
    q, k, v, cu_q, cu_k = _inputs(DT, seed=7)
    leftpad = torch.tensor([2, 0, 5, 17, 1], dtype=torch.int32, device=DEVICE)
    seqused = torch.tensor([20, 12, 9, 33, 6], dtype=torch.int32, device=DEVICE)
    # the cache holds each sequence's keys from row leftpad[b] on
    kc, vc, table = to_pages(k, v, cu_k, page, leftpad=leftpad, seed=page)
    out, lse = varlen_launch(
        q,
        kc,
        vc,
        cu_q,
        cu_k,
        max(LENS_Q),
        max(LENS_K),
        block_table=table,
        seqused_k=seqused,
        leftpad_k=leftpad,
        causal=True,
    )
    # sequence b attends to its keys [0, seqused[b] - leftpad[b]) (the cache rows leftpad[b] + j)
    used = seqused - leftpad
    k_eq, v_eq, cu_eq = used_keys(k, v, cu_k, used, None)
    _check_ref(q, k_eq, v_eq, cu_q, cu_eq, out, lse, DT, causal=True)


def test_paged_table_wider_than_needed_and_a_strided_cache():
    """Unused table slots past each sequence's pages hold junk page ids (clamped, never read for valid
    lengths); the cache is a non-contiguous view (a slice of a wider head dimension)."""
    q, k, v, cu_q, cu_k = _inputs(DT, seed=5)
    kc, vc, table = to_pages(k, v, cu_k, 16, seed=5)
    table = torch.where(table < 0, torch.full_like(table, 10**6), table)
    wide_k = torch.randn(kc.shape[0], 16, HK + 1, D, device=DEVICE, dtype=DT)
    wide_v = torch.randn(vc.shape[0], 16, HK + 1, D, device=DEVICE, dtype=DT)
    wide_k[:, :, :HK] = kc
    wide_v[:, :, :HK] = vc
    out, lse = varlen_launch(
        q, wide_k[:, :, :HK], wide_v[:, :, :HK], cu_q, cu_k, max(LENS_Q), max(LENS_K), block_table=table
    )
    _check_ref(q, k, v, cu_q, cu_k, out, lse, DT)


def test_public_api_paged_and_leftpad():
    q, k, v, cu_q, cu_k = _inputs(DT, seed=3)
    kc, vc, table = to_pages(k, v, cu_k, 32, seed=3)
    res = flash_attn_varlen_forward(
        q, kc, vc, cu_q, cu_k, max(LENS_Q), max(LENS_K), causal=True, block_table=table
    )
    _check_ref(q, k, v, cu_q, cu_k, res.out, res.lse, DT, causal=True)
    leftpad = torch.tensor([1, 2, 0, 3, 4], dtype=torch.int32, device=DEVICE)
    res = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), leftpad_k=leftpad)
    k_eq, v_eq, cu_eq = used_keys(k, v, cu_k, None, leftpad)
    _check_ref(q, k_eq, v_eq, cu_q, cu_eq, res.out, res.lse, DT)


def _bad(**over):
    """Arguments of check_leftpad_and_pages for a valid paged + leftpad case, with ``over`` replaced."""
    q, k, v, cu_q, cu_k = _inputs(DT, seed=9)
    leftpad = torch.tensor([1, 0, 2, 3, 0], dtype=torch.int32, device=DEVICE)
    kc, vc, table = to_pages(k, v, cu_k, 16, leftpad=leftpad, seed=9)
    args = dict(
        q=q,
        k=kc,
        v=vc,
        cu_seqlens_k=cu_k,
        seqused_k=None,
        leftpad_k=leftpad,
        block_table=table,
        batch=len(LENS_Q),
        return_probs=False,
    )
    args.update(over)
    return args


def test_checks_accept_a_valid_case():
    check_leftpad_and_pages(**_bad())
    check_leftpad_and_pages(**_bad(block_table=None, k=torch.zeros(1), v=torch.zeros(1)))


@pytest.mark.parametrize(
    "over, err, match",
    [
        (dict(return_probs=True), FlashAttnValueError, "return_probs"),
        (dict(leftpad_k=torch.zeros(5, dtype=torch.int64, device=DEVICE)), TypeError, "leftpad_k"),
        (dict(leftpad_k=torch.zeros(4, dtype=torch.int32, device=DEVICE)), FlashAttnValueError, "leftpad_k"),
        (
            dict(leftpad_k=torch.tensor([0, 0, 10, 0, 0], dtype=torch.int32, device=DEVICE)),
            FlashAttnValueError,
            "leftpad_k",
        ),
        (
            dict(leftpad_k=torch.tensor([-1, 0, 0, 0, 0], dtype=torch.int32, device=DEVICE)),
            FlashAttnValueError,
            "leftpad_k",
        ),
        (dict(block_table=torch.zeros(5, 4, dtype=torch.int64, device=DEVICE)), TypeError, "block_table"),
        (
            dict(block_table=torch.zeros(4, 4, dtype=torch.int32, device=DEVICE)),
            FlashAttnValueError,
            "block_table",
        ),
        (
            dict(block_table=torch.zeros(5, 4, dtype=torch.int32, device=DEVICE)[:, ::2]),
            FlashAttnValueError,
            "contiguous",
        ),
        (
            dict(block_table=torch.zeros(5, 1, dtype=torch.int32, device=DEVICE)),
            FlashAttnValueError,
            "capacity",
        ),
        (
            dict(k=torch.zeros(3, 24, HK, D, device=DEVICE), v=torch.zeros(3, 24, HK, D, device=DEVICE)),
            FlashAttnValueError,
            "page size",
        ),
        (
            dict(k=torch.zeros(3, 16, HK, D, device=DEVICE), v=torch.zeros(2, 16, HK, D, device=DEVICE)),
            FlashAttnValueError,
            "caches",
        ),
        (dict(k=torch.zeros(3, HK, D, device=DEVICE)), FlashAttnValueError, "k must have 4"),
    ],
)
def test_checks_refuse_bad_arguments(over, err, match):
    with pytest.raises(err, match=match):
        check_leftpad_and_pages(**_bad(**over))


def test_checks_refuse_table_entries_out_of_range_but_not_unread_slots():
    args = _bad()
    table = args["block_table"].clone()
    assert bool((table == -1).any())  # unread slots hold -1: accepted
    check_leftpad_and_pages(**args)
    table[0, 0] = args["k"].shape[0]  # one past the last page
    with pytest.raises(FlashAttnValueError, match="block_table entries"):
        check_leftpad_and_pages(**_bad(block_table=table))
    with settings.override(value_checks=False):
        check_leftpad_and_pages(**_bad(block_table=table))


def test_leftpad_k_with_the_fp8_layout(monkeypatch):
    """leftpad_k moves the key start of the keys-last V copy too (the FP8 path's layout on 16-bit inputs)."""
    monkeypatch.setattr(forward_launch, "FP8_LAYOUT_FOR_16BIT", True)
    q, k, v, cu_q, cu_k = _inputs(DT, seed=21)
    leftpad = torch.tensor([3, 1, 0, 7, 2], dtype=torch.int32, device=DEVICE)
    out, lse = varlen_launch(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), leftpad_k=leftpad, causal=True)
    k_eq, v_eq, cu_eq = used_keys(k, v, cu_k, None, leftpad)
    _check_ref(q, k_eq, v_eq, cu_q, cu_eq, out, lse, DT, causal=True)


def test_paged_refuses_the_fp8_layout(monkeypatch):
    monkeypatch.setattr(forward_launch, "FP8_LAYOUT_FOR_16BIT", True)
    q, k, v, cu_q, cu_k = _inputs(DT, seed=22)
    kc, vc, table = to_pages(k, v, cu_k, 16, seed=22)
    with pytest.raises(FlashAttnValueError, match="block_table"):
        varlen_launch(q, kc, vc, cu_q, cu_k, max(LENS_Q), max(LENS_K), block_table=table)


@pytest.mark.parametrize(
    "page, tile",
    [
        (16, (32, 16, 4, 1, True)),
        (64, (32, 16, 4, 1, True)),
        (16, (32, 64, 4, 1, True)),
        (64, (32, 64, 4, 1, True)),
    ],
)
@pytest.mark.parametrize("rule", list(RULES))
def test_paged_descriptor_loads(page, tile, rule, monkeypatch):
    """Tensor-descriptor (TMA) loads of a paged cache (forced under the interpreter): one descriptor over the
    whole cache where a tile lies in one page, pointer loads for smaller pages; rows no sequence uses hold NaN
    (a stale cache), which must not reach the output (causal / window: the tiles before the keys' ragged end
    skip zeroing V, the ragged tile runs on its own)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(forward_launch, "tma_ok", lambda *t: True)
    elif torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90+")
    lens_q, lens_k = [7, 33, 1], [150, 70, 131]
    q, k, v, cu_q, cu_k = _inputs(DT, seed=page, lens_q=lens_q, lens_k=lens_k)
    kc, vc, table = to_pages(k, v, cu_k, page, seed=page, stale=float("nan"))
    with force_tile(tile):
        out, lse = varlen_launch(
            q, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k), block_table=table, **RULES[rule]
        )
        assert fwd_kernel.best_config.kwargs["USE_TMA"]
    _check_ref(q, k, v, cu_q, cu_k, out, lse, DT, **RULES[rule])


def test_paged_pointer_loads_ignore_stale_rows():
    q, k, v, cu_q, cu_k = _inputs(DT, seed=31)
    kc, vc, table = to_pages(k, v, cu_k, 32, seed=31, stale=float("nan"))
    out, lse = varlen_launch(q, kc, vc, cu_q, cu_k, max(LENS_Q), max(LENS_K), block_table=table, causal=True)
    _check_ref(q, k, v, cu_q, cu_k, out, lse, DT, causal=True)
