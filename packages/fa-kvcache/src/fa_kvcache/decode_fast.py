"""The steady decode step of :func:`fa_kvcache.interface.flash_attn_with_kvcache`, planned once per signature.

A call without new k/v, rotary, cache_batch_idx, left padding, ALiBi or sink (one decode step of a serving
loop) takes :func:`_decode_fast`: what follows from its signature (shapes, strides, dtypes, devices, scalar
options) is derived once (:func:`_build_fast`: the full shape checks, the plan, the grids and every constant
launch argument) and read back on later calls; its only value check is one host copy of ``cache_seqlens`` (the
check kernel for a paged cache); its split partials share one allocation (:func:`_split_workspace`); and on a
GPU its launches are recorded once and replayed with each call's tensors (:class:`fa_core.fast_launch.Replay`).
Errors are never cached: a signature is stored only after its checks passed.

The planning functions and launchers are read from :mod:`fa_kvcache.interface` at call time (``_ki.<name>``),
so that what tests and tools patch there (planning constants, launch spies) applies here too.
"""

from __future__ import annotations

from typing import Any

import torch

from fa_core import validation as V
from fa_core.fast_launch import Replay, empty_arg, record
from fa_core.masking import has_window_left, normalize_window
from fa_kvcache import interface as _ki
from fa_kvcache.checks import cache_capacity, kvcache_value_checks_enabled, validate, value_checks

__all__ = ["decode_fast"]


def _split_workspace(rows: int, dv: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_part, lse_part)`` of the split-KV kernel for ``rows = splits * batch * seqlen_q * nheads`` partial
    rows, in one float32 allocation on ``like``'s device: ``lse_part`` its first ``rows`` floats, ``out_part``
    (``rows * dv`` floats, row-major) from the next 128-byte boundary. Both kernels address the partials
    through these base pointers alone, so flat tensors serve."""
    off = -(-rows // 32) * 32
    ws = torch.empty(off + rows * dv, dtype=torch.float32, device=like.device)
    return ws[off:], ws


class _FastDecode:
    """Everything one eager decode call derives from its signature (shapes, strides, dtypes, devices and
    scalar options; see :func:`_decode_fast`): the plan, the launches' constant arguments, the output shapes."""

    __slots__ = (
        "batch",
        "capacity",
        "check_args",
        "combine_grid",
        "combine_meta",
        "combine_tail",
        "dummy",
        "empty_f32",
        "grid",
        "lse_shape",
        "out_shape",
        "paged",
        "record_tries",
        "replay",
        "seq_mode",
        "split_meta",
        "splits",
        "tail_head",
        "tail_rest",
        "ws_dv",
        "ws_rows",
    )
    #: q's batch; rows one sequence can hold; (num_blocks, page, batch_cache) of :func:`value_checks`
    batch: int
    capacity: int
    check_args: tuple[int, int, int]
    #: the combine launch (with several splits): grid, constexprs, runtime arguments after the tensors
    combine_grid: tuple[int]
    combine_meta: dict[str, Any]
    combine_tail: tuple[int, ...]
    #: the cached placeholders of absent int32 / float32 pointer arguments
    dummy: torch.Tensor
    empty_f32: torch.Tensor
    #: the split-KV launch: grid and constexprs
    grid: tuple[int, int, int]
    split_meta: dict[str, Any]
    #: shapes of out and lse
    out_shape: tuple[int, int, int, int]
    lse_shape: tuple[int, int, int]
    paged: bool
    #: the recorded launches (GPU) and how many more calls may try to record them
    record_tries: int
    replay: Replay | None
    #: _SEQ_NONE / _SEQ_INT / _SEQ_TENSOR
    seq_mode: int
    #: key splits; the split workspace's rows and head dim
    splits: int
    ws_rows: int
    ws_dv: int
    #: the split-KV launch's runtime arguments after the tensors: before and after ``cache_seqlen_int``
    #: (included in ``tail_head`` unless cache_seqlens is an int)
    tail_head: tuple[int, ...]
    tail_rest: tuple[int | float, ...]


#: :class:`_FastDecode` per call signature (None: a signature the general path takes); cleared when full
_FAST: dict[tuple, _FastDecode | None] = {}
_FAST_MAX = 256
_MISS = object()
#: ``seq_mode`` of a :class:`_FastDecode`: cache_seqlens None (the whole cache), a Python int, a tensor
_SEQ_NONE, _SEQ_INT, _SEQ_TENSOR = 0, 1, 2


def _decode_fast(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: int | torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    num_splits: int,
    attention_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`flash_attn_with_kvcache` without new k/v, rotary, cache_batch_idx, left padding, ALiBi or sink:
    ``(out, lse)``, or None where the general path must take the call.

    A steady decode loop repeats one signature: plain tensors with the same shapes, strides, dtypes and
    devices, the same kind of ``cache_seqlens`` (None, int or tensor) and the same scalar options. The first
    call of a signature runs the general path's shape checks (raising its errors) and derives the plan and
    every launch argument that follows from the signature (:class:`_FastDecode`); later calls only read that
    back, run the value checks, allocate the outputs and launch. Signatures the general path must handle
    (a strided last dim to copy, a non-contiguous cache_seqlens or block_table, empty outputs) are recorded
    as None.
    """
    if type(q) is not torch.Tensor or type(k_cache) is not torch.Tensor or type(v_cache) is not torch.Tensor:
        return None
    if cache_seqlens is None:
        seq_key: object = None
    elif type(cache_seqlens) is int:
        seq_key = int
    elif type(cache_seqlens) is torch.Tensor:
        seq_key = (cache_seqlens.shape, cache_seqlens.stride(), cache_seqlens.dtype, cache_seqlens.device)
    else:
        return None
    if block_table is None:
        bt_key: object = None
    elif type(block_table) is torch.Tensor:
        bt_key = (block_table.shape, block_table.stride(), block_table.dtype, block_table.device)
    else:
        return None
    if (
        type(window_size) is not tuple
        or len(window_size) != 2
        or type(window_size[0]) is not int
        or type(window_size[1]) is not int
        or type(causal) is not bool
        or type(num_splits) is not int
        or type(attention_chunk) is not int
        or type(softcap) not in (float, int)
        or (softmax_scale is not None and type(softmax_scale) not in (float, int))
    ):
        return None
    if q.requires_grad and torch.is_grad_enabled():
        return None  # the general path raises
    key = (
        q.shape,
        q.stride(),
        q.dtype,
        q.device,
        k_cache.shape,
        k_cache.stride(),
        k_cache.dtype,
        k_cache.device,
        v_cache.shape,
        v_cache.stride(),
        v_cache.dtype,
        v_cache.device,
        seq_key,
        bt_key,
        softmax_scale,
        causal,
        window_size,
        softcap,
        num_splits,
        attention_chunk,
        V.interpreting(),
        _ki._FORCED_TILES[-1] if _ki._FORCED_TILES else None,
    )
    fast = _FAST.get(key, _MISS)
    if fast is _MISS:
        fast = _build_fast(
            q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size, softcap,
            num_splits, attention_chunk,
        )  # fmt: skip
        if len(_FAST) >= _FAST_MAX:
            _FAST.clear()
        _FAST[key] = fast
    if fast is None:
        return None
    assert isinstance(fast, _FastDecode)
    seq_mode = fast.seq_mode
    seq_tensor = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    if fast.batch > 0 and (seq_mode != _SEQ_NONE or fast.paged) and kvcache_value_checks_enabled(q):
        value_checks(
            fast.batch,
            fast.capacity if cache_seqlens is None else cache_seqlens,
            None,
            None,
            block_table,
            0,
            fast.capacity,
            *fast.check_args,
        )
    out = q.new_empty(fast.out_shape)
    lse = torch.empty(fast.lse_shape, dtype=torch.float32, device=q.device)
    if fast.splits > 1:
        out_part, lse_part = _split_workspace(fast.ws_rows, fast.ws_dv, q)
        slots: tuple[torch.Tensor | None, ...] = (
            q, k_cache, v_cache, out, lse, out_part, lse_part, block_table, seq_tensor
        )  # fmt: skip
    else:
        out_part = lse_part = fast.empty_f32
        slots = (q, k_cache, v_cache, out, lse, None, None, block_table, seq_tensor)
    if fast.replay is not None or fast.record_tries:
        # GPU launches of a tensor (or None) cache_seqlens: replayed with this call's tensors once recorded,
        # for 16-byte aligned inputs (the launches' specialization); the launchers' keys are skipped
        ptrs = q.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr()
        if block_table is not None:
            ptrs |= block_table.data_ptr()
        if seq_tensor is not None:
            ptrs |= seq_tensor.data_ptr()
        if not ptrs & 15:
            if fast.replay is not None:
                if fast.replay(slots):
                    return out, lse
            else:
                fast.record_tries -= 1
                with record() as rec:
                    _launch_fast(
                        fast, q, k_cache, v_cache, out, lse, out_part, lse_part, block_table, seq_tensor, 0
                    )
                fast.replay = Replay.build(rec, slots)
                return out, lse
    _launch_fast(
        fast, q, k_cache, v_cache, out, lse, out_part, lse_part, block_table, seq_tensor,
        cache_seqlens if isinstance(cache_seqlens, int) else 0,
    )  # fmt: skip
    return out, lse


def _launch_fast(
    fast: _FastDecode,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    out_part: torch.Tensor,
    lse_part: torch.Tensor,
    block_table: torch.Tensor | None,
    seq_tensor: torch.Tensor | None,
    seqlen_int: int,
) -> None:
    """The split-KV launch (and the combine launch with several splits) of a :func:`_decode_fast` call."""
    dummy = fast.dummy
    if fast.seq_mode == _SEQ_INT:
        tail = (*fast.tail_head, seqlen_int, *fast.tail_rest)
    else:
        tail = fast.tail_head + fast.tail_rest
    _ki.split_kv_launch(
        fast.grid,
        q,
        k_cache,
        v_cache,
        out,
        lse,
        out_part,
        lse_part,
        block_table if block_table is not None else dummy,
        seq_tensor if seq_tensor is not None else dummy,
        dummy,
        dummy,
        fast.empty_f32,
        fast.empty_f32,
        *tail,
        **fast.split_meta,
    )
    if fast.splits > 1:
        _ki.combine_launch(
            fast.combine_grid, out_part, lse_part, out, lse, lse_part, *fast.combine_tail, **fast.combine_meta
        )


def _build_fast(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: int | torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    num_splits: int,
    attention_chunk: int,
) -> _FastDecode | None:
    """The :class:`_FastDecode` of one call's signature after the general path's shape checks (which raise
    as they do there); None when the general path must take this signature."""
    if V.contig_last(q) is not q:
        return None  # the general path copies q (then checks it)
    validate(
        q, k_cache, v_cache, None, None, None, None, cache_seqlens, None, None, block_table, None, window_size,
        softcap, softmax_scale,
    )  # fmt: skip
    batch, seqlen_q, nheads, d = q.shape
    V.check_chunk_and_sink(attention_chunk, None, nheads, q)
    if isinstance(cache_seqlens, torch.Tensor) and not cache_seqlens.is_contiguous():
        return None
    if block_table is not None and block_table.stride(-1) != 1:
        return None
    if batch == 0 or seqlen_q == 0 or nheads == 0:
        return None
    nheads_k, dv = k_cache.shape[2], v_cache.shape[3]
    paged = block_table is not None
    capacity = cache_capacity(k_cache, block_table)
    scale = d ** (-0.5) if softmax_scale is None else softmax_scale
    left, right, is_local = normalize_window(causal, window_size)
    page = k_cache.shape[1] if paged else 0
    seq_tensor = isinstance(cache_seqlens, torch.Tensor)
    plan = _ki.plan_decode(
        batch, seqlen_q, nheads, nheads_k, d, dv, capacity, page, int(num_splits or 0), _ki._sm_count(q.device),
        seq_tensor, False, False, is_local, has_window_left(is_local, left), attention_chunk > 0, softcap > 0,
        False, False, V.interpreting(), _ki._FORCED_TILES[-1] if _ki._FORCED_TILES else None,
    )  # fmt: skip
    fast = _FastDecode()
    fast.batch = batch
    fast.capacity = capacity
    fast.paged = paged
    fast.seq_mode = _SEQ_NONE if cache_seqlens is None else (_SEQ_TENSOR if seq_tensor else _SEQ_INT)
    fast.check_args = (k_cache.shape[0], k_cache.shape[1], k_cache.shape[0])
    fast.out_shape = (batch, seqlen_q, nheads, dv)
    fast.lse_shape = (batch, nheads, seqlen_q)
    fast.splits = plan.splits
    fast.ws_rows = plan.splits * batch * seqlen_q * nheads
    fast.ws_dv = dv
    fast.dummy = empty_arg(q, torch.int32)
    fast.empty_f32 = empty_arg(q, torch.float32)
    fast.grid = plan.grid
    fast.split_meta = plan.split_meta
    # the out tensor is allocated contiguous: its strides follow from its shape
    out_strides = (seqlen_q * nheads * dv, nheads * dv, dv)
    num_blocks = max(k_cache.shape[0], 1)
    fast.tail_head = (
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *out_strides,
        block_table.stride(0) if block_table is not None else 0,
        0,
        batch,
        seqlen_q,
        0,
    )
    if fast.seq_mode == _SEQ_NONE:
        fast.tail_head = (*fast.tail_head, capacity)
    elif fast.seq_mode == _SEQ_TENSOR:
        fast.tail_head = (*fast.tail_head, 0)
    fast.tail_rest = (
        capacity,
        num_blocks,
        num_blocks,
        nheads,
        nheads_k,
        nheads // nheads_k,
        plan.n_head_chunks,
        plan.splits,
        float(scale),
        float(softcap),
        left,
        right,
        int(attention_chunk),
    )
    fast.replay = None
    # a launch through Triton's own path (the first, compiling one) records nothing: a few tries, GPU only,
    # never with an int cache_seqlens (a launch argument that changes from call to call)
    fast.record_tries = 3 if q.is_cuda and fast.seq_mode != _SEQ_INT else 0
    fast.combine_grid = plan.combine_grid
    fast.combine_meta = plan.combine_meta
    fast.combine_tail = (plan.combine_grid[0], seqlen_q, nheads, plan.splits, *out_strides)
    return fast


decode_fast = _decode_fast
