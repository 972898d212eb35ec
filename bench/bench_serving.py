"""Serving building blocks: cascade (shared-prefix) decode, unified mixed prefill + decode, FP8 KV-cache decode.

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

``"bench": "mixed"``: one serving step of 64 decode rows (contexts uniform in [1k, 32k]) plus 4 prefill chunks
of 512 rows (contexts uniform in [2k, 6k], the chunk being their last 512 positions), causal, headdim 128, 32
query / 8 KV heads, bf16, pages of 16 / 64 / 256 tokens, shuffled in one cache:

* ``unified``: :func:`fa_kvcache.unified.unified_attention` (every row in one launch, plus the split combine);
* ``two-call``: the same work as a prefill call, ``fa_core.flash_attn_varlen_forward`` with ``block_table``
  (through its launcher while the public function takes no ``block_table``), plus a decode call,
  :func:`fa_kvcache.flash_attn_with_kvcache` with ``block_table``;
* ``flaggems``: ``flag_gems.ops.flash_attn_varlen_func`` (vLLM's argument order) on the same pages, eager (it
  faults under graph capture); skipped with the reason when FlagGems is absent.

``tokens_per_s`` = query rows / step time; the bar: unified >= 1.0x both others.

``"bench": "fp8_decode"``: decode (seqlen_q 1) of b in {8, 32} requests with 8k / 32k contexts, page 64: an
FP8 e4m3 cache with per-(request, kv head) descales vs the bf16 cache, through ``unified_attention``
(``unified-fp8`` vs ``unified-bf16``) and ``flash_attn_with_kvcache`` (``kvcache-bf16``; ``kvcache-fp8`` when
it takes ``k_descale``). The bar: unified-fp8 >= 1.8x unified-bf16 tokens/s.

    python bench/bench_serving.py --bench mixed,fp8_decode
    python bench/bench_serving.py --bench all
    TRITON_INTERPRET=1 python bench/bench_serving.py --bench all --smoke

Every provider is checked against ``unified`` (max abs difference, in the row's note) before timing; graphs
as above (``graph: false`` rows ran eagerly).

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

from common import Row, bench_ms, install_sigterm_handler, markdown_table, write_results  # noqa: E402

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


# ------------------------------------------------------------------------------------------ mixed / fp8 decode


def paged_cache(
    ctx: list[int], page: int, hk: int, d: int, dtype: torch.dtype, device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random cache ``(num_blocks, page, hk, d)`` x 2 with each request's pages shuffled, and the block
    table ``(batch, max_pages)`` int32 (unused entries 0)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    need = [max(1, -(-n // page)) for n in ctx]
    nb = sum(need) + 1
    kc = torch.randn(nb, page, hk, d, device=device, generator=gen).to(dtype)
    vc = torch.randn(nb, page, hk, d, device=device, generator=gen).to(dtype)
    perm = torch.randperm(nb, device=device, generator=gen).to(torch.int32)
    bt = torch.zeros(len(ctx), max(need), dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[used : used + n]
        used += n
    return kc, vc, bt


def _tensor(x: Any) -> torch.Tensor:
    """The output of a call that returns ``out`` or ``(out, lse)``: ``out``."""
    return x if isinstance(x, torch.Tensor) else x[0]


def _cu(lens: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _varlen_paged(q, kc, vc, cu_q, cu_k, max_q, max_k, bt, scale) -> Callable[[], torch.Tensor]:
    """fa_core's paged varlen forward: the public function when it takes ``block_table``, else its launcher
    (the same kernel launch without the host checks)."""
    import inspect

    import fa_core

    varlen: Any = fa_core.flash_attn_varlen_forward
    if "block_table" in inspect.signature(varlen).parameters:
        return lambda: (
            varlen(q, kc, vc, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True, block_table=bt).out
        )
    from fa_core.forward_launch import launch_forward

    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    kw: dict[str, Any] = dict(
        varlen=True,
        batch=bt.shape[0],
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        seqused_k=None,
        softmax_scale=scale,
        causal=True,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        dropout_p=0.0,
        rng_state=torch.zeros(2, dtype=torch.int64),
        block_table=bt,
    )

    def run() -> torch.Tensor:
        launch_forward(q, kc, vc, out, lse, **kw)
        return out

    return run


def mixed_case(page: int, smoke: bool) -> dict[str, Any]:
    """64 decode rows + 4 prefill chunks of 512 (smoke: 4 + 1 chunk of 20, small heads) in one cache."""
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    hq, hk, d = (4, 2, 32) if smoke else (NHEADS, NHEADS_K, HEADDIM)
    n_dec, n_pre, chunk = (4, 1, 20) if smoke else (64, 4, 512)
    g = torch.Generator().manual_seed(page)
    dec_lo, dec_hi, pre_lo, pre_hi = (20, 100, 30, 90) if smoke else (1024, 32768, 2048, 6144)
    dec_ctx = torch.randint(dec_lo, dec_hi + 1, (n_dec,), generator=g).tolist()
    pre_ctx = torch.randint(pre_lo, pre_hi + 1, (n_pre,), generator=g).tolist()
    ctx = dec_ctx + pre_ctx
    qlens = [1] * n_dec + [chunk] * n_pre
    kc, vc, bt = paged_cache(ctx, page, hk, d, dtype, device, seed=page)
    q = torch.randn(sum(qlens), hq, d, device=device, dtype=torch.float32).to(dtype)
    return dict(
        q=q,
        kc=kc,
        vc=vc,
        bt=bt,
        ctx=ctx,
        qlens=qlens,
        n_dec=n_dec,
        chunk=chunk,
        hq=hq,
        hk=hk,
        d=d,
        dev=device,
    )


def mixed_providers(c: dict[str, Any]) -> dict[str, tuple[Callable[[], Any], bool]]:
    """name -> (the step's function, CUDA graph allowed); ``c["assemble"][name]`` turns a function's result
    into out ``(total_q, nheads, d)`` where it is not that already."""
    from fa_kvcache import flash_attn_with_kvcache
    from fa_kvcache.unified import unified_attention

    q, kc, vc, bt, ctx, qlens, n_dec, dev = (
        c[k] for k in ("q", "kc", "vc", "bt", "ctx", "qlens", "n_dec", "dev")
    )
    scale = c["d"] ** -0.5
    cu = _cu(qlens, dev)
    seq = torch.tensor(ctx, dtype=torch.int32, device=dev)
    max_q, max_k = max(qlens), max(ctx)

    def unified() -> torch.Tensor:
        return _tensor(unified_attention(q, kc, vc, cu, seq, max_q, max_k, bt, softmax_scale=scale))

    q_dec = q[:n_dec].view(n_dec, 1, c["hq"], c["d"])
    q_pre = q[n_dec:]
    bt_dec, bt_pre = bt[:n_dec].contiguous(), bt[n_dec:].contiguous()
    seq_dec = seq[:n_dec].contiguous()
    pre_ctx = ctx[n_dec:]
    prefill = _varlen_paged(
        q_pre, kc, vc, _cu(qlens[n_dec:], dev), _cu(pre_ctx, dev), c["chunk"], max(pre_ctx), bt_pre, scale
    )

    def two_call() -> tuple[torch.Tensor, torch.Tensor]:
        o_dec = _tensor(
            flash_attn_with_kvcache(
                q_dec, kc, vc, cache_seqlens=seq_dec, block_table=bt_dec, softmax_scale=scale, causal=True
            )
        )
        return o_dec, prefill()

    # the timed functions return what the calls give; the check assembles (total_q, nheads, d) from it
    c["assemble"] = {"two-call": lambda r: torch.cat([r[0].view(n_dec, c["hq"], c["d"]), r[1]])}
    provs: dict[str, tuple[Callable[[], Any], bool]] = {
        "unified": (unified, True),
        "two-call": (two_call, True),
    }
    if dev == "cuda":
        try:
            from fa_core.backends.flaggems import _flag_gems

            fg = _flag_gems()  # raises with the reason when FlagGems is unavailable

            def flaggems() -> torch.Tensor:
                return _tensor(
                    fg.ops.flash_attn_varlen_func(
                        q,
                        kc,
                        vc,
                        max_q,
                        cu,
                        max_k,
                        seqused_k=seq,
                        softmax_scale=scale,
                        causal=True,
                        block_table=bt,
                    )
                )

            provs["flaggems"] = (flaggems, False)
        except Exception as exc:
            print(f"[serving] flaggems skipped: {type(exc).__name__}: {exc}")
            c["flaggems_skip"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return provs


def run_mixed(page: int, smoke: bool = False) -> list[Row]:
    c = mixed_case(page, smoke)
    provs = mixed_providers(c)
    ref = provs["unified"][0]().float().clone()
    diffs = {}
    for name, (fn, _) in provs.items():
        try:
            got = c["assemble"].get(name, lambda r: r)(fn())
            diffs[name] = float((got.float() - ref).abs().max())
        except Exception as exc:
            diffs[name] = float("nan")
            print(f"[serving] mixed {name} page {page}: {type(exc).__name__}: {str(exc)[:200]}")
    print(f"[check] mixed page {page}: max|provider - unified| = {diffs}")
    if smoke:
        if not diffs["two-call"] <= 1e-4:
            raise SystemExit(f"unified differs from the two calls: {diffs}")
        return []
    n_tok = len(c["qlens"]) and sum(c["qlens"])
    kv_token = 2 * c["hk"] * c["d"] * 2
    base: Row = {
        "bench": "mixed",
        "page": page,
        "decode": c["n_dec"],
        "prefill": f"{len(c['qlens']) - c['n_dec']}x{c['chunk']}",
        "nheads": c["hq"],
        "nheads_k": c["hk"],
        "headdim": c["d"],
    }
    rows: list[Row] = []
    times: dict[str, float] = {}
    for name, (fn, graph_ok) in provs.items():
        row: Row = {**base, "provider": name}
        try:
            ms, graphed = _time(fn, graph=graph_ok)
            times[name] = ms
            row.update(
                ms=round(ms, 5),
                tokens_per_s=round(n_tok / (ms * 1e-3), 1),
                gbps=round(sum(c["ctx"]) * kv_token / (ms * 1e-3) / 1e9, 1),
                graph=graphed,
                note=f"max|out - unified| {diffs[name]:.2e}",
            )
            if diffs[name] != diffs[name] or diffs[name] > 5e-2:
                row["error"] = f"differs from unified: max abs diff {diffs[name]:.3e}"
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            row.update(ms=None, tokens_per_s=None, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        rows.append(row)
    if "flaggems_skip" in c:
        rows[0]["note"] += f"; flaggems skipped ({c['flaggems_skip']})"
    if "unified" in times:
        ratios = {k: round(v / times["unified"], 2) for k, v in times.items() if k != "unified"}
        rows[0]["speedup"] = min(ratios.values()) if ratios else None
        rows[0]["note"] += "; " + ", ".join(f"{r}x {k}" for k, r in ratios.items())
    for r in rows:
        print(json.dumps(r), flush=True)
    del c, provs
    if not smoke:
        torch.cuda.empty_cache()
    return rows


def run_fp8_decode(batch: int, ctx: int, page: int, smoke: bool = False) -> list[Row]:
    """Decode over an FP8 e4m3 cache (per-(request, kv head) descales) vs the bf16 cache it was quantised
    from."""
    import inspect

    from fa_kvcache import flash_attn_with_kvcache
    from fa_kvcache.unified import unified_attention

    dev = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    hq, hk, d = (4, 2, 32) if smoke else (NHEADS, NHEADS_K, HEADDIM)
    kc, vc, bt = paged_cache([ctx] * batch, page, hk, d, dtype, dev, seed=batch + ctx)
    # one scale per (request, kv head) mapping the cache's largest |value| to 448 (all requests share pages of
    # the same distribution here)
    k_scale = (kc.float().abs().amax() / 448).expand(batch, hk).contiguous()
    v_scale = (vc.float().abs().amax() / 448).expand(batch, hk).contiguous()
    kc8 = (kc.float() / k_scale[0, 0]).to(torch.float8_e4m3fn)
    vc8 = (vc.float() / v_scale[0, 0]).to(torch.float8_e4m3fn)
    q = torch.randn(batch, hq, d, device=dev).to(dtype)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    provs: dict[str, Callable[[], torch.Tensor]] = {
        "unified-fp8": lambda: _tensor(
            unified_attention(q, kc8, vc8, cu, seq, 1, ctx, bt, k_descale=k_scale, v_descale=v_scale)
        ),
        "unified-bf16": lambda: _tensor(unified_attention(q, kc, vc, cu, seq, 1, ctx, bt)),
        "kvcache-bf16": lambda: _tensor(
            flash_attn_with_kvcache(q[:, None], kc, vc, cache_seqlens=seq, block_table=bt, causal=True)
        ).view(batch, hq, d),
    }
    skip = None
    kvcache: Any = flash_attn_with_kvcache
    if "k_descale" in inspect.signature(kvcache).parameters:
        provs["kvcache-fp8"] = lambda: _tensor(
            kvcache(
                q[:, None], kc8, vc8, cache_seqlens=seq, block_table=bt, causal=True, k_descale=k_scale,
                v_descale=v_scale,
            )
        ).view(batch, hq, d)  # fmt: skip
    else:
        skip = "flash_attn_with_kvcache takes no FP8 cache (no k_descale argument): kvcache-fp8 not timed"
    ref = provs["unified-bf16"]().float().clone()
    diffs = {name: float((fn().float() - ref).abs().max()) for name, fn in provs.items()}
    print(f"[check] fp8_decode b{batch} ctx {ctx} page {page}: max|provider - unified-bf16| = {diffs}")
    if smoke:
        if not diffs["kvcache-bf16"] <= 1e-4 or not diffs["unified-fp8"] <= 0.25:
            raise SystemExit(f"fp8 decode check failed: {diffs}")
        return []
    base: Row = {
        "bench": "fp8_decode",
        "batch": batch,
        "context": ctx,
        "page": page,
        "nheads": hq,
        "nheads_k": hk,
        "headdim": d,
    }
    rows: list[Row] = []
    times: dict[str, float] = {}
    for name, fn in provs.items():
        row: Row = {**base, "provider": name}
        bytes_per = 1 if "fp8" in name else 2
        try:
            ms, graphed = _time(fn)
            times[name] = ms
            row.update(
                ms=round(ms, 5),
                tokens_per_s=round(batch / (ms * 1e-3), 1),
                gbps=round(batch * ctx * 2 * hk * d * bytes_per / (ms * 1e-3) / 1e9, 1),
                graph=graphed,
                note=f"max|out - unified-bf16| {diffs[name]:.2e}",
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            row.update(ms=None, tokens_per_s=None, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        rows.append(row)
    if skip:
        rows[0]["note"] += f"; {skip}"
    if "unified-fp8" in times and "unified-bf16" in times:
        rows[0]["speedup"] = round(times["unified-bf16"] / times["unified-fp8"], 2)
        if "kvcache-bf16" in times:
            rows[0]["note"] += f"; {times['kvcache-bf16'] / times['unified-fp8']:.2f}x kvcache-bf16"
    for r in rows:
        print(json.dumps(r), flush=True)
    provs.clear()
    torch.cuda.empty_cache()
    return rows


MIXED_BAR, FP8_BAR = 1.0, 1.8


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
    tps = {
        (r.get("bench"), r.get("page"), r.get("batch"), r.get("context"), r.get("provider")): r.get(
            "tokens_per_s"
        )
        for r in rows
    }
    for r in rows:
        if r.get("bench") == "mixed" and r.get("provider") == "unified":
            ours = r.get("tokens_per_s")
            for other in ("two-call", "flaggems"):
                theirs = tps.get(("mixed", r["page"], None, None, other))
                tag = f"mixed page {r['page']}: unified vs {other}"
                if not ours or not theirs:
                    msgs.append(f"SKIP {tag}: not measured ({r.get('error') or r.get('note', '')[-160:]})")
                else:
                    x = ours / theirs
                    msgs.append(
                        f"{'ok  ' if x >= MIXED_BAR else 'MISS'} {tag}: {x:.2f}x tokens/s (bar {MIXED_BAR})"
                    )
        if r.get("bench") == "fp8_decode" and r.get("provider") == "unified-fp8":
            ours = r.get("tokens_per_s")
            theirs = tps.get(("fp8_decode", r["page"], r["batch"], r["context"], "unified-bf16"))
            tag = f"fp8_decode b{r['batch']} ctx {r['context']} page {r['page']}: unified-fp8 vs unified-bf16"
            if not ours or not theirs:
                msgs.append(f"MISS {tag}: not measured ({r.get('error')})")
            else:
                x = ours / theirs
                msgs.append(f"{'ok  ' if x >= FP8_BAR else 'MISS'} {tag}: {x:.2f}x tokens/s (bar {FP8_BAR})")
    return msgs


#: the provider each bench's ratio columns are taken against
OURS_BY_BENCH = {"cascade": "cascade", "mixed": "unified", "fp8_decode": "unified-fp8"}
TITLES = {
    "cascade": "Cascade decode (bf16)",
    "mixed": "Mixed prefill + decode step (bf16)",
    "fp8_decode": "FP8 vs bf16 KV-cache decode",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="cascade", help="comma list of cascade, mixed, fp8_decode, or all")
    ap.add_argument("--batch", default="64", help="cascade: comma list of requests sharing the prefix")
    ap.add_argument("--prefix", default="16384", help="cascade: comma list of shared prefix lengths")
    ap.add_argument("--suffix", default="512", help="cascade: comma list of per-request suffix lengths")
    ap.add_argument("--pages", default=None, help="default: cascade 16,64; mixed 16,64,256; fp8_decode 64")
    ap.add_argument("--fp8-batch", default="8,32", help="fp8_decode: comma list of batch sizes")
    ap.add_argument("--fp8-context", default="8192,32768", help="fp8_decode: comma list of context lengths")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter: tiny shapes, checks only")
    ap.add_argument("--no-merge", action="store_true", help="overwrite the results file's rows")
    args = ap.parse_args()
    install_sigterm_handler()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    benches = ["cascade", "mixed", "fp8_decode"] if args.bench == "all" else args.bench.split(",")
    for b in benches:
        if b not in OURS_BY_BENCH:
            raise SystemExit(f"unknown bench {b!r}: pick from {', '.join(OURS_BY_BENCH)} or all")
    default_pages = {"cascade": "16,64", "mixed": "16,64,256", "fp8_decode": "64"}

    def pages(bench: str) -> list[int]:
        return ints(args.pages or default_pages[bench])

    if args.smoke:
        if "cascade" in benches:
            for page in pages("cascade"):
                run_point(4, 2 * page, 20, page, smoke=True)
        if "mixed" in benches:
            for page in pages("mixed"):
                run_mixed(page, smoke=True)
        if "fp8_decode" in benches:
            run_fp8_decode(2, 70, 16, smoke=True)
        print("[serving] smoke ok")
        return
    rows: list[Row] = []
    try:
        if "cascade" in benches:
            for batch in ints(args.batch):
                for prefix in ints(args.prefix):
                    for suffix in ints(args.suffix):
                        for page in pages("cascade"):
                            rows += run_point(batch, prefix, suffix, page)
        if "mixed" in benches:
            for page in pages("mixed"):
                rows += run_mixed(page)
        if "fp8_decode" in benches:
            for batch in ints(args.fp8_batch):
                for ctx in ints(args.fp8_context):
                    for page in pages("fp8_decode"):
                        rows += run_fp8_decode(batch, ctx, page)
    finally:
        if rows:
            first = str(rows[0]["bench"])
            path = write_results(
                KIND,
                rows,
                merge=not args.no_merge,
                table_kw={"metric": "tokens_per_s", "ours": OURS_BY_BENCH[first], "title": TITLES[first]},
                plot_kw={
                    "metric": "tokens_per_s",
                    "x": "page",
                    "bench": first,
                    "panels": ("batch", "prefix") if first == "cascade" else ("batch", "context"),
                },
            )
            # one table per bench, each with its own provider as the ratio anchor, over every row of the file
            all_rows = json.loads(path.read_text())["rows"]
            md_parts = []
            for bench in dict.fromkeys(str(r.get("bench")) for r in all_rows):
                sub = [r for r in all_rows if r.get("bench") == bench]
                md_parts.append(
                    markdown_table(
                        sub,
                        metric="tokens_per_s",
                        ours=OURS_BY_BENCH.get(bench, "fa-plus"),
                        title=TITLES.get(bench, bench),
                    )
                )
            eager = sorted(
                {
                    f"{r['bench']} {r['provider']} (page {r['page']})"
                    for r in all_rows
                    if r.get("graph") is False
                }
            )
            extra = [
                f"Timed eagerly (no CUDA graph): {', '.join(eager)}."
                if eager
                else "All rows timed in CUDA graphs."
            ]
            extra += [
                f"- {r['bench']} {r['provider']} "
                + ", ".join(f"{k} {r[k]}" for k in ("batch", "prefix", "context", "page") if k in r)
                + f": {r['note']}"
                for r in all_rows
                if r.get("note")
            ]
            extra += bars(all_rows)
            path.with_suffix(".md").write_text("\n".join(md_parts) + "\n".join(extra) + "\n")
            print(f"[serving] wrote {path}")
            for m in bars(rows):
                print(m)


if __name__ == "__main__":
    main()
