"""GPU probe of the forward kernel: correctness (bf16) of the TMA and pointer paths, then TFLOP/s next to SDPA.

Usage (on the GPU machine): python scripts/fwd_probe.py [--quick]
Prints one table; meant for quick kernel iterations, bench/bench_forward.py is the real benchmark.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from fa_core import attention_ref, flash_attn_forward
from fa_core.forward_kernel import fwd_kernel


def check(tma: str) -> None:
    os.environ["FA_PLUS_TMA"] = tma
    torch.manual_seed(0)
    for b, sq, sk, h, hk, d, causal, win in [
        (2, 1000, 1000, 8, 2, 128, True, (-1, -1)),
        (1, 777, 1333, 4, 4, 96, False, (100, 50)),
        (3, 513, 257, 6, 3, 64, True, (-1, -1)),
        (1, 300, 300, 2, 1, 256, False, (-1, -1)),
    ]:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
        out = torch.full_like(q, float("nan"))
        r = flash_attn_forward(q, k, v, causal=causal, window_size=win, out=out)
        ref, lse = attention_ref(q, k, v, causal=causal, window_size=win)
        low, _ = attention_ref(q, k, v, causal=causal, window_size=win, upcast=False)
        err = (r.out.float() - ref.float()).abs().max().item()
        base = (low.float() - ref.float()).abs().max().item()
        lerr = (r.lse - lse).abs().nan_to_num(0).max().item()
        ok = err <= 2 * base + 1e-2 and not torch.isnan(r.out).any()
        print(f"check tma={tma} {b}x{sq}x{sk} h{h}/{hk} d{d} causal={causal} win={win}: err {err:.2e} "
              f"(ref-lowp {base:.2e}) lse {lerr:.1e} {'OK' if ok else 'FAIL'}", flush=True)


def bench(quick: bool) -> None:
    rows = []
    seqlens = [1024, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    for d in (64, 128):
        for causal in (False, True):
            for s in seqlens:
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                res = {}
                for tma in ("1", "0"):
                    os.environ["FA_PLUS_TMA"] = tma
                    fn = lambda: flash_attn_forward(q, k, v, causal=causal)  # noqa: E731
                    with torch.no_grad():
                        res[f"fa-plus tma{tma}"] = flops / triton.testing.do_bench(fn, return_mode="median") * 1e-9
                for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            fn = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)  # noqa: E731
                            res[name] = flops / triton.testing.do_bench(fn, return_mode="median") * 1e-9
                    except Exception as e:  # noqa: BLE001
                        res[name] = float("nan")
                        print(name, "failed", e)
                rows.append((d, causal, s, res))
                print(d, causal, s, {k_: round(v_, 1) for k_, v_ in res.items()}, flush=True)
    print("\nautotune choices:")
    for key, cfg in fwd_kernel.cache.items():
        print(" ", key, cfg)
    print("\n| d | causal | seqlen | " + " | ".join(rows[0][3]) + " |")
    for d, causal, s, res in rows:
        print(f"| {d} | {causal} | {s} | " + " | ".join(f"{v:.0f}" for v in res.values()) + " |")


if __name__ == "__main__":
    t = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    check("1")
    check("0")
    bench("--quick" in sys.argv)
    print(f"total {time.time() - t:.0f}s")
