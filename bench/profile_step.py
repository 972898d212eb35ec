"""Where does a fa-plus training step spend its time at one shape? (GPU only; a diagnosis tool, no results file)

For each shape: median times (``do_bench``) of forward, backward-only and forward+backward through
``fa_backward.flash_attn_func``; the host time of one step (launch-only: 20 steps without a sync, divided);
and a ``torch.profiler`` table of the GPU kernels of one forward+backward step. A step whose host time exceeds
its GPU time is launch-bound: its kernels wait for Python.

    python bench/profile_step.py                            # d64 seqlen 512 / 1024 (batch 16384 / seqlen)
    python bench/profile_step.py --shapes 32x512x16x128 --causal 1 --trace $OUT   # + GPU idle gaps, trace
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import host_ms_per_call  # noqa: E402


def _shape(text: str) -> tuple[int, int, int, int]:
    b, s, h, d = (int(x) for x in text.split("x"))
    return b, s, h, d


def profile(b: int, s: int, h: int, d: int, causal: bool, trace_dir: str | None = None) -> None:
    import triton

    from fa_backward import flash_attn_func

    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fwd() -> torch.Tensor:
        return flash_attn_func(q, k, v, causal=causal)

    def step() -> object:
        return torch.autograd.grad(fwd(), (q, k, v), dout)

    step()
    out = fwd()

    def bwd() -> object:
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    bwd()
    torch.cuda.synchronize()
    flop = 4 * b * h * s * s * d / (2 if causal else 1)
    t_f = triton.testing.do_bench(fwd)
    t_b = triton.testing.do_bench(bwd)
    t_fb = triton.testing.do_bench(step)

    host_f, host_b, host = host_ms_per_call(fwd), host_ms_per_call(bwd), host_ms_per_call(step)
    print(f"   host ms/call: fwd {host_f:.3f}, bwd {host_b:.3f}, fwd+bwd {host:.3f}")
    print(
        f"\n== b{b} s{s} h{h} d{d} causal={causal}: fwd {t_f:.3f} ms ({flop / t_f * 1e-9:.0f} TF/s), "
        f"bwd {t_b:.3f} ms ({2.5 * flop / t_b * 1e-9:.0f}), fwd+bwd {t_fb:.3f} ms "
        f"({3.5 * flop / t_fb * 1e-9:.0f}); fwd+bwd sum of parts {t_f + t_b:.3f} ms; host {host:.3f} ms/step"
    )
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    print_gaps(p)
    if trace_dir:
        path = Path(trace_dir) / f"step_b{b}_s{s}_h{h}_d{d}_c{int(causal)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        p.export_chrome_trace(str(path))
        print(f"   chrome trace: {path}")


def print_gaps(p: Any, top: int = 6) -> None:
    """GPU idle time between consecutive kernels of the profiled steps: where the GPU waited for the host."""
    kernels = sorted(
        (e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    if len(kernels) < 2:
        return
    busy = sum(e.time_range.end - e.time_range.start for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    gaps = [
        (nxt.time_range.start - prev.time_range.end, prev.name, nxt.name)
        for prev, nxt in zip(kernels, kernels[1:])
    ]
    print(f"   GPU busy {busy:.0f} us of a {span:.0f} us span ({busy / span:.0%}); largest idle gaps:")
    for gap, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"     {gap:8.1f} us  after {before[:40]}  before {after[:40]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="32x512x32x64,16x1024x32x64", help="comma list of BxSxHxD")
    ap.add_argument("--causal", default="0,1", help="comma list of 0/1")
    ap.add_argument("--trace", default=None, help="folder for a chrome trace per shape (e.g. $OUT)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step: no CUDA GPU", file=sys.stderr)
        return 3
    for text in args.shapes.split(","):
        for c in args.causal.split(","):
            profile(*_shape(text), causal=c == "1", trace_dir=args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
