"""Host (CPU) cost of one call of the public functions, split into our Python and Triton's launch path.

Short sequences are launch-bound: a forward+backward step at seqlen 512 runs ~1 ms of GPU work, so tens of
microseconds of host time per launch decide whether we beat FA2 there. This script times, on tiny inputs (GPU
work negligible), the host time per call of: the forward (direct and through autograd), the backward alone,
and forward+backward; then the same with every Triton kernel replaced by a no-op, which leaves our Python
(validation, argument building, allocations) and torch's autograd. The difference is Triton's launch path
(autotuner lookup, argument binding/specialization, the driver launch). On the GPU, the real calls are timed
twice: through Triton's own launch path and through ``fa_core.fast_launch`` (the default).

    python bench/host_overhead.py            # GPU: real and no-op launches; CPU: no-op only (interpreter)
    python bench/host_overhead.py --profile  # also cProfile forward+backward (real launches): top functions
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import env_override, host_ms_per_call  # noqa: E402


def _per_call_us(fn: Callable[[], Any], n: int = 300) -> float:
    return host_ms_per_call(fn, n=n, warmup=20) * 1e3


def _calls(device: str) -> dict[str, Callable[[], Any]]:
    from fa_backward import flash_attn_func
    from fa_core import flash_attn_forward

    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    q, k, v, do = (torch.randn(2, 128, 4, 64, device=device, dtype=dtype) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = flash_attn_func(qg, kg, vg, causal=True)
    return {
        "forward (fa_core, no autograd)": lambda: flash_attn_forward(q, k, v, causal=True),
        "forward (flash_attn_func, autograd)": lambda: flash_attn_func(qg, kg, vg, causal=True),
        "backward only (retain_graph)": lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True),
        "forward + backward": lambda: torch.autograd.grad(
            flash_attn_func(qg, kg, vg, causal=True), (qg, kg, vg), do
        ),
    }


def _nop(*args: Any, **kwargs: Any) -> None:
    return None


def _patch_nop() -> None:
    import fa_backward.launch as bl
    import fa_core.forward_launch as fl

    fl.fwd_launch = _nop
    for name in ("dkdv_launch", "dq_launch"):
        setattr(bl, name, _nop)


def _profile(fn: Callable[[], Any], n: int = 500, top: int = 30) -> None:
    """Where the host time of one call goes, by function (self time first)."""
    import cProfile
    import pstats

    for _ in range(20):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    print(f"cProfile of {n} calls (times include the profiler's own overhead):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "--profile" in sys.argv[1:]:
        if device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        _profile(_calls(device)["forward + backward"])
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    results: dict[str, dict[str, float]] = {}
    if device == "cuda":
        from fa_core.fast_launch import set_fast_launch

        for fast in (False, True):
            set_fast_launch(fast)
            for name, fn in _calls(device).items():
                results.setdefault(name, {})["real" if fast else "triton"] = _per_call_us(fn)
        # the forward uses on-device TMA descriptors (global scratch allocated per launch); without them:
        with env_override("FA_PLUS_TMA", "0"):
            for fast in (False, True):
                set_fast_launch(fast)
                fn = _calls(device)["forward (fa_core, no autograd)"]
                results.setdefault("forward (fa_core), FA_PLUS_TMA=0", {})["real" if fast else "triton"] = (
                    _per_call_us(fn)
                )
    _patch_nop()
    for name, fn in _calls(device).items():
        results.setdefault(name, {})["nop"] = _per_call_us(fn)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "no GPU"
    print(
        f"host time per call, us ({gpu}; 'nop': Triton kernels replaced by no-ops; 'triton path': fa_core.fast_launch off)"
    )
    print(f"{'call':<40} {'triton path':>12} {'real':>8} {'nop':>8} {'launch path':>12}")
    for name, r in results.items():
        real, slow, nop = (
            r.get("real", float("nan")),
            r.get("triton", float("nan")),
            r.get("nop", float("nan")),
        )
        print(f"{name:<40} {slow:12.1f} {real:8.1f} {nop:8.1f} {real - nop:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
