"""Forward+backward and backward-only TFLOP/s of fa-plus (the public ``flash_attn.flash_attn_func``) vs SDPA
(flash, cuDNN), FlexAttention and FlagGems, in one run.

Standard sweep (batch * seqlen = 16384, hidden 2048, headdim 64/128, seqlen 512..16384, causal and not,
bf16). FLOPs: fwd_bwd = 3.5 x forward, bwd = 2.5 x forward (forward = 4*b*h*s^2*d, halved when causal).
Gradients are taken with ``torch.autograd.grad`` (no accumulation into ``.grad``) for every provider; the
backward-only timing reuses one forward graph (``retain_graph=True``). Peak memory of one fwd+bwd step
(``torch.cuda.max_memory_allocated`` above the inputs) goes with the fwd_bwd rows.
Writes bench/results/<device>-backward.{json,md,png}.

    python bench/bench_backward.py                  # everything (5 providers x 24 shapes x 2 benches)
    python bench/bench_backward.py --quick --check  # d128, seqlen 1k and 16k, after a gradient check
    python bench/bench_backward.py --providers fa-plus,sdpa-flash --headdims 128 --seqlens 4096,16384

Run from the repository root with
PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-kvcache/src:packages/fa-compat/src.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Row,
    bench_ms,
    flops,
    install_sigterm_handler,
    progress,
    rel_error,
    release_cache,
    standard_sweep,
    try_provider,
    write_results,
)

KIND = "backward"
BENCHES = ("fwd_bwd", "bwd")

# A provider builds, from q, k, v, dout in OUR layout (batch, seqlen, nheads, headdim), its own leaf tensors
# (layout conversion outside the timed region) and returns (forward, leaves, dout) with forward() -> out.
Built = tuple[Callable[[], torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor]


def _leaves(*ts: torch.Tensor, bhsd: bool) -> tuple[torch.Tensor, ...]:
    return tuple((t.transpose(1, 2).contiguous() if bhsd else t).detach().requires_grad_() for t in ts)


def _fa_plus(q, k, v, dout, causal) -> Built:
    """The public ``flash_attn.flash_attn_func`` as training calls it: inputs requiring grad."""
    from flash_attn import flash_attn_func

    q, k, v = _leaves(q, k, v, bhsd=False)
    return (lambda: flash_attn_func(q, k, v, causal=causal)), (q, k, v), dout


def _sdpa(backend_name: str):
    def build(q, k, v, dout, causal) -> Built:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        backend = getattr(SDPBackend, backend_name)
        qt, kt, vt = _leaves(q, k, v, bhsd=True)

        def fwd() -> torch.Tensor:
            with sdpa_kernel(backend):
                return sdpa(qt, kt, vt, is_causal=causal)

        return fwd, (qt, kt, vt), dout.transpose(1, 2).contiguous()

    return build


_FLEX: dict[str, Any] = {}


def _flex(q, k, v, dout, causal) -> Built:
    import torch._dynamo as dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 1000)
    if hasattr(dynamo.config, "accumulated_recompile_limit"):
        dynamo.config.accumulated_recompile_limit = 100000
    if "fn" not in _FLEX:
        # the backward-only timing replays one graph (retain_graph=True), which donated buffers forbid
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    compiled = _FLEX["fn"]
    qt, kt, vt = _leaves(q, k, v, bhsd=True)
    sq, sk = q.shape[1], k.shape[1]
    block_mask = None
    if causal:
        off = sk - sq  # bottom-right aligned, as ours

        def causal_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return q_idx + off >= kv_idx

        block_mask = create_block_mask(causal_mod, B=None, H=None, Q_LEN=sq, KV_LEN=sk, device=q.device)
    return (
        (lambda: compiled(qt, kt, vt, block_mask=block_mask)),
        (qt, kt, vt),
        dout.transpose(1, 2).contiguous(),
    )


def _flaggems(q, k, v, dout, causal) -> Built:
    """FlagGems' differentiable SDPA entry point, called directly; a FlagGems without one gives error rows."""
    from fa_core.backends.flaggems import _flag_gems

    fg = _flag_gems()  # raises FlagGemsUnavailableError with the reason
    fn = getattr(fg.ops, "scaled_dot_product_attention", None)
    if fn is None:
        raise NotImplementedError("this FlagGems has no flag_gems.ops.scaled_dot_product_attention")
    qt, kt, vt = _leaves(q, k, v, bhsd=True)
    scale = q.shape[-1] ** -0.5
    return (
        (lambda: fn(qt, kt, vt, attn_mask=None, dropout_p=0.0, is_causal=causal, scale=scale)),
        (qt, kt, vt),
        dout.transpose(1, 2).contiguous(),
    )


#: fwd+bwd providers. ``fa-plus`` is the public API (``flash_attn.flash_attn_func``).
PROVIDERS: dict[str, Callable[..., Built]] = {
    "fa-plus": _fa_plus,
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "flex": _flex,
    "flaggems": _flaggems,
}


def timed_fns(built: Built) -> dict[str, Callable[[], Any]]:
    """``{"fwd_bwd": f, "bwd": g}``; building runs one fwd+bwd (compiles/autotunes outside the timing)."""
    fwd, leaves, dout = built

    def fwd_bwd() -> Any:
        return torch.autograd.grad(fwd(), leaves, dout)

    fwd_bwd()
    out = fwd()

    def bwd() -> Any:
        return torch.autograd.grad(out, leaves, dout, retain_graph=True)

    bwd()
    return {"fwd_bwd": fwd_bwd, "bwd": bwd}


def peak_mem_mb(fn: Callable[[], Any]) -> float:
    """Peak memory of one call above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def _inputs(b: int, s: int, h: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(4)]


def check(providers: list[str], headdim: int, dtype: torch.dtype, tol: float = 3e-2) -> dict[str, str]:
    """fa-plus gradients vs fp32 SDPA (math) at one shape; returns ``{provider: reason}`` on failure."""
    if "fa-plus" not in providers:
        return {}
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k, v, dout = _inputs(2, 1024, 2048 // headdim, headdim, dtype)
    bad: dict[str, str] = {}
    for causal in (False, True):
        try:
            ref_leaves = _leaves(*(t.float() for t in (q, k, v)), bhsd=True)
            ref = torch.autograd.grad(
                sdpa(*ref_leaves, is_causal=causal), ref_leaves, dout.float().transpose(1, 2)
            )
            fwd, leaves, d_out = _fa_plus(q, k, v, dout, causal)
            ours = torch.autograd.grad(fwd(), leaves, d_out)
            errs = [rel_error(o, r.transpose(1, 2)) for o, r in zip(ours, ref)]
            ok = max(errs) <= tol and all(bool(torch.isfinite(o).all()) for o in ours)
            print(
                f"[check] fa-plus causal={causal} d={headdim}: rel err dq/dk/dv "
                f"{', '.join(f'{e:.2e}' for e in errs)} {'ok' if ok else 'FAIL'}"
            )
            if not ok:
                bad["fa-plus"] = f"check failed: rel err {max(errs):.2e} vs fp32 SDPA (causal={causal})"
        except Exception as exc:
            print(f"[check] fa-plus: {type(exc).__name__}: {exc}")
            bad["fa-plus"] = f"check failed: {type(exc).__name__}: {exc}"[:300]
    return bad


def _build(fns: dict[str, Callable[[], Any]], name: str, q, k, v, dout, causal: bool) -> str | None:
    """Fill ``fns`` with the provider's timed functions; return the error message if it cannot run."""
    try:
        fns.update(timed_fns(PROVIDERS[name](q, k, v, dout, causal)))
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # unsupported shape, OOM, compile error: recorded, the sweep goes on
        return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    finally:
        release_cache()


def _autotuned_tiles() -> dict[str, Any]:
    """The backward kernels' autotuned configs of the last launch (the shape just timed): rows record them,
    since picks differ between runs when configs time close."""
    from fa_backward import launch

    tiles: dict[str, Any] = {}
    for name in ("dkdv", "dq"):
        config = getattr(launch, f"{name}_launch").last_config
        if config is not None:
            tiles[name] = [*config.kwargs.values(), config.num_warps, config.num_stages]
    return tiles


def _time_config(
    cfg: Row, providers: list[str], benches: list[str], dtype: torch.dtype, bad: dict[str, str]
) -> list[Row]:
    b, s, h, d, causal = cfg["batch"], cfg["seqlen"], cfg["nheads"], cfg["headdim"], cfg["causal"]
    q, k, v, dout = _inputs(b, s, h, d, dtype)
    rows: list[Row] = []
    for name in providers:
        base: Row = {"provider": name, "headdim": d, "causal": causal, "seqlen": s, "batch": b, "nheads": h}
        new = [{"bench": bench, **base} for bench in benches]
        fns: dict[str, Callable[[], Any]] = {}
        if name in bad:
            for row in new:
                row.update(ms=None, tflops=None, error=bad[name])
        else:
            # building (compile, autotune, first fwd+bwd) failing fails every row of this provider
            build_error = _build(fns, name, q, k, v, dout, causal)
            for row in new:
                if build_error:
                    row.update(ms=None, tflops=None, error=build_error)
                    continue
                fn = fns[row["bench"]]
                try_provider(row, lambda fn=fn: bench_ms(fn), flops(b, s, s, h, d, causal, mode=row["bench"]))
                if name == "fa-plus" and not row.get("error"):
                    row["tile"] = _autotuned_tiles()
                if row["bench"] == "fwd_bwd" and not row.get("error"):
                    try:
                        row["peak_mem_mb"] = peak_mem_mb(fn)
                    except Exception as exc:  # never lose the timing for a memory probe
                        row["note"] = f"no peak memory: {type(exc).__name__}"
        fns.clear()
        release_cache()
        rows += new
        for row in new:
            val = row.get("tflops") if row.get("tflops") is not None else row.get("error")
            mem = f" peak {row['peak_mem_mb']} MiB" if "peak_mem_mb" in row else ""
            print(
                f"  {row['bench']:7s} {name:10s} d={d:3d} causal={causal!s:5} s={s:5d} b={b:2d}: {val}{mem}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headdim 128, seqlen 1024 and 16384 only")
    ap.add_argument(
        "--providers", default=",".join(PROVIDERS), help=f"comma list out of {','.join(PROVIDERS)}"
    )
    ap.add_argument("--headdims", default=None, help="comma list (default 64,128; --quick: 128)")
    ap.add_argument("--seqlens", default=None, help="comma list (default 512..16384)")
    ap.add_argument("--causal", default=None, choices=["0", "1"], help="only non-causal (0) or causal (1)")
    ap.add_argument("--benches", default=",".join(BENCHES), help="comma list out of fwd_bwd,bwd")
    ap.add_argument("--check", action="store_true", help="check fa-plus gradients vs fp32 SDPA before timing")
    ap.add_argument("--no-merge", action="store_true", help="overwrite the results file instead of merging")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_backward: no CUDA GPU; nothing to time", file=sys.stderr)
        return 3
    install_sigterm_handler()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        ap.error(f"unknown providers {unknown}; known: {list(PROVIDERS)}")
    benches = [x.strip() for x in args.benches.split(",") if x.strip()]
    if any(x not in BENCHES for x in benches):
        ap.error(f"--benches takes {BENCHES}")
    headdims = (
        [int(x) for x in args.headdims.split(",")] if args.headdims else ([128] if args.quick else [64, 128])
    )
    seqlens = (
        [int(x) for x in args.seqlens.split(",")] if args.seqlens else ([1024, 16384] if args.quick else None)
    )
    causals = (False, True) if args.causal is None else (args.causal == "1",)
    dtype = getattr(torch, args.dtype)
    print(
        f"[bench_backward] {torch.cuda.get_device_name()} providers={providers} headdims={headdims} "
        f"benches={benches} dtype={args.dtype}",
        flush=True,
    )

    bad = check(providers, headdims[-1], dtype) if args.check else {}
    rows: list[Row] = []
    try:
        for cfg in progress(standard_sweep(headdims, seqlens, causals), desc="backward"):
            rows += _time_config(cfg, providers, benches, dtype, bad)
    finally:
        if rows:
            path = write_results(
                KIND,
                rows,
                merge=not args.no_merge,
                plot_kw={"bench": "fwd_bwd"},
                table_kw={"title": f"forward+backward and backward ({args.dtype})"},
            )
            print(f"[bench_backward] wrote {path} (+ .md, .png)")
    errors = sum(1 for r in rows if r.get("error"))
    print(f"[bench_backward] {len(rows)} rows, {errors} with errors")
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
