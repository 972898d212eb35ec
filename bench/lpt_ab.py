"""A/B of the backward's program order (``FA_PLUS_LPT_BWD`` section widths) in ONE process (GPU exploration).

Process-to-process swings (~4%) hide a few-percent scheduling effect, so every width is timed here beside the
others, in interleaved rounds, on the causal-shaped cases the order matters for: dense causal d128 and the
block-sparse ``window_global`` / score_mod ``relbias`` patterns of ``bench_sparse.py``. bf16, 16 heads.

    python bench/lpt_ab.py                                   # widths 1,4,16; every case
    python bench/lpt_ab.py --widths 1,4 --cases causal --seqlens 4096,16384

Prints fwd+bwd TFLOP/s (visible elements, 3.5 x the forward's FLOPs) per width and the ratio to width 1; writes
``bench/results/<device>-lpt-ab.json``. One tile per kernel (``FA_PLUS_AUTOTUNE=0``) unless ``--autotune``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

if "--autotune" not in sys.argv:
    os.environ.setdefault("FA_PLUS_AUTOTUNE", "0")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sparse import build_case  # noqa: E402
from common import bench_ms, env_override, progress, write_json  # noqa: E402

from fa_backward.programmable import attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="1,4,16", help="FA_PLUS_LPT_BWD values (comma list)")
    ap.add_argument("--cases", default="causal,window_global,relbias")
    ap.add_argument(
        "--seqlens", default=None, help="default: causal 4096,8192,16384; sparse 8192,16384,32768"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--autotune", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("lpt_ab.py times GPU kernels: no CUDA device here")
    widths = [w.strip() for w in args.widths.split(",")]
    h, d, device = 16, 128, "cuda"
    todo = []
    for case in args.cases.split(","):
        default = "4096,8192,16384" if case == "causal" else "8192,16384,32768"
        for s in (int(x) for x in (args.seqlens or default).split(",")):
            todo.append((case, s))
    rows = []
    gen = torch.Generator().manual_seed(0)
    for case, s in progress(todo, desc="lpt a/b"):
        tokens = 16384 if case == "causal" else 32768
        b = max(1, tokens // s)
        q, k, v, dout = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16) for _ in range(4))
        leaves = [t.requires_grad_() for t in (q, k, v)]
        if case == "causal":
            kw, visible = {"causal": True}, s * (s + 1) / 2 * b * h
        else:
            c = build_case(case, b, h, s, device, 128, gen)
            kw, visible = c.ours, c.visible
        flop = 3.5 * 4.0 * d * visible

        def step(kw=kw, leaves=leaves, dout=dout):
            torch.autograd.grad(attention(*leaves, **kw)[0], leaves, dout)

        times: dict[str, list[float]] = {w: [] for w in widths}
        for _ in range(args.rounds):
            for w in widths:
                with env_override("FA_PLUS_LPT_BWD", w):
                    times[w].append(bench_ms(step, warmup=5, rep=30))
        base = statistics.median(times[widths[0]])
        for w in widths:
            ms = statistics.median(times[w])
            row = {"case": case, "seqlen": s, "batch": b, "width": int(w), "ms": round(ms, 4)}
            row.update(tflops=round(flop / ms * 1e-9, 1), vs_first=round(base / ms, 3), rounds=times[w])
            rows.append(row)
            print(
                f"  {case:13s} s={s:6d} width={w:>5s}: {row['tflops']:7.1f} TFLOP/s  x{row['vs_first']:.3f}"
            )
    print(f"[lpt_ab] wrote {write_json('lpt-ab', rows)}")


if __name__ == "__main__":
    main()
