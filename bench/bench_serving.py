"""Serving building blocks: cascade (shared-prefix) decode vs the plain paged decode over the full contexts.

``"bench": "cascade"``: 64 requests sharing one 16k-token prompt prefix, each with 512 tokens of its own,
decode (seqlen_q 1), headdim 128, 32 query heads / 8 KV heads, bf16, pages of 16 and 64 tokens, in one
:class:`fa_kvcache.PagedKVCache` (the prompt appended once, forked 64 times, each fork appending its tokens):

* ``cascade``: :func:`fa_kvcache.cascade.cascade_decode` with the plan of
  :func:`fa_kvcache.cascade.cascade_plan_from_cache` (the prefix pages attended once for the 64 queries, each
  request's own pages, one merge kernel);
* ``plain``: :func:`fa_kvcache.flash_attn_with_kvcache` over each request's full block table (the shared
  prefix pages listed in every row, as a paged engine without cascade reads them).

Both are checked against each other (max abs difference) before timing, then timed in the same process inside
CUDA graphs (``triton.testing.do_bench_cudagraph``; a row says ``"graph": false`` if capture failed and it was
timed eagerly). ``tokens_per_s`` = batch / step time (one token per request per step); ``gbps`` = the K/V
bytes the provider has to read / step time (plain: every request's full context; cascade: the prefix once
plus every suffix). The bar: cascade >= 3x plain tokens/s. Writes bench/results/<device>-serving.{json,md,png}.

    python bench/bench_serving.py                          # the default configuration, pages 16 and 64
    python bench/bench_serving.py --batch 16,64 --prefix 4096,16384
    TRITON_INTERPRET=1 python bench/bench_serving.py --smoke   # CPU: tiny shapes, no timing, nothing written

Run from the repository root with
PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-kvcache/src:packages/fa-compat/src.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, bench_ms, install_sigterm_handler, write_results  # noqa: E402

KIND = "serving"
NHEADS, NHEADS_K, HEADDIM = 32, 8, 128
BAR = 3.0


def _time(fn: Callable[[], Any], graph: bool = True) -> tuple[float, bool]:
    """Milliseconds (median) inside a CUDA graph, or eagerly if capture fails."""
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
            print(f"[serving] graph capture failed ({type(exc).__name__}: {str(exc)[:160]}); timing eagerly")
            torch.cuda.synchronize()
    return bench_ms(fn), False


def build(batch: int, prefix: int, suffix: int, page: int, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """The cache (prompt + forks), the cascade plan, the plain call's block table / lengths, and q."""
    from fa_kvcache import PagedKVCache
    from fa_kvcache.cascade import cascade_plan_from_cache

    blocks = -(-prefix // page) + batch * (-(-suffix // page) + 1) + 4
    cache = PagedKVCache(blocks, page, NHEADS_K, HEADDIM, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(n: int) -> torch.Tensor:
        return torch.randn(n, NHEADS_K, HEADDIM, device=device, dtype=dtype, generator=gen)

    cache.add_sequence("prompt")
    cache.append("prompt", rand(prefix), rand(prefix))
    ids = [f"req{i}" for i in range(batch)]
    for sid in ids:
        cache.fork("prompt", sid)
        cache.append(sid, rand(suffix), rand(suffix))
    plan = cascade_plan_from_cache(cache, ids)
    q = torch.randn(batch, 1, NHEADS, HEADDIM, device=device, dtype=dtype, generator=gen)
    return {
        "cache": cache,
        "plan": plan,
        "q": q,
        "block_table": cache.block_table(ids),
        "seqlens": cache.cache_seqlens(ids),
    }


def providers(case: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    from fa_kvcache import flash_attn_with_kvcache
    from fa_kvcache.cascade import cascade_decode

    cache, plan, q = case["cache"], case["plan"], case["q"]
    kc, vc, bt, lens = cache.k_cache, cache.v_cache, case["block_table"], case["seqlens"]
    return {
        "cascade": lambda: cascade_decode(q, kc, vc, plan),
        "plain": lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt),
    }


def parts(case: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """The cascade's three launches alone (for the note: where its time goes)."""
    from fa_kvcache import flash_attn_with_kvcache
    from fa_kvcache.merge import merge_attention_states

    cache, plan, q = case["cache"], case["plan"], case["q"]
    kc, vc = cache.k_cache, cache.v_cache
    b, g, r = q.shape[0], plan.num_groups, plan.group_size
    qp = q.reshape(g, r, NHEADS, HEADDIM)
    o, lse = flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=plan.cache_seqlens, return_softmax_lse=True, block_table=plan.block_table
    )
    la = lse.view(g, r, NHEADS, 1)
    oa = o.view(g, r, 1, NHEADS, HEADDIM)
    lb, ob = la.clone(), oa.clone()
    return (
        {
            "prefix": lambda: flash_attn_with_kvcache(
                qp, kc, vc, cache_seqlens=plan.prefix_lens, block_table=plan.prefix_block_table
            ),
            "suffix": lambda: flash_attn_with_kvcache(
                q, kc, vc, cache_seqlens=plan.cache_seqlens, block_table=plan.block_table
            ),
            "merge": lambda: merge_attention_states(oa, la, ob, lb, out=ob, out_lse=lb),
        }
        if plan.request_group is None and b == g * r
        else {}
    )


def run_point(batch: int, prefix: int, suffix: int, page: int, smoke: bool = False) -> list[Row]:
    dtype = torch.float32 if smoke else torch.bfloat16
    device = "cpu" if smoke else "cuda"
    case = build(batch, prefix, suffix, page, dtype, device)
    fns = providers(case)
    out_c = fns["cascade"]()
    out_p = fns["plain"]()
    diff = float((out_c.float() - out_p.float()).abs().max())
    scale = float(out_p.float().abs().max())
    print(
        f"[check] batch {batch} prefix {prefix} suffix {suffix} page {page}: max|cascade - plain| = "
        f"{diff:.3e} (max|plain| {scale:.3e}); groups {case['plan'].num_groups}, "
        f"prefix_lens {case['plan'].prefix_lens.tolist()[:4]}"
    )
    ok = diff <= (1e-4 if smoke else 2e-2)
    if smoke:
        if not ok:
            raise SystemExit("cascade differs from the plain call")
        for fn in parts(case).values():
            fn()
        return []
    base: Row = {
        "bench": "cascade",
        "batch": batch,
        "prefix": prefix,
        "suffix": suffix,
        "page": page,
        "seqlen_q": 1,
        "nheads": NHEADS,
        "nheads_k": NHEADS_K,
        "headdim": HEADDIM,
    }
    kv_token = 2 * NHEADS_K * HEADDIM * torch.finfo(dtype).bits // 8
    kv_bytes = {
        "plain": batch * (prefix + suffix) * kv_token,
        "cascade": (prefix + batch * suffix) * kv_token,
    }
    rows: list[Row] = []
    times: dict[str, float] = {}
    for name, fn in fns.items():
        row: Row = {**base, "provider": name}
        try:
            ms, graphed = _time(fn)
            times[name] = ms
            row.update(
                ms=round(ms, 5),
                tokens_per_s=round(batch / (ms * 1e-3), 1),
                gbps=round(kv_bytes[name] / (ms * 1e-3) / 1e9, 1),
                graph=graphed,
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            row.update(ms=None, tokens_per_s=None, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        rows.append(row)
    cascade_row = rows[0]
    notes = [f"max|cascade - plain| {diff:.2e}" + ("" if ok else " (TOO LARGE)")]
    part_ms = {}
    for name, fn in parts(case).items():
        try:
            part_ms[name] = _time(fn)[0]
        except Exception as exc:  # the parts are informative only
            print(f"[serving] part {name}: {type(exc).__name__}: {exc}")
    if part_ms:
        notes.append("parts " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in part_ms.items()))
    cascade_row["note"] = "; ".join(notes)
    if "cascade" in times and "plain" in times:
        cascade_row["speedup"] = round(times["plain"] / times["cascade"], 2)
    if not ok:
        cascade_row["error"] = f"cascade differs from plain: max abs diff {diff:.3e}"
    for r in rows:
        print(json.dumps(r), flush=True)
    del case, fns
    torch.cuda.empty_cache()
    return rows


def bars(rows: list[Row]) -> list[str]:
    msgs = []
    for r in rows:
        if r.get("provider") == "cascade" and r.get("bench") == "cascade":
            s = r.get("speedup")
            tag = f"cascade b{r['batch']} prefix {r['prefix']} suffix {r['suffix']} page {r['page']}"
            if s is None or r.get("error"):
                msgs.append(f"MISS {tag}: {r.get('error') or 'no speedup measured'}")
            else:
                msgs.append(f"{'ok  ' if s >= BAR else 'MISS'} {tag}: {s:.2f}x plain tokens/s (bar {BAR})")
    return msgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="64", help="comma list of requests sharing the prefix")
    ap.add_argument("--prefix", default="16384", help="comma list of shared prefix lengths")
    ap.add_argument("--suffix", default="512", help="comma list of per-request suffix lengths")
    ap.add_argument("--pages", default="16,64")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter: tiny shapes, checks only")
    ap.add_argument("--no-merge", action="store_true", help="overwrite the results file's rows")
    args = ap.parse_args()
    install_sigterm_handler()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if args.smoke:
        for page in ints(args.pages):
            run_point(4, 2 * page, 20, page, smoke=True)
        print("[serving] smoke ok")
        return
    rows: list[Row] = []
    try:
        for batch in ints(args.batch):
            for prefix in ints(args.prefix):
                for suffix in ints(args.suffix):
                    for page in ints(args.pages):
                        rows += run_point(batch, prefix, suffix, page)
    finally:
        if rows:
            eager = sorted({f"{r['provider']} (page {r['page']})" for r in rows if r.get("graph") is False})
            path = write_results(
                KIND,
                rows,
                merge=not args.no_merge,
                table_kw={"metric": "tokens_per_s", "ours": "cascade", "title": "Cascade decode (bf16)"},
                plot_kw={"metric": "tokens_per_s", "x": "page", "panels": ("batch", "prefix")},
            )
            md = path.with_suffix(".md")
            extra = [
                f"Timed eagerly (no CUDA graph): {', '.join(eager)}."
                if eager
                else "All rows timed in CUDA graphs."
            ]
            extra += [f"- {r['provider']} page {r['page']}: {r['note']}" for r in rows if r.get("note")]
            extra += bars(rows)
            md.write_text(md.read_text() + "\n".join(extra) + "\n")
            print(f"[serving] wrote {path}")
            for m in bars(rows):
                print(m)


if __name__ == "__main__":
    main()
