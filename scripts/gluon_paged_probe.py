"""Compile the Gluon Hopper forward's paged-KV variants offline for sm_90 (no GPU needed) and report resources.

Run with a Triton 3.6 environment: ``python scripts/gluon_paged_probe.py [--ptx DIR] [--pages 16,64,256]``.
Per kernel kind, head dim, page size and mask: shared memory, registers (ptxas), spills and the number of
wgmma / TMA instructions in the PTX. Exits non-zero when a variant fails to compile.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "fa-core" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from gluon_probe import _ptxas_stats  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from fa_core.gluon import _launch  # noqa: E402


def compile_paged(
    kind: str,
    d: int,
    page: int,
    causal: bool,
    seqused: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    dtype: torch.dtype = torch.bfloat16,
    ptx_dir: Path | None = None,
) -> dict:
    """Compile one paged variant (CPU tensors stand in for the device ones: only shapes and strides count)."""
    h, hk, num_pages, batch, max_pages = 4, 2, 64, 2, 16
    total_q = 300
    q = torch.empty(total_q, h, d, dtype=dtype)
    out = torch.empty_like(q)
    lse = torch.empty(h, total_q, dtype=torch.float32)
    k = torch.empty(num_pages, page, hk, d, dtype=dtype)
    v = torch.empty_like(k)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    table = torch.zeros(batch, max_pages, dtype=torch.int32)
    used = torch.tensor([100, 200], dtype=torch.int32) if seqused else None
    kernel, args, constexprs, num_warps, _grid = _launch.prepare(
        kind, q, k, v, out, lse, 1 / math.sqrt(d), causal, window_size, softcap,
        varlen=(cu, cu, 200, 200), paged=(table, used),
    )  # fmt: skip
    names = kernel.arg_names
    sig = {name: "constexpr" if name in constexprs else mangle_type(args[name]) for name in names}
    src = GluonASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": num_warps})
    ptx = ck.asm["ptx"]
    stats = dict(
        kind=kind,
        d=d,
        page=page,
        causal=causal,
        seqused=seqused,
        window_size=window_size,
        softcap=softcap,
        shared=ck.metadata.shared,
        wgmma=len(re.findall(r"wgmma.mma_async", ptx)),
        tma=len(re.findall(r"cp.async.bulk.tensor", ptx)),
        spills=len(re.findall(r"\.local", ptx)),
    )
    stats.update(_ptxas_stats(ptx))
    if ptx_dir is not None:
        ptx_dir.mkdir(parents=True, exist_ok=True)
        stem = f"paged_{kind}_d{d}_p{page}_{'c' if causal else 'n'}"
        (ptx_dir / f"{stem}.ptx").write_text(ptx)
        (ptx_dir / f"{stem}.ttgir").write_text(ck.asm["ttgir"])
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ptx", type=Path, default=None)
    ap.add_argument("--kinds", default="pipelined,ws,ws3")
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--pages", default="16,64,256")
    ap.add_argument("--features", action="store_true", help="also seqused_k, sliding window and softcap")
    args = ap.parse_args()
    variants = [(False, False, (-1, -1), 0.0), (True, False, (-1, -1), 0.0)]
    if args.features:
        variants += [
            (False, True, (-1, -1), 0.0),
            (True, False, (100, 0), 0.0),
            (False, False, (64, 64), 5.0),
        ]
    failed = 0
    for kind in args.kinds.split(","):
        for d in (int(x) for x in args.d.split(",")):
            if (kind, d) not in _launch.CONFIGS:
                continue
            for page in (int(x) for x in args.pages.split(",")):
                for causal, seqused, window, softcap in variants:
                    try:
                        print(
                            compile_paged(kind, d, page, causal, seqused, window, softcap, ptx_dir=args.ptx),
                            flush=True,
                        )
                    except Exception as exc:  # report every variant
                        failed += 1
                        msg = f"FAILED {kind} d{d} page {page} causal={causal}: {type(exc).__name__}: {exc}"
                        print(msg[:4000], flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
