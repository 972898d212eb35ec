"""Compile the Gluon Hopper backward kernels (the dK/dV pass and the dQ pass) offline for sm_90 (no GPU needed)
and report resources.

Run with a Triton 3.6 environment: ``python scripts/gluon_bwd_probe.py [--pass dkdv,dq] [--sass DIR] [--d 64,128]
[--dlse]``.
Per head dim, mask, GQA group and dtype: shared memory, registers (ptxas), spill bytes, and the SASS
instruction mix of the consumer's loops over query tiles (HGMMA, MUFU.EX2, FP32 ops, barriers), from the
cubin disassembled with the nvdisasm that ships with Triton. Exits non-zero when a variant fails to compile.
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "packages" / "fa-core" / "src"), str(ROOT / "packages" / "fa-backward" / "src")]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from gluon_probe import _ptxas_stats  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from fa_backward import gluon_dkdv, gluon_dq  # noqa: E402

_OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_KEYS = (
    "HGMMA",
    "WARPGROUP",
    "MUFU.EX2",
    "FFMA",
    "FMUL",
    "FADD",
    "FSEL",
    "F2FP",
    "SYNCS",
    "LDS",
    "LDL",
    "STL",
    "BAR",
)


def loop_mix(sass: str) -> list[str]:
    """Op counts of every innermost loop (backward branch) of the SASS whose body holds an HGMMA: one line per
    loop (the consumers' query-tile loops: masked diagonal tiles and unmasked tiles, per consumer)."""
    text = sass.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(text) if (m := re.match(r"^(\.L_x_\d+):", ln.strip()))}
    loops = []
    for i, ln in enumerate(text):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ln)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    lines = []
    for start, end in loops:
        # innermost loops only: an outer loop's count would repeat its inner loops'
        if any(start <= s2 and e2 <= end and (s2, e2) != (start, end) for s2, e2 in loops):
            continue
        full = collections.Counter(mm.group(1) for s in text[start : end + 1] if (mm := _OP.match(s)))
        base = collections.Counter()
        for name, n in full.items():
            base[name.split(".")[0]] += n
        if not base["HGMMA"]:
            continue
        counts = {k: (full[k] if "." in k else base[k]) for k in _KEYS}
        lines.append(
            f"  loop @{start}: {sum(full.values())} instructions; "
            + " ".join(f"{k}={v}" for k, v in counts.items())
        )
    return lines


def compile_variant(
    d: int,
    causal: bool,
    group: int,
    dtype: torch.dtype = torch.bfloat16,
    config: dict | None = None,
    sass_dir: Path | None = None,
    which: str = "dkdv",
    dlse: bool = False,
) -> dict:
    """Compile one variant of pass ``which`` (CPU tensors stand in for the device ones: only shapes and strides
    count)."""
    b, sq, sk, hk = 2, 1000, 1537, 2
    h = hk * group
    q = torch.empty(b, sq, h, d, dtype=dtype)
    k = torch.empty(b, sk, hk, d, dtype=dtype)
    lse = torch.empty(b, h, sq, dtype=torch.float32)
    delta, lse2 = torch.empty(2, b, h, sq, dtype=torch.float32).unbind(0)
    scale = 1 / math.sqrt(d)
    if which == "dq":
        prepared = gluon_dq.prepare(
            q, k, k, q, q, lse, q, delta, lse2, scale, causal, lse if dlse else None, config
        )
    else:
        prepared = gluon_dkdv.prepare(q, k, k, q, lse2, delta, k, k, scale, causal, config)
    kernel, args, constexprs, num_warps, _grid = prepared
    names = kernel.arg_names
    sig = {name: "constexpr" if name in constexprs else mangle_type(args[name]) for name in names}
    src = GluonASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": num_warps})
    ptx = ck.asm["ptx"]
    stats: dict = dict(
        which=which,
        d=d,
        causal=causal,
        group=group,
        dtype=str(dtype).replace("torch.", ""),
        dlse=dlse,
        config=config,
        shared=ck.metadata.shared,
        regs=getattr(ck, "n_regs", None),
        wgmma_ptx=len(re.findall(r"wgmma.mma_async", ptx)),
        ex2_ptx=len(re.findall(r"ex2.approx", ptx)),
        tma_ptx=len(re.findall(r"cp.async.bulk.tensor", ptx)),
        local_ptx=len(re.findall(r"\.local", ptx)),
    )
    stats.update(_ptxas_stats(ptx))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        sass = subprocess.run(
            [str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True
        ).stdout
    stats["loops"] = loop_mix(sass)
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{which}_d{d}_{'c' if causal else 'n'}_g{group}_{stats['dtype']}"
        (sass_dir / f"{tag}.sass").write_text(sass)
        (sass_dir / f"{tag}.ttgir").write_text(ck.asm["ttgir"])
        (sass_dir / f"{tag}.ptx").write_text(ptx)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--sass", type=Path, default=None, help="write the SASS / TTGIR / PTX of every variant here"
    )
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--groups", default="1,4")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--config", default=None, help="tile override, e.g. BLOCK_N=64,STAGES=3 (on CONFIGS[d])")
    ap.add_argument("--pass", dest="passes", default="dkdv,dq", help="comma list out of dkdv, dq")
    ap.add_argument("--dlse", action="store_true", help="dq: compile with a dlse input (HAS_DLSE)")
    args = ap.parse_args()
    failed = 0
    modules = {"dkdv": gluon_dkdv, "dq": gluon_dq}
    for which in [x.strip() for x in args.passes.split(",") if x.strip()]:
        for d in [int(x) for x in args.d.split(",")]:
            config = None
            if args.config:
                config = dict(modules[which].CONFIGS[d])
                config.update({kk: int(vv) for kk, vv in (kv.split("=") for kv in args.config.split(","))})
            for dtype in [getattr(torch, x) for x in args.dtypes.split(",")]:
                for causal in (False, True):
                    for group in [int(x) for x in args.groups.split(",")]:
                        try:
                            stats = compile_variant(
                                d, causal, group, dtype, config, args.sass, which, args.dlse
                            )
                            loops = stats.pop("loops")
                            print(stats, flush=True)
                            for line in loops:
                                print(line, flush=True)
                        except Exception as exc:  # report every variant
                            failed += 1
                            what = f"{which} d{d} causal={causal} group={group} {dtype}"
                            print(f"FAILED {what}: {type(exc).__name__}: {exc}"[:4000], flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
