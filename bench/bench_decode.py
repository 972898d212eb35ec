"""Decode bandwidth (GB/s of K/V read) of fa-plus's flash_attn_with_kvcache vs SDPA, FlexAttention, FlagGems.

One query token per sequence (seqlen_q 1) and four (speculative decoding, ``--seqlen-q 1,4``), nheads 32,
nheads_k 8 (GQA), headdim 128, bf16, for batch x context in {(1, 1k), (1, 32k), (8, 8k), (32, 1k), (64, 32k)}:

* ``fa-plus``: contiguous cache (page 0) and paged caches (page 16, 64, 256; shuffled block table);
* ``sdpa``: ``scaled_dot_product_attention(enable_gqa=True)`` on a contiguous (b, h, s, d) cache;
* ``flex``: ``torch.compile(flex_attention)`` (its decode kernel) on the same contiguous cache;
* ``flaggems``: ``flag_gems.ops.flash_attn_varlen_func`` with ``block_table`` + ``seqused_k`` (pages 16, 256;
  vLLM argument order), timed eagerly (it faults under CUDA-graph capture);
* ``copy_gbps`` in every row: a device-to-device copy of the same number of bytes, counting read + write
  traffic (the memory system's practical peak for this size).

GB/s = K/V bytes / time. Every provider except FlagGems is timed inside a CUDA graph
(``triton.testing.do_bench_cudagraph``); when capture fails it is timed eagerly and its row has
``"graph": false``. With seqlen_q 4, fa-plus and FlagGems are causal (bottom-right: the drafted tokens see the
cache and each other), SDPA and Flex attend to the whole cache (same bytes read). Writes
bench/results/<device>-decode.{json,md,png}.

    python bench/bench_decode.py                       # everything
    python bench/bench_decode.py --quick               # (1, 1k) and (8, 8k) only
    python bench/bench_decode.py --providers fa-plus,sdpa --pages 0,16

Run from the repository root with PYTHONPATH=packages/fa-core/src:packages/fa-kvcache/src.
"""

from __future__ import annotations

import argparse
import json
import math
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
    markdown_table,
    results_path,
    write_results,
)

KIND = "decode"
SHAPES = [(1, 1024), (1, 32768), (8, 8192), (32, 1024), (64, 32768)]
NHEADS, NHEADS_K, HEADDIM = 32, 8, 128
PROVIDERS = ("fa-plus", "sdpa", "flex", "flaggems")
#: providers timed at every page size (the others: FlagGems paged only, SDPA / Flex contiguous only)
PAGED = ("fa-plus",)
KEY_FIELDS = ("bench", "provider", "batch", "context", "page", "seqlen_q", "nheads", "nheads_k", "headdim")


def _time(fn: Callable[[], Any], graph: bool) -> tuple[float, bool]:
    """Milliseconds (median) inside a CUDA graph, or eagerly if not asked / capture fails."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            try:
                return float(do_bench_cudagraph(fn, rep=100, return_mode="median")), True
            except TypeError:  # triton without return_mode
                return float(do_bench_cudagraph(fn, rep=100)), True
        except Exception as exc:
            print(f"[decode] graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); timing eagerly")
            torch.cuda.synchronize()
    return bench_ms(fn), False


def _paged(kc: torch.Tensor, vc: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, ctx, hk, d) -> a shuffled pool (num_blocks, page, hk, d) and block_table (batch, nb) int32."""
    batch, ctx = kc.shape[:2]
    nb = math.ceil(ctx / page)
    perm = torch.randperm(batch * nb, device=kc.device).reshape(batch, nb)
    kp = torch.empty(batch * nb, page, *kc.shape[2:], device=kc.device, dtype=kc.dtype)
    vp = torch.empty_like(kp)
    pad = nb * page - ctx
    kp[perm] = torch.nn.functional.pad(kc, (0, 0, 0, 0, 0, pad)).reshape(batch, nb, page, *kc.shape[2:])
    vp[perm] = torch.nn.functional.pad(vc, (0, 0, 0, 0, 0, pad)).reshape(batch, nb, page, *vc.shape[2:])
    return kp, vp, perm.to(torch.int32)


def _fa_plus(q, kc, vc, lens, page):
    from fa_kvcache import flash_attn_with_kvcache

    causal = q.shape[1] > 1
    if page == 0:
        return lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=causal)
    kp, vp, bt = _paged(kc, vc, page)
    return lambda: flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=bt, causal=causal)


def _sdpa(q, kc, vc, lens, page):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, kc, vc))
    return lambda: sdpa(qt, kt, vt, enable_gqa=True)


_FLEX: dict[str, Any] = {}


def _flex(q, kc, vc, lens, page):
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        # one static compile per (batch, context, seqlen_q): the sweep has more shapes than dynamo's default
        # recompile limit (8), past which it silently runs flex eagerly (the full score matrix, ~80 ms a step)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    compiled = _FLEX["fn"]
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, kc, vc))
    return lambda: compiled(qt, kt, vt, enable_gqa=True)


def _flaggems(q, kc, vc, lens, page):
    from fa_core.backends.flaggems import _flag_gems

    fg = _flag_gems()  # raises with the reason when FlagGems is unavailable
    batch, sq = q.shape[:2]
    ctx = kc.shape[1]
    kp, vp, bt = _paged(kc, vc, page)
    q3 = q.reshape(batch * sq, NHEADS, HEADDIM)
    cu_q = torch.arange(0, batch * sq + 1, sq, dtype=torch.int32, device=q.device)
    scale = HEADDIM**-0.5
    # vLLM's order: q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, ...
    return lambda: fg.ops.flash_attn_varlen_func(
        q3, kp, vp, sq, cu_q, ctx, seqused_k=lens, softmax_scale=scale, causal=True, block_table=bt
    )


MAKERS = {"fa-plus": _fa_plus, "sdpa": _sdpa, "flex": _flex, "flaggems": _flaggems}


def _timed(prov: str, fn: Callable[[], Any]) -> tuple[float, bool]:
    """Time one provider: in a CUDA graph, except FlagGems (it faults under capture)."""
    return _time(fn, graph=prov != "flaggems")


def _copy_gbps(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = _time(lambda: dst.copy_(src), graph=True)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _check(q, kc, vc, lens, pages) -> None:
    """fa-plus (every page size) against fp32 SDPA before timing; raises on a mismatch."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    ref = sdpa(*(t.float().transpose(1, 2) for t in (q, kc, vc)), enable_gqa=True).transpose(1, 2)
    for page in pages:
        out = _fa_plus(q, kc, vc, lens, page)()
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        print(f"[check] fa-plus page={page}: rel err {err:.2e}")
        if not err <= 2e-2:
            raise SystemExit(f"fa-plus page={page} is wrong (rel err {err:.2e})")


def run(shapes, providers, pages, check: bool, seqlens_q=(1,), into: list[Row] | None = None) -> list[Row]:
    """Rows of every point, appended to ``into`` shape by shape (a run cut short keeps what it measured)."""
    rows: list[Row] = [] if into is None else into
    for batch, ctx in shapes:
        for sq in seqlens_q:
            rows += _run_shape(
                batch, ctx, sq, providers, pages, check and (batch, ctx) == shapes[0] and sq == 1
            )
    return rows


def _run_shape(batch, ctx, sq, providers, pages, check: bool) -> list[Row]:
    rows: list[Row] = []
    dtype = torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(batch, sq, NHEADS, HEADDIM, device="cuda", dtype=dtype)
    kc = torch.randn(batch, ctx, NHEADS_K, HEADDIM, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    nbytes = 2 * kc.numel() * kc.element_size()
    if check:
        _check(q, kc, vc, lens, pages)
    copy = round(_copy_gbps(nbytes), 1)
    for prov in providers:
        prov_pages = pages if prov in PAGED else [p for p in pages if p] if prov == "flaggems" else [0]
        for page in prov_pages:
            row: Row = {
                "bench": "decode",
                "provider": prov,
                "batch": batch,
                "context": ctx,
                "page": page,
                "seqlen_q": sq,
                "nheads": NHEADS,
                "nheads_k": NHEADS_K,
                "headdim": HEADDIM,
            }
            try:
                fn = MAKERS[prov](q, kc, vc, lens, page)
                ms, graphed = _timed(prov, fn)
                row.update(ms=round(ms, 5), gbps=round(nbytes / (ms * 1e-3) / 1e9, 1), graph=graphed)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                row.update(
                    ms=None,
                    gbps=None,
                    graph=None,
                    error=f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300],
                )
            row["copy_gbps"] = copy
            print(json.dumps(row), flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
    del q, kc, vc
    torch.cuda.empty_cache()
    return rows


def bars(rows: list[Row]) -> list[str]:
    """The targets: paged fa-plus >= 0.9x SDPA (context >= 8k), >= 0.7x (1k); >= 1.0x FlagGems everywhere;
    >= 0.8x copy_gbps at batch >= 8 and context >= 8k."""
    get = {
        (r["provider"], r["batch"], r["context"], r["page"], r.get("seqlen_q", 1)): r.get("gbps")
        for r in rows
    }
    copy = {(r["batch"], r["context"], r.get("seqlen_q", 1)): r.get("copy_gbps") for r in rows}
    msgs = []
    for (prov, b, ctx, page, sq), g in get.items():
        if prov not in PAGED or not page or not g:
            continue
        tag = f"{prov} page {page} b{b} ctx{ctx} q{sq}"
        sd = get.get(("sdpa", b, ctx, 0, sq))
        if sd:
            need = 0.9 if ctx >= 8192 else 0.7
            msgs.append(f"{'ok  ' if g >= need * sd else 'MISS'} {tag}: {g / sd:.2f}x sdpa (bar {need})")
        fgm = get.get(("flaggems", b, ctx, page, sq))
        if fgm:
            msgs.append(f"{'ok  ' if g >= fgm else 'MISS'} {tag}: {g / fgm:.2f}x flaggems (bar 1.0)")
        cp = copy.get((b, ctx, sq))
        if cp and b >= 8 and ctx >= 8192:
            msgs.append(f"{'ok  ' if g >= 0.8 * cp else 'MISS'} {tag}: {g / cp:.2f}x copy_gbps (bar 0.8)")
    return msgs


def _merge(rows: list[Row]) -> list[Row]:
    path = results_path(KIND)
    old: list[Row] = []
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError):
            old = []
    new_keys = {tuple(r.get(k) for k in KEY_FIELDS) for r in rows}
    return [r for r in old if tuple(r.get(k) for k in KEY_FIELDS) not in new_keys] + rows


def plot_bars(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["batch"], r["context"]) for r in rows))
    series = list(dict.fromkeys((r["provider"], r["page"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(shapes)), 4.5))
    width = 0.8 / (len(series) + 1)
    for i, (prov, page) in enumerate(series):
        vals = []
        for b, c in shapes:
            g = [
                r.get("gbps")
                for r in rows
                if (r["provider"], r["page"], r["batch"], r["context"]) == (prov, page, b, c)
            ]
            vals.append(g[0] if g and g[0] else 0)
        ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=f"{prov} page {page}")
    copies = [next((r["copy_gbps"] for r in rows if (r["batch"], r["context"]) == s), 0) for s in shapes]
    ax.bar(
        [x + len(series) * width for x in range(len(shapes))], copies, width, label="d2d copy", color="grey"
    )
    ax.set_xticks([x + 0.4 for x in range(len(shapes))], [f"b{b} ctx{c // 1024}k" for b, c in shapes])
    ax.set_ylabel("GB/s (K/V bytes / time)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(all_rows: list[Row], path: Path) -> None:
    """The decode table (GB/s, eager rows named, the bar checks) and plot beside ``path`` (the JSON); also
    used by ``merge_results.py`` after merging lanes."""
    # "graph" differs between providers of one shape: keep it out of the table's configuration columns
    table = markdown_table([{k: v for k, v in r.items() if k != "graph"} for r in all_rows], metric="gbps")
    eager = sorted({f"{r['provider']} (page {r['page']})" for r in all_rows if r.get("graph") is False})
    note = f"Timed eagerly (no CUDA graph): {', '.join(eager)}.\n" if eager else ""
    path.with_suffix(".md").write_text(table + note + "\n".join(bars(all_rows)) + "\n")
    try:
        plot_bars(all_rows, path.with_suffix(".png"))
    except Exception as exc:
        print(f"[decode] no plot: {exc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    ap.add_argument("--pages", default="0,16,64,256")
    ap.add_argument("--seqlen-q", default="1,4", help="comma list of query tokens per step")
    ap.add_argument("--quick", action="store_true", help="(1, 1k) and (8, 8k) only")
    ap.add_argument("--shapes", default=None, help="comma list of BATCHxCONTEXT (default: all of SHAPES)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-merge", action="store_true")
    args = ap.parse_args()
    install_sigterm_handler()
    shapes = [(1, 1024), (8, 8192)] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in spec.split("x")) for spec in args.shapes.split(",")]
    providers = [p for p in args.providers.split(",") if p]
    pages = [int(p) for p in args.pages.split(",")]
    rows: list[Row] = []
    try:
        seqlens_q = tuple(int(x) for x in args.seqlen_q.split(","))
        run(shapes, providers, pages, check=not args.no_check, seqlens_q=seqlens_q, into=rows)
    finally:
        if rows:
            all_rows = rows if args.no_merge else _merge(rows)
            path = write_results(
                KIND,
                all_rows,
                merge=False,
                table_kw={"metric": "gbps"},
                plot_kw={"metric": "gbps", "x": "context", "panels": ("page",)},
            )
            render(all_rows, path)
            print(f"[decode] wrote {path}")
            for m in bars(all_rows):
                print(m)


if __name__ == "__main__":
    main()
