"""Context-parallel forward+backward throughput: fa-plus ring / all-gather vs torch's ``context_parallel`` (SDPA).

Tokens per second of the whole group (``batch * seqlen / time of one fwd+bwd``; the time is the slowest
rank's) at seqlen 64k and 128k, headdim 128, nheads 16 (hidden 2048), batch 1, bf16, causal and not. ONE launch
of W ranks measures, side by side:

* world_size 1 (every rank alone on its GPU, no communication; the slowest rank's time):
  ``fa-plus`` (fa_backward.flash_attn_func) and ``sdpa-flash`` (SDPA, flash backend): the baselines;
* world_size W: ``fa-plus-ring``, ``fa-plus-allgather``, ``torch-cp`` (torch's context_parallel, default
  rotate method "allgather"), ``torch-cp-alltoall`` (rotate method "alltoall").

``efficiency`` = tokens/s on W GPUs / (W x tokens/s of the 1-GPU baseline of the same family: fa-plus for
fa-plus-*, sdpa-flash for torch-cp*); ``vs_torch_cp`` = tokens/s / the best torch-cp row of the same point.
Rows: ``"bench": "cp_fwd_bwd"`` in bench/results/<device>-parallel.{json,md,png} (the json and md are rewritten
after every row, so a run cut short keeps what it measured).

    torchrun --standalone --nproc_per_node=2 bench/bench_parallel.py
    python bench/bench_parallel.py --world-size 2            # the same through mp.spawn
    python bench/bench_parallel.py --quick                   # 64k only, 2 timed iterations
    python bench/bench_parallel.py --cpu-smoke               # CPU: the 1-GPU code path at a toy size (interpreter)

Kernels: one tile config per kernel (``FA_PLUS_AUTOTUNE=0`` unless set; the first configs are the ones measured
best at d128 on long sequences, and autotuning at 128k tokens costs minutes per key); ``--autotune`` lets the
autotuner time every config once per shape (during the untimed warm-up).
A provider that fails gives a row with ``"error"`` and ``"tokens_per_s": null``.

Run from the repository root with PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-parallel/src.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--autotune" not in sys.argv:
    os.environ.setdefault("FA_PLUS_AUTOTUNE", "0")
if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import device_slug, markdown_table, results_path, versions, write_json, write_results  # noqa: E402

KIND = "parallel"
BENCH = "cp_fwd_bwd"
BASELINES = ("fa-plus", "sdpa-flash")
PROVIDERS = ("fa-plus-ring", "fa-plus-allgather", "torch-cp", "torch-cp-alltoall")
FAMILY = {"fa-plus-ring": "fa-plus", "fa-plus-allgather": "fa-plus", "torch-cp": "sdpa-flash",
          "torch-cp-alltoall": "sdpa-flash"}  # fmt: skip
# a provider failing on one rank leaves the others in a collective: the NCCL watchdog then ends the world
# (its rows so far are kept) instead of hanging until the stage's timeout
TIMEOUT = datetime.timedelta(minutes=3)
# measurements, not part of a row's identity (merging, table columns)
common.MEASURE_FIELDS = common.MEASURE_FIELDS | {"tokens_per_s", "efficiency", "vs_torch_cp"}

Step = Callable[[], None]


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[65536, 131072])
    p.add_argument(
        "--world-size", type=int, default=0, help="ranks to spawn without torchrun (default: all GPUs)"
    )
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES)
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--nheads", type=int, default=16)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--quick", action="store_true", help="64k only, 2 timed iterations")
    p.add_argument(
        "--autotune", action="store_true", help="let the kernels autotune (else FA_PLUS_AUTOTUNE=0)"
    )
    p.add_argument("--no-merge", action="store_true", help="overwrite the results file")
    p.add_argument(
        "--cpu-smoke", action="store_true", help="CPU, no process group: 1-GPU code path, toy size"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seqlens, args.iters = [65536], min(args.iters, 2)
    return args


# ------------------------------------------------------------------------------------------ providers
# Each builder allocates its own inputs (outside the timing) and returns (step, cleanup).


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _leaves(shape: tuple[int, ...], n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(shape, device=_device(), dtype=_dtype(), requires_grad=True) for _ in range(n)]


def _fa_plus_single(b: int, s: int, h: int, d: int, causal: bool) -> tuple[Step, Callable[[], None] | None]:
    from fa_backward import flash_attn_func

    q, k, v = _leaves((b, s, h, d))
    dout = torch.randn_like(q)

    def step() -> None:
        out = flash_attn_func(q, k, v, causal=causal)
        torch.autograd.grad(out, (q, k, v), dout)

    return step, None


def _sdpa_single(b: int, s: int, h: int, d: int, causal: bool) -> tuple[Step, Callable[[], None] | None]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _leaves((b, h, s, d))  # SDPA's layout, built directly (no transpose inside the timing)
    dout = torch.randn_like(q)
    backend = SDPBackend.FLASH_ATTENTION if torch.cuda.is_available() else SDPBackend.MATH

    def step() -> None:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.autograd.grad(out, (q, k, v), dout)

    return step, None


def _fa_plus_cp(strategy: str, b: int, s: int, h: int, d: int, causal: bool, world: int):
    from fa_parallel import context_parallel_attn_func

    q, k, v = _leaves((b, s // world, h, d))  # this rank's zig-zag shard (values do not matter)
    dout = torch.randn_like(q)

    def step() -> None:
        out = context_parallel_attn_func(q, k, v, causal=causal, strategy=strategy, layout="zigzag")
        torch.autograd.grad(out, (q, k, v), dout)

    return step, None


_MESH: dict[int, Any] = {}


def _cp_modules() -> tuple[Any, Any]:
    """``context_parallel`` and its options object, wherever this torch keeps them (2.6 ... 2.13)."""
    from torch.distributed.tensor.experimental import context_parallel

    try:
        from torch.distributed.tensor.experimental._attention import _cp_options
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel._attention import _cp_options
    return context_parallel, _cp_options


def _set_rotate(method: str) -> None:
    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel._attention import set_rotate_method
    set_rotate_method(method)


def _torch_cp(rotate: str, b: int, s: int, h: int, d: int, causal: bool, world: int):
    """SDPA (flash backend) under ``context_parallel``: the global buffers are sharded in place when the
    context is entered (head-tail load balancing when causal: torch allows it only there)."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.attention import SDPBackend, sdpa_kernel

    context_parallel, cp_options = _cp_modules()
    if world not in _MESH:
        _MESH[world] = init_device_mesh("cuda", (world,))
    mesh = _MESH[world]
    # (batch, nheads, seqlen, headdim): SDPA's layout, sequence at dim 2
    bufs = [torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    cp_options.enable_load_balance = causal  # read when the context is entered
    _set_rotate(rotate)
    ctx = context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 4, no_restore_buffers=set(bufs))
    ctx.__enter__()
    q, k, v = (t.detach().requires_grad_() for t in bufs[:3])
    dout = bufs[3]

    def step() -> None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # looked up now: the CP one
        torch.autograd.grad(out, (q, k, v), dout)

    def cleanup() -> None:
        try:
            ctx.__exit__(None, None, None)
        finally:
            _set_rotate("allgather")

    return step, cleanup


def _build(prov: str, b: int, s: int, h: int, d: int, causal: bool, world: int):
    if prov == "fa-plus":
        return _fa_plus_single(b, s, h, d, causal)
    if prov == "sdpa-flash":
        return _sdpa_single(b, s, h, d, causal)
    if prov.startswith("fa-plus-"):
        return _fa_plus_cp(prov.removeprefix("fa-plus-"), b, s, h, d, causal, world)
    return _torch_cp("alltoall" if prov.endswith("alltoall") else "allgather", b, s, h, d, causal, world)


# ------------------------------------------------------------------------------------------ timing


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(step: Step, iters: int, distributed: bool) -> tuple[float, float]:
    """(seconds of the warm-up step, milliseconds per fwd+bwd: the slowest rank's mean over ``iters``)."""
    t0 = time.perf_counter()
    step()  # compiles (and autotunes with --autotune)
    _sync()
    warm = time.perf_counter() - t0
    if distributed:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync()
    ms = (time.perf_counter() - t0) * 1e3 / iters
    if distributed:
        t = torch.tensor([ms, warm], device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ms, warm = float(t[0].item()), float(t[1].item())
    return warm, ms


def _measure(
    prov: str, world: int, s: int, causal: bool, args: argparse.Namespace, distributed: bool
) -> dict:
    b, h, d = args.batch, args.nheads, args.headdim
    row: dict[str, Any] = dict(
        bench=BENCH, provider=prov, world_size=world, seqlen=s, causal=causal, headdim=d, nheads=h, batch=b,
        dtype=str(_dtype()).removeprefix("torch."),
    )  # fmt: skip
    cleanup = None
    ok = 1
    try:
        if s % (2 * world):
            raise ValueError(f"seqlen {s} not divisible by 2 * world_size")
        step, cleanup = _build(prov, b, s, h, d, causal, world)
        warm, ms = _time(step, args.iters, distributed)
        row.update(ms=round(ms, 3), tokens_per_s=round(b * s / (ms * 1e-3), 1), note=f"warm-up {warm:.1f} s")
    except Exception as exc:
        ok = 0
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        row.update(ms=None, tokens_per_s=None, error=msg)
        if os.environ.get("BENCH_TRACEBACK", "1") == "1":
            traceback.print_exc()
    finally:
        step = None  # type: ignore[assignment]
        if cleanup is not None:
            try:
                cleanup()
            except Exception as exc:
                print(f"[bench] cleanup of {prov} failed: {exc}", file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if distributed:  # a provider failing on one rank only must mark the row failed everywhere
        t = torch.tensor([ok], device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        if not t.item() and "error" not in row:
            row.update(ms=None, tokens_per_s=None, error="failed on another rank")
    return row


# ------------------------------------------------------------------------------------------ results


def _derive(rows: list[dict[str, Any]]) -> None:
    """Fill ``efficiency`` and ``vs_torch_cp`` of the W-rank rows, in place."""
    tps = {(r["provider"], r["world_size"], r["seqlen"], r["causal"]): r.get("tokens_per_s") for r in rows}
    for r in rows:
        t, w = r.get("tokens_per_s"), r["world_size"]
        if not t or w == 1:
            continue
        base = tps.get((FAMILY.get(r["provider"], ""), 1, r["seqlen"], r["causal"]))
        if base:
            r["efficiency"] = round(t / (w * base), 3)
        cp = [tps.get((p, w, r["seqlen"], r["causal"])) for p in ("torch-cp", "torch-cp-alltoall")]
        cp = [x for x in cp if x]
        if cp and r["provider"].startswith("fa-plus"):
            r["vs_torch_cp"] = round(t / max(cp), 3)


def _summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: per (seqlen, causal, world size) the tokens/s of every provider, efficiency, vs torch-cp."""
    lines = ["", "## Summary (tokens/s; efficiency = W GPUs / (W x 1 GPU of the same family))", ""]
    head = ["seqlen", "causal", "W", "provider", "tokens/s", "efficiency", "vs best torch-cp"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {p: i for i, p in enumerate(BASELINES + PROVIDERS)}
    key = lambda r: (r["seqlen"], r["causal"], r["world_size"], order.get(r["provider"], 99))  # noqa: E731
    for r in sorted((r for r in rows if r.get("bench") == BENCH), key=key):
        t = r.get("tokens_per_s")
        cells = [
            str(r["seqlen"]), str(r["causal"]), str(r["world_size"]), r["provider"],
            f"{t:,.0f}" if t else "err: " + str(r.get("error", ""))[:60],
            f"{r['efficiency']:.3f}" if r.get("efficiency") else "-",
            f"{r['vs_torch_cp']:.2f}x" if r.get("vs_torch_cp") else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _all_rows(rows: list[dict[str, Any]], merge: bool) -> list[dict[str, Any]]:
    path = results_path(KIND)
    if merge and path.exists():
        try:
            old = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError):
            old = []
        keys = {common.row_key(r) for r in rows}
        rows = [r for r in old if common.row_key(r) not in keys] + rows
    _derive(rows)
    return rows


TABLE_KW = dict(metric="tokens_per_s", ours="fa-plus-ring", title="Context-parallel fwd+bwd tokens/s")


def _write_partial(rows: list[dict[str, Any]], merge: bool) -> None:
    """json + md after every row (no plot): a run cut short keeps its numbers."""
    rows = _all_rows(rows, merge)
    path = write_json(KIND, rows)
    path.with_suffix(".md").write_text(markdown_table(rows, **TABLE_KW) + _summary(rows))  # type: ignore[arg-type]


def _write(rows: list[dict[str, Any]], merge: bool) -> Path:
    rows = _all_rows(rows, merge)
    out = write_results(
        KIND, rows, merge=False, table_kw=TABLE_KW,
        plot_kw=dict(metric="tokens_per_s", x="seqlen", panels=("world_size", "causal")),
    )  # fmt: skip
    with out.with_suffix(".md").open("a") as f:
        f.write(_summary(rows))
    print(_summary(rows))
    print(f"wrote {out} ({device_slug()}, {versions()})", flush=True)
    return out


# ------------------------------------------------------------------------------------------ driver


def _bench(rank: int, world: int, args: argparse.Namespace, distributed: bool) -> list[dict[str, Any]]:
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    rows: list[dict[str, Any]] = []
    plan = [(p, 1) for p in args.baselines] + ([(p, world) for p in args.providers] if world > 1 else [])
    for s in args.seqlens:
        for causal in causals:
            for prov, w in plan:
                row = _measure(prov, w, s, causal, args, distributed)
                if rank == 0:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    _write_partial(rows, not args.no_merge)
    return rows


def _run(rank: int, world: int, args: argparse.Namespace) -> None:
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dist.init_process_group(
        "nccl", rank=rank, world_size=world, device_id=torch.device("cuda", local), timeout=TIMEOUT
    )
    try:
        rows = _bench(rank, world, args, True)
        if rank == 0:
            _write(rows, not args.no_merge)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    _run(rank, world, args)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.cpu_smoke:  # no GPU: the 1-GPU providers at a toy size, results not written
        args.iters = 1
        for s in args.seqlens:
            for prov in args.baselines:
                print(json.dumps(_measure(prov, 1, s, True, args, False)), flush=True)
        return 0
    if not torch.cuda.is_available():
        print("bench_parallel needs CUDA GPUs (or --cpu-smoke)", file=sys.stderr)
        return 2
    if "RANK" in os.environ:  # torchrun: this process is one rank
        _run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return 0
    import torch.multiprocessing as mp

    world = args.world_size or min(torch.cuda.device_count(), 4)
    mp.spawn(_spawned, args=(world, args, _free_port()), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
