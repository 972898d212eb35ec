"""The sm_90 SASS of the Triton forward kernel's loops for a varlen call, contiguous or paged, compiled here without
a GPU: registers, stack bytes, and per loop with exponentials its instruction count, tensor-core, TMA, shared-memory
and local-memory (spill) operations.

Why: the paged and contiguous varlen calls run one kernel whose paged variant reads its pages through the block
table; where a paged tile costs more than a contiguous one shows in the loop's instructions before any timing
(for example a tile that takes a round trip through registers, or spills). Two steps, each in its own process:

1. capture (under ``TRITON_INTERPRET=1``, any Triton): run a small ``flash_attn_varlen_func`` with the forward
   launch replaced by a recorder that writes every launch argument's kind and value;
2. compile (Triton 3.6): rebuild the signature from the record (16-bit tensors become bf16; 16-divisible ints
   carry ``tt.divisibility`` 16 and ints equal to 1 become constexprs, as Triton's specialization would; the
   ``do_not_specialize`` ints stay plain), set the tile (``BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma``),
   compile with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and disassemble with the
   nvdisasm that ships with Triton.

    python scripts/fwd_sass_mix.py --page 256 --causal --tile 128,64,4,3,1
    python scripts/fwd_sass_mix.py --page 0 --tile 128,64,4,3,1           # the contiguous call
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = [str(ROOT / "packages" / p / "src") for p in ("fa-core", "fa-backward", "fa-kvcache", "fa-compat")]
sys.path.insert(0, str(ROOT / "scripts"))
import sass_mix  # noqa: E402  (the argument record, the sm_90 compile and the loop split of the backward's tools)

KEYS = ("HGMMA", "MUFU", "UTMALDG", "LDGSTS", "LDS", "STS", "LDL", "STL", "BAR", "MEMBAR", "ISETP")


def capture(path: str, page: int, causal: bool) -> None:
    """Step 1: record the forward kernel's launch arguments of a two-sequence varlen call (GQA 4, d128)."""
    import torch

    import fa_core.forward_launch as fl
    from fa_core.forward_kernel import fwd_kernel
    from flash_attn import flash_attn_varlen_func

    names = fwd_kernel.fn.arg_names
    record: dict[str, dict] = {}

    class Captured(Exception):
        pass

    def recorder(grid: object, *args: object, **kwargs: object) -> None:
        record.update({n: sass_mix.describe_arg(a) for n, a in zip(names, args)})
        record.update({n: sass_mix.describe_arg(a) for n, a in kwargs.items()})
        raise Captured

    fl.fwd_launch = recorder
    torch.manual_seed(0)
    lens, h, hk, d = [300, 700], 4, 1, 128
    q = torch.randn(sum(lens), h, d, dtype=torch.float16)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    if page:
        pages = 2 * -(-max(lens) // page)
        k = torch.randn(pages, page, hk, d, dtype=torch.float16)
        table = torch.arange(pages, dtype=torch.int32).reshape(2, -1)
        extra: dict = {"block_table": table}
    else:
        k = torch.randn(sum(lens), hk, d, dtype=torch.float16)
        extra = {}
    with contextlib.suppress(Captured):
        flash_attn_varlen_func(
            q, k, torch.randn_like(k), cu, cu, max(lens), max(lens), causal=causal, **extra
        )
    Path(path).write_text(json.dumps(record))


def compile_mix(record: dict, tile: tuple[int, int, int, int, bool], out: Path) -> list[str]:
    """Step 2: compile the forward kernel for sm_90 from its record with ``tile``; returns the report lines: the
    registers and stack, then each innermost loop with exponentials (one key tile)."""
    from fa_core.forward_kernel import fwd_kernel

    desc = dict(
        record,
        BLOCK_M={"t": "int", "v": tile[0]},
        BLOCK_N={"t": "int", "v": tile[1]},
        USE_TMA={"t": "const", "v": tile[4]},
        TMA_OK={"t": "const", "v": tile[4]},
    )
    sass, usage = sass_mix.compile_sm90(fwd_kernel.fn, desc, tile[2], tile[3], out)
    lines = [f"tile {tile}: {usage}"]
    found = sass_mix.loops(sass)
    for a, b, ops in found:
        if any(a <= c and d <= b and (c, d) != (a, b) for c, d, _ in found):
            continue  # an enclosing loop: its inner loops are reported
        if ops["MUFU"]:
            counts = " ".join(f"{k}={ops[k]}" for k in KEYS)
            lines.append(f"  loop: {sum(ops.values())} instructions; {counts}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page", type=int, default=256, help="page size of the cache (0: contiguous keys)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--tile", default="128,64,4,3,1", help="BLOCK_M,BLOCK_N,num_warps,num_stages,use_tma")
    ap.add_argument(
        "--capture-python", default=sys.executable, help="the interpreter that captures (any Triton version)"
    )
    ap.add_argument("--capture", nargs=3, metavar=("PATH", "PAGE", "CAUSAL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.capture:
        sys.path[:0] = SRC
        capture(args.capture[0], int(args.capture[1]), args.capture[2] == "1")
        return
    parts = [int(x) for x in args.tile.split(",")]
    tile = (parts[0], parts[1], parts[2], parts[3], bool(parts[4]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(SRC), FA_PLUS_AUTOTUNE="0")
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "record.json"
        cmd = [
            args.capture_python,
            __file__,
            "--capture",
            str(rec),
            str(args.page),
            "1" if args.causal else "0",
        ]
        subprocess.run(cmd, env=env, check=True)
        sys.path[:0] = SRC
        name = f"fwd_page{args.page}_{'causal' if args.causal else 'plain'}"
        print(f"{name}:")
        print("\n".join(compile_mix(json.loads(rec.read_text()), tile, Path(tmp) / name)))


if __name__ == "__main__":
    main()
