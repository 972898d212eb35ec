"""Forward TFLOP/s of fa-plus (the public ``flash_attn.flash_attn_func``, inputs not requiring grad) vs SDPA
(flash, cuDNN), FlexAttention and FlagGems, in one run.

Standard sweep (batch * seqlen = 16384, hidden 2048, headdim 64/128, seqlen 512..16384, causal and not,
bf16) plus a varlen section (random lengths in [128, 4096] summing to ~16k tokens, fixed seed: fa-plus
varlen vs FlagGems varlen). Writes bench/results/<device>-forward.{json,md,png}.

    python bench/bench_forward.py                 # everything
    python bench/bench_forward.py --quick --check # d128, seqlen 1k and 16k, after a correctness check
    python bench/bench_forward.py --providers fa-plus,sdpa-flash --headdims 128

Run from the repository root with
PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-kvcache/src:packages/fa-compat/src.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FORWARD_PROVIDERS,
    Row,
    bench_ms,
    flops,
    install_sigterm_handler,
    progress,
    rel_error,
    standard_sweep,
    try_provider,
    write_results,
)

KIND = "forward"
VARLEN_PROVIDERS = ("fa-plus", "flaggems")


def _qkv(batch: int, seqlen: int, nheads: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=dtype) for _ in range(3)]


def check(providers: list[str], headdim: int, dtype: torch.dtype, tol: float = 2e-2) -> dict[str, str]:
    """Compare each provider that returns our layout (fa-plus, flaggems) with fp32 SDPA (fa-plus at seqlen 256,
    outside the sweep's autotune keys; FlagGems at the sweep's batch-16 / 1k shape).

    Returns ``{provider: reason}`` for providers that failed (they are then not timed).
    """
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    bad: dict[str, str] = {}
    torch.manual_seed(0)
    # fa-plus at seqlen 256: an autotune bucket no sweep point uses. At (batch 2, seqlen 1024) the check
    # autotuned the sweep's 1k keys on 256 programs, where small tiles win, and the batch-16 points inherited
    # them (H200: d128 causal 1k ran the 64x128 tile at 201 TFLOP/s instead of 64x64 at 314). FlagGems at the
    # sweep's own 1k shape: its dense kernel returns wrong values at (batch 2, seqlen 256, 16 heads, d128)
    # (rel err 1.75 on an H200, FlagGems 5.0.2: a split-KV path the sweep's shapes never take)
    shapes = {"fa-plus": (2, 256), "flaggems": (16, 1024)}
    for name in [p for p in providers if p in shapes]:
        q, k, v = _qkv(*shapes[name], 2048 // headdim, headdim, dtype)
        for causal in (False, True):
            if name in bad:
                continue
            ref = sdpa(*(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=causal).transpose(1, 2)
            try:
                out = FORWARD_PROVIDERS[name](q, k, v, causal)()
                out = out.out if hasattr(out, "out") else out[0] if isinstance(out, tuple) else out
                err = rel_error(out, ref)
                ok = err <= tol and bool(torch.isfinite(out).all())
                print(
                    f"[check] {name} causal={causal} d={headdim} shape={shapes[name]}: rel err {err:.2e} "
                    f"{'ok' if ok else 'FAIL'}"
                )
                if not ok:
                    bad[name] = f"check failed: rel err {err:.2e} vs fp32 SDPA (causal={causal}, d={headdim})"
            except Exception as exc:
                print(f"[check] {name}: {type(exc).__name__}: {exc}")
                bad[name] = f"check failed: {type(exc).__name__}: {exc}"[:300]
    return bad


def _autotuned_tile() -> list[Any] | None:
    """The forward's tile (BLOCK_M, BLOCK_N, warps, stages, TMA) of the last launch: the autotuner's pick for
    the shape just timed (tiles differ between runs when configs time close; the rows record which one ran)."""
    from fa_core.forward_configs import config_key
    from fa_core.forward_launch import fwd_launch

    config = fwd_launch.last_config
    return list(config_key(config)) if config is not None else None


def _time_config(
    cfg: Row, providers: list[str], dtype: torch.dtype, bad: dict[str, str], rounds: int = 1
) -> list[Row]:
    """One sweep point: every provider timed ``rounds`` times, interleaved (round 1 of all providers, then round
    2...), so that a drift of the GPU's clocks during the point hits every provider alike; a row's ``ms`` is the
    median over its rounds (each a ``do_bench`` median), ``ms_rounds`` lists them when ``rounds > 1``."""
    b, s, h, d, causal = cfg["batch"], cfg["seqlen"], cfg["nheads"], cfg["headdim"], cfg["causal"]
    torch.manual_seed(0)
    q, k, v = _qkv(b, s, h, d, dtype)
    flop = flops(b, s, s, h, d, causal)
    rows: dict[str, Row] = {}
    times: dict[str, list[float]] = {}
    for name in providers:
        rows[name] = {
            "bench": KIND,
            "provider": name,
            "headdim": d,
            "causal": causal,
            "seqlen": s,
            "batch": b,
            "nheads": h,
        }
        if name in bad:
            rows[name].update(ms=None, tflops=None, error=bad[name])
        else:
            times[name] = []
    fns: dict[str, Callable[[], Any]] = {}
    for _ in range(max(1, rounds)):
        for name in [n for n in providers if n in times and not rows[n].get("error")]:
            row = rows[name]

            def timed(name: str = name) -> float:
                if name not in fns:
                    fns[name] = FORWARD_PROVIDERS[name](q, k, v, causal)
                return bench_ms(fns[name])

            try_provider(row, timed, flop)
            if row.get("error"):
                continue
            times[name].append(row["ms"])
            if name.startswith("fa-plus"):
                row["tile"] = _autotuned_tile()
    for name, ms_list in times.items():
        row = rows[name]
        if row.get("error") or not ms_list:
            continue
        ms = statistics.median(ms_list)
        row["ms"], row["tflops"] = round(ms, 5), round(flop / (ms * 1e-3) / 1e12, 2)
        if len(ms_list) > 1:
            row["ms_rounds"] = ms_list
    for name in providers:
        row = rows[name]
        print(
            f"  {name:11s} d={d:3d} causal={causal!s:5} s={s:5d} b={b:2d}: "
            f"{row.get('tflops') if row.get('tflops') is not None else row.get('error')}"
            + (
                f"  rounds {[round(flop / (m * 1e-3) / 1e12, 1) for m in times[name]]}"
                if rounds > 1 and times.get(name)
                else ""
            ),
            flush=True,
        )
    return list(rows.values())


def dense_rows(
    configs: list[Row],
    providers: list[str],
    dtype: torch.dtype,
    bad: dict[str, str],
    into: list[Row] | None = None,
    rounds: int = 1,
) -> list[Row]:
    """Rows of the standard sweep, appended to ``into`` as they are measured (a timeout keeps them)."""
    rows: list[Row] = [] if into is None else into
    for cfg in progress(configs, desc="forward"):
        rows += _time_config(cfg, providers, dtype, bad, rounds)
    return rows


def varlen_lengths(total: int = 16384, lo: int = 128, hi: int = 4096, seed: int = 0) -> list[int]:
    """Random lengths in [lo, hi] summing to exactly ``total`` (the last one trimmed), fixed seed."""
    rng = random.Random(seed)
    lens: list[int] = []
    while sum(lens) < total:
        lens.append(rng.randint(lo, hi))
    lens[-1] -= sum(lens) - total
    if lens[-1] < lo and len(lens) > 1:
        lens[-2] += lens.pop()
    return lens


def _varlen_fn(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, maxlen: int, causal: bool
) -> Callable[[], Any]:
    if name == "fa-plus":
        from flash_attn import flash_attn_varlen_func

        def fn() -> Any:
            return flash_attn_varlen_func(q, k, v, cu, cu, maxlen, maxlen, causal=causal)

        return fn
    from fa_core.backends.flaggems import _flag_gems

    fg = _flag_gems()
    scale = q.shape[-1] ** -0.5
    return lambda: fg.ops.flash_attn_varlen_func(
        q, k, v, maxlen, cu, maxlen, cu_seqlens_k=cu, softmax_scale=scale, causal=causal
    )


def varlen_rows(
    headdims: list[int],
    providers: list[str],
    dtype: torch.dtype,
    bad: dict[str, str],
    into: list[Row] | None = None,
) -> list[Row]:
    """Varlen rows, appended to ``into`` as they are measured."""
    lens = varlen_lengths()
    total, maxlen = sum(lens), max(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    rows: list[Row] = [] if into is None else into
    for d in headdims:
        h = 2048 // d
        torch.manual_seed(0)
        q, k, v = (torch.randn(total, h, d, device="cuda", dtype=dtype) for _ in range(3))
        for causal in (False, True):
            flop = sum(flops(1, n, n, h, d, causal) for n in lens)
            for name in [p for p in providers if p in VARLEN_PROVIDERS]:
                row: Row = {
                    "bench": "forward_varlen",
                    "provider": name,
                    "headdim": d,
                    "causal": causal,
                    "seqlen": None,
                    "total_tokens": total,
                    "max_seqlen": maxlen,
                    "nseqs": len(lens),
                    "nheads": h,
                }
                if name in bad:
                    row.update(ms=None, tflops=None, error=bad[name])
                else:
                    args = (name, q, k, v, cu, maxlen, causal)
                    try_provider(row, lambda args=args: bench_ms(_varlen_fn(*args)), flop)
                rows.append(row)
                print(
                    f"  varlen {name:9s} d={d:3d} causal={causal!s:5}: "
                    f"{row.get('tflops') if row.get('tflops') is not None else row.get('error')}",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headdim 128, seqlen 1024 and 16384 only")
    ap.add_argument(
        "--providers",
        default=",".join(FORWARD_PROVIDERS),
        help=f"comma list out of {','.join(FORWARD_PROVIDERS)}",
    )
    ap.add_argument("--headdims", default=None, help="comma list (default 64,128; --quick: 128)")
    ap.add_argument("--seqlens", default=None, help="comma list (default 512..16384)")
    ap.add_argument("--no-varlen", action="store_true", help="skip the varlen section")
    ap.add_argument("--check", action="store_true", help="check fa-plus/flaggems vs fp32 SDPA before timing")
    ap.add_argument("--no-merge", action="store_true", help="overwrite the results file instead of merging")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every provider this many times per point, interleaved; the median is reported (H200 runs "
        "drift by ~5%% between timings of one kernel: 3 rounds make close ratios trustworthy)",
    )
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_forward: no CUDA GPU; nothing to time", file=sys.stderr)
        return 3
    install_sigterm_handler()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in FORWARD_PROVIDERS]
    if unknown:
        ap.error(f"unknown providers {unknown}; known: {list(FORWARD_PROVIDERS)}")
    headdims = (
        [int(x) for x in args.headdims.split(",")] if args.headdims else ([128] if args.quick else [64, 128])
    )
    seqlens = (
        [int(x) for x in args.seqlens.split(",")] if args.seqlens else ([1024, 16384] if args.quick else None)
    )
    dtype = getattr(torch, args.dtype)
    print(
        f"[bench_forward] {torch.cuda.get_device_name()} providers={providers} headdims={headdims} "
        f"dtype={args.dtype}",
        flush=True,
    )

    bad = check(providers, headdims[-1], dtype) if args.check else {}
    rows: list[Row] = []
    try:
        # rows fill in place: a SIGTERM (timeout) still writes what was measured in the finally block
        dense_rows(standard_sweep(headdims, seqlens), providers, dtype, bad, into=rows, rounds=args.rounds)
        if not args.no_varlen:
            varlen_rows(headdims, providers, dtype, bad, into=rows)
    finally:
        if rows:
            path = write_results(
                KIND,
                rows,
                merge=not args.no_merge,
                plot_kw={"bench": KIND},
                table_kw={"title": f"forward ({args.dtype})"},
            )
            print(f"[bench_forward] wrote {path} (+ .md, .png)")
    errors = sum(1 for r in rows if r.get("error"))
    print(f"[bench_forward] {len(rows)} rows, {errors} with errors")
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
