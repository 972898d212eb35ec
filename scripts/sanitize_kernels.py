#!/usr/bin/env python3
"""A handful of kernel launches at odd sizes for ``compute-sanitizer`` (memcheck / racecheck).

Odd seqlens (113, 257, 1, an empty sequence), head dims 72 / 96 / 256 (padded tiles with masks), GQA, causal,
window, varlen, kvcache contiguous (split-KV + combine) and paged (append + attention). Every result is checked
against the fp32 reference so the run also says the launches computed the right thing.

Out-of-range index values (``--subset oob``, a separate run so that each fits its sanitizer time limit): with
value checks off (as under CUDA-graph capture or torch.compile) the kernels must stay inside their tensors
whatever ``cache_seqlens``, ``block_table``, ``cache_batch_idx``, ``leftpad_k`` (kvcache) or ``cu_seqlens_q`` /
``cu_seqlens_k`` / ``seqused_k`` (varlen forward) or a paged varlen ``block_table`` hold: past the capacity,
negative, int32 extremes, non-monotone. memcheck must report 0 errors; the plain run checks that every output
is finite (no fault, no NaN from outside the inputs).

    python scripts/sanitize_kernels.py                 # plain run (also warms the Triton cache)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        python scripts/sanitize_kernels.py --subset oob
    compute-sanitizer --tool racecheck python scripts/sanitize_kernels.py --subset race

``--subset race``: one forward and one backward launch only (racecheck is much slower).
Exit status 0 when every comparison passed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

os.environ.setdefault("FA_PLUS_AUTOTUNE", "0")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fa_core.reference import attention_ref, attention_varlen_ref  # noqa: E402
from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
TOL = 3e-2 if DEV == "cuda" else 1e-4
FAILURES: list[str] = []


def rand(*shape, grad=False):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(DTYPE).requires_grad_(grad)


def check(name, got, ref):
    err = float((got.float() - ref.float()).abs().max()) if got.numel() else 0.0
    scale = max(float(ref.float().abs().max()) if ref.numel() else 0.0, 1.0)
    ok = err <= TOL * scale
    print(f"  {name}: max err {err:.2e} {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        FAILURES.append(name)


def dense(name, b, sq, sk, h, hk, d, backward=True, **kw):
    print(f"{name}: dense {b}x{sq}x{sk} h{h}/{hk} d{d} {kw}", flush=True)
    q, k, v = (
        rand(b, sq, h, d, grad=backward),
        rand(b, sk, hk, d, grad=backward),
        rand(b, sk, hk, d, grad=backward),
    )
    out = flash_attn_func(q, k, v, **kw)
    ref, _ = attention_ref(q.detach(), k.detach(), v.detach(), **kw)
    check(f"{name} out", out, ref)
    if backward:
        dout = torch.randn_like(out)
        out.backward(dout)
        qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
        r, _ = attention_ref(qr, kr, vr, upcast=False, **kw)
        r.backward(dout.float())
        for n, g, t in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
            check(f"{name} {n}", g, t)


def varlen(name, lens, h, hk, d, **kw):
    print(f"{name}: varlen {lens} h{h}/{hk} d{d} {kw}", flush=True)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    n = sum(lens)
    q, k, v = rand(n, h, d, grad=True), rand(n, hk, d, grad=True), rand(n, hk, d, grad=True)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), **kw)
    ref, _ = attention_varlen_ref(q.detach(), k.detach(), v.detach(), cu, cu, **kw)
    check(f"{name} out", out, ref)
    out.backward(torch.ones_like(out))
    for n_, g in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        if not torch.isfinite(g).all():
            FAILURES.append(f"{name} {n_} not finite")


def kvcache(name, b, cap, h, hk, d, page, lens, seqlen_q=1, num_splits=0):
    print(f"{name}: kvcache b{b} cap{cap} h{h}/{hk} d{d} page {page} lens {lens} sq{seqlen_q}", flush=True)
    q, k_new, v_new = rand(b, seqlen_q, h, d), rand(b, seqlen_q, hk, d), rand(b, seqlen_q, hk, d)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    if page:
        nblocks = b * cap // page + 1
        kc, vc = rand(nblocks, page, hk, d), rand(nblocks, page, hk, d)
        table = torch.randperm(nblocks)[: b * cap // page].reshape(b, cap // page).to(torch.int32).to(DEV)
        logical = lambda x: x[table.long()].reshape(b, cap, hk, d)  # noqa: E731
    else:
        kc, vc, table = rand(b, cap, hk, d), rand(b, cap, hk, d), None
        logical = lambda x: x  # noqa: E731
    out = flash_attn_with_kvcache(
        q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table, causal=True, num_splits=num_splits
    )
    kl, vl = logical(kc), logical(vc)
    for i, n in enumerate(lens):
        ref, _ = attention_ref(
            q[i : i + 1], kl[i : i + 1, : n + seqlen_q], vl[i : i + 1, : n + seqlen_q], causal=True
        )
        check(f"{name} out[{i}]", out[i : i + 1], ref)


I32_MAX, I32_MIN = 2**31 - 1, -(2**31)


def i32(*vals: int) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.int64).to(torch.int32).to(DEV)


def finite(name, out, lse):
    """No fault and nothing from outside the inputs: out finite, lse without NaN (+inf marks empty rows)."""
    ok = bool(torch.isfinite(out).all()) and not bool(torch.isnan(lse).any())
    print(f"  {name}: {'ok' if ok else 'FAILED (non-finite output)'}", flush=True)
    if not ok:
        FAILURES.append(name)


def kvcache_oob(name, *, paged, lens, table=None, batch_idx=None, leftpad=None, seqlen_new=2, splits=(1, 3)):
    """flash_attn_with_kvcache with value checks off and index tensors out of range (batch = len(lens))."""
    from fa_core import settings
    from fa_kvcache import flash_attn_with_kvcache as fak

    b, h, hk, d, page, cols = len(lens), 4, 2, 72, 16, 3
    print(
        f"{name}: kvcache oob paged={paged} lens={lens} table={table} batch_idx={batch_idx} leftpad={leftpad}"
    )
    q = rand(b, 2, h, d)
    k_new = rand(b, seqlen_new, hk, d) if seqlen_new else None
    v_new = rand(b, seqlen_new, hk, d) if seqlen_new else None
    kw: dict = dict(cache_seqlens=i32(*lens), causal=True)
    if paged:
        nb = b * cols - 1
        kc, vc = rand(nb, page, hk, d), rand(nb, page, hk, d)
        kw["block_table"] = i32(*table).reshape(b, cols)
        cap = cols * page
    else:
        cap = 40
        kc, vc = rand(b + 1, cap, hk, d), rand(b + 1, cap, hk, d)
        if batch_idx is not None:
            kw["cache_batch_idx"] = i32(*batch_idx)
        if leftpad is not None:
            kw["leftpad_k"] = i32(*leftpad)
    if seqlen_new:
        angle = torch.rand(cap + 2, 16, device=DEV) * 6.0
        kw.update(rotary_cos=torch.cos(angle).to(DTYPE), rotary_sin=torch.sin(angle).to(DTYPE))
    with settings.override(value_checks=False):
        for n in splits:
            for preload in (True, False) if paged else (True,):
                with contextlib.nullcontext() if preload else bt_preload_off():
                    out, lse = fak(q, kc, vc, k_new, v_new, num_splits=n, return_softmax_lse=True, **kw)
                    if DEV == "cuda":
                        torch.cuda.synchronize()
                finite(f"{name} splits={n} preload={int(preload)}", out, lse)


@contextlib.contextmanager
def bt_preload_off():
    """Paged split-KV launches read block-table entries inside the key loop (the path of splits too long to
    preload) instead of preloading them."""
    import fa_kvcache.decode_configs as dc
    import fa_kvcache.interface as ki

    saved = dc.MAX_BT_PRELOAD
    dc.MAX_BT_PRELOAD = 0
    ki.plan_decode.cache_clear()
    try:
        yield
    finally:
        dc.MAX_BT_PRELOAD = saved
        ki.plan_decode.cache_clear()


def varlen_oob(name, cu_q, cu_k, total_q, total_k, max_q, max_k, seqused=None, causal=True):
    """fa-core's varlen forward with value checks off and corrupt cu_seqlens / seqused_k."""
    from fa_core import flash_attn_varlen_forward, settings

    print(f"{name}: varlen oob cu_q={cu_q} cu_k={cu_k} seqused={seqused}", flush=True)
    q, k, v = rand(total_q, 4, 72), rand(total_k, 2, 72), rand(total_k, 2, 72)
    kw: dict = dict(causal=causal)
    if seqused is not None:
        kw["seqused_k"] = i32(*seqused)
    with settings.override(value_checks=False):
        try:
            res = flash_attn_varlen_forward(q, k, v, i32(*cu_q), i32(*cu_k), max_q, max_k, **kw)
        except (ValueError, TypeError) as e:  # a host-side shape check may still refuse (no device read)
            print(f"  {name}: refused on the host: {e}", flush=True)
            return
    if DEV == "cuda":
        torch.cuda.synchronize()
    finite(name, res.out, res.lse)


def paged_varlen_oob(name, table, lens_k, d=72, page=16):
    """flash_attn_varlen_func over a paged K/V (block_table) with value checks off and block ids out of range
    (head dims 64 / 128 take the Gluon TMA kernel on Hopper, others the Triton one). Last of the set: a
    device-side assert here would end the process."""
    from fa_core import settings

    print(f"{name}: paged varlen oob d={d} page={page} table={table} lens_k={lens_k}", flush=True)
    b, cols = len(lens_k), 2
    cu_q = torch.tensor([0, 3, 6][: b + 1], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = rand(3 * b, 4, d)
    kc, vc = rand(3, page, 2, d), rand(3, page, 2, d)
    with settings.override(value_checks=False):
        try:
            out = flash_attn_varlen_func(
                q, kc, vc, cu_q, cu_k, 3, max(lens_k), causal=True, block_table=i32(*table).reshape(b, cols)
            )
        except (ValueError, TypeError, NotImplementedError) as e:
            print(f"  {name}: refused on the host: {e}", flush=True)
            return
    if DEV == "cuda":
        torch.cuda.synchronize()
    finite(name, out, torch.zeros(1, device=DEV))


def oob_set() -> None:
    big = 2**30
    kvcache_oob("kv-oob-seqlens-paged", paged=True, lens=[60, -3, I32_MAX], table=[0, 1, 2, 3, 4, 5, 6, 7, 0])
    kvcache_oob("kv-oob-seqlens-min", paged=True, lens=[I32_MIN, big, 5], table=[0, 1, 2, 3, 4, 5, 6, 7, 0])
    kvcache_oob(
        "kv-oob-table", paged=True, lens=[47, 20, 3], table=[8, -1, I32_MAX, I32_MIN, 100, 7, 0, -(2**20), 9]
    )
    kvcache_oob("kv-oob-table-no-append", paged=True, lens=[48, 47, 0], table=[9] * 9, seqlen_new=0)
    kvcache_oob("kv-oob-seqlens-contig", paged=False, lens=[41, -1, I32_MAX])
    kvcache_oob("kv-oob-batch-idx", paged=False, lens=[5, 9, 38], batch_idx=[-1, 4, I32_MAX])
    kvcache_oob("kv-oob-batch-idx-min", paged=False, lens=[5, 9, 1], batch_idx=[I32_MIN, 0, 3])
    kvcache_oob("kv-oob-leftpad", paged=False, lens=[5, 9, 30], leftpad=[-5, 50, I32_MAX])
    kvcache_oob("kv-oob-leftpad-seqlens", paged=False, lens=[I32_MAX, -7, 3], leftpad=[I32_MIN, 3, 4])
    # varlen forward: totals 40 / 50, three sequences
    varlen_oob("varlen-oob-cu-past-total", [0, 10, 30, 90], [0, 20, 45, 80], 40, 50, 64, 64)
    varlen_oob("varlen-oob-cu-negative", [0, -5, 20, 40], [-10, 20, 30, 50], 40, 50, 64, 64)
    varlen_oob("varlen-oob-cu-non-monotone", [0, 30, 10, 40], [0, 45, 5, 50], 40, 50, 64, 64)
    varlen_oob(
        "varlen-oob-cu-extremes", [I32_MIN, 10, I32_MAX, 40], [0, I32_MAX, 20, I32_MIN], 40, 50, 64, 64
    )
    varlen_oob("varlen-oob-max-seqlen-small", [0, 30, 35, 40], [0, 40, 45, 50], 40, 50, 8, 8)
    varlen_oob(
        "varlen-oob-seqused", [0, 10, 30, 40], [0, 20, 45, 50], 40, 50, 32, 32, seqused=[-3, 90, I32_MAX]
    )
    varlen_oob(
        "varlen-oob-seqused-min", [0, 10, 30, 40], [0, 20, 45, 50], 40, 50, 32, 32, seqused=[I32_MIN, 0, 25]
    )
    paged_varlen_oob("varlen-paged-oob-table", [0, 3, I32_MAX, -1], [20, 30])
    paged_varlen_oob("varlen-paged-oob-table-d128", [0, 3, I32_MAX, -1], [20, 30], d=128)
    paged_varlen_oob("varlen-paged-oob-lens-d64", [I32_MIN, 2, 1, 9], [300, 40], d=64, page=64)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", choices=["all", "race", "oob"], default="all")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.subset == "race":
        dense("race-fwd-bwd", 1, 113, 113, 2, 1, 72, causal=True)
    elif args.subset == "oob":
        oob_set()
    else:
        dense("d72-gqa-causal", 1, 113, 113, 3, 1, 72, causal=True)
        dense("d96-window-sq257-sk113", 2, 257, 113, 2, 2, 96, window_size=(32, 8))
        dense("d256-sq113", 1, 113, 257, 2, 1, 256)
        varlen("varlen-d72", [113, 1, 0, 257], 4, 2, 72, causal=True)
        kvcache("kv-paged-d96", 2, 512, 4, 2, 96, 16, [113, 257])
        kvcache("kv-contig-split-d72", 2, 300, 4, 1, 72, 0, [113, 257], seqlen_q=2, num_splits=3)
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"launch set '{args.subset}' done: {len(FAILURES)} failed comparisons {FAILURES}", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
