"""FP8 (e4m3) forward vs our bf16 forward, and a tuner of the FP8 tile list (target: fp8 >= 1.3x bf16 at
seqlen >= 4k).

Standard sweep points (batch * seqlen = 16384, hidden 2048), headdim 128 and 64, causal and not. Each
provider is timed with a few fixed tiles (the leading ones of its autotune family, each run through
``fa_core.forward_configs.force_tile``) and the best is kept, so the run needs no autotune sweep: compiles run
first, in parallel processes (Triton's disk cache), then the timings run in this process, one kernel at a time.
``--all-tiles`` times every tile of both families, ``--extra-tiles`` candidate tiles outside them.

    python bench/bench_fp8.py                       # 4k, 8k, 16k x d128, d64 x causal, non-causal
    python bench/bench_fp8.py --seqlens 16384 --headdims 128 --jobs 1

Prints one row per point (best bf16 / fp8 TFLOP/s, their tiles, the ratio) and writes
bench/results/<device>-fp8-vs-bf16.json. Exit status 0 when every point with seqlen >= 4096 meets the bar, 1
otherwise, 3 without a GPU. Expected time on an H200: ~60 s (20 compiles over 4 processes, 60 timings).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fa_core.forward_configs import Tile, force_tile  # noqa: E402

BAR = 1.3
FP8 = torch.float8_e4m3fn
# (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA): the leading tiles of each autotune family
TILES: dict[str, list[Tile]] = {
    "bf16": [(128, 128, 8, 3, True), (128, 64, 8, 3, True)],
    "fp8": [(64, 128, 4, 3, True), (64, 128, 4, 4, True), (128, 64, 8, 4, True), (128, 128, 8, 3, True)],
}


def _inputs(batch: int, seqlen: int, nheads: int, d: int, fp8: bool) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if not fp8:
        return (q, k, v), {}
    ones = torch.ones(batch, nheads, device="cuda", dtype=torch.float32)
    return tuple(t.to(FP8) for t in (q, k, v)), {"q_descale": ones, "k_descale": ones, "v_descale": ones}


def _run(tensors, kw, causal):
    from fa_core import flash_attn_forward

    return flash_attn_forward(*tensors, causal=causal, **kw)


def compile_only(headdim: int, causal: bool) -> None:
    """Compile every tile of both families for one (headdim, causal) at a small shape."""
    for name, tiles in TILES.items():
        fp8 = name == "fp8"
        tensors, kw = _inputs(1, 1024, 2048 // headdim, headdim, fp8)
        for tile in tiles:
            try:
                with force_tile(tile):
                    _run(tensors, kw, causal)
            except Exception as exc:  # reported again (and skipped) by the timing pass
                print(f"[compile] d={headdim} causal={causal} {name} {tile}: {type(exc).__name__}: {exc}")
    torch.cuda.synchronize()


def time_point(headdim: int, causal: bool, seqlen: int) -> dict[str, Any]:
    import triton

    batch, nheads = 16384 // seqlen, 2048 // headdim
    flop = 4 * batch * nheads * seqlen * seqlen * headdim / (2 if causal else 1)
    row: dict[str, Any] = {"headdim": headdim, "causal": causal, "seqlen": seqlen, "batch": batch}
    for name, tiles in TILES.items():
        fp8 = name == "fp8"
        tensors, kw = _inputs(batch, seqlen, nheads, headdim, fp8)
        best: tuple[float, Any] = (0.0, None)
        for tile in tiles:
            try:
                with force_tile(tile):
                    fn = lambda t=tensors, kw=kw: _run(t, kw, causal)  # noqa: E731
                    ms = triton.testing.do_bench(fn, warmup=10, rep=40)
            except Exception as exc:
                print(f"  {name} {tile}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            tf = flop / ms * 1e-9
            row.setdefault(f"{name}_all", {})[str(tile)] = round(tf, 1)
            if tf > best[0]:
                best = (tf, tile)
        row[name] = round(best[0], 1)
        row[f"{name}_tile"] = list(best[1]) if best[1] else None
    row["ratio"] = round(row["fp8"] / row["bf16"], 3) if row["bf16"] else None
    return row


def plot_rows(rows: list[dict[str, Any]], path: Path, device: str) -> Path | None:
    """PNG beside the JSON: TFLOP/s of the bf16 and the FP8 forward against seqlen, a panel per (headdim,
    causal) (``common.plot``)."""
    from common import plot

    flat = [
        {
            "bench": "fp8_vs_bf16",
            "provider": name,
            "headdim": r["headdim"],
            "causal": r["causal"],
            "seqlen": r["seqlen"],
            "tflops": r.get(key),
        }
        for r in rows
        for name, key in (("fa-plus bf16", "bf16"), ("fa-plus fp8", "fp8"))
    ]
    return plot(flat, path, title=f"FP8 (e4m3) vs bf16 forward, TFLOP/s ({device})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="4096,8192,16384")
    ap.add_argument("--headdims", default="128,64")
    ap.add_argument(
        "--jobs", type=int, default=4, help="parallel compile processes (0: compile while timing)"
    )
    ap.add_argument(
        "--extra-tiles",
        default="",
        help="exploration: ';'-separated BM,BN,warps,stages,tma (tma 0/1) tried for fp8 besides its family",
    )
    ap.add_argument(
        "--all-tiles",
        action="store_true",
        help="time every tile of both autotune families (is autotuning picking well at these points?)",
    )
    ap.add_argument("--compile-only", default=None, help=argparse.SUPPRESS)  # "d,causal": worker mode
    args = ap.parse_args(argv)
    if args.all_tiles:
        os.environ["BENCH_FP8_ALL_TILES"] = "1"
    if os.environ.get("BENCH_FP8_ALL_TILES") == "1":
        from fa_core.forward_configs import FP8_TILES, FWD_TILES

        TILES["bf16"] = [t[:5] for t in FWD_TILES]
        TILES["fp8"] = [t[:5] for t in FP8_TILES]
    if args.extra_tiles:
        # workers inherit the tiles through the environment
        os.environ["BENCH_FP8_EXTRA_TILES"] = args.extra_tiles
    for spec in filter(None, os.environ.get("BENCH_FP8_EXTRA_TILES", "").split(";")):
        bm, bn, warps, stages, tma = (int(x) for x in spec.split(","))
        TILES["fp8"].append((bm, bn, warps, stages, bool(tma)))
    if not torch.cuda.is_available():
        print("bench_fp8: no CUDA GPU; nothing to time", file=sys.stderr)
        return 3
    if args.compile_only:
        d, c = args.compile_only.split(",")
        compile_only(int(d), c == "1")
        return 0
    headdims = [int(x) for x in args.headdims.split(",")]
    seqlens = [int(x) for x in args.seqlens.split(",")]
    points = [(d, c) for d in headdims for c in (False, True)]
    t0 = time.time()
    if args.jobs > 0:
        procs: list[subprocess.Popen] = []
        for d, c in points:
            while len([p for p in procs if p.poll() is None]) >= args.jobs:
                time.sleep(0.2)
            cmd = [sys.executable, __file__, "--compile-only", f"{d},{int(c)}"]
            procs.append(subprocess.Popen(cmd))
        for p in procs:
            p.wait()
        print(f"[bench_fp8] compiled in {time.time() - t0:.0f}s", flush=True)
    from common import device_slug, install_sigterm_handler, results_path, write_json

    install_sigterm_handler()
    rows = []
    path = None
    print(f"{'d':>4} {'causal':>6} {'seqlen':>6} {'bf16':>7} {'fp8':>7} {'fp8/bf16':>8}  tiles (bf16 | fp8)")
    try:
        for d, c in points:
            for s in seqlens:
                row = time_point(d, c, s)
                rows.append(row)
                ok = row["ratio"] is not None and (s < 4096 or row["ratio"] >= BAR)
                print(
                    f"{d:>4} {c!s:>6} {s:>6} {row['bf16']:>7.1f} {row['fp8']:>7.1f} {row['ratio'] or 0:>8.2f}  "
                    f"{row['bf16_tile']} | {row['fp8_tile']}{'' if ok else '  < bar'}",
                    flush=True,
                )
    finally:
        # the points measured so far, also when a time limit stops the run
        if rows:
            path = write_json("fp8-vs-bf16", rows, bar=BAR)
            plot_rows(rows, results_path("fp8-vs-bf16", ".png"), device_slug())
    worst = min((r["ratio"] or 0.0) for r in rows if r["seqlen"] >= 4096) if rows else 0.0
    print(
        f"[bench_fp8] worst fp8/bf16 at seqlen >= 4k: {worst:.2f} (bar {BAR}); {time.time() - t0:.0f}s; {path}"
    )
    return 0 if worst >= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
