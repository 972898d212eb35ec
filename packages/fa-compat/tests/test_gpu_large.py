"""GPU: inputs past 2^31 elements (64-bit offsets). About 45 GiB of GPU memory at most; one test per process
(``scripts/gpu_stage_hardening.sh`` runs each node id alone: an int32 overflow ends in an illegal address,
which poisons the CUDA context for every later test of the process).

Where int32 would overflow:

* ``rows``: ONE sequence whose ``seqlen * nheads * headdim`` passes 2^31, so that the in-tile row offset
  ``offs_m * stride_m`` (not only a base offset) needs 64 bits: q/k/v ``(1, 8320, 2048, 128)`` bf16, 2.18e9
  elements each (rows >= 8192 of every head are past 2^31);
* ``batch``: the batch offset only: ``(2, 8320, 1024, 128)``;
* ``varlen``: the sequence start offset ``cu_seqlens[b] * stride``: 2 sequences in ``(8320, 2048, 128)``;
* ``kvcache``: a cache of ``(1, 2^20 + 256, 16, 128)`` (2.15e9 elements), decode at its end, contiguous and
  paged over the same memory, with the appended row landing past 2^31.

No seqlen^2 matrix is ever built: the reference is the same kernel run on a small slice (two heads, or one
batch) that equals part of the big problem, plus ``attention_ref`` in fp32 on those heads only (8320^2 scores
per head). A failure names the rows that are wrong.
"""

from __future__ import annotations

import gc

import pytest
import torch
from fa_compat_testutils import HAS_BACKWARD, HAS_KVCACHE

from fa_core.reference import attention_ref
from fa_core.testing import assert_close_2x, use_settings
from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DTYPE = torch.bfloat16
INT32_MAX = 2**31 - 1


@pytest.fixture(autouse=True)
def _free():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _need(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB free GPU memory, {free / 2**30:.0f} GiB free")


def _randn(*shape, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=DTYPE)


def _bad_rows(a: torch.Tensor, b: torch.Tensor, atol: float) -> str:
    """Rows (dim 1) where a and b differ by more than atol: first/last/count, for the failure message."""
    bad = ((a.float() - b.float()).abs() > atol) | (torch.isnan(a) != torch.isnan(b))
    rows = bad.reshape(bad.shape[0], bad.shape[1], -1).any(-1).any(0).nonzero().flatten()
    if rows.numel() == 0:
        return "none"
    return f"{rows.numel()} rows, first {int(rows[0])}, last {int(rows[-1])}"


def _compare(big: torch.Tensor, small: torch.Tensor, what: str, atol: float = 0.0) -> None:
    """big (a slice of the large problem's result) vs the same kernel on the small problem: bitwise expected
    (same kernel and tile config, per-row work independent of the other heads); ``atol`` as a fallback."""
    if torch.equal(big, small):
        return
    err = float((big.float() - small.float()).abs().nan_to_num(float("inf")).max())
    assert err <= atol, (
        f"{what}: large vs small differ by {err:.3e}; wrong rows: {_bad_rows(big, small, atol)}"
    )


def _check_vs_ref(out_heads, q_h, k_h, v_h, what, **kw):
    ref, _ = attention_ref(q_h, k_h, v_h, **kw)
    low, _ = attention_ref(q_h, k_h, v_h, upcast=False, **kw)
    assert_close_2x(out_heads, ref, low, what)


HEADS = [0, 2047]  # first and last head (the last one has the largest offsets)


def _rows_problem(grad: bool):
    b, s, h, d = 1, 8320, 2048, 128
    assert s * h * d > INT32_MAX and (s - 1) * h * d > INT32_MAX
    return tuple(_randn(b, s, h, d, seed=i).requires_grad_(grad) for i in range(3))


@pytest.mark.parametrize("load", ["tma", "pointers"])
def test_rows_past_int32_forward(load, monkeypatch):
    """One sequence, seqlen * nheads * headdim > 2^31 (rows >= 8192 of every head past int32): forward, through
    the TMA descriptors (64-bit inside) and through plain pointer arithmetic (settings tma=False)."""
    _need(30)
    if load == "pointers":
        use_settings(monkeypatch, tma=False)
    q, k, v = _rows_problem(False)
    out = flash_attn_func(q, k, v, causal=True)
    torch.cuda.synchronize()
    sel = torch.tensor(HEADS, device="cuda")
    qs, ks, vs = (x.index_select(2, sel).contiguous() for x in (q, k, v))
    out_small = flash_attn_func(qs, ks, vs, causal=True)
    _compare(out.index_select(2, sel), out_small, f"out ({load})", atol=1.6e-2)
    _check_vs_ref(out.index_select(2, sel), qs, ks, vs, f"out ({load})", causal=True)


@pytest.mark.skipif(not HAS_BACKWARD, reason="fa-backward not installed")
def test_rows_past_int32_backward():
    """Same problem, backward (pointer arithmetic only): dq/dk/dv of two heads vs the small problem."""
    _need(48)
    q, k, v = _rows_problem(True)
    b, s, h, d = q.shape
    out = flash_attn_func(q, k, v, causal=True)
    sel = torch.tensor(HEADS, device="cuda")
    qs, ks, vs = (x.detach().index_select(2, sel).contiguous().requires_grad_() for x in (q, k, v))
    out_small = flash_attn_func(qs, ks, vs, causal=True)
    dout = _randn(b, s, h, d, seed=9)
    out.backward(dout)
    out_small.backward(dout.index_select(2, sel).contiguous())
    torch.cuda.synchronize()
    for name, big, small in (("dq", q.grad, qs.grad), ("dk", k.grad, ks.grad), ("dv", v.grad, vs.grad)):
        assert torch.isfinite(big.index_select(2, sel)).all(), f"{name}: non-finite entries"
        _compare(big.index_select(2, sel), small, name, atol=3e-2)


def test_batch_offset_past_int32():
    """batch * stride_b > 2^31, each batch below: forward, backward; batch 1 checked against its own run."""
    _need(48)
    b, s, h, d = 2, 8320, 1024, 128
    assert b * s * h * d > INT32_MAX > s * h * d
    q, k, v = (_randn(b, s, h, d, seed=10 + i).requires_grad_(HAS_BACKWARD) for i in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    q1, k1, v1 = (x.detach()[1:].clone().requires_grad_(HAS_BACKWARD) for x in (q, k, v))
    out1 = flash_attn_func(q1, k1, v1, causal=True)
    _compare(out.detach()[1:], out1.detach(), "out (batch 1)", atol=1.6e-2)
    if not HAS_BACKWARD:
        return
    dout = _randn(b, s, h, d, seed=19)
    out.backward(dout)
    out1.backward(dout[1:].contiguous())
    torch.cuda.synchronize()
    for name, big, small in (("dq", q.grad, q1.grad), ("dk", k.grad, k1.grad), ("dv", v.grad, v1.grad)):
        _compare(big[1:], small, f"{name} (batch 1)", atol=3e-2)


def test_varlen_offset_past_int32():
    """Packed sequences, the second starting past 2^31 / stride rows: forward and backward of sequence 1."""
    _need(48)
    total, h, d = 8320, 2048, 128
    lens = [4096, total - 4096]
    cu = torch.tensor([0, lens[0], total], dtype=torch.int32, device="cuda")
    assert lens[0] * h * d <= INT32_MAX < total * h * d
    q, k, v = (_randn(total, h, d, seed=20 + i).requires_grad_(HAS_BACKWARD) for i in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    sel = torch.tensor(HEADS, device="cuda")
    seq1 = slice(lens[0], total)
    qs, ks, vs = (
        x.detach()[seq1].index_select(1, sel).contiguous()[None].requires_grad_(HAS_BACKWARD)
        for x in (q, k, v)
    )
    out_small = flash_attn_func(qs, ks, vs, causal=True)
    _compare(
        out.detach()[seq1].index_select(1, sel)[None], out_small.detach(), "out (sequence 1)", atol=1.6e-2
    )
    if not HAS_BACKWARD:
        return
    dout = _randn(total, h, d, seed=29)
    out.backward(dout)
    out_small.backward(dout[seq1].index_select(1, sel).contiguous()[None])
    torch.cuda.synchronize()
    for name, big, small in (("dq", q.grad, qs.grad), ("dk", k.grad, ks.grad), ("dv", v.grad, vs.grad)):
        _compare(big[seq1].index_select(1, sel)[None], small, f"{name} (sequence 1)", atol=3e-2)


@pytest.mark.skipif(not HAS_KVCACHE, reason="fa-kvcache not installed")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_past_int32(paged):
    """Decode at the end of a cache of 2.15e9 elements: the new row is written past 2^31 and read back."""
    _need(24)
    cap, hk, h, d, page = 2**20 + 256, 16, 32, 128, 256
    assert cap * hk * d > INT32_MAX
    k_cache, v_cache = _randn(1, cap, hk, d, seed=30), _randn(1, cap, hk, d, seed=31)
    q, k_new, v_new = _randn(1, 1, h, d, seed=32), _randn(1, 1, hk, d, seed=33), _randn(1, 1, hk, d, seed=34)
    pos = cap - 1  # append at the last row: element offset (cap - 1) * hk * d > 2^31
    lens = torch.tensor([pos], dtype=torch.int32, device="cuda")
    kw = {}
    kc, vc = k_cache, v_cache
    if paged:  # the same memory seen as pages, the table in reverse order
        kc, vc = (x.view(cap // page, page, hk, d) for x in (k_cache, v_cache))
        kw["block_table"] = torch.arange(cap // page - 1, -1, -1, dtype=torch.int32, device="cuda")[None]
    out = flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, causal=True, **kw)
    torch.cuda.synchronize()
    if paged:
        # logical row pos lives in page table[pos // page] = 0 (reversed), row pos % page
        assert torch.equal(kc[0, pos % page], k_new[0, 0]), "appended k row not found where the table says"
        logical = lambda x: x.flip(0).reshape(1, cap, hk, d)  # noqa: E731
        k_log, v_log = logical(kc), logical(vc)
    else:
        assert torch.equal(k_cache[0, pos], k_new[0, 0]), (
            "appended k row not at cache_seqlens (offset > 2^31)"
        )
        assert torch.equal(v_cache[0, pos], v_new[0, 0]), (
            "appended v row not at cache_seqlens (offset > 2^31)"
        )
        k_log, v_log = k_cache, v_cache
    group = h // hk
    for hh in (0, h - 1):  # first and last query head; their kv heads 0 and hk - 1
        kv = hh // group
        ref, _ = attention_ref(q[:, :, hh : hh + 1], k_log[:, :, kv : kv + 1], v_log[:, :, kv : kv + 1])
        low, _ = attention_ref(
            q[:, :, hh : hh + 1], k_log[:, :, kv : kv + 1], v_log[:, :, kv : kv + 1], upcast=False
        )
        assert_close_2x(out[:, :, hh : hh + 1], ref, low, f"decode out, head {hh}")
