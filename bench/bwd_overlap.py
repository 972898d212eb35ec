"""Backward overlap probe: would the dQ and dK/dV programs gain from sharing the SMs (one launch, as flex does)?

Times the backward's two kernels for fixed tiles, launched one after the other (as shipped) and side by side on
two CUDA streams, where the GPU's block scheduler can put a dQ program and a dK/dV program on the same SM (when
both fit: one-warpgroup tiles). The side-by-side run does not wait for the dQ pass's delta (the dK/dV pass reads
the previous call's buffer contents): a timing experiment only, never a result. bf16, d128, 16 heads, batch *
seqlen = 32k tokens; rows to ``bench/results/<device>-bwd-overlap.json``.

    python bench/bwd_overlap.py --seqlens 16384 --cases causal relbias
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from common import bench_ms, install_sigterm_handler, write_json  # noqa: E402

from fa_backward import backward_kernel as bk  # noqa: E402
from fa_backward import launch as bl  # noqa: E402
from fa_backward.programmable import attention  # noqa: E402
from fa_core import score_mods as sm  # noqa: E402

#: (name, dQ tile, dK/dV tile): (BLOCK_M, BLOCK_N, num_warps, num_stages) as in backward_configs
PAIRS = [
    ("8w", (128, 128, 8, 2), (64, 128, 8, 3)),
    ("4w", (64, 64, 4, 2), (32, 64, 4, 2)),
    ("4w-dq32", (64, 32, 4, 3), (32, 64, 4, 2)),
]


def _cfg(t: tuple[int, int, int, int]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": t[0], "BLOCK_N": t[1]}, num_warps=t[2], num_stages=t[3])]


class _Streams:
    """Patches the two launchers: the dK/dV launch goes to a side stream that does not wait for the dQ one."""

    def __init__(self) -> None:
        self.side = torch.cuda.Stream()
        self.on = False
        self._dkdv = bl.dkdv_launch
        bl.dkdv_launch = self._dkdv_call

    def _dkdv_call(self, *a: Any, **kw: Any) -> Any:
        if not self.on:
            return self._dkdv(*a, **kw)
        main = torch.cuda.current_stream()
        self.side.wait_event(self.start)  # after the previous step's work, not after this step's dQ pass
        with torch.cuda.stream(self.side):
            r = self._dkdv(*a, **kw)
        main.wait_stream(self.side)
        return r

    def step(self, fn: Any) -> Any:
        self.start = torch.cuda.Event()
        self.start.record()
        return fn()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="*", default=[16384])
    ap.add_argument("--cases", nargs="*", default=["causal", "relbias"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bwd_overlap.py times GPU kernels: no CUDA device here")
        return
    install_sigterm_handler()
    streams = _Streams()
    rows: list[dict[str, Any]] = []
    h, d = 16, 128
    for s in args.seqlens:
        b = max(1, 32768 // s)
        for case in args.cases:
            torch.manual_seed(0)
            q, k, v = (
                torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in "qkv"
            )
            dout = torch.randn_like(q)
            kw: dict[str, Any] = {"causal": True}
            if case == "relbias":
                kw.update(score_mod=sm.relative_position_bias, score_mod_grad=sm.additive_grad)
            o = attention(q, k, v, **kw)[0]
            flop = 2.5 * 4.0 * d * b * h * s * (s + 1) / 2

            def bwd(o: torch.Tensor = o, q=q, k=k, v=v, dout=dout) -> Any:
                return torch.autograd.grad(o, (q, k, v), dout, retain_graph=True)

            for name, tdq, tkv in PAIRS:
                bk.dq_kernel.configs = _cfg(tdq)
                bk.dkdv_kernel.configs = _cfg(tkv)
                bk.dq_kernel.cache.clear()
                bk.dkdv_kernel.cache.clear()
                # drop the fast path's cached compiled kernels (fa_core.fast_launch)
                bl.dq_launch._cache.clear()
                streams._dkdv._cache.clear()
                for mode in ("serial", "streams"):
                    streams.on = mode == "streams"
                    streams.step(bwd)
                    ms = bench_ms(lambda: streams.step(bwd), warmup=10, rep=40)
                    row = {
                        "case": case,
                        "seqlen": s,
                        "batch": b,
                        "pair": name,
                        "mode": mode,
                        "ms": round(ms, 4),
                    }
                    row["tflops"] = round(flop / ms * 1e-9, 1)
                    rows.append(row)
                    print(row, flush=True)
                streams.on = False
    print(write_json("bwd-overlap", rows))


if __name__ == "__main__":
    main()
