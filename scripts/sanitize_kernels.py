#!/usr/bin/env python3
"""A handful of kernel launches at odd sizes for ``compute-sanitizer`` (memcheck / racecheck).

Odd seqlens (113, 257, 1, an empty sequence), head dims 72 / 96 / 256 (padded tiles with masks), GQA, causal,
window, varlen, kvcache contiguous (split-KV + combine) and paged (append + attention). Every result is checked
against the fp32 reference so the run also says the launches computed the right thing.

    python scripts/sanitize_kernels.py                 # plain run (also warms the Triton cache)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck python scripts/sanitize_kernels.py --subset race

``--subset race``: one forward and one backward launch only (racecheck is much slower).
Exit status 0 when every comparison passed.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", choices=["all", "race"], default="all")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.subset == "race":
        dense("race-fwd-bwd", 1, 113, 113, 2, 1, 72, causal=True)
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
