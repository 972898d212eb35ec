"""SDPA with Flash Attention Plus as its flash backend vs SDPA's own flash and cuDNN backends.

Providers (all called through ``torch.nn.functional.scaled_dot_product_attention`` on ``(b, h, s, d)``
contiguous inputs, backend forced with ``sdpa_kernel``):
  ``sdpa-fa-plus``  FLASH_ATTENTION backend after ``fa_backward.sdpa.activate()`` (our kernels)
  ``sdpa-flash``    FLASH_ATTENTION backend, torch's kernel (ours restored)
  ``sdpa-cudnn``    CUDNN_ATTENTION backend
Benches: ``sdpa_forward`` rows go to bench/results/<device>-forward.json, ``sdpa_fwd_bwd`` rows (forward +
backward, ``torch.autograd.grad``, FLOPs = 3.5 x forward) to <device>-backward.json, each its own table there:
its three providers come from one run (bench_forward's and bench_backward's own sdpa-flash rows stay theirs). Standard sweep: batch * seqlen =
16384, hidden 2048, headdim 64/128, seqlen 512..16384, causal and not, bf16.

    python bench/bench_sdpa.py --quick        # d128, seqlen 1k / 4k / 16k
    python bench/bench_sdpa.py                # the whole sweep
    python bench/bench_sdpa.py --providers sdpa-fa-plus,sdpa-flash --benches forward --seqlens 4096

Run from the repository root with PYTHONPATH=packages/fa-core/src:packages/fa-backward/src (torch >= 2.11).
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
    result_layout,
    standard_sweep,
    try_provider,
    write_results,
)

PROVIDERS = ("sdpa-fa-plus", "sdpa-flash", "sdpa-cudnn")
BENCHES = {"forward": "forward", "fwd_bwd": "backward"}  # --benches name -> results kind (file)


def _backend(provider: str) -> Any:
    from torch.nn.attention import SDPBackend

    return SDPBackend.CUDNN_ATTENTION if provider == "sdpa-cudnn" else SDPBackend.FLASH_ATTENTION


def _set_provider(provider: str) -> None:
    """Ours active for sdpa-fa-plus only. cuDNN stays enabled: every call forces its backend anyway."""
    import fa_backward.sdpa as fa_sdpa

    if provider == "sdpa-fa-plus":
        if not fa_sdpa.is_active():
            fa_sdpa.activate(disable_cudnn=False)
    elif fa_sdpa.is_active():
        fa_sdpa.restore()


def build(
    provider: str, benches: list[str], b: int, s: int, h: int, d: int, causal: bool, dtype: torch.dtype
) -> dict[str, Callable[[], Any]]:
    """``{bench: fn}`` for one provider and shape; runs each once (compile, autotune, unsupported shapes
    fail here, not inside the timing) and checks from the call counters that SDPA ran the right kernels."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import fa_backward.sdpa as fa_sdpa

    _set_provider(provider)
    backend = _backend(provider)
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def forward() -> torch.Tensor:
        with torch.no_grad(), sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=causal)

    def fwd_bwd() -> Any:
        with sdpa_kernel(backend):
            out = sdpa(*leaves, is_causal=causal)
        return torch.autograd.grad(out, leaves, dout)

    fns = {name: fn for name, fn in (("forward", forward), ("fwd_bwd", fwd_bwd)) if name in benches}
    fa_sdpa.reset_call_counts()
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    calls = fa_sdpa.call_counts()
    want = {"forward": len(fns), "backward": int("fwd_bwd" in fns)}
    if provider == "sdpa-fa-plus" and calls != want:
        raise RuntimeError(f"SDPA did not route to FA_PLUS (calls {calls}, expected {want})")
    if provider != "sdpa-fa-plus" and any(calls.values()):
        raise RuntimeError(f"{provider} ran FA_PLUS kernels (calls {calls})")
    return fns


def _time_config(cfg: Row, providers: list[str], benches: list[str], dtype: torch.dtype) -> list[Row]:
    b, s, h, d, causal = cfg["batch"], cfg["seqlen"], cfg["nheads"], cfg["headdim"], cfg["causal"]
    rows: list[Row] = []
    for name in providers:
        new = [
            {
                "bench": f"sdpa_{bench}",
                "provider": name,
                "headdim": d,
                "causal": causal,
                "seqlen": s,
                "batch": b,
                "nheads": h,
            }
            for bench in benches
        ]
        fns: dict[str, Callable[[], Any]] = {}
        try:
            fns = build(name, benches, b, s, h, d, causal, dtype)
            error = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # unsupported shape / backend, OOM: recorded, the sweep goes on
            error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        for row in new:
            if error:
                row.update(ms=None, tflops=None, error=error)
            else:
                fn = fns[row["bench"]]
                mode = "fwd" if row["bench"] == "forward" else "fwd_bwd"
                try_provider(row, lambda fn=fn: bench_ms(fn), flops(b, s, s, h, d, causal, mode=mode))
            val = row.get("tflops") if row.get("tflops") is not None else row.get("error")
            print(
                f"  {row['bench']:7s} {name:12s} d={d:3d} causal={causal!s:5} s={s:5d} b={b:2d}: {val}",
                flush=True,
            )
        fns.clear()
        torch.cuda.empty_cache()
        rows += new
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headdim 128, seqlen 1024, 4096 and 16384 only")
    ap.add_argument(
        "--providers", default=",".join(PROVIDERS), help=f"comma list out of {','.join(PROVIDERS)}"
    )
    ap.add_argument("--benches", default=",".join(BENCHES), help="comma list out of forward,fwd_bwd")
    ap.add_argument("--headdims", default=None, help="comma list (default 64,128; --quick: 128)")
    ap.add_argument("--seqlens", default=None, help="comma list (default 512..16384; --quick: 1k,4k,16k)")
    ap.add_argument("--causal", default=None, choices=["0", "1"], help="only non-causal (0) or causal (1)")
    ap.add_argument("--no-merge", action="store_true", help="overwrite the results files instead of merging")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_sdpa: no CUDA GPU; nothing to time", file=sys.stderr)
        return 3
    import fa_backward.sdpa as fa_sdpa

    if fa_sdpa._registry() is None:
        print(
            f"bench_sdpa: torch {torch.__version__} has no flash-attention registry (needs >= 2.11)",
            file=sys.stderr,
        )
        return 3
    install_sigterm_handler()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    benches = [x.strip() for x in args.benches.split(",") if x.strip()]
    if any(p not in PROVIDERS for p in providers):
        ap.error(f"--providers takes {PROVIDERS}")
    if any(x not in BENCHES for x in benches):
        ap.error(f"--benches takes {tuple(BENCHES)}")
    headdims = (
        [int(x) for x in args.headdims.split(",")] if args.headdims else ([128] if args.quick else [64, 128])
    )
    seqlens = (
        [int(x) for x in args.seqlens.split(",")]
        if args.seqlens
        else ([1024, 4096, 16384] if args.quick else None)
    )
    causals = [args.causal == "1"] if args.causal is not None else [False, True]
    dtype = getattr(torch, args.dtype)
    sweep = standard_sweep(headdims=headdims, seqlens=seqlens, causals=causals)

    rows: list[Row] = []
    try:
        for cfg in progress(sweep, desc="sdpa"):
            rows += _time_config(cfg, providers, benches, dtype)
    finally:
        if fa_sdpa.is_active():
            fa_sdpa.restore()
        for bench, kind in BENCHES.items():
            sel = [r for r in rows if r["bench"] == f"sdpa_{bench}"]
            if sel:
                plot_kw, table_kw = result_layout(kind, args.dtype)
                path = write_results(kind, sel, merge=not args.no_merge, plot_kw=plot_kw, table_kw=table_kw)
                print(f"[bench_sdpa] {len(sel)} sdpa_{bench} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
