"""Multi-GPU correctness check of fa-parallel (NCCL, bf16, long sequences). Standalone script, not a test module.

Every configuration (seqlen x causal x strategy) runs the context-parallel forward + backward on all ranks,
gathers out, lse, dq, dk, dv on rank 0, and compares them with fa-plus on ONE GPU over the whole sequence
(fa-backward's ``flash_attn_func``):

* out and dq on a sample of query rows: the 2x rule against a float32 reference of those rows (exact
  softmax over all keys; dq = scale * sum_j P_ij (dout_i.v_j - dout_i.out_i) k_j), for both fa-plus on one GPU
  and the context-parallel result: ``err(cp) <= 2 * err(one GPU) + slack(bf16)``;
* dk, dv (every key sees every row, no cheap exact reference): ``max|cp - one GPU| <= 1e-2 * max|one GPU|``
  (bf16 has 8 mantissa bits: a different float32 summation order moves results by about one bf16 ulp);
* lse: ``max|cp - one GPU| <= 1e-3`` (float32 either way).

Launch from the repository root (PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-parallel/src):

    torchrun --standalone --nproc_per_node=2 packages/fa-parallel/tests/gpu_parallel_check.py
    python packages/fa-parallel/tests/gpu_parallel_check.py --spawn 2 --seqlens 32768 --quick

Exit code 0 when every configuration passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072], help="total sequence lengths")
    p.add_argument("--nheads", type=int, default=8)
    p.add_argument("--nheads-k", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--strategies", nargs="+", default=["ring", "allgather"])
    p.add_argument("--quick", action="store_true", help="causal only, plus one non-causal ring case")
    p.add_argument("--rows", type=int, default=64, help="query rows checked against the float32 reference")
    p.add_argument("--spawn", type=int, default=0, help="start this many ranks with mp.spawn (else torchrun)")
    p.add_argument(
        "--cpu", action="store_true", help="dry run of this script: gloo, float32, Triton interpreter"
    )
    return p.parse_args(argv)


def _configs(args: argparse.Namespace) -> list[dict]:
    out = []
    for s in args.seqlens:
        for causal in (True, False):
            for strategy in args.strategies:
                if args.quick and not causal and strategy != "ring":
                    continue
                out.append(dict(seqlen=s, causal=causal, strategy=strategy, nheads_k=args.nheads_k))
    # GQA once, at the smallest length
    out.append(
        dict(seqlen=min(args.seqlens), causal=True, strategy="ring", nheads_k=max(1, args.nheads // 4))
    )
    return out


def _rows_reference(q, k, v, dout, rows, causal, scale):
    """float32 out and dq of the sampled query rows (exact softmax over every key)."""
    group = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    qr, dor = q[:, rows].float(), dout[:, rows].float()
    s = torch.einsum("brhd,bshd->bhrs", qr * scale, kf)
    if causal:
        j = torch.arange(k.shape[1], device=q.device)
        s = s.masked_fill(j[None, None, None, :] > rows[None, None, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhrs,bshd->brhd", p, vf)
    dp = torch.einsum("brhd,bshd->bhrs", dor, vf)
    delta = (dor * out).sum(-1).transpose(1, 2)[..., None]  # (b, h, r, 1)
    dq = torch.einsum("bhrs,bshd->brhd", p * (dp - delta), kf) * scale
    return out, dq


def _sync(args: argparse.Namespace) -> None:
    if not args.cpu:
        torch.cuda.synchronize()


def _check_one(cfg: dict, args: argparse.Namespace, rank: int, world: int) -> tuple[bool, str]:
    from fa_backward import flash_attn_func
    from fa_core.testing import slack_for
    from fa_parallel import context_parallel_attn_func, shard_sequence
    from fa_parallel.comm import all_gather_seq

    s, causal, strategy, hk = cfg["seqlen"], cfg["causal"], cfg["strategy"], cfg["nheads_k"]
    b, h, d = 1, args.nheads, args.headdim
    dtype, dev = (torch.float32, torch.device("cpu")) if args.cpu else (torch.bfloat16, torch.device("cuda"))
    scale = d**-0.5
    shapes = [(b, s, h, d), (b, s, hk, d), (b, s, hk, d), (b, s, h, d)]
    if rank == 0:
        g = torch.Generator(device=dev).manual_seed(s + 7 * causal)
        glob = [torch.randn(sh, device=dev, dtype=dtype, generator=g) for sh in shapes]
    else:
        glob = [torch.empty(sh, device=dev, dtype=dtype) for sh in shapes]
    for t in glob:
        dist.broadcast(t, 0)
    q, k, v, dout = glob
    layout = "zigzag"
    ql, kl, vl = (shard_sequence(t, rank, world, layout).requires_grad_() for t in (q, k, v))
    dl = shard_sequence(dout, rank, world, layout)

    def cp_step():
        for t in (ql, kl, vl):
            t.grad = None
        o, l, _ = context_parallel_attn_func(
            ql, kl, vl, causal=causal, return_attn_probs=True, strategy=strategy, layout=layout
        )
        o.backward(dl)
        return o, l

    cp_step()  # compile / autotune
    _sync(args)
    dist.barrier()
    t0 = time.perf_counter()
    out_l, lse_l = cp_step()
    _sync(args)
    ms = (time.perf_counter() - t0) * 1e3
    gathered = [all_gather_seq(t.detach(), None, layout) for t in (out_l, ql.grad, kl.grad, vl.grad)]
    lse_cp = all_gather_seq(lse_l, None, layout, dim=2)
    msg = f"seqlen={s:>6} causal={causal!s:5} {strategy:9} nheads={h}/{hk}: cp fwd+bwd {ms:8.1f} ms"
    if rank != 0:
        return True, msg
    out_cp, dq_cp, dk_cp, dv_cp = gathered
    # one GPU, whole sequence
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out1, lse1, _ = flash_attn_func(qs, ks, vs, causal=causal, return_attn_probs=True)
    out1.backward(dout)
    rows = torch.linspace(0, s - 1, args.rows, device=dev).long()
    out_ref, dq_ref = _rows_reference(q, k, v, dout, rows, causal, scale)
    slack = slack_for(dtype)
    problems = []
    for name, cp, one, ref in (("out", out_cp, out1, out_ref), ("dq", dq_cp, qs.grad, dq_ref)):
        e_cp = (cp[:, rows].float() - ref).abs().max().item()
        e_one = (one[:, rows].float() - ref).abs().max().item()
        if not e_cp <= 2 * e_one + slack:
            problems.append(f"{name}: err {e_cp:.3e} > 2 x one-GPU err {e_one:.3e} + {slack}")
        msg += f" | {name} err {e_cp:.2e} (1 GPU {e_one:.2e})"
    for name, cp, one in (("dk", dk_cp, ks.grad), ("dv", dv_cp, vs.grad)):
        diff = (cp.float() - one.float()).abs().max().item()
        top = one.float().abs().max().item()
        if not diff <= 1e-2 * top:
            problems.append(f"{name}: max|cp - 1 GPU| {diff:.3e} > 1e-2 x {top:.3e}")
        msg += f" | {name} diff {diff / max(top, 1e-30):.1e} rel"
    lse_diff = (lse_cp - lse1).abs().max().item()
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
    failures = 0
    for cfg in _configs(args):
        ok, msg = _check_one(cfg, args, rank, world)
        flag = torch.tensor([0 if ok else 1], device=dev)
        dist.broadcast(flag, 0)  # rank 0 judges; every rank agrees on the verdict
        failures += int(flag.item())
        if rank == 0:
            print(("PASS " if ok else "FAIL ") + msg, flush=True)
        if not args.cpu:
            torch.cuda.empty_cache()
    if rank == 0:
        print(f"{failures} failing configuration(s) on {world} GPUs", flush=True)
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
