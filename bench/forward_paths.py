"""Time the same forward through its launch paths in one process, beside FlagGems (GPU exploration).

``bench_forward.py`` (autotuned) and ``forward_variants.py`` (one tile forced) disagreed by ~7% at d128
non-causal 4k on an H200 with the same tile (455 vs 485-491 TFLOP/s, FlagGems ~490 in both). This script
times, at each point and in two alternating rounds (``bench_ms``: ``do_bench`` median, as the sweep):

* ``auto``: the default path (autotuned, TMA allowed), the pick printed;
* ``auto-notma``: autotuned with ``FA_PLUS_TMA=0`` (TMA_OK false: a different autotune key);
* ``forced``: the autotuner's pick of ``auto`` forced as the only config (``bench_fp8._force_tile``);
* ``forced-triton``: the same through Triton's own launch path (``fa_core.fast_launch`` off);
* ``flaggems``.

    python bench/forward_paths.py --points nc4096,c8192

Writes nothing to bench/results (exploration); prints one line per timing and a summary table.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fp8 import _force_tile  # noqa: E402
from common import bench_ms, env_override  # noqa: E402


def _no_grad(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return fn(*args, **kwargs)


def _unforce(orig: dict[bool, dict[tuple, str]]) -> None:
    """Undo ``_force_tile``: the full tile families, autotuning on, caches cleared."""
    from fa_core import forward_kernel as fk
    from fa_core.forward_launch import fwd_launch

    for fp8, fam in orig.items():
        fk._FAMILIES[fp8] = dict(fam)
    os.environ["FA_PLUS_AUTOTUNE"] = "1"
    os.environ.pop("FA_PLUS_TMA", None)
    cache = getattr(fk.fwd_kernel, "cache", None)
    if isinstance(cache, dict):
        cache.clear()
    fwd_launch.clear()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="nc4096,c8192")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("forward_paths: needs a CUDA GPU", file=sys.stderr)
        return 3
    from fa_core import flash_attn_forward, forward_launch
    from fa_core import forward_kernel as fk
    from fa_core.backends.flaggems import _flag_gems
    from fa_core.fast_launch import _STATE
    from fa_core.forward_configs import config_key

    orig = {fp8: dict(fam) for fp8, fam in fk._FAMILIES.items()}
    fg = _flag_gems()
    table: list[tuple[str, str, int, float, Any]] = []
    for point in args.points.split(","):
        causal, s = point.startswith("c"), int(point.lstrip("nc"))
        b, h, d = 16384 // s, 16, 128
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flop = 4 * b * h * s * s * d / (2 if causal else 1)

        ours = functools.partial(_no_grad, flash_attn_forward, q, k, v, causal=causal)
        theirs = functools.partial(
            fg.ops.flash_attention_forward, q, k, v, None, None, s, s, 0.0, causal, False, scale=d**-0.5
        )

        for rnd in range(args.rounds):
            _unforce(orig)
            ms = bench_ms(ours)
            assert forward_launch.fwd_launch.last_config is not None
            pick = config_key(forward_launch.fwd_launch.last_config)
            timings: list[tuple[str, float, Any]] = [("auto", ms, pick)]
            with env_override("FA_PLUS_TMA", "0"):
                ms = bench_ms(ours)
                timings.append(("auto-notma", ms, config_key(forward_launch.fwd_launch.last_config)))
            _force_tile(pick, False)
            timings.append(("forced", bench_ms(ours), pick))
            _STATE["enabled"] = False
            try:
                timings.append(("forced-triton", bench_ms(ours), pick))
            finally:
                _STATE["enabled"] = True
            timings.append(("flaggems", bench_ms(theirs), None))
            for name, ms, tile in timings:
                tf = flop / ms * 1e-9
                table.append((point, name, rnd, tf, tile))
                print(f"{point:8s} round {rnd} {name:14s} {tf:7.1f} TFLOP/s  {tile}", flush=True)
        _unforce(orig)
    print(f"\n{'point':8s} {'path':14s} " + " ".join(f"round {r}" for r in range(args.rounds)))
    for point in dict.fromkeys(p for p, *_ in table):
        for name in dict.fromkeys(n for p, n, *_ in table if p == point):
            vals = [f"{tf:7.1f}" for p, n, _, tf, _ in table if p == point and n == name]
            print(f"{point:8s} {name:14s} " + " ".join(vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
