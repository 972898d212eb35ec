"""Index values the backward kernels read from tensors, garbage with the host value checks off.

``cu_seqlens_q`` / ``cu_seqlens_k``, ``seqused_k`` and a block mask's counts and indices are read by the
kernels; with ``value_checks=False`` (``FA_PLUS_SKIP_VALUE_CHECKS=1``) nobody validates them on the host, and
the kernels clamp them so that no load or store leaves the tensors (the gradients are then garbage, which is
allowed).

Under the interpreter every load and store (pointer or tensor-descriptor) goes through
``InterpreterBuilder.create_masked_load`` / ``create_masked_store``: the ``bounds_checked`` fixture checks
every address a mask lets through against the storages of the launch's tensor arguments, before the access
happens.
``dq`` / ``dk`` / ``dv`` are views into larger buffers (extra rows before and after, an extra head, extra
columns) whose guard elements must keep their sentinel. On a GPU the same cases run (``-m gpu``), under
``compute-sanitizer --tool memcheck`` for the address check.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
import torch
from fa_backward_testutils import DEVICE, FP, rand

import fa_backward.launch as bl
from fa_backward import flash_attn_backward, flash_attn_varlen_backward
from fa_core import score_mods as sm
from fa_core import settings
from fa_core.block_sparse import create_block_mask

GPU_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")

SENTINEL = 768.0  # exact in float16, bfloat16 and float32
GUARD = 5
I32_MAX = 2**31 - 1
I32_MIN = -(2**31)


class OutOfBounds(AssertionError):
    pass


@pytest.fixture
def bounds_checked(monkeypatch):
    """Every masked-in load / store address of the kernels must lie inside a tensor argument of the launch."""
    if DEVICE != "cpu":
        pytest.skip("checks every address under Triton's CPU interpreter (GPU: the -m gpu tests + memcheck)")
    from triton.runtime import interpreter as ti

    state: dict[str, Any] = {"lo": np.zeros(0, np.uint64), "hi": np.zeros(0, np.uint64), "launches": 0}
    state["accesses"] = 0

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (tuple, list)):
            for y in x:
                yield from tensors(y)
        elif hasattr(x, "base") and isinstance(x.base, torch.Tensor):  # a host-side TensorDescriptor
            yield x.base

    init_args = ti.GridExecutor._init_args_hst

    def recording_init(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        spans = sorted(
            (t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
            for t in tensors([*args_hst, *kwargs_hst.values()])
        )
        merged: list[list[int]] = []
        for lo, hi in spans:  # views of one storage (delta / lse2) give the same span
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        state["lo"] = np.array([m[0] for m in merged], dtype=np.uint64)
        state["hi"] = np.array([m[1] for m in merged], dtype=np.uint64)
        state["launches"] += 1
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        addr = np.asarray(ptrs.data, dtype=np.uint64)
        keep = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        addr = addr[keep]
        if addr.size == 0:
            return
        state["accesses"] += addr.size
        size = np.uint64(ti._get_np_dtype(ptrs.get_element_ty()).itemsize)
        at = np.searchsorted(state["lo"], addr, side="right") - 1
        ok = at >= 0
        ok[ok] &= addr[ok] + size <= state["hi"][at[ok]]
        if not ok.all():
            raise OutOfBounds(f"{what} of {int((~ok).sum())} element(s) outside every tensor argument")

    load = ti.InterpreterBuilder.create_masked_load
    store = ti.InterpreterBuilder.create_masked_store

    def checked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def checked_store(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, cache_policy)

    monkeypatch.setattr(ti.GridExecutor, "_init_args_hst", recording_init)
    monkeypatch.setattr(ti.InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(ti.InterpreterBuilder, "create_masked_store", checked_store)
    with checks_off():
        yield state


@contextlib.contextmanager
def checks_off():
    """The host checks that read tensor values turned off (``fa_core.settings``)."""
    with settings.override(value_checks=False):
        yield


def guarded(shape, dtype=FP):
    """``(view, buffer, inside)``: a NaN tensor of ``shape`` (rows, heads, dim) inside a larger buffer filled
    with SENTINEL: GUARD extra rows on both sides, one extra head, 8 extra columns; ``inside`` marks the view."""
    rows, heads, dim = shape
    buf = torch.full((rows + 2 * GUARD, heads + 1, dim + 8), SENTINEL, dtype=dtype, device=DEVICE)
    inside = torch.zeros(buf.shape, dtype=torch.bool, device=DEVICE)
    inside[GUARD : GUARD + rows, :heads, :dim] = True
    buf[inside] = float("nan")  # rows the kernels do not write stay NaN
    return buf[GUARD : GUARD + rows, :heads, :dim], buf, inside


def assert_guards_intact(name, buf, inside):
    outside = buf[~inside]
    bad = int((outside != SENTINEL).sum())
    assert bad == 0, f"{name}: {bad} guard element(s) overwritten"


def grad_buffers(q, k, v):
    """dq / dk / dv views (leading batch dim kept for dense tensors) with their guard buffers."""
    res = []
    for t in (q, k, v):
        flat = t.reshape(-1, t.shape[-2], t.shape[-1])
        view, buf, inside = guarded(tuple(flat.shape))
        res.append((view.view(t.shape) if t.dim() == 4 else view, buf, inside))
    return res


H, HK, D = 2, 1, 16
TOTAL_Q, TOTAL_K = 64, 70
VALID_CU_Q = [0, 20, 47, TOTAL_Q]
VALID_CU_K = [0, 33, 40, TOTAL_K]

VARLEN_CASES = {
    "decreasing": ([0, 40, 10, TOTAL_Q], [0, 50, 20, TOTAL_K], None),
    "past_total": ([5, 90, 1000, 3000], [0, 80, 2**20, TOTAL_K], None),
    "negative": ([-100, -3, 20, TOTAL_Q], [I32_MIN, 10, -1, TOTAL_K], None),
    "extreme": ([I32_MAX, I32_MIN, I32_MAX, 0], [I32_MIN, I32_MAX, 0, I32_MIN], None),
    "seqused": (VALID_CU_Q, VALID_CU_K, [-5, 10**6, I32_MAX]),
    "seqused_extreme": (VALID_CU_Q, VALID_CU_K, [I32_MIN, I32_MAX, 3]),
    "all_garbage": ([I32_MIN, 7, I32_MAX, -1], [3, I32_MIN, 9, I32_MAX], [I32_MAX, -1, I32_MIN]),
}


def run_varlen(cu_q, cu_k, seqused, causal, window=(-1, -1), dropout_p=0.0, seed=0):
    torch.manual_seed(seed)
    q, dout, out = rand(TOTAL_Q, H, D), rand(TOTAL_Q, H, D), rand(TOTAL_Q, H, D)
    k, v = rand(TOTAL_K, HK, D), rand(TOTAL_K, HK, D)
    lse = torch.randn(H, TOTAL_Q, dtype=torch.float32, device=DEVICE) + 3.0
    bufs = grad_buffers(q, k, v)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    rng = torch.tensor([7, 0], dtype=torch.int64) if dropout_p > 0 else None
    flash_attn_varlen_backward(
        dout, q, k, v, out, lse, bufs[0][0], bufs[1][0], bufs[2][0],
        i32(cu_q), i32(cu_k), 40, 48,
        dropout_p=dropout_p, causal=causal, window_size_left=window[0], window_size_right=window[1],
        rng_state=rng, seqused_k=None if seqused is None else i32(seqused),
    )  # fmt: skip
    for name, (_, buf, inside) in zip(("dq", "dk", "dv"), bufs):
        assert_guards_intact(name, buf, inside)
    return [view.clone() for view, _, _ in bufs]


@pytest.mark.parametrize("case", sorted(VARLEN_CASES))
def test_varlen_garbage_lengths(bounds_checked, case):
    cu_q, cu_k, seqused = VARLEN_CASES[case]
    run_varlen(cu_q, cu_k, seqused, causal=case in ("negative", "seqused", "all_garbage"))
    assert bounds_checked["launches"] == 2 and bounds_checked["accesses"] > 0


def test_varlen_garbage_window_dropout(bounds_checked):
    cu_q, cu_k, seqused = VARLEN_CASES["all_garbage"]
    run_varlen(cu_q, cu_k, seqused, causal=False, window=(5, 3), dropout_p=0.2)
    assert bounds_checked["launches"] == 2


def test_varlen_garbage_descriptor_loads(bounds_checked, monkeypatch):
    """The tensor-descriptor path (forced under the interpreter) with garbage lengths."""
    calls = []

    def forced(*t):
        calls.append(1)
        return True

    monkeypatch.setattr(bl, "bwd_tma", forced)
    for case in ("extreme", "past_total", "seqused_extreme"):
        cu_q, cu_k, seqused = VARLEN_CASES[case]
        run_varlen(cu_q, cu_k, seqused, causal=True)
    assert bounds_checked["launches"] == 6 and len(calls) == 3


def test_garbage_sequence_leaves_others_exact(bounds_checked):
    """A garbage seqused_k entry of one sequence changes nothing in the gradients of the others."""
    good = run_varlen(VALID_CU_Q, VALID_CU_K, [30, 7, 30], causal=True, seed=5)
    bad = run_varlen(VALID_CU_Q, VALID_CU_K, [30, I32_MAX, 30], causal=True, seed=5)
    q_rows = [r for b in (0, 2) for r in range(VALID_CU_Q[b], VALID_CU_Q[b + 1])]
    k_rows = [r for b in (0, 2) for r in range(VALID_CU_K[b], VALID_CU_K[b + 1])]
    for name, g, b, rows in zip(("dq", "dk", "dv"), good, bad, (q_rows, k_rows, k_rows)):
        assert torch.equal(g[rows], b[rows]), name
        assert torch.isfinite(g[rows]).all(), name
        assert bool((g[rows] != 0).any()), f"{name}: the valid sequences got no gradient"


def garbage_mask(seed, sq=128, sk=112, full=True):
    """A valid block mask (32 x 32 blocks) with every count and index overwritten by garbage."""
    bm = create_block_mask(
        sm.prefix_lm_torch, None, H, sq, sk, block_size=(32, 32), device=DEVICE, full_blocks=full
    )
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([-1, 0, 3, 4, 5, 100, 2**20, I32_MAX, I32_MIN, -7], dtype=torch.int32)

    def junk(t):
        return pool[torch.randint(0, len(pool), t.shape, generator=g)].contiguous().to(DEVICE)

    fields = {"kv_num_blocks": junk(bm.kv_num_blocks), "kv_indices": junk(bm.kv_indices)}
    if full:
        fields.update(
            full_kv_num_blocks=junk(bm.full_kv_num_blocks), full_kv_indices=junk(bm.full_kv_indices)
        )
    return bm._replace(**fields)


@pytest.mark.parametrize(
    "kw", [{}, {"causal": True}, {"mask_mod": sm.prefix_lm}], ids=["plain", "causal", "mask_mod"]
)
@pytest.mark.parametrize("full", [True, False], ids=["full_blocks", "partial_only"])
def test_block_mask_garbage(bounds_checked, kw, full):
    run_block_mask(kw, full)
    assert bounds_checked["launches"] == 2


def run_block_mask(kw, full):
    torch.manual_seed(11)
    sq, sk = 128, 112
    q, dout, out = rand(1, sq, H, D), rand(1, sq, H, D), rand(1, sq, H, D)
    k, v = rand(1, sk, HK, D), rand(1, sk, HK, D)
    lse = torch.randn(1, H, sq, dtype=torch.float32, device=DEVICE) + 3.0
    bufs = grad_buffers(q, k, v)
    bm = garbage_mask(seed=len(kw) + 2 * full, full=full)
    flash_attn_backward(
        dout, q, k, v, out, lse, bufs[0][0], bufs[1][0], bufs[2][0], block_mask=bm, **kw
    )  # fmt: skip
    for name, (_, buf, inside) in zip(("dq", "dk", "dv"), bufs):
        assert_guards_intact(name, buf, inside)


@pytest.mark.gpu
@GPU_ONLY
@pytest.mark.parametrize("case", sorted(VARLEN_CASES))
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "descriptor"])
def test_varlen_garbage_lengths_gpu(monkeypatch, case, tma):
    """The varlen cases on the GPU (descriptor loads where the GPU has them): no fault, guards intact."""
    if not tma:
        monkeypatch.setattr(bl, "bwd_tma", lambda *t: False)
    cu_q, cu_k, seqused = VARLEN_CASES[case]
    with checks_off():
        run_varlen(cu_q, cu_k, seqused, causal=True)
        run_varlen(cu_q, cu_k, seqused, causal=False, window=(5, 3), dropout_p=0.2)
        torch.cuda.synchronize()


@pytest.mark.parametrize(
    "kw", [{}, {"causal": True}, {"mask_mod": sm.prefix_lm}], ids=["plain", "causal", "mask_mod"]
)
@pytest.mark.parametrize("full", [True, False], ids=["full_blocks", "partial_only"])
@pytest.mark.gpu
@GPU_ONLY
def test_block_mask_garbage_gpu(kw, full):
    with checks_off():
        run_block_mask(kw, full)
        torch.cuda.synchronize()
