"""All-gather attention (the Llama 3 recipe): gather the whole K/V, attend the local queries to it.

One all-gather per pass instead of ``W - 1`` hops; each local q chunk needs exactly one kernel call (no
partial results to merge), and the planner (:func:`fa_parallel.blocks.plan_block`) trims the keys the
chunk cannot see. The backward re-gathers K/V (nothing of size ``S`` is kept between the passes), computes
the full-length dK/dV contributions of the local queries, and reduce-scatters them to their owners.

Varlen (packed documents, ``cu_seqlens`` over the global sequence), contiguous layout: a rank's queries meet
only the documents they belong to, which are contiguous in the gathered K/V. Per-document zig-zag layout
(:mod:`fa_parallel.documents`, balanced): the local queries, reordered "first chunks, then second chunks",
need two varlen calls whose key segments are the documents of the gathered K/V (``cu_seqlens_k`` = the
global ``cu_seqlens``) cut by ``seqused_k`` at each chunk's end (bottom-right aligned: exactly the causal
keys of the chunk).
"""

from __future__ import annotations

import torch

from fa_backward.backward import flash_attn_backward, flash_attn_varlen_backward
from fa_core.forward import flash_attn_forward, flash_attn_varlen_forward
from fa_parallel.blocks import INF, BlockCall, plan_block
from fa_parallel.comm import (
    all_gather_documents,
    all_gather_seq,
    group_info,
    reduce_scatter_documents,
    reduce_scatter_seq,
)
from fa_parallel.documents import DocumentSharding
from fa_parallel.sharding import local_chunks

__all__ = [
    "AllGatherAttnFunc",
    "AllGatherDocumentsAttnFunc",
    "AllGatherVarlenAttnFunc",
    "VarlenPlan",
    "varlen_plan",
]


def _calls(rank: int, world: int, seqlen: int, layout: str, left: int, right: int) -> list[BlockCall]:
    calls = []
    for ch in local_chunks(rank, world, seqlen, layout):
        c = plan_block(ch.start, ch.length, 0, world * seqlen, left, right)
        if c is not None:
            calls.append(BlockCall(c.q0 + ch.local, c.q1 + ch.local, c.k0, c.k1, c.causal, c.window))
    return calls


class AllGatherAttnFunc(torch.autograd.Function):
    """Differentiable all-gather context-parallel attention on dense ``(b, s_local, h, d)`` shards."""

    @staticmethod
    def forward(ctx, q, k, v, group, softmax_scale, left, right, softcap, layout, deterministic):
        rank, world = group_info(group)
        b, s, h, _ = q.shape
        kg, vg = all_gather_seq(k, group, layout), all_gather_seq(v, group, layout)
        # rows no call covers see no key: out 0, lse +inf (the kernels' convention)
        out = torch.zeros(b, s, h, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full((b, h, s), float("inf"), dtype=torch.float32, device=q.device)
        for c in _calls(rank, world, s, layout, left, right):
            res = flash_attn_forward(
                q[:, c.q0 : c.q1], kg[:, c.k0 : c.k1], vg[:, c.k0 : c.k1], softmax_scale=softmax_scale,
                causal=c.causal, window_size=c.window, softcap=softcap, out=out[:, c.q0 : c.q1],
            )  # fmt: skip
            lse[:, :, c.q0 : c.q1] = res.lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, softmax_scale, left, right, softcap, layout, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, softmax_scale, left, right, softcap, layout, deterministic = ctx.args
        rank, world = group_info(group)
        s = q.shape[1]
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        kg, vg = all_gather_seq(k, group, layout), all_gather_seq(v, group, layout)
        dq = torch.zeros_like(q)
        dkg = torch.zeros(kg.shape, dtype=torch.float32, device=q.device)
        dvg = torch.zeros(vg.shape, dtype=torch.float32, device=q.device)
        for c in _calls(rank, world, s, layout, left, right):
            res = flash_attn_backward(
                dout[:, c.q0 : c.q1], q[:, c.q0 : c.q1], kg[:, c.k0 : c.k1], vg[:, c.k0 : c.k1],
                out[:, c.q0 : c.q1], lse[:, :, c.q0 : c.q1], dq[:, c.q0 : c.q1], None, None,
                softmax_scale=softmax_scale, causal=c.causal, window_size_left=c.window[0],
                window_size_right=c.window[1], softcap=softcap, deterministic=deterministic,
            )  # fmt: skip
            dkg[:, c.k0 : c.k1] += res.dk
            dvg[:, c.k0 : c.k1] += res.dv
        dk = reduce_scatter_seq(dkg, group, layout).to(k.dtype)
        dv = reduce_scatter_seq(dvg, group, layout).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------- varlen


class VarlenPlan(dict):
    """Host-side plan of one rank's varlen call (built once per forward from ``cu_seqlens``).

    Keys: ``q0, q1`` local rows covered by a document; ``k0, k1`` the gathered keys they may see;
    ``cu_q, cu_k`` int32 prefix sums of the local pieces; ``max_q, max_k``.
    """


def varlen_plan(
    cu_seqlens: list[int], rank: int, total_local: int, causal_like: bool, device: torch.device
) -> VarlenPlan | None:
    """Cut the documents ``cu_seqlens`` (global prefix sums) down to the rows of rank ``rank``.

    Causal (``causal_like``): a document's keys end at the rank's last row inside it, so its pieces stay
    bottom-right aligned (the kernel's diagonal is then the global one). Otherwise each document's keys are
    all of it. Either way the pieces of consecutive documents are consecutive in the gathered K/V.
    """
    lo, hi = rank * total_local, (rank + 1) * total_local
    cu_q, cu_k = [0], [0]
    q0: int | None = None
    k0 = 0
    for b in range(len(cu_seqlens) - 1):
        start, end = cu_seqlens[b], cu_seqlens[b + 1]
        qs, qe = max(start, lo), min(end, hi)
        if qs >= qe:
            continue
        if q0 is None:
            q0, k0 = qs, start
        ke = qe if causal_like else end
        cu_q.append(cu_q[-1] + qe - qs)
        cu_k.append(ke - k0)
    if q0 is None:
        return None

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32, device=device)

    return VarlenPlan(
        q0=q0 - lo,
        q1=q0 - lo + cu_q[-1],
        k0=k0,
        k1=k0 + cu_k[-1],
        cu_q=t(cu_q),
        cu_k=t(cu_k),
        max_q=max(b - a for a, b in zip(cu_q, cu_q[1:])),
        max_k=max(b - a for a, b in zip(cu_k, cu_k[1:])),
    )


def check_varlen_window(left: int, right: int) -> bool:
    """True when the varlen path is causal-like; raises for the windows it cannot express."""
    if right == 0:
        return True
    if left == INF and right == INF:
        return False
    raise NotImplementedError(
        "context-parallel varlen supports window_size (-1, -1), causal, and (left, 0) windows; "
        f"got the band [-{left}, {right}]"
    )


class AllGatherVarlenAttnFunc(torch.autograd.Function):
    """Differentiable all-gather attention on packed ``(total_local, h, d)`` contiguous shards."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, group, softmax_scale, left, right, softcap, deterministic):
        rank, world = group_info(group)
        n, h, _ = q.shape
        causal_like = check_varlen_window(left, right)
        plan = varlen_plan([int(x) for x in cu_seqlens.tolist()], rank, n, causal_like, q.device)
        out = torch.zeros(n, h, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full((h, n), float("inf"), dtype=torch.float32, device=q.device)
        if plan is not None:
            kg = all_gather_seq(k, group, "contiguous", dim=0)
            vg = all_gather_seq(v, group, "contiguous", dim=0)
            window = (left if left != INF else -1, 0 if causal_like else -1)
            res = flash_attn_varlen_forward(
                q[plan["q0"] : plan["q1"]], kg[plan["k0"] : plan["k1"]], vg[plan["k0"] : plan["k1"]],
                plan["cu_q"], plan["cu_k"], plan["max_q"], plan["max_k"], softmax_scale=softmax_scale,
                window_size=window, softcap=softcap, out=out[plan["q0"] : plan["q1"]],
            )  # fmt: skip
            lse[:, plan["q0"] : plan["q1"]] = res.lse
        else:
            # the collectives must still match across ranks
            all_gather_seq(k, group, "contiguous", dim=0)
            all_gather_seq(v, group, "contiguous", dim=0)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.args = (group, softmax_scale, left, causal_like, softcap, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, softmax_scale, left, causal_like, softcap, deterministic = ctx.args
        plan = ctx.plan
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        kg = all_gather_seq(k, group, "contiguous", dim=0)
        vg = all_gather_seq(v, group, "contiguous", dim=0)
        dq = torch.zeros_like(q)
        dkg = torch.zeros(kg.shape, dtype=torch.float32, device=q.device)
        dvg = torch.zeros(vg.shape, dtype=torch.float32, device=q.device)
        if plan is not None:
            q0, q1, k0, k1 = plan["q0"], plan["q1"], plan["k0"], plan["k1"]
            res = flash_attn_varlen_backward(
                dout[q0:q1], q[q0:q1], kg[k0:k1], vg[k0:k1], out[q0:q1], lse[:, q0:q1], dq[q0:q1], None, None,
                plan["cu_q"], plan["cu_k"], plan["max_q"], plan["max_k"], softmax_scale=softmax_scale,
                window_size_left=left if left != INF else -1, window_size_right=0 if causal_like else -1,
                softcap=softcap, deterministic=deterministic,
            )  # fmt: skip
            dkg[k0:k1] += res.dk
            dvg[k0:k1] += res.dv
        dk = reduce_scatter_seq(dkg, group, "contiguous", dim=0).to(k.dtype)
        dv = reduce_scatter_seq(dvg, group, "contiguous", dim=0).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None


def _document_calls(layout: DocumentSharding, rank: int, causal_like: bool):
    """The two varlen calls of a rank: ``(local rows [r0, r1) in the first/second-chunk order, cu_q,
    seqused_k)``; empty ones are dropped. ``seqused_k`` = chunk end (causal) or the document length."""
    loc = layout.local(rank)
    doc_len = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).to(torch.int32)
    spans = ((0, loc.n_first), (loc.n_first, loc.n))
    calls = []
    for j, (r0, r1) in enumerate(spans):
        if r1 > r0:
            calls.append((r0, r1, loc.cu_q[j], loc.kv_end[j] if causal_like else doc_len))
    return loc, calls


class AllGatherDocumentsAttnFunc(torch.autograd.Function):
    """Differentiable all-gather attention on per-document zig-zag shards ``(n_local, h, d)``
    (:func:`fa_parallel.documents.document_sharding`); dK/dV reduce-scattered back in that layout."""

    @staticmethod
    def forward(ctx, q, k, v, layout, group, softmax_scale, left, right, softcap, deterministic):
        rank, _ = group_info(group)
        n, h, _ = q.shape
        causal_like = check_varlen_window(left, right)
        loc, calls = _document_calls(layout, rank, causal_like)
        perm = loc.perm.to(q.device)
        kg, vg = all_gather_documents(k, group, layout), all_gather_documents(v, group, layout)
        cu_k = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)
        qp = q.index_select(0, perm)
        outp = torch.zeros(n, h, v.shape[-1], dtype=q.dtype, device=q.device)
        lsep = torch.full((h, n), float("inf"), dtype=torch.float32, device=q.device)
        window = (left if left != INF else -1, 0 if causal_like else -1)
        for r0, r1, cu_q, used in calls:
            res = flash_attn_varlen_forward(
                qp[r0:r1], kg, vg, cu_q.to(q.device), cu_k, layout.max_chunk, layout.max_doc,
                softmax_scale=softmax_scale, window_size=window, softcap=softcap, seqused_k=used.to(q.device),
                out=outp[r0:r1],
            )  # fmt: skip
            lsep[:, r0:r1] = res.lse
        inv = loc.inv_perm.to(q.device)
        out, lse = outp.index_select(0, inv), lsep.index_select(1, inv)
        ctx.save_for_backward(qp, k, v, outp, lsep)
        ctx.plan = (layout, loc, calls)
        ctx.args = (group, softmax_scale, left, causal_like, softcap, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        qp, k, v, outp, lsep = ctx.saved_tensors
        group, softmax_scale, left, causal_like, softcap, deterministic = ctx.args
        layout, loc, calls = ctx.plan
        doutp = dout.index_select(0, loc.perm.to(dout.device))
        kg, vg = all_gather_documents(k, group, layout), all_gather_documents(v, group, layout)
        cu_k = layout.cu_seqlens.to(device=qp.device, dtype=torch.int32)
        dqp = torch.zeros_like(qp)
        dkg = torch.zeros(kg.shape, dtype=torch.float32, device=qp.device)
        dvg = torch.zeros(vg.shape, dtype=torch.float32, device=qp.device)
        for r0, r1, cu_q, used in calls:
            res = flash_attn_varlen_backward(
                doutp[r0:r1], qp[r0:r1], kg, vg, outp[r0:r1], lsep[:, r0:r1], dqp[r0:r1], None, None,
                cu_q.to(qp.device), cu_k, layout.max_chunk, layout.max_doc, softmax_scale=softmax_scale,
                window_size_left=left if left != INF else -1, window_size_right=0 if causal_like else -1,
                softcap=softcap, deterministic=deterministic, seqused_k=used.to(qp.device),
            )  # fmt: skip
            dkg += res.dk
            dvg += res.dv
        dq = dqp.index_select(0, loc.inv_perm.to(qp.device))
        dk = reduce_scatter_documents(dkg, group, layout).to(k.dtype)
        dv = reduce_scatter_documents(dvg, group, layout).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None
