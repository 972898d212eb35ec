"""Offline sm_90 compile of the fa-kvcache kernels (split-KV decode, combine, append, unified), without a GPU.

For a refactor of the kernel helpers that must leave the generated code alone: compiles every variant from the
kernel files of a git revision and of the working tree with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` and prints, per variant, registers, stack bytes, SASS / PTX instruction
counts, each loop's SASS instruction count and a hash of the SASS (register names included), then whether the
per-opcode histograms match. Variants: decode (d128 bf16, 8 query heads per kv head, 16-row tile, BLOCK_N 64)
contiguous with and without splits and with a left window, paged page 16 / 64 with block-table preload 0 / 32
and splits on / off; both combine kernels; both append kernels (rotary, FP8 e4m3); the unified kernel with the
small and the 64-row tile, FP8 cache, window, no split.

    /path/to/triton-3.6/python scripts/kvcache_sass_compare.py --rev HEAD~1
    python scripts/kvcache_sass_compare.py --rev main --only uni
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("kernels", "unified_kernels", "append")


def run(pkgdir: str, out: Path, only: str, loop_ops: bool = False) -> dict[str, collections.Counter]:
    """Compile every variant from the fa_kvcache kernel files under ``pkgdir``; returns SASS opcode histograms."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, pkgdir)
    sys.path.insert(0, str(ROOT / "packages" / "fa-core" / "src"))
    for name in [m for m in sys.modules if m.startswith("fa_kvcache")]:
        del sys.modules[name]
    K = importlib.import_module("fa_kvcache.kernels")
    U = importlib.import_module("fa_kvcache.unified_kernels")
    A = importlib.import_module("fa_kvcache.append")
    sys.path.remove(pkgdir)
    out.mkdir(parents=True, exist_ok=True)
    hist: dict[str, collections.Counter] = {}
    I32 = {"BlockTable", "CacheSeqlens", "CacheBatchIdx", "LeftPad", "CuSeqlensQ", "SequsedK", "CuSeqlensNew"}
    F32 = {"Lse", "OutPart", "LsePart", "Alibi", "Sink", "KDescale", "VDescale", "KScale", "VScale"}
    FLOATS = {"sm_scale", "softcap"}
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

    def comp(tag, jit, consts, warps, stages, fp8=False):
        if only and not tag.startswith(only):
            return
        fn = jit
        sig, attrs, cst = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            if fn.params[i].is_constexpr:
                sig[name] = "constexpr"
                cst[name] = consts[name]
                continue
            if name in consts:
                sig[name] = "constexpr"
                cst[name] = consts[name]
                continue
            if name[0].isupper():
                if name in I32:
                    sig[name] = "*i32"
                elif name in F32:
                    sig[name] = "*fp32"
                elif fp8 and name in ("K", "V"):
                    sig[name] = "*fp8e4nv"
                else:
                    sig[name] = "*bf16"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name in FLOATS:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
                if name.startswith("stride"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        c = triton.compile(
            ASTSource(fn, sig, cst, attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
        cub = out / f"{tag}.cubin"
        cub.write_bytes(c.asm["cubin"])
        sass = subprocess.run(
            [str(tools / "nvdisasm"), "-c", str(cub)], capture_output=True, text=True
        ).stdout
        (out / f"{tag}.sass").write_text(sass)
        (out / f"{tag}.ptx").write_text(c.asm["ptx"])
        usage = subprocess.run(
            [str(tools / "cuobjdump"), "--dump-resource-usage", str(cub)], capture_output=True, text=True
        ).stdout
        regs = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
        op = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
        text = sass.splitlines()
        n = sum(1 for s in text if op.match(s))
        labels = {m.group(1): i for i, ln in enumerate(text) if (m := re.match(r"^(\.L_x_\d+):", ln.strip()))}
        loops = []
        for i, ln in enumerate(text):
            m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ln)
            if m and labels.get(m.group(1), i) < i:
                loops.append(sum(1 for s in text[labels[m.group(1)] : i + 1] if op.match(s)))
        body = "\n".join(re.sub(r"^\s*/\*[0-9a-f]+\*/", "", s) for s in text if op.match(s))
        ptxn = sum(
            1
            for l in c.asm["ptx"].splitlines()
            if l.strip() and not l.strip().startswith(("//", ".", "$", "{", "}", ")"))
        )
        h = hashlib.sha1(body.encode()).hexdigest()[:10]
        hist[tag] = collections.Counter(m.group(1) for s in text if (m := op.match(s)))
        print(
            f"{tag:28s} regs {regs.group(1) if regs else '?':>4} stack {regs.group(2) if regs else '?':>3} sass {n:5d} ptx {ptxn:5d} loops {sorted(loops)} sha {h}",
            flush=True,
        )
        if loop_ops:
            # opcode histogram (opcode without modifiers) of the longest loop: the key loop of the hot path
            best = None
            for i, ln in enumerate(text):
                m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ln)
                if m and labels.get(m.group(1), i) < i:
                    body_ops = [
                        mm.group(1).split(".")[0]
                        for s in text[labels[m.group(1)] : i + 1]
                        if (mm := op.match(s))
                    ]
                    if best is None or len(body_ops) > len(best):
                        best = body_ops
            if best:
                top = collections.Counter(best).most_common()
                print("    longest loop:", " ".join(f"{k}:{v}" for k, v in top), flush=True)

    common = dict(HEADDIM=128, HEADDIM_V=128, BLOCK_D=128, BLOCK_DV=128)

    def dec(tag, PAGED, PAGE, PAGE_TILE, BT, SPLIT, window=False):
        c = dict(
            common,
            PAGED=PAGED,
            PAGE=PAGE,
            PAGE_TILE=PAGE_TILE,
            BT_PRELOAD=BT,
            SEQLENS_TENSOR=True,
            HAS_BATCH_IDX=not PAGED,
            HAS_LEFTPAD=not PAGED,
            IS_LOCAL=window,
            HAS_WINDOW_LEFT=window,
            HAS_CHUNK=False,
            HAS_SOFTCAP=False,
            HAS_ALIBI=False,
            HAS_SINK=False,
            SPLIT=SPLIT,
            HB=8,
            BLOCK_M=16,
            BLOCK_N=64,
        )
        comp(tag, K.split_kv_kernel, c, 4, 3)

    dec("dec_contig", False, 1, False, 0, False)
    dec("dec_contig_split", False, 1, False, 0, True)
    dec("dec_contig_window", False, 1, False, 0, True, window=True)
    for page in (16, 64):
        for bt in (0, 32):
            for sp in (False, True):
                dec(f"dec_p{page}_bt{bt}_sp{int(sp)}", True, page, page >= 64, bt, sp)
    comp("combine", K.combine_kernel, dict(HEADDIM_V=128, BLOCK_DV=128, BLOCK_S=16, HAS_SINK=True), 4, 1)
    comp(
        "append_rot",
        A.append_kernel,
        dict(
            common,
            HAS_ROTARY=True,
            ROTARY_DIM=128,
            BLOCK_HALF=64,
            INTERLEAVED=False,
            PAGED=True,
            PAGE=16,
            SEQLENS_TENSOR=True,
            HAS_BATCH_IDX=False,
            BLOCK_T=16,
        ),
        4,
        1,
    )
    comp(
        "append_plain",
        A.append_kernel,
        dict(
            common,
            HAS_ROTARY=False,
            ROTARY_DIM=0,
            BLOCK_HALF=1,
            INTERLEAVED=False,
            PAGED=False,
            PAGE=1,
            SEQLENS_TENSOR=True,
            HAS_BATCH_IDX=True,
            BLOCK_T=16,
        ),
        4,
        1,
    )
    for q in (False, True):
        comp(
            f"append_paged_q{int(q)}",
            U.append_paged_kernel,
            dict(
                common,
                HAS_ROTARY=True,
                ROTARY_DIM=64,
                BLOCK_HALF=32,
                INTERLEAVED=True,
                PAGE=16,
                QUANT=q,
                BLOCK_T=16,
            ),
            4,
            1,
        )
    comp(
        "u_combine",
        U.combine_kernel,
        dict(QROWS=2, HEADDIM_V=128, BLOCK_DV=128, BLOCK_S=16, HAS_SINK=True),
        4,
        1,
    )

    def uni(tag, BM, fp8, SPLIT, window=False):
        c = dict(
            common,
            PAGE=16,
            PAGE_TILE=False,
            BT_PRELOAD=32,
            BT_PRELOAD_SPLIT=16,
            IS_LOCAL=window,
            HAS_WINDOW_LEFT=window,
            HAS_SOFTCAP=False,
            HAS_ALIBI=False,
            HAS_SINK=False,
            HAS_DESCALE=fp8,
            F16_DOTS=fp8,
            SPLIT=SPLIT,
            HB=8,
            BLOCK_M=BM,
            BLOCK_M_SMALL=16,
            BLOCK_N=64,
        )
        comp(tag, U.unified_kernel, c, 4, 3, fp8=fp8)

    uni("uni_small", 16, False, True)
    uni("uni_64", 64, False, True)
    uni("uni_64_nosplit", 64, False, False)
    uni("uni_64_fp8", 64, True, True)
    uni("uni_64_window", 64, False, True, window=True)

    def fp8dec(tag, fp8, SPLIT, BN, bt):
        # bench/bench_serving.py --bench fp8_decode: 32 q / 8 kv heads (HB 4), d128, page 64 (PAGE_TILE), decode
        # rows (16-row small tile); batch 32 unsplit (whole 8k range's entries preloaded), batch 8 split
        c = dict(
            common,
            PAGE=64,
            PAGE_TILE=True,
            BT_PRELOAD=bt,
            BT_PRELOAD_SPLIT=bt,
            IS_LOCAL=False,
            HAS_WINDOW_LEFT=False,
            HAS_SOFTCAP=False,
            HAS_ALIBI=False,
            HAS_SINK=False,
            HAS_DESCALE=fp8,
            F16_DOTS=fp8,
            SPLIT=SPLIT,
            HB=4,
            BLOCK_M=16,
            BLOCK_M_SMALL=16,
            BLOCK_N=BN,
        )
        comp(tag, U.unified_kernel, c, 4, 3, fp8=fp8)

    fp8dec("fp8dec_b32_bf16", False, False, 64, 256)
    fp8dec("fp8dec_b32_fp8", True, False, 64, 256)
    fp8dec("fp8dec_b8_bf16", False, True, 32, 32)
    fp8dec("fp8dec_b8_fp8", True, True, 64, 32)
    return hist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="git revision to compare the working tree against")
    ap.add_argument("--only", default="", help="compile only the variants whose name starts with this")
    ap.add_argument("--loop-ops", action="store_true", help="print the opcode histogram of each longest loop")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvcache_sass_"))
    res = {}
    for side in ("rev", "tree"):
        pkg = tmp / side / "fa_kvcache"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        for f in FILES:
            rel = f"packages/fa-kvcache/src/fa_kvcache/{f}.py"
            text = (
                subprocess.run(["git", "-C", str(ROOT), "show", f"{args.rev}:{rel}"], check=True,
                               capture_output=True, text=True).stdout
                if side == "rev"
                else (ROOT / rel).read_text()
            )  # fmt: skip
            (pkg / f"{f}.py").write_text(text)
        print(f"== {args.rev if side == 'rev' else 'working tree'} (files under {tmp / side})", flush=True)
        res[side] = run(str(tmp / side), tmp / f"{side}_out", args.only, args.loop_ops)
    diff = [t for t in res["rev"] if res["rev"][t] != res["tree"].get(t)]
    print("per-opcode SASS histograms:", "identical" if not diff else "differ in " + ", ".join(diff))


if __name__ == "__main__":
    main()
