"""Cascade (shared-prefix) decode: attend a prompt prefix shared by many requests once per group.

Requests forked from one prompt (parallel sampling, beam search, a common system prompt) share its KV pages.
A plain decode step reads those pages once per request; :func:`cascade_decode` reads them once per *group*,
the two-level scheme of FlashInfer's ``MultiLevelCascadeAttentionWrapper`` and vLLM's cascade attention:

1. **prefix** (level 0): the queries of all the requests of a group are packed as the query rows of one
   sequence and attend, non-causally, to the group's prefix pages: every prefix key is visible to every
   request's query (it precedes all of them). One :func:`fa_kvcache.flash_attn_with_kvcache` call over the
   ``num_groups`` prefixes (GQA heads packed by the kernel as in any decode; split-KV when the grid is small).
2. **suffix** (level 1): each request attends to its own pages (the tokens after the prefix, new k/v appended
   there first), causal as usual when ``seqlen_q > 1``: one more ``flash_attn_with_kvcache`` call. The prefix
   call runs first and writes no cache, so a bad argument of either call is refused before anything is
   written.
3. the two partial results are combined with their lse by :func:`fa_kvcache.merge.merge_attention_states`
   (one fused kernel), written in place into the suffix call's output.

The result equals ``flash_attn_with_kvcache`` over the full context (prefix pages then the request's pages in
one block table) up to rounding: softmax scale and softcap act on each score, so splitting the keys in two and
merging with the lse is exact. What would not be exact is refused with an error: a left sliding window (it
can end inside the prefix), ALiBi (its bias depends on the query's position relative to each key, which the
packed prefix call does not see), rotary (positions are relative to the full context: rotate q and the new k
before the call). With ``causal`` (or a right window) and ``seqlen_q > 1`` every query row must see the whole
prefix, i.e. each request's suffix (after the append) holds at least ``seqlen_q - 1`` (``- right``) tokens,
checked on the host when value checks are on. A ``learnable_sink`` is counted once (in the prefix call).

The layout of a step -- which requests form which group, the prefix and suffix block tables and lengths -- is a
:class:`CascadePlan`, built on the host (:meth:`CascadePlan.build`, or :func:`cascade_plan_from_cache` from a
:class:`fa_kvcache.PagedKVCache` whose sequences were forked from common parents). Its tensors stay valid as
long as the batch composition does; update ``cache_seqlens`` / block tables in place between CUDA-graph
replays. When the groups are contiguous in the batch and of equal size (one prompt sampled ``n`` times, a
batch of such prompts) no query or output is copied: the packed prefix queries are a view of ``q``;
otherwise the queries are gathered into ``group_size`` slots per group (padding slots are computed and
dropped) and the prefix results gathered back.

Measured: ``bench/bench_serving.py`` (``bench/results/<gpu>-serving.md``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from fa_kvcache.cache_manager import PagedKVCache
from fa_kvcache.interface import flash_attn_with_kvcache, kvcache_value_checks_enabled
from fa_kvcache.merge import merge_attention_states

__all__ = ["CascadePlan", "cascade_decode", "cascade_plan_from_cache"]


def _int_list(name: str, x: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise FlashAttnValueError(
                f"{name} must be a 1-D integer sequence, got {x.dtype} {tuple(x.shape)}"
            )
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


@dataclass(frozen=True)
class CascadePlan:
    """Layout of a cascade decode step (build with :meth:`build` or :func:`cascade_plan_from_cache`).

    Attributes:
        prefix_block_table: ``(num_groups, max_prefix_blocks)`` int32 pages of each group's prefix, or None
            when the prefix cache is contiguous ``(num_groups, seqlen, nheads_k, headdim)``.
        prefix_lens: ``(num_groups,)`` int32 prefix tokens of each group (0: no shared prefix).
        block_table: ``(batch, max_blocks)`` int32 pages of each request's own tokens (its suffix), or None
            for a contiguous suffix cache ``(batch, seqlen, nheads_k, headdim)``.
        cache_seqlens: ``(batch,)`` int32 suffix tokens of each request already in the cache (new k/v passed to
            :func:`cascade_decode` are appended after them).
        group_size: query slots per group in the packed prefix call (the largest group's request count).
        request_group, request_rank: ``(batch,)`` int64 group of each request and its slot in the group; None
            when request ``b`` is slot ``b % group_size`` of group ``b // group_size`` (contiguous equal
            groups: no gather).
        slot_request: ``(num_groups * group_size,)`` int64 request whose query fills each slot (padding slots
            repeat a request of the batch); None with the contiguous layout.
    """

    prefix_block_table: torch.Tensor | None
    prefix_lens: torch.Tensor
    block_table: torch.Tensor | None
    cache_seqlens: torch.Tensor
    group_size: int
    request_group: torch.Tensor | None = None
    request_rank: torch.Tensor | None = None
    slot_request: torch.Tensor | None = None

    @property
    def num_groups(self) -> int:
        return int(self.prefix_lens.shape[0])

    @property
    def batch(self) -> int:
        return int(self.cache_seqlens.shape[0])

    @classmethod
    def build(
        cls,
        request_group: Sequence[int] | torch.Tensor,
        prefix_block_table: torch.Tensor | None,
        prefix_lens: torch.Tensor,
        block_table: torch.Tensor | None,
        cache_seqlens: torch.Tensor,
    ) -> CascadePlan:
        """Plan from explicit tables.

        Args:
            request_group: ``batch`` ints, the group (row of ``prefix_lens``) of each request; read on the host
                (a device tensor is copied to the host once).
            prefix_block_table: ``(num_groups, max_prefix_blocks)`` int32, or None (contiguous prefix cache).
            prefix_lens: ``(num_groups,)`` int32.
            block_table: ``(batch, max_blocks)`` int32 suffix pages, or None (contiguous suffix cache).
            cache_seqlens: ``(batch,)`` int32 suffix lengths.
        """
        groups = _int_list("request_group", request_group)
        prefix_lens = V.check_tensor("prefix_lens", prefix_lens, 1)
        cache_seqlens = V.check_tensor("cache_seqlens", cache_seqlens, 1)
        num_groups, batch = prefix_lens.shape[0], cache_seqlens.shape[0]
        for name, t in (("prefix_lens", prefix_lens), ("cache_seqlens", cache_seqlens)):
            if t.dtype != torch.int32:
                raise TypeError(f"{name} must be int32, got {t.dtype}")
        if len(groups) != batch:
            raise FlashAttnValueError(f"request_group has {len(groups)} entries, cache_seqlens {batch}")
        tables: tuple[tuple[str, torch.Tensor | None, int], ...] = (
            ("prefix_block_table", prefix_block_table, num_groups),
            ("block_table", block_table, batch),
        )
        for name, bt, rows in tables:
            if bt is not None:
                V.check_tensor(name, bt, 2)
                if bt.dtype != torch.int32:
                    raise TypeError(f"{name} must be int32, got {bt.dtype}")
                if bt.shape[0] != rows:
                    raise FlashAttnValueError(f"{name} has {bt.shape[0]} rows, expected {rows}")
                V.check_device(name, bt, "cache_seqlens", cache_seqlens)
        V.check_device("prefix_lens", prefix_lens, "cache_seqlens", cache_seqlens)
        bad = [g for g in groups if not 0 <= g < num_groups]
        if bad:
            raise FlashAttnValueError(f"request_group values must be in [0, {num_groups}), got {bad[0]}")
        counts = [0] * num_groups
        ranks = []
        for g in groups:
            ranks.append(counts[g])
            counts[g] += 1
        size = max(counts, default=1) or 1
        if all(g == b // size for b, g in enumerate(groups)) and batch == num_groups * size:
            return cls(prefix_block_table, prefix_lens, block_table, cache_seqlens, size)
        slots = [0] * (num_groups * size)  # padding slots: request 0 (computed, then dropped)
        for b, (g, r) in enumerate(zip(groups, ranks)):
            slots[g * size + r] = b
        dev = cache_seqlens.device

        def as_long(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64).to(dev)

        return cls(
            prefix_block_table,
            prefix_lens,
            block_table,
            cache_seqlens,
            size,
            as_long(groups),
            as_long(ranks),
            as_long(slots),
        )


def cascade_plan_from_cache(
    cache: PagedKVCache,
    seq_ids: Sequence[Hashable],
    groups: Sequence[int] | None = None,
    *,
    num_new: int = 0,
    width: int | None = None,
    prefix_width: int | None = None,
) -> CascadePlan:
    """A :class:`CascadePlan` for sequences of a :class:`fa_kvcache.PagedKVCache` (read through its public
    methods ``blocks_of`` / ``seq_len`` / ``refcount``; the cache is not changed).

    Args:
        cache: the paged cache; prefix and suffix pages both live in ``cache.k_cache`` / ``cache.v_cache``.
        seq_ids: the requests of the step, in batch order (the order of q's rows).
        groups: optional group id of each request (any ints; groups are numbered by first appearance). Default:
            requests whose first page is the same shared page form a group (sequences forked from one parent).
        num_new: tokens the step appends (after :meth:`PagedKVCache.prepare_append` with the same count): the
            plan's ``cache_seqlens`` are the suffix lengths before them, and no page they write is in a prefix.
        width, prefix_width: fixed widths of the suffix / prefix block tables (CUDA graphs); default: the
            longest list.

    A group's prefix is the run of leading pages that every member lists (the same page ids: shared, never
    copied) and that are full for every member before the append; each request's suffix is the rest of its
    pages. A group of one request, or with no common full page, gets an empty prefix (all its pages are suffix).
    """
    ids = list(seq_ids)
    if len(set(ids)) != len(ids):
        raise FlashAttnValueError("seq_ids must be distinct")
    if num_new < 0:
        raise FlashAttnValueError(f"num_new must be >= 0, got {num_new}")
    page = cache.page_size
    blocks = [list(cache.blocks_of(s)) for s in ids]
    lens = [cache.seq_len(s) - num_new for s in ids]
    if any(n < 0 for n in lens):
        raise FlashAttnValueError(f"num_new ({num_new}) is more than a sequence's length")
    if groups is None:
        keys: list[object] = [
            ("page", bl[0]) if bl and cache.refcount(bl[0]) > 1 else ("alone", b)
            for b, bl in enumerate(blocks)
        ]
    else:
        keys = list(groups)
        if len(keys) != len(ids):
            raise FlashAttnValueError(f"groups has {len(keys)} entries, seq_ids {len(ids)}")
    gid: dict[object, int] = {}
    request_group = [gid.setdefault(k, len(gid)) for k in keys]
    members: list[list[int]] = [[] for _ in gid]
    for b, g in enumerate(request_group):
        members[g].append(b)
    prefix_blocks: list[list[int]] = []
    for mem in members:
        n = min(lens[b] // page for b in mem)  # pages full before the append, for every member
        first = blocks[mem[0]]
        n = min(n, len(first))
        for b in mem[1:]:
            k = 0
            while k < n and blocks[b][k] == first[k]:
                k += 1
            n = k
        prefix_blocks.append(first[:n] if len(mem) > 1 else [])
    suffix = [blocks[b][len(prefix_blocks[g]) :] for b, g in enumerate(request_group)]
    suffix_lens = [lens[b] - len(prefix_blocks[g]) * page for b, g in enumerate(request_group)]
    dev = cache.k_cache.device

    def table(rows: list[list[int]], w: int | None, name: str) -> torch.Tensor:
        need = max((len(r) for r in rows), default=0)
        w = max(need, 1) if w is None else w
        if need > w:
            raise FlashAttnValueError(f"{name} ({w}) is less than the {need} pages of a row")
        return (
            torch.tensor([r + [0] * (w - len(r)) for r in rows], dtype=torch.int32)
            .reshape(len(rows), w)
            .to(dev)
        )

    def ints(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32).to(dev)

    return CascadePlan.build(
        request_group,
        table(prefix_blocks, prefix_width, "prefix_width"),
        ints([len(p) * page for p in prefix_blocks]),
        table(suffix, width, "width"),
        ints(suffix_lens),
    )


def cascade_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: CascadePlan,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    prefix_k_cache: torch.Tensor | None = None,
    prefix_v_cache: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    prefix_num_splits: int = 0,
    return_softmax_lse: bool = False,
    learnable_sink: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode / chunked-prefill attention of requests that share per-group prefixes (see the module docstring).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, already rotated if the model uses rotary embeddings.
        k_cache, v_cache: the suffix cache, paged ``(num_blocks, page_size, nheads_k, headdim[_v])`` with
            ``plan.block_table``, or contiguous ``(batch_cache, seqlen_cache, ...)`` without.
        plan: the step's :class:`CascadePlan`.
        k, v: optional new tokens ``(batch, seqlen_new, nheads_k, headdim[_v])`` appended to each request's
            suffix at ``plan.cache_seqlens`` before attending (rotated already).
        prefix_k_cache, prefix_v_cache: the prefix cache; default ``k_cache`` / ``v_cache`` (one page pool).
            Paged with ``plan.prefix_block_table``, or contiguous ``(num_groups, seqlen, ...)`` without.
        softmax_scale, causal, softcap, num_splits: as in :func:`fa_kvcache.flash_attn_with_kvcache`; causal
            applies to the suffix (the prefix precedes every query). ``prefix_num_splits``: the prefix call's.
        window_size: ``(-1, right)`` only; a left window raises (not exact through a shared prefix).
        alibi_slopes: must be None (raises: not exact through the packed prefix call).
        return_softmax_lse: also return the lse ``(batch, nheads, seqlen_q)`` float32 of the full context.
        learnable_sink: ``(nheads,)`` logits, counted once in every row's denominator.

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)``, or ``(out, lse)``: equal up to rounding to
        ``flash_attn_with_kvcache`` over each request's prefix pages followed by its suffix pages.
    """
    V.check_tensor("q", q, 4)
    if not isinstance(plan, CascadePlan):
        raise TypeError(f"plan must be a CascadePlan, got {type(plan).__name__}")
    batch, seqlen_q, nheads, d = q.shape
    if plan.batch != batch:
        raise FlashAttnValueError(f"plan holds {plan.batch} requests but q has batch {batch}")
    if alibi_slopes is not None:
        raise FlashAttnValueError(
            "alibi_slopes: not supported by cascade_decode (the packed prefix call cannot give each request's "
            "query its own key distances); use flash_attn_with_kvcache over the full context"
        )
    left, right = V.window_pair(window_size)
    if left >= 0:
        raise FlashAttnValueError(
            f"window_size {window_size}: a left window can end inside the shared prefix, which cascade_decode "
            "attends in full; use flash_attn_with_kvcache over the full context"
        )
    pk = k_cache if prefix_k_cache is None else prefix_k_cache
    pv = v_cache if prefix_v_cache is None else prefix_v_cache
    V.check_tensor("prefix_k_cache", pk, 4)
    V.check_tensor("prefix_v_cache", pv, 4)
    seqlen_new = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else 0
    reach = 0 if causal else right  # rows see keys up to their diagonal + reach (-1: all)
    if reach >= 0 and batch > 0 and seqlen_q - 1 - reach > 0 and kvcache_value_checks_enabled(q):
        short = int(plan.cache_seqlens.min()) + seqlen_new
        if short < seqlen_q - 1 - reach:
            raise FlashAttnValueError(
                f"cache_seqlens: a request's suffix holds {short} tokens (after the append); with causal / a "
                f"right window and seqlen_q {seqlen_q} each needs >= {seqlen_q - 1 - reach} so that every query "
                "row sees the whole prefix"
            )

    # level 0 first (it writes no cache: a bad prefix argument is refused before the suffix call appends):
    # each group's prefix once, its requests' queries packed as the rows of one sequence
    groups, size = plan.num_groups, plan.group_size
    if batch == 0 or seqlen_q == 0 or nheads == 0:
        qp = q.new_empty(groups, 0, nheads, d)
    elif plan.slot_request is None:
        qp = q.reshape(groups, size * seqlen_q, nheads, d)
    else:
        qp = q.index_select(0, plan.slot_request).view(groups, size * seqlen_q, nheads, d)
    try:
        out_p, lse_p = flash_attn_with_kvcache(
            qp,
            pk,
            pv,
            cache_seqlens=plan.prefix_lens,
            block_table=plan.prefix_block_table,
            softmax_scale=softmax_scale,
            causal=False,
            softcap=softcap,
            num_splits=prefix_num_splits,
            return_softmax_lse=True,
            learnable_sink=learnable_sink,
        )
    except FlashAttnValueError as exc:
        raise FlashAttnValueError(
            f"prefix attention (q packed per group; plan.prefix_lens / plan.prefix_block_table / "
            f"prefix_k_cache / prefix_v_cache): {exc}"
        ) from exc

    # level 1: each request's own pages (appends k / v first)
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k,
        v,
        cache_seqlens=plan.cache_seqlens,
        block_table=plan.block_table,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        num_splits=num_splits,
        return_softmax_lse=True,
    )
    if out.numel() == 0:
        return (out, lse) if return_softmax_lse else out

    dv = out.shape[-1]
    if plan.request_group is None:
        # slot layout == batch layout: merge through (group, rank) views, no copy
        oa = out_p.view(groups, size, seqlen_q, nheads, dv)
        la = lse_p.view(groups, nheads, size, seqlen_q).transpose(1, 2)
        ob = out.view(groups, size, seqlen_q, nheads, dv)
        lb = lse.view(groups, size, nheads, seqlen_q)
        merge_attention_states(oa, la, ob, lb, out=ob, out_lse=lb)
    else:
        g, r = plan.request_group, plan.request_rank
        oa = out_p.view(groups, size, seqlen_q, nheads, dv)[g, r]
        la = lse_p.view(groups, nheads, size, seqlen_q)[g, :, r]
        merge_attention_states(oa, la, out, lse, out=out, out_lse=lse)
    return (out, lse) if return_softmax_lse else out
