"""Quickstart: run Flash Attention Plus through its public API (``flash_attn.flash_attn_func``) and check it
against the reference.

On a machine with a GPU it runs the Triton kernels there (bf16); without one it runs them on CPU tensors
through Triton's interpreter (fp32, small shapes). Prints the error against the float64 reference and
the time of one call.

    python examples/quickstart.py
"""

from __future__ import annotations

import os
import time

import torch

if not torch.cuda.is_available():
    # Triton reads this when kernels are defined: set it before importing fa_core.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fa_core import attention_ref  # noqa: E402
from flash_attn import flash_attn_func  # noqa: E402


def main() -> None:
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    batch, seqlen, nheads, nheads_k, headdim = (4, 2048, 16, 4, 128) if gpu else (1, 97, 4, 2, 64)
    torch.manual_seed(0)
    q = torch.randn(batch, seqlen, nheads, headdim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen, nheads_k, headdim, device=device, dtype=dtype)
    v = torch.randn(batch, seqlen, nheads_k, headdim, device=device, dtype=dtype)
    where = torch.cuda.get_device_name() if gpu else "CPU (Triton interpreter)"
    print(f"Flash Attention Plus quickstart on {where}")
    print(f"q {tuple(q.shape)}, k/v {tuple(k.shape)} (GQA {nheads}/{nheads_k}), {dtype}, causal")

    flash_attn_func(q, k, v, causal=True)  # warm-up: compiles (GPU) or traces (CPU) the kernel
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    if gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    ref, ref_lse = attention_ref(q, k, v, causal=True, dtype=torch.float64 if not gpu else torch.float32)
    low, _ = attention_ref(q, k, v, causal=True, upcast=False)
    err = (out.double() - ref.double()).abs().max().item()
    base = (low.double() - ref.double()).abs().max().item()
    lse_err = (lse.double() - ref_lse.double()).abs().max().item()
    print(f"max |out - ref| = {err:.3e}   (plain PyTorch in {dtype}: {base:.3e})")
    print(f"max |lse - ref| = {lse_err:.3e}")
    print(f"one forward call: {elapsed * 1e3:.2f} ms")
    ok = err <= 2 * base + (1e-4 if dtype == torch.float32 else 2e-2)
    print("OK" if ok else "MISMATCH")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
