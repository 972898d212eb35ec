"""Time source-level variants of the forward kernel against the current one and FlagGems (GPU exploration).

Each variant is a copy of ``packages/fa-core/src`` with one textual edit of the kernel (a function below), run
in its own process (Triton caches kernels by source, so copies never mix) at the chosen points; every process
also times FlagGems at the same points, so each variant's numbers sit beside a reference measured with them.
Tiles are forced one at a time (``bench_fp8._force_tile``; ``--tiles`` may name tiles outside the autotune
space); the best per point is reported, with the config FlagGems' own autotuner picked.

    python bench/forward_variants.py                               # every variant, d128, default points
    python bench/forward_variants.py --variants base,interior_first --points nc1024,c4096

Points: ``nc<seqlen>`` / ``c<seqlen>`` (non-causal / causal), batch x seqlen = 16k tokens, hidden 2048, bf16.
Writes nothing to bench/results (exploration only); prints a table and the JSON of every timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "fa_core/forward_kernel.py"
INNER = "fa_core/forward_inner.py"
LAUNCH = "fa_core/forward_launch.py"
SCHEDULING = "fa_core/scheduling.py"
TILES = [(128, 128, 8, 3, False), (128, 128, 8, 3, True), (128, 64, 8, 3, True)]


def _swap_edge_and_interior(src: str) -> str:
    """The masked diagonal / right-edge loop and the unmasked interior loop in the other order (the kernel
    runs the edge first, as FlagGems does, since session 6: this variant times the interior first)."""
    interior = src.index("        # interior: no mask at all")
    edge = src.index("        if HAS_RIGHT_EDGE:")
    end = src.index("    if HAS_SINK:")
    if interior < edge:
        return src[:interior] + src[edge:end] + src[interior:edge] + src[end:]
    return src[:edge] + src[interior:end] + src[edge:interior] + src[end:]


def _no_reverse(src: str) -> str:
    """Programs in launch order for causal / local too (no heaviest-first reversal)."""
    old = "    if HEAVY_LAST:\n"
    assert old in src
    return src.replace(old, "    if False:\n")


def _lpt(width: int) -> Callable[[str], str]:
    """Causal forward programs longest-processing-time first within sections of ``width`` heads
    (``fa_core.scheduling.FORWARD_LPT``, default 4; 1 is the plain order: one head's blocks together, heaviest
    first). ``FA_PLUS_LPT`` must be unset for the edit to take effect."""

    def edit(src: str) -> str:
        old = "FORWARD_LPT = 4\n"
        assert old in src
        return src.replace(old, f"FORWARD_LPT = {width}\n")

    return edit


def _no_m_safe(src: str) -> str:
    """Unmasked tiles without the -inf guard on the running max (FlagGems' interior loop): with every key
    visible and finite scores, m_new is finite there."""
    old = '    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)\n'
    assert old in src
    new = (
        "    if MASKED or HAS_SCORE_MOD:\n"
        '        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)\n'
        "    else:\n"
        "        m_safe = m_new\n"
    )
    return src.replace(old, new)


_L_UPDATE = "    l_i = l_i * alpha + tl.sum(p, 1)\n"
_ACC_RESCALE = "    acc = acc * alpha[:, None]\n"
_PV_DOT = "    acc = tl.dot(p.to(v.dtype), v, acc)\n"


def _rescale_first(src: str) -> str:
    """The accumulator rescale right after alpha, before the probabilities (FlagGems' order)."""
    assert _ACC_RESCALE in src
    src = src.replace(_ACC_RESCALE, "")
    anchor = "    alpha = tl.exp2(m_i - m_safe)\n"
    assert anchor in src
    return src.replace(anchor, anchor + _ACC_RESCALE)


def _sum_after_dot(src: str) -> str:
    """The row sum of p after the P @ V dot is issued, so that it can overlap the asynchronous wgmma."""
    assert _L_UPDATE in src and _PV_DOT in src
    return src.replace(_L_UPDATE, "").replace(_PV_DOT, _PV_DOT + _L_UPDATE)


def _masked_rows(src: str) -> str:
    """Row masks on the Q load and the O / LSE stores even where every query block is full (``EVEN_M`` off):
    what the kernel's ``EVEN_M`` saves (every sweep point's seqlen is a multiple of 128)."""
    old = "EVEN_M=not varlen and max_seqlen_q % MAX_BLOCK_M == 0,"
    assert old in src
    return src.replace(old, "EVEN_M=False,")


def _no_lse(src: str) -> str:
    """No LSE store at all (diagnostic: the epilogue's cost; the LSE output is left unwritten)."""
    old = (
        "    if EVEN_M:\n        tl.store(lse_ptrs, lse)\n"
        "    else:\n        tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)\n"
    )
    assert old in src
    return src.replace(old, "")


#: name -> (file under packages/fa-core/src, edit of its source)
VARIANTS: dict[str, tuple[str, Callable[[str], str]]] = {
    "base": (KERNEL, lambda src: src),
    "interior_first": (KERNEL, _swap_edge_and_interior),
    "no_reverse": (SCHEDULING, _no_reverse),
    "no_lpt": (SCHEDULING, _lpt(1)),
    "lpt16": (SCHEDULING, _lpt(16)),
    "lpt_all": (SCHEDULING, _lpt(1 << 16)),
    "no_m_safe": (INNER, _no_m_safe),
    "rescale_first": (INNER, _rescale_first),
    "sum_after_dot": (INNER, _sum_after_dot),
    "both_orders": (INNER, lambda src: _sum_after_dot(_rescale_first(src))),
    "masked_rows": (LAUNCH, _masked_rows),
    "no_lse": (KERNEL, _no_lse),
}


def _flaggems_pick() -> str:
    """The config FlagGems' autotuner chose for its dense forward (its key is the head dim only)."""
    from flag_gems.ops import flash_kernel

    obj, seen = getattr(flash_kernel, "flash_fwd_kernel", None), 0
    while obj is not None and seen < 4:
        cache = getattr(obj, "cache", None)
        if isinstance(cache, dict) and cache:
            return "; ".join(f"{k}: {v}" for k, v in list(cache.items())[:3])
        obj, seen = getattr(obj, "fn", None), seen + 1
    return "unknown"


def _worker(points: list[str], tag: str, tiles: list[tuple]) -> None:
    """Time every tile at every point with this process's fa_core; FlagGems beside it."""
    import torch
    import triton

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_fp8 import _force_tile

    from fa_core import flash_attn_forward
    from fa_core.backends.flaggems import _flag_gems

    fg = _flag_gems()
    for point in points:
        causal, s = point.startswith("c"), int(point.lstrip("nc"))
        b, h, d = 16384 // s, 16, 128
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal
        ).transpose(1, 2)  # a wrong variant shows in the error column
        flop = 4 * b * h * s * s * d / (2 if causal else 1)
        ours = functools.partial(flash_attn_forward, q, k, v, causal=causal)
        theirs = functools.partial(
            fg.ops.flash_attention_forward, q, k, v, None, None, s, s, 0.0, causal, False, scale=d**-0.5
        )
        row: dict = {"variant": tag, "point": point}
        for tile in tiles:
            _force_tile(tile, False)
            try:
                err = float((ours().out.float() - ref.float()).abs().max())
                ms = triton.testing.do_bench(ours, rep=60)
                row[str(tile)] = (round(flop / ms * 1e-9, 1), err)
            except Exception as exc:  # a variant may not compile for every tile
                row[str(tile)] = f"{type(exc).__name__}: {str(exc)[:80]}"

        row["flaggems"] = round(flop / triton.testing.do_bench(theirs, rep=60) * 1e-9, 1)
        row["flaggems_config"] = _flaggems_pick()
        print("ROW " + json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--points", default="nc1024,nc4096,c4096,c16384")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per variant")
    ap.add_argument(
        "--tiles",
        default="/".join(",".join(str(int(x)) for x in t) for t in TILES),
        help="'/'-separated BLOCK_M,BLOCK_N,warps,stages,tma (tma 0/1), e.g. 128,128,8,2,0/128,64,8,3,1",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    points = args.points.split(",")
    tiles = [(*(int(x) for x in t.split(",")[:4]), t.split(",")[4] == "1") for t in args.tiles.split("/")]
    if args.worker:
        _worker(points, args.worker, tiles)
        return 0
    rows = []
    for name in args.variants.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            src_dir = Path(tmp) / "src"
            shutil.copytree(ROOT / "packages/fa-core/src", src_dir)
            where, edit = VARIANTS[name]
            edited = src_dir / where
            edited.write_text(edit(edited.read_text()))
            env = dict(os.environ, PYTHONPATH=f"{src_dir}:{os.environ.get('PYTHONPATH', '')}")
            cmd = [sys.executable, __file__, "--worker", name, "--points", args.points, "--tiles", args.tiles]
            try:
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                out = res.stdout + res.stderr
            except subprocess.TimeoutExpired as exc:
                out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                print(f"[variants] {name}: timed out after {args.timeout:.0f} s")
            for line in out.splitlines():
                if line.startswith("ROW "):
                    rows.append(json.loads(line[4:]))
                    print(line[4:], flush=True)
            if not any(r["variant"] == name for r in rows):
                print(f"[variants] {name}: no rows; output tail:\n{out[-1500:]}")
    print(f"\n{'variant':<14} {'point':<8} {'best':>7} {'tile':<24} {'flaggems':>8} {'ratio':>6}")
    for r in rows:
        timed = {k: v[0] for k, v in r.items() if isinstance(v, list)}
        if not timed:
            continue
        tile, best = max(timed.items(), key=lambda kv: kv[1])
        print(
            f"{r['variant']:<14} {r['point']:<8} {best:7.1f} {tile:<24} {r['flaggems']:8.1f} {best / r['flaggems']:6.2f}"
            f"  (flaggems: {r.get('flaggems_config', '?')})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
