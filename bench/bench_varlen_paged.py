"""Varlen forward with K/V in a paged cache (read through the block table in the kernel) vs the contiguous
varlen layout, and vs FlagGems' paged varlen.

Random sequence lengths summing to 16384 tokens (query = key lengths, prefill), 16 heads (nheads_k 16),
headdim 128, bf16, causal and not, three length regimes (mean sequence 512, 2048, 8192):

* ``fa-plus``: the public ``flash_attn.flash_attn_varlen_func`` on packed K/V (page 0) and on shuffled paged
  caches (page 16, 256) with ``block_table`` (``fa_core.flash_attn_varlen_forward`` where fa-compat is not
  installed; value checks skipped as in every benchmark);
* ``flaggems``: ``flag_gems.ops.flash_attn_varlen_func`` (vLLM's argument order: ``max_seqlen_q`` before
  ``cu_seqlens_q``) with ``block_table`` + ``seqused_k`` on the same paged caches (pages 16, 256); skipped with
  the reason when FlagGems is not installed.

TFLOP/s = 4 * h * d * sum(len_b^2) / time, halved when causal; time = ``triton.testing.do_bench`` median.
Bars: fa-plus paged >= 0.95x fa-plus contiguous, and >= 1.0x FlagGems, at every point (printed and written
under the table). Writes bench/results/<device>-varlen-paged.{json,md,png}.

    python bench/bench_varlen_paged.py
    python bench/bench_varlen_paged.py --pages 0,16 --means 2048 --providers fa-plus

Run from the repository root with
PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-kvcache/src:packages/fa-compat/src.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Row,
    bench_ms,
    install_sigterm_handler,
    progress,
    results_path,
    write_results,
)

KIND = "varlen-paged"
TOKENS, NHEADS, NHEADS_K, HEADDIM = 16384, 16, 16, 128
MEANS = (512, 2048, 8192)
PROVIDERS = ("fa-plus", "flaggems")


def lengths(mean: int, seed: int) -> list[int]:
    """Random lengths in [mean / 4, 7 mean / 4] rescaled to sum to TOKENS exactly (each >= 1)."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, TOKENS // mean)
    raw = torch.rand(n, generator=g) * 1.5 + 0.25
    lens = (raw / raw.sum() * TOKENS).floor().clamp_min(1).long()
    lens[-1] += TOKENS - int(lens.sum())
    return [int(x) for x in lens]


def paged(k: torch.Tensor, v: torch.Tensor, lens: list[int], page: int, seed: int):
    """Packed ``(total, hk, d)`` K/V -> a shuffled cache ``(num_pages, page, hk, d)`` and ``block_table
    (batch, max_pages)`` int32 (unused slots point at page 0)."""
    need = [-(-n // page) for n in lens]
    cols = max(need)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sum(need), generator=g).to(k.device)
    kc = torch.zeros(sum(need), page, *k.shape[1:], device=k.device, dtype=k.dtype)
    vc = torch.zeros_like(kc)
    table = torch.zeros(len(lens), cols, dtype=torch.int32, device=k.device)
    start = used = 0
    for b, n in enumerate(lens):
        pages = perm[used : used + need[b]]
        table[b, : need[b]] = pages.to(torch.int32)
        rows = torch.arange(n, device=k.device)
        kc[pages[rows // page], rows % page] = k[start : start + n]
        vc[pages[rows // page], rows % page] = v[start : start + n]
        start += n
        used += need[b]
    return kc, vc, table


def _fa_plus(q, k, v, cu, lens, page, causal):
    """Packed (page 0) and paged K/V through the same entry point, as users call it: flash-attn's public
    ``flash_attn.flash_attn_varlen_func`` (``block_table=`` for the pages), so both runs take what the library
    dispatches to (on sm_90 the Gluon kernels); without fa-compat, ``fa_core.flash_attn_varlen_forward``, else
    its launcher (the same kernel launch without the host checks) for both."""
    import fa_core

    mx = max(lens)
    table = None
    if page:
        k, v, table = paged(k, v, lens, page, seed=page)
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:
        return lambda: flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=causal, block_table=table)
    if "block_table" in inspect.signature(fa_core.flash_attn_varlen_forward).parameters:
        extra = {} if table is None else {"block_table": table}
        return lambda: fa_core.flash_attn_varlen_forward(q, k, v, cu, cu, mx, mx, causal=causal, **extra).out
    from fa_core.forward_launch import launch_forward

    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    kw: dict[str, Any] = dict(
        varlen=True,
        batch=len(lens),
        max_seqlen_q=mx,
        max_seqlen_k=mx,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        seqused_k=None,
        softmax_scale=HEADDIM**-0.5,
        causal=causal,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        dropout_p=0.0,
        rng_state=torch.zeros(2, dtype=torch.int64),
        block_table=table,
    )

    def run():
        launch_forward(q, k, v, out, lse, **kw)
        return out

    return run


def _flaggems(q, k, v, cu, lens, page, causal):
    if page == 0:
        raise ValueError("FlagGems' varlen forward is timed on paged caches only")
    from fa_core.backends.flaggems import _flag_gems

    fg = _flag_gems()  # raises with the reason when FlagGems is unavailable
    mx = max(lens)
    kc, vc, table = paged(k, v, lens, page, seed=page)
    used = torch.tensor(lens, dtype=torch.int32, device=q.device)
    # vLLM's order: q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, ...
    return lambda: fg.ops.flash_attn_varlen_func(
        q,
        kc,
        vc,
        mx,
        cu,
        mx,
        seqused_k=used,
        softmax_scale=HEADDIM**-0.5,
        causal=causal,
        block_table=table,
    )


MAKERS: dict[str, Callable[..., Callable[[], Any]]] = {"fa-plus": _fa_plus, "flaggems": _flaggems}


def flop(lens: list[int], causal: bool) -> float:
    f = 4.0 * NHEADS * HEADDIM * sum(n * n for n in lens)
    return f / 2 if causal else f


def run(means, pages, providers, causals, check: bool, into: list[Row]) -> list[Row]:
    points = [(m, c, p, prov) for m in means for c in causals for prov in providers for p in pages]
    points = [x for x in points if not (x[3] == "flaggems" and x[2] == 0)]
    cache: dict[int, tuple] = {}
    ref: dict[tuple, torch.Tensor] = {}
    for mean, causal, page, prov in progress(points, desc="varlen-paged"):
        if mean not in cache:
            cache.clear()
            torch.manual_seed(mean)
            lens = lengths(mean, seed=mean)
            q, k, v = (
                torch.randn(TOKENS, h, HEADDIM, device="cuda", dtype=torch.bfloat16)
                for h in (NHEADS, NHEADS_K, NHEADS_K)
            )
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
            cache[mean] = (q, k, v, cu, lens)
        q, k, v, cu, lens = cache[mean]
        row: Row = {
            "bench": "varlen_paged",
            "provider": prov,
            "page": page,
            "headdim": HEADDIM,
            "tokens": TOKENS,
            "nheads": NHEADS,
            "causal": causal,
            "mean_seqlen": mean,
            "batch": len(lens),
            "max_seqlen": max(lens),
        }
        try:
            fn = MAKERS[prov](q, k, v, cu, lens, page, causal)
            out = fn()
            torch.cuda.synchronize()
            if check:
                key = (mean, causal)
                if prov == "fa-plus" and page == 0:
                    ref[key] = out.float()
                elif key in ref:
                    err = float((out.float() - ref[key]).abs().max() / ref[key].abs().max())
                    row["rel_err"] = float(f"{err:.2e}")
                    if not err <= 2e-2:
                        raise RuntimeError(
                            f"output differs from the contiguous fa-plus one (rel err {err:.2e})"
                        )
            ms = bench_ms(fn)
            row.update(ms=round(ms, 5), tflops=round(flop(lens, causal) / (ms * 1e-3) / 1e12, 2))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            row.update(
                ms=None, tflops=None, error=f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
            )
        print(json.dumps(row), flush=True)
        into.append(row)
        torch.cuda.empty_cache()
    return into


def bars(rows: list[Row]) -> list[str]:
    """fa-plus paged >= 0.95x fa-plus contiguous and >= 1.0x FlagGems (same page) at every point."""
    get = {(r["provider"], r["mean_seqlen"], r["causal"], r["page"]): r.get("tflops") for r in rows}
    msgs = []
    for (prov, mean, causal, page), t in sorted(get.items(), key=str):
        if prov != "fa-plus" or not page or not t:
            continue
        tag = f"page {page} mean {mean} {'causal' if causal else 'full'}"
        base = get.get(("fa-plus", mean, causal, 0))
        if base:
            msgs.append(
                f"{'ok  ' if t >= 0.95 * base else 'MISS'} {tag}: {t / base:.3f}x contiguous (bar 0.95)"
            )
        fg = get.get(("flaggems", mean, causal, page))
        if fg:
            msgs.append(f"{'ok  ' if t >= fg else 'MISS'} {tag}: {t / fg:.2f}x flaggems (bar 1.0)")
    return msgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--pages", default="0,16,256")
    ap.add_argument("--means", default=",".join(map(str, MEANS)), help="mean sequence lengths")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-merge", action="store_true")
    ap.add_argument(
        "--gluon-min-flops",
        type=float,
        default=None,
        help="run with fa_core.ops.GLUON_MIN_FLOPS set to this (where the Gluon kernels take over); rows are "
        "printed, not written",
    )
    args = ap.parse_args()
    install_sigterm_handler()
    rows: list[Row] = []
    probe = args.gluon_min_flops is not None
    if probe:
        import fa_core.ops

        fa_core.ops.GLUON_MIN_FLOPS = args.gluon_min_flops
    try:
        run(
            [int(x) for x in args.means.split(",")],
            [int(x) for x in args.pages.split(",")],
            [p for p in args.providers.split(",") if p],
            [bool(int(x)) for x in args.causal.split(",")],
            check=not args.no_check,
            into=rows,
        )
    finally:
        if rows and not probe:
            path = write_results(
                KIND,
                rows,
                merge=not args.no_merge,
                plot_kw=dict(x="mean_seqlen", panels=("page", "causal"), bench="varlen_paged"),
                table_kw=dict(title="varlen forward, paged K/V vs contiguous (bf16, d128, 16k tokens)"),
            )
            msgs = bars(json.loads(path.read_text())["rows"])
            with results_path(KIND, ".md").open("a") as f:
                f.write("\n" + "\n".join(msgs) + "\n")
            print("\n".join(msgs))
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
