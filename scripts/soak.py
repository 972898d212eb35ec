#!/usr/bin/env python3
"""Soak: N random calls through the flash_attn API (forward + backward: dense, varlen, GQA, causal / window;
decode: kvcache contiguous and paged), shapes drawn from a FIXED small set so that compiles stay bounded.

Checks
* memory: ``torch.cuda.memory_allocated()`` after the warm-up (every case run twice) vs at the end and its
  maximum over the run, outputs dropped (growth in bytes; 0 expected);
* determinism: every ``--check-every`` calls one case is re-run on its FIXED inputs with ``deterministic=True``
  and compared BITWISE with the result recorded at warm-up (out, dq, dk, dv; decode out and cache row).

Writes ``<out>/soak.json`` and ``<out>/soak.md``. On a CPU (Triton interpreter) the shapes shrink and fp32 is
used, for a smoke run only: ``TRITON_INTERPRET=1 python scripts/soak.py --calls 20``.

    python scripts/soak.py --calls 10000 --max-seconds 230 --out reports/gpu-hardening
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FA_PLUS_AUTOTUNE", "0")

from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # dense | varlen | decode
    shape: tuple  # dense: (b, s, h, hk, d); varlen: (lens, h, hk, d); decode: (b, cap, h, hk, d, page)
    kw: tuple = ()  # sorted (key, value) pairs


def cases() -> list[Case]:
    if CUDA:
        dense = [
            Case("dense-d64-full", "dense", (2, 256, 8, 8, 64)),
            Case("dense-d64-causal-gqa", "dense", (2, 256, 8, 2, 64), (("causal", True),)),
            Case("dense-d128-causal", "dense", (1, 512, 8, 8, 128), (("causal", True),)),
            Case(
                "dense-d128-swa-gqa",
                "dense",
                (2, 256, 8, 2, 128),
                (("causal", True), ("window_size", (64, 0))),
            ),
        ]
        varlen = [
            Case("varlen-d64-causal", "varlen", ((113, 1, 257, 64), 8, 8, 64), (("causal", True),)),
            Case("varlen-d128-gqa", "varlen", ((200, 56, 0, 300), 8, 2, 128)),
        ]
        decode = [
            Case("decode-contig", "decode", (4, 2048, 16, 2, 128, 0)),
            Case("decode-paged", "decode", (4, 2048, 16, 2, 128, 256)),
            Case("decode-contig-leftpad", "decode", (4, 2048, 16, 2, 128, 0), (("leftpad", True),)),
        ]
    else:  # interpreter smoke run
        dense = [
            Case("dense-d16-full", "dense", (1, 24, 2, 2, 16)),
            Case("dense-d16-causal-gqa", "dense", (1, 24, 4, 2, 16), (("causal", True),)),
        ]
        varlen = [Case("varlen-d16-causal", "varlen", ((9, 1, 17), 2, 2, 16), (("causal", True),))]
        decode = [
            Case("decode-contig", "decode", (2, 64, 4, 2, 16, 0)),
            Case("decode-paged", "decode", (2, 64, 4, 2, 16, 16)),
            Case("decode-contig-leftpad", "decode", (2, 64, 4, 2, 16, 0), (("leftpad", True),)),
        ]
    return dense + varlen + decode


def _randn(shape, gen, requires_grad=False):
    t = torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32).to(DTYPE)
    return t.requires_grad_(requires_grad)


class Runner:
    """Builds inputs per case (random, or fixed from a per-case seed) and runs one call."""

    def __init__(self) -> None:
        self.gen = torch.Generator(device=DEV).manual_seed(0)
        self.decode_state: dict[str, tuple] = {}

    def inputs(self, c: Case, gen):
        if c.kind == "dense":
            b, s, h, hk, d = c.shape
            return [_randn((b, s, h, d), gen, True), _randn((b, s, hk, d), gen, True), _randn((b, s, hk, d), gen, True), _randn((b, s, h, d), gen)]  # fmt: skip
        if c.kind == "varlen":
            lens, h, hk, d = c.shape
            n = sum(lens)
            return [_randn((n, h, d), gen, True), _randn((n, hk, d), gen, True), _randn((n, hk, d), gen, True), _randn((n, h, d), gen)]  # fmt: skip
        b, cap, h, hk, d, page = c.shape
        return [_randn((b, 1, h, d), gen), _randn((b, 1, hk, d), gen), _randn((b, 1, hk, d), gen)]

    def cache(self, c: Case):
        """Persistent caches per decode case (a serving loop's), lengths cycling so the cache never fills."""
        if c.name not in self.decode_state:
            b, cap, h, hk, d, page = c.shape
            g = torch.Generator(device=DEV).manual_seed(1)
            if page:
                nblocks = b * cap // page
                kc, vc = _randn((nblocks, page, hk, d), g), _randn((nblocks, page, hk, d), g)
                perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(2))
                table = perm.reshape(b, cap // page).to(torch.int32).to(DEV)
            else:
                kc, vc, table = _randn((b, cap, hk, d), g), _randn((b, cap, hk, d), g), None
            lens = torch.tensor([(i * 997) % (cap - 1) for i in range(b)], dtype=torch.int32, device=DEV)
            self.decode_state[c.name] = (kc, vc, table, lens)
        return self.decode_state[c.name]

    def run(self, c: Case, ins, deterministic=False, lens_override=None, caches=None):
        kw = dict(c.kw)
        if c.kind in ("dense", "varlen"):
            q, k, v, dout = ins
            for t in (q, k, v):
                t.grad = None
            if c.kind == "dense":
                out = flash_attn_func(q, k, v, deterministic=deterministic, **kw)
            else:
                lens = c.shape[0]
                cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
                out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), deterministic=deterministic, **kw)  # fmt: skip
            out.backward(dout)
            return [out.detach(), q.grad, k.grad, v.grad]
        q, k_new, v_new = ins
        kc, vc, table, lens = self.cache(c)
        if caches is not None:  # determinism re-check: private copies of the warm-up cache state
            kc, vc = caches
        use = lens if lens_override is None else lens_override
        # left padding: the sequence's keys start a third of the way into its filled rows
        pad = torch.div(use, 3, rounding_mode="floor").to(torch.int32) if kw.get("leftpad") else None
        out = flash_attn_with_kvcache(
            q, kc, vc, k_new, v_new, cache_seqlens=use, cache_leftpad=pad, block_table=table, causal=True
        )
        if lens_override is None:  # advance the serving loop, wrapping before the cache fills
            cap = c.shape[1]
            lens.add_(1).remainder_(cap - 1)
        return [out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10000 if CUDA else 20)
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop early after this long (0: no limit)")
    ap.add_argument("--check-every", type=int, default=100, help="determinism re-check period (calls)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default="reports/gpu-hardening")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        tqdm = None

    rng = random.Random(args.seed)
    runner = Runner()
    all_cases = cases()
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    mem = torch.cuda.memory_allocated if CUDA else (lambda: 0)

    # ---- warm-up: compile every case, record the fixed-input results for the determinism checks
    t0 = time.perf_counter()
    fixed: dict[str, tuple] = {}
    for c in all_cases:
        for rep in range(2):
            gen = torch.Generator(device=DEV).manual_seed(hash(c.name) % 2**31)
            ins = runner.inputs(c, gen)
            lens0 = snap = None
            if c.kind == "decode":
                kc, vc, _, lens = runner.cache(c)
                lens0, snap = lens.clone(), (kc.clone(), vc.clone())
            res = [r.clone() for r in runner.run(c, ins, deterministic=True, lens_override=lens0)]
            if rep == 0:
                # the serving loop rewrites its caches later: the re-checks run on copies of this state
                fixed[c.name] = (hash(c.name) % 2**31, lens0, res, snap)
        print(f"warm-up {c.name}: {time.perf_counter() - t0:.1f}s", flush=True)
    sync()
    gc.collect()
    warm_s = time.perf_counter() - t0
    mem_after_warmup = mem()
    mem_max = mem_after_warmup

    counts = {c.name: 0 for c in all_cases}
    times = {c.name: 0.0 for c in all_cases}
    det_checks, det_failures = 0, []
    t1 = time.perf_counter()
    done = 0
    bar = tqdm(total=args.calls, mininterval=2.0) if tqdm is not None else None
    for i in range(args.calls):
        if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
            print(f"stopping at {i} calls: --max-seconds {args.max_seconds} reached", flush=True)
            break
        c = rng.choice(all_cases)
        ts = time.perf_counter()
        ins = runner.inputs(c, runner.gen)
        res = runner.run(c, ins)
        del ins, res
        times[c.name] += time.perf_counter() - ts
        counts[c.name] += 1
        done += 1
        if (i + 1) % args.check_every == 0:
            cc = all_cases[(i // args.check_every) % len(all_cases)]
            seed, lens0, ref, snap = fixed[cc.name]
            caches = None if snap is None else (snap[0].clone(), snap[1].clone())
            ins = runner.inputs(cc, torch.Generator(device=DEV).manual_seed(seed))
            res = runner.run(cc, ins, True, lens0, caches)
            det_checks += 1
            for j, (a, b) in enumerate(zip(res[:1] if cc.kind == "decode" else res, ref)):
                if not torch.equal(a, b):
                    det_failures.append(f"call {i + 1}: {cc.name} result #{j} differs from the warm-up run")
            del res
            sync()
            mem_max = max(mem_max, mem())
        if bar is not None:
            bar.update(1)
        elif (i + 1) % 1000 == 0:
            print(f"{i + 1}/{args.calls} calls, {time.perf_counter() - t1:.1f}s", flush=True)
    if bar is not None:
        bar.close()
    sync()
    gc.collect()
    soak_s = time.perf_counter() - t1
    mem_end = mem()
    growth = mem_end - mem_after_warmup
    summary = dict(
        device=torch.cuda.get_device_name() if CUDA else "cpu (interpreter)",
        dtype=str(DTYPE),
        calls=done,
        calls_requested=args.calls,
        warmup_seconds=round(warm_s, 2),
        soak_seconds=round(soak_s, 2),
        ms_per_call=round(1000 * soak_s / max(done, 1), 3),
        mem_after_warmup=mem_after_warmup,
        mem_end=mem_end,
        mem_growth_bytes=growth,
        mem_max_growth_bytes=mem_max - mem_after_warmup,
        determinism_checks=det_checks,
        determinism_failures=det_failures,
        per_case={
            c.name: dict(calls=counts[c.name], ms=round(1000 * times[c.name] / max(counts[c.name], 1), 3))
            for c in all_cases
        },  # fmt: skip
    )
    # no growth: allocated memory never rises above its post-warm-up level (it may end lower: the warm-up's
    # last outputs are still alive when that level is taken)
    ok = growth <= 0 and summary["mem_max_growth_bytes"] <= 0 and not det_failures and done == args.calls
    summary["ok"] = ok
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = [
        f"# Soak ({summary['device']}, {summary['dtype']})",
        "",
        f"- calls: {done} of {args.calls} requested; warm-up {warm_s:.1f}s, soak {soak_s:.1f}s "
        f"({summary['ms_per_call']} ms/call)",
        f"- memory_allocated after warm-up {mem_after_warmup} B, at the end {mem_end} B: growth {growth} B "
        f"(max during the run +{summary['mem_max_growth_bytes']} B)",
        f"- determinism: {det_checks} bitwise re-checks, {len(det_failures)} failures",
        *[f"  - {m}" for m in det_failures[:20]],
        "",
        "| case | calls | ms/call |",
        "|---|---:|---:|",
        *[f"| {n} | {v['calls']} | {v['ms']} |" for n, v in summary["per_case"].items()],
        "",
        f"verdict: {'OK' if ok else 'FAILED'}",
    ]
    with open(os.path.join(args.out, "soak.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
