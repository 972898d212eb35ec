"""Context-parallel forward+backward throughput: fa-plus ring / all-gather vs torch's ``context_parallel`` (SDPA).

Tokens per second of the whole group (``batch * seqlen / time of one fwd+bwd``; the time is the slowest
rank's) at seqlen 64k and 128k, headdim 128, nheads 16 (hidden 2048), batch 1, bf16, causal and not, on 1, 2
and 4 GPUs (the world sizes the machine has). Writes bench/results/<device>-parallel.{json,md,png}.

    python bench/bench_parallel.py                  # spawns 1, 2 (and 4 if present) ranks, one world after another
    python bench/bench_parallel.py --world-sizes 2 --seqlens 65536 --providers fa-plus-ring torch-cp
    torchrun --standalone --nproc_per_node=2 bench/bench_parallel.py   # one world size (rank 0 writes)

Providers:
    fa-plus-ring       fa_parallel.context_parallel_attn_func(strategy="ring", layout="zigzag")
    fa-plus-allgather  the same with strategy="allgather"
    torch-cp           torch.distributed.tensor.experimental.context_parallel over SDPA (flash backend); q, k, v
                       and dout are the ``buffers`` it shards (head-tail load balancing when causal, which it
                       requires; plain contiguous shards when not), default rotate method ("allgather").
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
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import device_slug, results_path, versions, write_results  # noqa: E402

KIND = "parallel"
PROVIDERS = ("fa-plus-ring", "fa-plus-allgather", "torch-cp")
# a provider failing on one rank leaves the others in a collective: the NCCL watchdog then ends the world
# (its rows so far are kept) instead of hanging until the device command's limit
TIMEOUT = datetime.timedelta(minutes=3)
# tokens_per_s is a measurement, not part of a row's identity (merging, table columns)
common.MEASURE_FIELDS = common.MEASURE_FIELDS | {"tokens_per_s"}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[65536, 131072])
    p.add_argument(
        "--world-sizes", type=int, nargs="+", default=None, help="default: 1, 2, 4 (those present)"
    )
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--nheads", type=int, default=16)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--no-merge", action="store_true", help="overwrite the results file")
    return p.parse_args(argv)


def _fa_plus_step(strategy: str, b: int, s_local: int, h: int, d: int, causal: bool):
    from fa_parallel import context_parallel_attn_func

    q, k, v = (
        torch.randn(b, s_local, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    dout = torch.randn(b, s_local, h, d, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        out = context_parallel_attn_func(q, k, v, causal=causal, strategy=strategy, layout="zigzag")
        out.backward(dout)

    return step, None


_MESHES: dict[int, Any] = {}


def _torch_cp_step(b: int, s: int, h: int, d: int, causal: bool, world: int):
    """SDPA under ``context_parallel``; returns the step and the context manager to exit at the end."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if world not in _MESHES:  # one mesh (process group) per world size, not one per row
        _MESHES[world] = init_device_mesh("cuda", (world,))
    mesh = _MESHES[world]
    # (batch, nheads, seqlen, headdim): SDPA's layout, sequence at dim 2; global buffers, sharded in place
    bufs = [torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    # load balancing (head-tail) is only allowed with is_causal=True
    _cp_options.enable_load_balance = causal
    ctx = context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 4, no_restore_buffers=set(bufs))
    ctx.__enter__()
    q, k, v = (t.detach().requires_grad_() for t in bufs[:3])
    dout = bufs[3]

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.backward(dout)

    return step, ctx


def _time(step, iters: int) -> float:
    """Milliseconds per fwd+bwd: the slowest rank's mean over ``iters`` after one warm-up."""
    step()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    ms = torch.tensor([(time.perf_counter() - t0) * 1e3 / iters], device="cuda")
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms.item())


def _bench_world(rank: int, world: int, args: argparse.Namespace, sink: str | None) -> list[dict[str, Any]]:
    b, h, d = args.batch, args.nheads, args.headdim
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    rows = []
    for s in args.seqlens:
        for causal in causals:
            for prov in args.providers:
                row: dict[str, Any] = dict(
                    bench="parallel", provider=prov, world_size=world, seqlen=s, headdim=d, causal=causal,
                    nheads=h, batch=b,
                )  # fmt: skip
                ctx = None
                try:
                    if s % (2 * world):
                        raise ValueError(f"seqlen {s} not divisible by 2 * world_size")
                    if prov == "torch-cp":
                        step, ctx = _torch_cp_step(b, s, h, d, causal, world)
                    else:
                        step, ctx = _fa_plus_step(prov.split("-")[-1], b, s // world, h, d, causal)
                    ms = _time(step, args.iters)
                    row.update(ms=round(ms, 3), tokens_per_s=round(b * s / (ms * 1e-3), 1))
                except Exception as exc:
                    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
                    row.update(ms=None, tokens_per_s=None, error=msg)
                    if os.environ.get("BENCH_TRACEBACK") == "1":
                        traceback.print_exc()
                finally:
                    if ctx is not None:
                        ctx.__exit__(None, None, None)
                    torch.cuda.empty_cache()
                if rank == 0:
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if sink:  # rows survive a crash of a later configuration
                        with open(sink, "a") as f:
                            f.write(json.dumps(row) + "\n")
    return rows


def _worker(rank: int, world: int, args: argparse.Namespace, port: int, sink: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank), timeout=TIMEOUT
    )
    try:
        _bench_world(rank, world, args, sink)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write(rows: list[dict[str, Any]], merge: bool) -> Path:
    path = results_path(KIND)
    if merge and path.exists():
        old = json.loads(path.read_text()).get("rows", [])
        keys = {common.row_key(r) for r in rows}
        rows = [r for r in old if common.row_key(r) not in keys] + rows
    out = write_results(
        KIND, rows, merge=False,
        table_kw=dict(metric="tokens_per_s", ours="fa-plus-ring", title="Context-parallel fwd+bwd tokens/s"),
        plot_kw=dict(metric="tokens_per_s", x="seqlen", panels=("world_size", "causal")),
    )  # fmt: skip
    print(f"wrote {out} ({device_slug()}, {versions()})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if not torch.cuda.is_available():
        print("bench_parallel needs CUDA GPUs", file=sys.stderr)
        return 2
    if "RANK" in os.environ:  # torchrun: one world size, this process is one rank
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=TIMEOUT)
        rows = _bench_world(rank, world, args, None)
        dist.destroy_process_group()
        if rank == 0:
            _write(rows, not args.no_merge)
        return 0
    import torch.multiprocessing as mp

    n = torch.cuda.device_count()
    worlds = args.world_sizes or [w for w in (1, 2, 4) if w <= n]
    rows: list[dict[str, Any]] = []
    for world in worlds:
        if world > n:
            print(f"skipping world size {world}: {n} GPU(s)", file=sys.stderr)
            continue
        with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as sink:
            try:
                mp.spawn(_worker, args=(world, args, _free_port(), sink.name), nprocs=world, join=True)
            except Exception as exc:  # keep the rows written before the crash, go on with the next world
                print(f"world size {world} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows += [json.loads(line) for line in Path(sink.name).read_text().splitlines() if line.strip()]
    _write(rows, not args.no_merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
