"""sm_90 SASS of the backward kernels for a set of configurations, compiled offline: a fingerprint to compare
two versions of the kernel sources (a refactor must leave the generated code unchanged).

For every configuration (plain causal d128, varlen with seqused_k, the relative-bias score_mod, the built-in
softcap, a block-sparse mask with full blocks and a mask_mod, a window with ALiBi and dropout), both kernels
(dQ 128x64, dK/dV 32x128, 8 warps, 2 stages), with tensor-descriptor loads on and off: registers, stack bytes,
the total instruction count, the count per opcode and a hash of the disassembly (addresses and the kernel's
file/line info stripped). The launch arguments are captured under the CPU interpreter and the kernels compiled
with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` (:mod:`scripts.sass_mix` does both steps).

    python scripts/bwd_sass_compare.py --out before.json [--capture-python PYTHON]
    # ... change the kernel sources ...
    python scripts/bwd_sass_compare.py --out after.json --against before.json
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = [str(ROOT / "packages" / p / "src") for p in ("fa-core", "fa-backward")]
MODES = ("causal", "varlen", "relbias", "softcap", "sparse", "local")
TILES = {"dq": (128, 64, 8, 2), "dkdv": (32, 128, 8, 2)}


def _sass_mix():
    spec = importlib.util.spec_from_file_location("sass_mix", ROOT / "scripts" / "sass_mix.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def capture(mode: str, path: str) -> None:
    """Under TRITON_INTERPRET=1: record the launch arguments of both kernels for one configuration."""
    import torch

    from fa_backward.programmable import attention, attention_varlen
    from fa_core import score_mods as sm
    from fa_core.block_sparse import create_block_mask

    torch.manual_seed(0)
    h, d = 2, 128

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float16, requires_grad=True)

    def run_backward() -> None:
        if mode == "varlen":
            cu = torch.tensor([0, 40, 64], dtype=torch.int32)
            q, k, v = leaf(64, h, d), leaf(64, h, d), leaf(64, h, d)
            used = torch.tensor([30, 24], dtype=torch.int32)
            out = attention_varlen(q, k, v, cu, cu, 40, 40, causal=True, seqused_k=used)[0]
        else:
            n = 128 if mode == "sparse" else 64
            q, k, v = leaf(1, n, h, d), leaf(1, n, h, d), leaf(1, n, h, d)
            kw: dict = {"causal": True}
            if mode == "relbias":
                kw.update(score_mod=sm.relative_position_bias, score_mod_grad=sm.additive_grad)
            elif mode == "softcap":
                kw.update(softcap=30.0)
            elif mode == "sparse":
                kw = dict(
                    block_mask=create_block_mask(sm.prefix_lm_torch, None, None, 128, 128, (64, 64)),
                    mask_mod=sm.prefix_lm,
                )
            elif mode == "local":
                kw = dict(window_size=(24, 8), alibi_slopes=sm.alibi_slopes(h), dropout_p=0.1)
            out = attention(q, k, v, **kw)[0]
        out.float().sum().backward()

    Path(path).write_text(json.dumps(_sass_mix().record_backward_launches(run_backward)))


def fingerprint(sass: str) -> dict:
    op = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
    body = [ln for ln in sass.splitlines() if op.match(ln)]
    ops = collections.Counter(op.match(ln).group(1) for ln in body)  # type: ignore[union-attr]
    norm = "\n".join(re.sub(r"/\*[0-9a-f]+\*/", "", ln).split(";")[0].strip() for ln in body)
    return {
        "instructions": sum(ops.values()),
        "sha": hashlib.sha256(norm.encode()).hexdigest()[:16],
        "ops": dict(sorted(ops.items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--kernels", default="dq,dkdv")
    ap.add_argument("--tma", default="0,1")
    ap.add_argument("--out", required=False)
    ap.add_argument("--against", help="an earlier --out file: print the differences")
    ap.add_argument(
        "--capture-python", default=sys.executable, help="the interpreter that captures (any Triton version)"
    )
    ap.add_argument("--capture", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.capture:
        capture(*args.capture)
        return
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(SRC), FA_PLUS_AUTOTUNE="0")
    sys.path[:0] = SRC
    mix = _sass_mix()
    import triton

    work = Path(tempfile.mkdtemp(prefix="bwd_sass_"))
    result: dict[str, dict] = {"triton": {"version": triton.__version__}}
    if args.out and Path(args.out).exists():  # add to an earlier run's file
        result.update(json.loads(Path(args.out).read_text()))
    for mode in args.modes.split(","):
        rec_path = work / f"{mode}.json"
        subprocess.run([args.capture_python, __file__, "--capture", mode, str(rec_path)], env=env, check=True)
        record = json.loads(rec_path.read_text())
        for which in args.kernels.split(","):
            for tma in (int(t) for t in args.tma.split(",")):
                rec = {w: dict(r) for w, r in record.items()}
                rec[which]["USE_TMA"] = {"t": "const", "v": bool(tma)}
                name = f"{mode}-{which}-tma{tma}"
                report = mix.compile_mix(rec, which, TILES[which], work / name)
                fp = fingerprint((work / name).with_suffix(".sass").read_text())
                # instructions per iteration of each loop with exponentials (the steady state)
                fp["loops"] = [int(n) for n in re.findall(r"loop: (\d+) instructions", report)]
                regs = re.search(r"registers (\d+), stack (\d+)", report)
                fp.update(registers=int(regs.group(1)), stack=int(regs.group(2))) if regs else None
                result[name] = fp
                if args.out:
                    Path(args.out).write_text(json.dumps(result, indent=1))
                print(
                    f"{name}: {fp['instructions']} instructions, loops {fp['loops']}, "
                    f"regs {fp.get('registers')}, sha {fp['sha']}",
                    flush=True,
                )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.against:
        before = json.loads(Path(args.against).read_text())
        same = 0
        for name, fp in result.items():
            if name == "triton":
                continue
            old = before.get(name)
            if old is None:
                print(f"{name}: not in {args.against}")
            elif old["sha"] == fp["sha"] and old.get("registers") == fp.get("registers"):
                same += 1
            else:
                diff = {
                    k: (old["ops"].get(k, 0), fp["ops"].get(k, 0))
                    for k in set(old["ops"]) | set(fp["ops"])
                    if old["ops"].get(k, 0) != fp["ops"].get(k, 0)
                }
                print(
                    f"{name}: {old['instructions']} -> {fp['instructions']} instructions, "
                    f"loops {old.get('loops')} -> {fp.get('loops')}, "
                    f"regs {old.get('registers')} -> {fp.get('registers')}, ops {diff}"
                )
        print(f"{same} of {len(result) - 1} kernels identical to {args.against}")


if __name__ == "__main__":
    main()
