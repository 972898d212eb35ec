"""Compile the Gluon Hopper forward kernels offline for sm_90 (no GPU needed) and report resources.

Run with a Triton 3.6 environment: ``python scripts/gluon_probe.py [--ptx DIR]``. Prints, per kernel variant,
the shared memory, register count, spills and the number of wgmma / TMA instructions in the SASS-level PTX.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "fa-core" / "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from fa_core.gluon import _launch  # noqa: E402


def _ptxas_stats(ptx: str) -> dict:
    """Registers and spill bytes reported by ``ptxas -v`` for sm_90a."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = res.stdout + res.stderr
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores", log)
    return dict(ptxas_regs=[int(r) for r in regs], spill_stores=[int(x) for x in spill])


def compile_variant(
    kind: str,
    d: int,
    causal: bool,
    dtype=torch.bfloat16,
    ptx_dir: Path | None = None,
    config: dict | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    varlen: bool = False,
):
    b, s, h = 1, 256, 2
    q = torch.empty(b, s, h, d, dtype=dtype)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32)
    vl = None
    if varlen:
        q, out, lse = q[0], out[0], lse[0]
        cu = torch.tensor([0, 100, 256], dtype=torch.int32)
        vl = (cu, cu, 156, 156)
    kernel, args, constexprs, num_warps, _grid = _launch.prepare(
        kind, q, q, q, out, lse, 1 / math.sqrt(d), causal, window_size, softcap, config=config, varlen=vl
    )
    names = kernel.arg_names
    sig = {}
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = mangle_type(args[name])
    src = GluonASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": num_warps})
    ptx = ck.asm["ptx"]
    stats = dict(
        kind=kind,
        d=d,
        causal=causal,
        config=config,
        window_size=window_size,
        softcap=softcap,
        varlen=varlen,
        shared=ck.metadata.shared,
        regs=getattr(ck, "n_regs", None),
        wgmma=len(re.findall(r"wgmma.mma_async", ptx)),
        tma=len(re.findall(r"cp.async.bulk.tensor", ptx)),
        spills=len(re.findall(r"\.local", ptx)),
    )
    stats.update(_ptxas_stats(ptx))
    if ptx_dir is not None:
        ptx_dir.mkdir(parents=True, exist_ok=True)
        (ptx_dir / f"{kind}_d{d}_{'c' if causal else 'n'}.ptx").write_text(ptx)
        (ptx_dir / f"{kind}_d{d}_{'c' if causal else 'n'}.ttgir").write_text(ck.asm["ttgir"])
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ptx", type=Path, default=None)
    ap.add_argument("--kinds", default="pipelined,ws")
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--sweep", action="store_true", help="compile bench/bench_gluon.py's SWEEP tiles too")
    ap.add_argument("--varlen", action="store_true", help="also compile the varlen variants")
    ap.add_argument(
        "--features", action="store_true", help="also compile sliding-window and softcap variants"
    )
    args = ap.parse_args()
    failed = 0
    for kind in args.kinds.split(","):
        for d in [int(x) for x in args.d.split(",")]:
            for causal in (False, True):
                try:
                    print(compile_variant(kind, d, causal, ptx_dir=args.ptx), flush=True)
                except Exception as exc:  # report every variant
                    failed += 1
                    print(
                        f"FAILED {kind} d{d} causal={causal}: {type(exc).__name__}: {exc}"[:4000], flush=True
                    )
    if args.features:
        for kind in args.kinds.split(","):
            for d in [int(x) for x in args.d.split(",")]:
                for causal, window, softcap in (
                    (False, (100, 50), 0.0),
                    (True, (255, 0), 10.0),
                    (False, (-1, -1), 30.0),
                ):
                    try:
                        print(
                            compile_variant(kind, d, causal, window_size=window, softcap=softcap), flush=True
                        )
                    except Exception as exc:
                        failed += 1
                        print(
                            f"FAILED {kind} d{d} {window} {softcap}: {type(exc).__name__}: {exc}"[:4000],
                            flush=True,
                        )
    if args.varlen:
        for kind in args.kinds.split(","):
            for d in [int(x) for x in args.d.split(",")]:
                for causal, window, softcap in (
                    (False, (-1, -1), 0.0),
                    (True, (-1, -1), 0.0),
                    (False, (64, 0), 5.0),
                ):
                    try:
                        stats = compile_variant(
                            kind, d, causal, window_size=window, softcap=softcap, varlen=True
                        )
                        print(stats, flush=True)
                    except Exception as exc:
                        failed += 1
                        print(
                            f"FAILED varlen {kind} d{d} {causal}: {type(exc).__name__}: {exc}"[:4000],
                            flush=True,
                        )
    if args.sweep:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        from bench_gluon import SWEEP

        for (kind, d), configs in SWEEP.items():
            for cfg in configs:
                try:
                    print(compile_variant(kind, d, True, config=cfg), flush=True)
                except Exception as exc:
                    failed += 1
                    print(f"FAILED {kind} d{d} {cfg}: {type(exc).__name__}: {exc}"[:4000], flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
