"""Ring attention: K/V shards travel around the ring while each rank attends its queries to the shard in hand.

Forward, step ``s`` on rank ``r``: the K/V of rank ``src = (r - s) mod W`` is in hand; the next shard is
already on its way (``batch_isend_irecv``) while the kernels run. Each step's partial result is merged into
float32 accumulators by its lse (:func:`fa_parallel.blocks.merge_partial`).

Backward: the same rotation of K/V, plus a float32 dK/dV accumulator that rides one hop behind: the
accumulator of shard ``src`` arrives from the previous rank while this rank computes its own contribution,
gets that contribution added, and moves on; after ``W`` hops it is back with its owner. Every block uses
the GLOBAL ``out`` and ``lse`` of the merged forward, which makes the per-block gradients exact pieces of
the full gradient (``P = exp(S - lse)`` is the global softmax restricted to the block, and ``delta =
rowsum(dout * out)`` is the global one). dQ is summed locally.

The order of every sum is fixed by the ring, and the kernels use no atomics: results are deterministic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fa_backward.backward import flash_attn_backward
from fa_parallel.blocks import BlockCall, Coverage, finalize, forward_calls, plan_chunks
from fa_parallel.comm import RingComm
from fa_parallel.sharding import local_chunks

__all__ = ["RingAttnFunc", "ring_backward", "ring_forward"]

_TAG_KV, _TAG_DKV = 0, 1


def _pack(*ts: torch.Tensor) -> torch.Tensor:
    """One flat buffer, so each hop is a single message."""
    return torch.cat([t.reshape(-1) for t in ts])


def _unpack(buf: torch.Tensor, like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    out, start = [], 0
    for t in like:
        out.append(buf[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def _step_calls(
    rank: int, src: int, world: int, seqlen: int, layout: str, left: int, right: int
) -> list[BlockCall]:
    return plan_chunks(
        local_chunks(rank, world, seqlen, layout), local_chunks(src, world, seqlen, layout), left, right
    )


def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    softmax_scale: float,
    left: int,
    right: int,
    softcap: float,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``(b, s, h, d)``, k, v ``(b, s, hk, d[v])`` local shards -> ``out (b, s, h, dv)`` in q's dtype and
    ``lse (b, h, s)`` float32 (+inf for rows that see no key)."""
    comm = RingComm(group)
    rank, world = comm.rank, comm.world_size
    b, s, h, _ = q.shape
    out_acc = torch.zeros(b, s, h, v.shape[-1], dtype=torch.float32, device=q.device)
    lse_acc = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)
    coverage = Coverage()  # the first result of a row is copied into the accumulators, not merged
    if world == 1:
        kv = None
    else:
        kv = _pack(k, v)
        spare = torch.empty_like(kv)
    for step in range(world):
        # the next shard is on its way (NCCL runs it on its own stream) before the kernels of this step start
        reqs = comm.exchange(kv, spare, _TAG_KV) if kv is not None and step + 1 < world else []
        kk, vv = (k, v) if kv is None else _unpack(kv, (k, v))
        calls = _step_calls(rank, (rank - step) % world, world, s, layout, left, right)
        forward_calls(q, kk, vv, calls, out_acc, lse_acc, softmax_scale, softcap, coverage)
        if reqs:
            comm.wait(reqs)
            kv, spare = spare, kv
    return finalize(out_acc, lse_acc, q.dtype)


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    group: dist.ProcessGroup | None,
    softmax_scale: float,
    left: int,
    right: int,
    softcap: float,
    layout: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the local shards: ``dq`` like q, ``dk``, ``dv`` like k, v."""
    comm = RingComm(group)
    rank, world = comm.rank, comm.world_size
    s = q.shape[1]
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if world == 1:
        kv = None
        numel = k.numel() + v.numel()
    else:
        kv = _pack(k, v)
        kv_spare = torch.empty_like(kv)
        numel = kv.numel()
    # dK/dV of the shard in hand, float32, one flat buffer (one message per hop). Three buffers take turns:
    # ``local`` (this step's sums), ``recv`` (the travelling accumulator arriving), and the one sent at the
    # previous step, which becomes the next ``local`` once its send is complete (no copy before sending).
    dkv_local = torch.zeros(numel, dtype=torch.float32, device=q.device)
    dkv_recv = torch.empty_like(dkv_local) if world > 1 else dkv_local
    dkv_free = torch.empty_like(dkv_local) if world > 1 else dkv_local
    dkv_reqs: list = []
    # per-call kernel outputs (the kernels write, not accumulate)
    dq_blk, dk_blk, dv_blk = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for step in range(world):
        kv_reqs = comm.exchange(kv, kv_spare, _TAG_KV) if kv is not None and step + 1 < world else []
        kk, vv = (k, v) if kv is None else _unpack(kv, (k, v))
        dkk, dvv = _unpack(dkv_local, (k, v))
        for c in _step_calls(rank, (rank - step) % world, world, s, layout, left, right):
            nq, nk = c.q1 - c.q0, c.k1 - c.k0
            dq_c, dk_c, dv_c = dq_blk[:, :nq], dk_blk[:, :nk], dv_blk[:, :nk]
            flash_attn_backward(
                dout[:, c.q0 : c.q1], q[:, c.q0 : c.q1], kk[:, c.k0 : c.k1], vv[:, c.k0 : c.k1],
                out[:, c.q0 : c.q1], lse[:, :, c.q0 : c.q1], dq_c, dk_c, dv_c,
                softmax_scale=softmax_scale, causal=c.causal, window_size_left=c.window[0],
                window_size_right=c.window[1], softcap=softcap, deterministic=deterministic,
            )  # fmt: skip
            dq_acc[:, c.q0 : c.q1] += dq_c
            dkk[:, c.k0 : c.k1] += dk_c
            dvv[:, c.k0 : c.k1] += dv_c
        if world == 1:
            break
        if step > 0:
            # the accumulator of this shard, from the ranks it visited before; its hop overlapped our kernels.
            # The wait also completes the previous send, so that buffer is free again.
            comm.wait(dkv_reqs)
            dkv_local += dkv_recv
        # after the last step this hop brings every accumulator home (src of step W-1 is rank + 1)
        dkv_reqs = comm.exchange(dkv_local, dkv_recv, _TAG_DKV)
        if step + 1 < world:
            dkv_local, dkv_free = dkv_free, dkv_local
            dkv_local.zero_()
        if kv_reqs:
            comm.wait(kv_reqs)
            kv, kv_spare = kv_spare, kv
    if world > 1:
        comm.wait(dkv_reqs)
        dkv_local = dkv_recv
    dk, dv = _unpack(dkv_local, (k, v))
    return dq_acc.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttnFunc(torch.autograd.Function):
    """Differentiable ring attention over a process group (see :func:`fa_parallel.context_parallel_attn_func`)."""

    @staticmethod
    def forward(ctx, q, k, v, group, softmax_scale, left, right, softcap, layout, deterministic):
        out, lse = ring_forward(q, k, v, group, softmax_scale, left, right, softcap, layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, softmax_scale, left, right, softcap, layout, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None
