"""The SASS instruction mix of the backward kernels' loops, compiled for sm_90 here, without a GPU.

Why: device time is scarce; the op count per loop iteration (HGMMA, MUFU, FP32 ops, conversions) says where a
variant's extra cost goes before any timing. Two steps, each in its own process:

1. capture: run a small backward under the CPU interpreter with the dQ / dK/dV launches replaced by a recorder,
   which writes every launch argument's kind (tensor dtype, int value, float, constexpr, jit function);
2. compile: rebuild Triton's signature from that record (16-bit tensors become bf16, 16-divisible ints carry
   ``tt.divisibility`` 16, ints equal to 1 become constexprs, as Triton's specialization would), compile with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and disassemble with the nvdisasm that
   ships with Triton; print registers, stack bytes and the op counts of every loop with exponentials.

    python scripts/sass_mix.py                       # plain causal vs the relative-bias score_mod, both kernels
    python scripts/sass_mix.py --modes relbias --kernels dkdv --tile 64,128,8,2

For example, d128 (dQ 128x64 / dK/dV 32x128 tiles, 8 warps): the unmasked dQ loop has 379 instructions per warp
and iteration plain, 474 with the relative bias (+64 FFMA: two per score element, +16 I2F of the key index
vector); dK/dV 283 -> 339. The per-element FP32 work of plain dQ is one FFMA, one FMUL, one FADD.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = [str(ROOT / "packages" / p / "src") for p in ("fa-core", "fa-backward")]
TILES = {"dq": (128, 64, 8, 2), "dkdv": (32, 128, 8, 2)}  # the first entries of DQ_SPACE / DKDV_SPACE


def describe_arg(a: object) -> dict:
    """One launch argument by kind, as the compile step reads it: tensor dtype, jit function, constant, int,
    float."""
    import torch

    if isinstance(a, torch.Tensor):
        return {"t": "tensor", "dtype": str(a.dtype)}
    if callable(a) and hasattr(a, "fn"):
        return {"t": "jit", "mod": a.fn.__module__, "name": a.fn.__name__}
    if isinstance(a, bool) or a is None:
        return {"t": "const", "v": a}
    if isinstance(a, int):
        return {"t": "int", "v": a}
    if isinstance(a, float):
        return {"t": "float", "v": a}
    raise TypeError(f"unexpected launch argument {a!r}")


def record_backward_launches(run_backward) -> dict[str, dict]:
    """Run ``run_backward()`` (a small backward, under TRITON_INTERPRET=1) with the dQ and dK/dV launches replaced
    by recorders: each launch argument described by kind (tensor dtype, jit function, constant, int, float). The
    dQ pass runs first; the backward stops at the dK/dV launch."""
    from fa_backward import backward_kernel as bk

    record: dict[str, dict] = {}

    class Captured(Exception):
        pass

    def recorder(name, kern):
        def run(*args, grid=None, **kwargs):
            rec = {n: describe_arg(a) for n, a in zip(kern.arg_names, args)}
            rec.update({n: describe_arg(a) for n, a in kwargs.items()})
            record[name] = rec
            if name == "dkdv":  # the dQ pass runs first
                raise Captured

        return run

    bk.dq_kernel.run = recorder("dq", bk.dq_kernel)
    bk.dkdv_kernel.run = recorder("dkdv", bk.dkdv_kernel)
    with contextlib.suppress(Captured):
        run_backward()
    return record


def capture(mode: str, path: str) -> None:
    """Step 1 (under TRITON_INTERPRET=1): record the launch arguments of both backward kernels."""
    import torch

    from fa_backward.programmable import attention
    from fa_core import score_mods as sm

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 128, dtype=torch.float16, requires_grad=True) for _ in range(3))
    kw: dict = {"causal": True}
    if mode == "relbias":
        kw.update(score_mod=sm.relative_position_bias, score_mod_grad=sm.additive_grad)
    record = record_backward_launches(lambda: attention(q, k, v, **kw)[0].sum().backward())
    Path(path).write_text(json.dumps(record))


def compile_sm90(fn, desc: dict, num_warps: int, num_stages: int, out: Path) -> tuple[str, str]:
    """Compile the jit function ``fn`` for sm_90 from ``desc`` (every argument described as
    :func:`describe_arg` does) with Triton's specialization rules: 16-bit tensors become bf16, 16-divisible
    ints carry ``tt.divisibility`` 16 and ints equal to 1 become constexprs, except the ``do_not_specialize``
    ints. Writes ``out``.cubin / .sass; returns ``(sass, "registers R, stack S bytes")``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtypes = {
        "torch.float16": "*bf16",
        "torch.bfloat16": "*bf16",
        "torch.float32": "*fp32",
        "torch.int32": "*i32",
    }
    sig: dict[str, str] = {}
    consts: dict[str, object] = {}
    attrs: dict[tuple[int], list] = {}
    for i, name in enumerate(fn.arg_names):
        d = desc[name]
        plain = name in getattr(fn, "do_not_specialize", ())
        if fn.params[i].is_constexpr or d["t"] == "const" or (d["t"] == "int" and d["v"] == 1 and not plain):
            sig[name] = "constexpr"
            consts[name] = (
                getattr(importlib.import_module(d["mod"]), d["name"]) if d["t"] == "jit" else d["v"]
            )
        elif d["t"] == "tensor":
            sig[name] = dtypes[d["dtype"]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif d["t"] == "int":
            sig[name] = "i32"
            if d["v"] % 16 == 0 and not plain:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    compiled = triton.compile(
        ASTSource(fn, sig, consts, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    cubin = out.with_suffix(".cubin")
    cubin.write_bytes(compiled.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    out.with_suffix(".sass").write_text(sass)
    usage = subprocess.run(
        [str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
    ).stdout
    regs = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return sass, f"registers {regs.group(1)}, stack {regs.group(2)} bytes" if regs else usage[-200:]


def loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """Every loop of the disassembly (a backward branch), in order of its closing branch: ``(first line, last
    line, count per opcode)``."""
    text = sass.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(text) if (m := re.match(r"^(\.L_x_\d+):", ln.strip()))}
    op = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
    found = []
    for i, ln in enumerate(text):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ln)
        if not m or labels.get(m.group(1), i) >= i:
            continue
        a = labels[m.group(1)]
        found.append((a, i, collections.Counter(mm.group(1) for s in text[a : i + 1] if (mm := op.match(s)))))
    return found


def compile_mix(record: dict, which: str, tile: tuple[int, int, int, int], out: Path) -> str:
    """Step 2: compile one kernel for sm_90 from its record; returns the report lines."""
    from fa_backward import backward_kernel as bk

    fn = {"dq": bk._bwd_dq_kernel, "dkdv": bk._bwd_dkdv_kernel}[which]
    desc = dict(record[which], BLOCK_M={"t": "int", "v": tile[0]}, BLOCK_N={"t": "int", "v": tile[1]})
    sass, usage = compile_sm90(fn, desc, tile[2], tile[3], out)
    lines = [f"{which} {tile}: {usage}"]
    keys = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FSEL", "F2FP", "I2FP", "ISETP", "LDS", "BAR")
    for _, _, ops in loops(sass):
        if ops["MUFU"]:
            lines.append(
                f"  loop: {sum(ops.values())} instructions; " + " ".join(f"{k}={ops[k]}" for k in keys)
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="plain,relbias")
    ap.add_argument("--kernels", default="dq,dkdv")
    ap.add_argument("--tile", default=None, help="BLOCK_M,BLOCK_N,num_warps,num_stages (default: per kernel)")
    ap.add_argument("--capture", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.capture:
        capture(*args.capture)
        return
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(SRC))
    sys.path[:0] = SRC
    work = Path(tempfile.mkdtemp(prefix="sass_mix_"))
    for mode in args.modes.split(","):
        rec_path = work / f"{mode}.json"
        subprocess.run([sys.executable, __file__, "--capture", mode, str(rec_path)], env=env, check=True)
        record = json.loads(rec_path.read_text())
        for which in args.kernels.split(","):
            tile = tuple(int(x) for x in args.tile.split(",")) if args.tile else TILES[which]
            print(f"[{mode}] " + compile_mix(record, which, tile, work / f"{mode}-{which}"), flush=True)
    print(f"cubin / sass files in {work}")


if __name__ == "__main__":
    main()
