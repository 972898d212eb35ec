"""Where the public calls should switch from the Triton kernels to the Hopper Gluon kernels (a tuner).

At short sequences the Gluon launches (host-side tensor descriptors, Triton's own launch path, never replayed)
can cost more than they gain. This script times the public ``flash_attn_func`` at the FlashAttention-paper
shapes (batch * seqlen = 16k tokens, hidden 2048, nheads = 2048 / headdim, bf16), seqlen 512-4k, with each
Gluon dispatch threshold forced on and off, in one process:

* ``bench: fwd``: inputs that do not require grad; providers ``triton`` (``fa_core.ops.GLUON_MIN_FLOPS`` =
  inf) and ``gluon`` (= 0). The forward's launch replays are cleared at every switch, so a provider never runs
  the other's recorded launch.
* ``bench: fwd_bwd``: forward + ``torch.autograd.grad`` (inputs requiring grad); providers ``triton`` (both
  backward thresholds None), ``gluon-dkdv`` (``fa_backward.launch.GLUON_DKDV_MIN_FLOPS`` = 0) and ``gluon``
  (dQ and dK/dV both 0); the forward keeps its default dispatch.

Providers are interleaved (each once per round, the order reversed every round) and the best round is kept, so
clock drift during the run favours none of them. TFLOP/s: forward FLOPs = 4 * b * h * s^2 * d (halved when
causal); fwd_bwd counts 3.5x that. Rows also carry ``pass_flops``, the work measure the thresholds compare
(forward: 4 * b * h * s^2 * d, not halved when causal; backward pass: 8 * b * h * s^2 * d, halved when causal).
Writes
``bench/results/<gpu>-gluon-thresholds.{json,md}``.

    python bench/gluon_thresholds.py                       # both benches, d128 then d64, 2k first
    python bench/gluon_thresholds.py --benches fwd --headdims 128 --seqlens 1024,2048
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, bench_ms, install_sigterm_handler, progress, write_results  # noqa: E402

INF = float("inf")


@contextmanager
def _forward_threshold(value: float) -> Iterator[None]:
    import fa_core.ops as ops

    saved = ops.GLUON_MIN_FLOPS
    ops.GLUON_MIN_FLOPS = value
    ops._REPLAYS.clear()
    try:
        yield
    finally:
        ops.GLUON_MIN_FLOPS = saved
        ops._REPLAYS.clear()


@contextmanager
def _backward_thresholds(dq: float | None, dkdv: float | None) -> Iterator[None]:
    import fa_backward.launch as launch

    saved = launch.GLUON_DQ_MIN_FLOPS, launch.GLUON_DKDV_MIN_FLOPS
    launch.GLUON_DQ_MIN_FLOPS, launch.GLUON_DKDV_MIN_FLOPS = dq, dkdv
    try:
        yield
    finally:
        launch.GLUON_DQ_MIN_FLOPS, launch.GLUON_DKDV_MIN_FLOPS = saved


FWD_PROVIDERS: dict[str, Callable[[], Any]] = {
    "triton": lambda: _forward_threshold(INF),
    "gluon": lambda: _forward_threshold(0.0),
}
BWD_PROVIDERS: dict[str, Callable[[], Any]] = {
    "triton": lambda: _backward_thresholds(None, None),
    "gluon-dkdv": lambda: _backward_thresholds(None, 0.0),
    "gluon": lambda: _backward_thresholds(0.0, 0.0),
}


def measure(bench: str, d: int, s: int, causal: bool, rounds: int) -> list[Row]:
    from flash_attn import flash_attn_func

    h, b = 2048 // d, 16384 // s
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    fwd_flops = 4 * b * h * s * s * d / (2 if causal else 1)
    if bench == "fwd":
        providers, flop, pass_flops = FWD_PROVIDERS, fwd_flops, 4 * b * h * s * s * d

        def fn() -> Any:
            return flash_attn_func(q, k, v, causal=causal)

    else:
        providers, flop, pass_flops = BWD_PROVIDERS, 3.5 * fwd_flops, 2 * fwd_flops
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def fn() -> Any:
            return torch.autograd.grad(flash_attn_func(qg, kg, vg, causal=causal), (qg, kg, vg), do)

    best: dict[str, float] = {}
    errors: dict[str, str] = {}
    names = list(providers)
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            if name in errors:
                continue
            try:
                with providers[name]():
                    tflops = flop / bench_ms(fn) / 1e9
                best[name] = max(best.get(name, 0.0), tflops)
            except Exception as exc:  # one failing provider must not stop the sweep
                errors[name] = f"{type(exc).__name__}: {exc}"[:200]
    rows: list[Row] = []
    for name in names:
        row: Row = dict(bench=bench, provider=name, dtype="bfloat16", headdim=d, seqlen=s, batch=b, nheads=h,
                        causal=causal, rounds=rounds, pass_flops=f"{pass_flops:.3g}")  # fmt: skip
        if name in best:
            row["tflops"] = round(best[name], 1)
        else:
            row["error"] = errors.get(name, "not run")
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benches", default="fwd,fwd_bwd", help="comma list out of fwd, fwd_bwd")
    ap.add_argument("--headdims", default="128,64")
    ap.add_argument("--seqlens", default="2048,1024,512,4096")
    ap.add_argument("--causal", default="1,0", help="comma list of 0/1")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gluon_thresholds: needs a CUDA GPU (sm_90 for the Gluon kernels)")
        return 0
    install_sigterm_handler()
    points = [
        (bench, d, s, c == "1")
        for bench in args.benches.split(",")
        for d in map(int, args.headdims.split(","))
        for s in map(int, args.seqlens.split(","))
        for c in args.causal.split(",")
    ]
    rows: list[Row] = []
    try:
        for bench, d, s, causal in progress(points, desc="gluon thresholds"):
            new = measure(bench, d, s, causal, args.rounds)
            rows += new
            print(", ".join(f"{r['provider']} {r.get('tflops', r.get('error'))}" for r in new),
                  f"<- {bench} d{d} s{s} causal={causal}", flush=True)  # fmt: skip
    finally:
        if rows:
            print(f"wrote {write_results('gluon-thresholds', rows, plot_kw={'bench': 'fwd_bwd'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
