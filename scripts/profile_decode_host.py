"""Host (Python) time per eager ``flash_attn_with_kvcache`` decode call on CPU, every kernel launch stubbed.

A CPU-side proxy of the eager decode path's host cost: what remains with the launches replaced by no-ops is
argument checking, the value check's bookkeeping and its one host read, planning and argument marshalling.
Shapes: one query token, batch 2, 4/4 heads, d 64, a contiguous cache of 256 rows (``cache_seqlens`` a
tensor, as serving loops pass it) and a paged one (page 16, a block table); value checks on and off.

    python scripts/profile_decode_host.py              # microseconds per call (best of 9 rounds), ATen ops
    python scripts/profile_decode_host.py --profile    # cProfile of the paged case (top functions)

The ATen op count per call (the tensor ops a call dispatches besides its Triton launches; on a GPU most are a
kernel launch or an allocation, microseconds of host time each) is the machine-independent part; times on a
shared CPU are noisy, hence the best round.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the device check; every launch is stubbed

import torch  # noqa: E402

import fa_core.settings as fs  # noqa: E402
import fa_kvcache.interface as ki  # noqa: E402


def _nop(*args: Any, **kwargs: Any) -> None:
    return None


def stub_launches() -> None:
    """Every Triton launch of the decode path becomes a no-op (the Python around it is what is timed)."""
    for name in ("append_launch", "split_kv_launch", "combine_launch"):
        setattr(ki, name, _nop)
    import fa_kvcache.checks as kc

    if hasattr(kc, "value_check_launch"):
        setattr(kc, "value_check_launch", _nop)  # noqa: B010


def cases() -> dict[str, tuple[tuple, dict]]:
    torch.manual_seed(0)
    b, s, h, d, page = 2, 256, 4, 64, 16
    q = torch.randn(b, 1, h, d)
    kc = torch.randn(b, s, h, d)
    vc = torch.randn(b, s, h, d)
    seqlens = torch.full((b,), 200, dtype=torch.int32)
    kp = torch.randn(b * s // page, page, h, d)
    vp = torch.randn(b * s // page, page, h, d)
    bt = torch.arange(b * s // page, dtype=torch.int32).reshape(b, s // page)
    return {
        "contiguous": ((q, kc, vc), {"cache_seqlens": seqlens, "causal": True}),
        "paged": ((q, kp, vp), {"cache_seqlens": seqlens, "block_table": bt, "causal": True}),
        "int-seqlens": ((q, kc, vc), {"cache_seqlens": 200, "causal": True}),
    }


def aten_ops_per_call(args: tuple, kwargs: dict) -> int:
    """ATen ops one call dispatches (factory functions, views and copies included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            Count.n += 1
            return func(*a, **(kw or {}))

    with Count():
        ki.flash_attn_with_kvcache(*args, **kwargs)
    return Count.n


def us_per_call(args: tuple, kwargs: dict, n: int = 2000, rounds: int = 9) -> float:
    for _ in range(50):
        ki.flash_attn_with_kvcache(*args, **kwargs)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            ki.flash_attn_with_kvcache(*args, **kwargs)
        times.append((time.perf_counter() - t0) / n * 1e6)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("-n", type=int, default=2000)
    a = ap.parse_args()
    stub_launches()
    all_cases = cases()
    if a.profile:
        args, kwargs = all_cases["paged"]
        with fs.override(value_checks=True):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.n):
                ki.flash_attn_with_kvcache(*args, **kwargs)
            pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        return
    for name, (args, kwargs) in all_cases.items():
        for checks in (True, False):
            with fs.override(value_checks=checks):
                us = us_per_call(args, kwargs, a.n)
                ops = aten_ops_per_call(args, kwargs)
            print(
                f"{name:12s} value_checks={'on ' if checks else 'off'}  {us:7.1f} us/call  {ops:3d} ATen ops"
            )


if __name__ == "__main__":
    main()
