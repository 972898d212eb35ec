"""Multi-GPU correctness check of fa-parallel (NCCL, bf16, long sequences). Standalone script, not a test module.

Every configuration (seqlen x mask x strategy x layout x GQA, plus packed documents) runs the context-parallel
forward + backward on all ranks, gathers out, lse, dq, dk, dv on rank 0, and compares them with fa-plus on ONE
GPU over the whole sequence (fa-backward's ``flash_attn_func`` / ``flash_attn_varlen_func``):

* out and dq on a sample of query rows: the 2x rule against a float32 reference of those rows (exact
  softmax over all keys under the mask; dq = scale * sum_j P_ij (dout_i.v_j - dout_i.out_i) k_j), for both
  fa-plus on one GPU and the context-parallel result: ``err(cp) <= 2 * err(one GPU) + slack(bf16)``;
* dk, dv (every key sees many rows, no cheap exact reference): ``max|cp - one GPU| <= 1e-2 * max|one GPU|``
  (bf16 has 8 mantissa bits: a different float32 summation order moves results by about one bf16 ulp);
* lse: ``max|cp - one GPU| <= 1e-3`` (float32 either way);
* packed documents: out, dq, dk, dv against one GPU with the dk/dv rule.

Kernels run with one tile config each (``FA_PLUS_AUTOTUNE=0`` unless set): autotuning at 128k tokens costs
minutes and says nothing about correctness. ``--budget`` bounds the wall time: configurations that would
start after it are reported as SKIPPED (the important ones run first).

Launch from the repository root (PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-parallel/src):

    torchrun --standalone --nproc_per_node=2 packages/fa-parallel/tests/gpu_parallel_check.py
    python packages/fa-parallel/tests/gpu_parallel_check.py --spawn 2 --quick
    python packages/fa-parallel/tests/gpu_parallel_check.py --cpu --spawn 2 --seqlens 64 --nheads 2 --headdim 16

Exit code 0 when every configuration that ran passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("FA_PLUS_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072], help="total sequence lengths")
    p.add_argument("--nheads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--strategies", nargs="+", default=["ring", "allgather"])
    p.add_argument("--quick", action="store_true", help="the smallest length only, fewer configurations")
    p.add_argument("--rows", type=int, default=64, help="query rows checked against the float32 reference")
    p.add_argument(
        "--budget", type=float, default=0, help="seconds; later configurations are skipped (0: none)"
    )
    p.add_argument("--json", default="", help="write the results to this file (rank 0)")
    p.add_argument("--spawn", type=int, default=0, help="start this many ranks with mp.spawn (else torchrun)")
    p.add_argument(
        "--cpu", action="store_true", help="dry run of this script: gloo, float32, Triton interpreter"
    )
    return p.parse_args(argv)


def _cfg(seqlen: int, strategy: str, causal: bool, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        seqlen=seqlen, strategy=strategy, causal=causal, window=(-1, -1), layout="zigzag", gqa=False,
        docs=None,
    )  # fmt: skip
    base.update(kw)
    return base


def _docs(s: int) -> list[int]:
    """Document lengths summing to ``s``, cut at uneven places (some cross the shard boundaries)."""
    cuts = sorted({0, s, s // 7, (3 * s) // 8, s // 2 + 5, (7 * s) // 9})
    return [b - a for a, b in zip(cuts, cuts[1:])]


def _configs(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    """Most important first (a budget cut drops the tail)."""
    small, lens = min(args.seqlens), sorted(args.seqlens)
    strategies = args.strategies
    out = [_cfg(small, st, True) for st in strategies]
    out += [_cfg(small, st, False) for st in strategies]
    w = max(small // 8, 1)
    out += [_cfg(small, "ring", True, window=(w, -1))]  # sliding window over the zig-zag layout
    if "allgather" in strategies:  # packed documents, per-document head-tail layout (balanced)
        out += [_cfg(small, "allgather", True, docs=_docs(small), doc_layout="zigzag", gqa=True)]
    if args.quick:
        return out
    out += [_cfg(small, st, True, gqa=True) for st in strategies]
    out += [_cfg(small, "allgather", False, gqa=True, window=(w, w))]
    out += [_cfg(small, "ring", False, window=(w, w), layout="contiguous")]
    out += [_cfg(small, "ring", True, window=(w, -1), layout="contiguous")]
    if "allgather" in strategies:
        out += [
            _cfg(small, "allgather", True, docs=_docs(small)),
            _cfg(small, "allgather", False, docs=_docs(small)),
            _cfg(small, "allgather", False, docs=_docs(small), doc_layout="zigzag"),
        ]
    for s in lens[1:]:
        out += [_cfg(s, st, c) for c in (True, False) for st in strategies]
        out += [_cfg(s, "ring", True, gqa=True)]
    return [c for c in out if c["seqlen"] % (2 * world) == 0]


def _rows_reference(q, k, v, dout, rows, causal, window, scale):
    """float32 out and dq of the sampled query rows (exact softmax over every visible key)."""
    group = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    qr, dor = q[:, rows].float(), dout[:, rows].float()
    s = torch.einsum("brhd,bshd->bhrs", qr * scale, kf)
    left, right = window
    if causal:
        right = 0
    rel = torch.arange(k.shape[1], device=q.device)[None, :] - rows[:, None]  # j - i
    hidden = torch.zeros_like(rel, dtype=torch.bool)
    if right >= 0:
        hidden |= rel > right
    if left >= 0:
        hidden |= rel < -left
    s = s.masked_fill(hidden[None, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhrs,bshd->brhd", p, vf)
    dp = torch.einsum("brhd,bshd->bhrs", dor, vf)
    delta = (dor * out).sum(-1).transpose(1, 2)[..., None]  # (b, h, r, 1)
    dq = torch.einsum("bhrs,bshd->brhd", p * (dp - delta), kf) * scale
    return out, dq


def _sync(args: argparse.Namespace) -> None:
    if not args.cpu:
        torch.cuda.synchronize()


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-30)


def _check_one(cfg: dict[str, Any], args: argparse.Namespace, rank: int, world: int) -> tuple[bool, str]:
    from fa_backward import flash_attn_func, flash_attn_varlen_func
    from fa_core.testing import slack_for
    from fa_parallel import (
        context_parallel_attn_func,
        context_parallel_varlen_attn_func,
        document_shard,
        document_sharding,
        shard_sequence,
    )
    from fa_parallel.comm import all_gather_documents, all_gather_seq

    s, causal, strategy, window, layout = (
        cfg["seqlen"],
        cfg["causal"],
        cfg["strategy"],
        cfg["window"],
        cfg["layout"],
    )
    b, h, d = 1, args.nheads, args.headdim
    hk = max(1, h // 4) if cfg["gqa"] else h
    docs = cfg["docs"]
    dtype, dev = (torch.float32, torch.device("cpu")) if args.cpu else (torch.bfloat16, torch.device("cuda"))
    scale = d**-0.5
    shapes = [(b, s, h, d), (b, s, hk, d), (b, s, hk, d), (b, s, h, d)]
    g = torch.Generator(device=dev).manual_seed(s + 7 * causal + 13 * hk)
    glob = [torch.randn(sh, device=dev, dtype=dtype, generator=g) for sh in shapes]
    for t in glob:  # every rank has the same data anyway (same seed); the broadcast makes sure
        dist.broadcast(t, 0)
    q, k, v, dout = glob
    if docs is not None:
        layout = "contiguous"
        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        q, k, v, dout = (t[0] for t in (q, k, v, dout))
    seq_dim = 0 if docs is not None else 1
    doc_zz = document_sharding(cu, world) if docs is not None and cfg.get("doc_layout") == "zigzag" else None

    def shard(t: torch.Tensor) -> torch.Tensor:
        if doc_zz is not None:
            return document_shard(t, doc_zz, rank, world)
        return shard_sequence(t, rank, world, layout, seq_dim)

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    dl = shard(dout)
    kw = dict(causal=causal, window_size=window, return_attn_probs=True)

    def cp_step():
        for t in (ql, kl, vl):
            t.grad = None
        if docs is not None:
            vl_layout = "zigzag" if doc_zz is not None else "contiguous"
            o, lse, _ = context_parallel_varlen_attn_func(ql, kl, vl, cu, max(docs), layout=vl_layout, **kw)
        else:
            o, lse, _ = context_parallel_attn_func(ql, kl, vl, strategy=strategy, layout=layout, **kw)
        o.backward(dl)
        return o, lse

    t0 = time.perf_counter()
    cp_step()  # compile
    _sync(args)
    first = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    out_l, lse_l = cp_step()
    _sync(args)
    ms = (time.perf_counter() - t0) * 1e3
    if doc_zz is not None:
        gathered = [
            all_gather_documents(t.detach(), None, doc_zz) for t in (out_l, ql.grad, kl.grad, vl.grad)
        ]
        lse_cp = all_gather_documents(lse_l.T.contiguous(), None, doc_zz).T
    else:
        gathered = [
            all_gather_seq(t.detach(), None, layout, seq_dim) for t in (out_l, ql.grad, kl.grad, vl.grad)
        ]
        lse_cp = all_gather_seq(lse_l, None, layout, dim=seq_dim + 1)
    name = ("docs-zigzag" if doc_zz is not None else "docs") if docs is not None else f"{strategy}/{layout}"
    msg = (
        f"seqlen={s:>6} causal={causal!s:5} window={window!s:14} {name:20} heads={h}/{hk}: "
        f"cp fwd+bwd {ms:8.1f} ms (first {first:5.1f} s)"
    )
    if rank != 0:
        return True, msg
    out_cp, dq_cp, dk_cp, dv_cp = gathered
    problems = []
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if docs is not None:
        out1, lse1, _ = flash_attn_varlen_func(qs, ks, vs, cu, cu, max(docs), max(docs), **kw)
        out1.backward(dout)
        pairs = (
            ("out", out_cp, out1),
            ("dq", dq_cp, qs.grad),
            ("dk", dk_cp, ks.grad),
            ("dv", dv_cp, vs.grad),
        )
        for nm, cp, one in pairs:
            rel = _rel_diff(cp, one)
            if not rel <= 1e-2:
                problems.append(f"{nm}: max|cp - 1 GPU| = {rel:.1e} x max|1 GPU|")
            msg += f" | {nm} {rel:.1e} rel"
    else:
        out1, lse1, _ = flash_attn_func(qs, ks, vs, **kw)
        out1.backward(dout)
        rows = torch.linspace(0, s - 1, args.rows, device=dev).long()
        out_ref, dq_ref = _rows_reference(q, k, v, dout, rows, causal, window, scale)
        slack = slack_for(dtype)
        for nm, cp, one, ref in (("out", out_cp, out1, out_ref), ("dq", dq_cp, qs.grad, dq_ref)):
            e_cp = (cp[:, rows].float() - ref).abs().max().item()
            e_one = (one[:, rows].float() - ref).abs().max().item()
            if not e_cp <= 2 * e_one + slack:
                problems.append(f"{nm}: err {e_cp:.3e} > 2 x one-GPU err {e_one:.3e} + {slack}")
            msg += f" | {nm} err {e_cp:.2e} (1 GPU {e_one:.2e})"
        for nm, cp, one in (("dk", dk_cp, ks.grad), ("dv", dv_cp, vs.grad)):
            rel = _rel_diff(cp, one)
            if not rel <= 1e-2:
                problems.append(f"{nm}: max|cp - 1 GPU| = {rel:.1e} x max|1 GPU| > 1e-2")
            msg += f" | {nm} {rel:.1e} rel"
    finite = torch.isfinite(lse1)  # rows without keys: +inf on both sides
    if not torch.equal(finite, torch.isfinite(lse_cp)):
        problems.append("lse: rows without keys differ")
    lse_diff = (lse_cp[finite] - lse1[finite]).abs().max().item() if finite.any() else 0.0
    if not lse_diff <= 1e-3:
        problems.append(f"lse: max diff {lse_diff:.3e}")
    for t in (out_cp, dq_cp, dk_cp, dv_cp):
        if not torch.isfinite(t).all():
            problems.append("non-finite values")
            break
    return not problems, msg + ("" if not problems else "\n    FAIL: " + "; ".join(problems))


def run(rank: int, world: int, args: argparse.Namespace) -> int:
    local = int(os.environ.get("LOCAL_RANK", rank))
    if args.cpu:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    else:
        torch.cuda.set_device(local)
        dist.init_process_group(
            "nccl", rank=rank, world_size=world, device_id=torch.device("cuda", local),
            timeout=datetime.timedelta(minutes=5),
        )  # fmt: skip
    dev = "cpu" if args.cpu else "cuda"
    start = time.perf_counter()
    failures, results = 0, []
    configs = _configs(args, world)
    for i, cfg in enumerate(configs):
        # rank 0 decides whether there is time for one more; every rank follows
        go = torch.tensor(
            [1 if not args.budget or time.perf_counter() - start < args.budget else 0], device=dev
        )
        dist.broadcast(go, 0)
        if not go.item():
            if rank == 0:
                for c in configs[i:]:
                    print(f"SKIPPED (budget of {args.budget:.0f} s) {c}", flush=True)
                    results.append(dict(c, status="skipped"))
            break
        try:
            ok, msg = _check_one(cfg, args, rank, world)
        except Exception as exc:  # a crash on every rank (same code): report it, go on
            ok, msg = False, f"{cfg}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        flag = torch.tensor([0 if ok else 1], device=dev)
        dist.all_reduce(flag)  # every rank agrees on the verdict
        failures += int(flag.item() > 0)
        if rank == 0:
            print(("PASS " if ok else "FAIL ") + msg, flush=True)
            results.append(dict(cfg, status="pass" if ok else "fail", message=msg))
        if not args.cpu:
            torch.cuda.empty_cache()
    if rank == 0:
        print(
            f"{failures} failing configuration(s) on {world} ranks ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(world_size=world, failures=failures, results=results), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return failures


def _spawned(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    if run(rank, world, args):
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif torch.cuda.device_count() < 2:
        print("needs at least 2 CUDA devices", file=sys.stderr)
        return 2
    if args.spawn:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        try:
            mp.spawn(_spawned, args=(args.spawn, args, port), nprocs=args.spawn, join=True)
        except mp.ProcessExitedException:
            return 1
        return 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 1 if run(rank, world, args) else 0


if __name__ == "__main__":
    sys.exit(main())
