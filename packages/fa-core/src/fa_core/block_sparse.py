"""Block-sparse attention masks in FlexAttention's compact form, and the helpers that build them.

A :class:`BlockMask` lists, for every query block, the key blocks it may see, in two disjoint lists
(FlexAttention's names and layout):

* partial blocks ``kv_num_blocks (batch|1, nheads|1, num_q_blocks)`` and ``kv_indices (batch|1, nheads|1,
  num_q_blocks, num_kv_blocks)`` int32 (the first ``kv_num_blocks`` entries of each row are used): blocks
  where the element mask (``mask_mod``) must be evaluated;
* optional full blocks ``full_kv_num_blocks`` / ``full_kv_indices`` (same shapes): blocks every element of
  which is visible as far as ``mask_mod`` is concerned, so the kernels skip its evaluation there.

The kernels load only the listed key blocks, so their work is proportional to the visible blocks; inside them
the built-in element rules (causal, window, chunk, sequence ends) still apply, and ``mask_mod`` too in partial
blocks. The backward's dK/dV pass needs the transposed index (for every key block, the query blocks that see
it): :func:`transpose_block_mask` builds it on the device and caches it on the mask.

PyTorch's own ``torch.nn.attention.flex_attention.BlockMask`` (from its ``create_block_mask``) is accepted
wherever a :class:`BlockMask` is: :func:`as_block_mask` converts it (:func:`from_torch_block_mask`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fa_core.errors import FlashAttnValueError
from fa_core.validation import value_checks_enabled

__all__ = [
    "BlockMask",
    "QBlockIndex",
    "as_block_mask",
    "block_mask_from_dense",
    "from_torch_block_mask",
    "is_torch_block_mask",
    "block_mask_to_dense",
    "block_mask_to_dense_blocks",
    "create_block_mask",
    "transpose_block_mask",
]


class _BlockMaskFields(NamedTuple):
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: tuple[int, int] = (128, 128)
    full_kv_num_blocks: torch.Tensor | None = None
    full_kv_indices: torch.Tensor | None = None


class BlockMask(_BlockMaskFields):
    """``kv_num_blocks (B|1, H|1, Q)`` and ``kv_indices (B|1, H|1, Q, K)`` int32: the partial blocks;
    ``block_size`` = ``(query rows, key columns)`` per block, powers of two (default 128 x 128);
    ``full_kv_num_blocks`` / ``full_kv_indices`` (same shapes, optional): the full blocks (no ``mask_mod``
    evaluation), disjoint from the partial ones.

    A named tuple (``_replace`` gives a new mask without the cached transposed index)."""

    # instances get a __dict__ (no __slots__ here): it holds the cached transposed index


class QBlockIndex(NamedTuple):
    """The transposed index: ``q_num_blocks (B|1, H|1, K)``, ``q_indices (B|1, H|1, K, Q)`` int32 (the query
    blocks that see each key block through a partial block) and ``full_q_num_blocks`` / ``full_q_indices``
    (same, through a full block; None when the mask has no full blocks)."""

    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    full_q_num_blocks: torch.Tensor | None
    full_q_indices: torch.Tensor | None


def _compact(dense_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(..., rows, cols)`` -> ``(num (..., rows), indices (..., rows, cols))`` int32, the visible column
    indices first and in increasing order (a stable sort on "not visible"); device-only, no host sync."""
    num = dense_blocks.sum(-1, dtype=torch.int32)
    order = torch.sort((~dense_blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return num.contiguous(), order.contiguous()


def block_mask_from_dense(
    dense_blocks: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    full_blocks: torch.Tensor | None = None,
) -> BlockMask:
    """From a boolean ``(B|1, H|1, num_q_blocks, num_kv_blocks)`` block mask (True = visible).

    Args:
        dense_blocks: the visible blocks (partial and full).
        full_blocks: optional bool, same shape: the visible blocks that need no ``mask_mod`` evaluation (every
            element visible). Without it every visible block is partial (``mask_mod``, when given to the
            kernel, is evaluated everywhere).
    """
    if (
        not isinstance(dense_blocks, torch.Tensor)
        or dense_blocks.dim() != 4
        or dense_blocks.dtype != torch.bool
    ):
        raise ValueError(
            "dense_blocks must be a 4-D bool tensor, got "
            + (
                f"{dense_blocks.dtype} {tuple(dense_blocks.shape)}"
                if isinstance(dense_blocks, torch.Tensor)
                else type(dense_blocks).__name__
            )
        )
    if full_blocks is None:
        num, idx = _compact(dense_blocks)
        return BlockMask(num, idx, (int(block_size[0]), int(block_size[1])))
    if (
        not isinstance(full_blocks, torch.Tensor)
        or full_blocks.dtype != torch.bool
        or full_blocks.shape != dense_blocks.shape
    ):
        raise ValueError(
            f"full_blocks must be a bool tensor shaped like dense_blocks {tuple(dense_blocks.shape)}"
        )
    if full_blocks.device != dense_blocks.device:
        raise ValueError(
            f"full_blocks is on {full_blocks.device} but dense_blocks is on {dense_blocks.device}"
        )
    num, idx = _compact(dense_blocks & ~full_blocks)
    fnum, fidx = _compact(full_blocks)
    return BlockMask(num, idx, (int(block_size[0]), int(block_size[1])), fnum, fidx)


def create_block_mask(
    mask_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    batch: int | None,
    nheads: int | None,
    seqlen_q: int,
    seqlen_k: int,
    block_size: tuple[int, int] = (128, 128),
    device: torch.device | str = "cpu",
    full_blocks: bool = True,
) -> BlockMask:
    """From a PyTorch ``mask_fn(b, h, q_idx, kv_idx) -> bool`` (broadcastable index tensors).

    A block is listed when any of its elements is visible; it is *full* (``full_kv_*``, no ``mask_mod``
    evaluation in the kernels) when every element inside the sequences is, else *partial*. Pass the same
    function as ``mask_mod`` (as a ``@triton.jit`` twin) to the kernels for element-exact masking of the
    partial blocks (FlexAttention's semantics). ``full_blocks=False`` lists every visible block as partial.
    ``batch`` / ``nheads`` None = the mask does not depend on them. Evaluated one query-block row at a time
    on ``device``, so memory stays O(block_q * seqlen_k * batch * nheads).
    """
    bq, bk = (int(x) for x in block_size)
    nq, nk = -(-seqlen_q // bq), -(-seqlen_k // bk)
    bdim, hdim = batch or 1, nheads or 1
    b = torch.arange(bdim, device=device).view(-1, 1, 1, 1)
    h = torch.arange(hdim, device=device).view(1, -1, 1, 1)
    kv = torch.arange(nk * bk, device=device).view(1, 1, 1, -1)
    any_blocks = torch.zeros(bdim, hdim, nq, nk, dtype=torch.bool, device=device)
    all_blocks = torch.zeros(bdim, hdim, nq, nk, dtype=torch.bool, device=device)
    for i in range(nq):
        q = torch.arange(i * bq, (i + 1) * bq, device=device).view(1, 1, -1, 1)
        inside = (q < seqlen_q) & (kv < seqlen_k)
        m = torch.broadcast_to(mask_fn(b, h, q, kv), (bdim, hdim, bq, nk * bk))
        vis = (m & inside).reshape(bdim, hdim, bq, nk, bk)
        any_blocks[:, :, i] = vis.any(dim=4).any(dim=2)
        # elements outside the sequences do not make a block partial (the kernels mask them anyway)
        all_blocks[:, :, i] = (m | ~inside).reshape(bdim, hdim, bq, nk, bk).all(dim=4).all(dim=2)
    full = (any_blocks & all_blocks) if full_blocks else None
    return block_mask_from_dense(any_blocks, (bq, bk), full)


def _scatter_blocks(num: torch.Tensor, idx: torch.Tensor, ncols: int) -> torch.Tensor:
    """Bool ``(..., rows, ncols)`` of the used entries of a compact index; unused entries (whatever they
    hold) go to a dump column, so they never overwrite a used one."""
    used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    target = torch.where(used, idx.long().clamp(0, ncols), ncols)
    blocks = torch.zeros(*idx.shape[:-1], ncols + 1, dtype=torch.bool, device=idx.device)
    blocks.scatter_(-1, target, True)
    return blocks[..., :ncols]


def block_mask_to_dense_blocks(
    mask: BlockMask, num_kv_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` bool ``(B|1, H|1, num_q_blocks, num_kv_blocks)`` block masks (full is all False
    when the mask has no full blocks). ``num_kv_blocks`` defaults to ``kv_indices.shape[-1]``."""
    ncols = int(num_kv_blocks) if num_kv_blocks is not None else mask.kv_indices.shape[-1]
    partial = _scatter_blocks(mask.kv_num_blocks, mask.kv_indices, ncols)
    if mask.full_kv_num_blocks is None or mask.full_kv_indices is None:
        return partial, torch.zeros_like(partial)
    return partial, _scatter_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, ncols)


def block_mask_to_dense(mask: BlockMask, seqlen_q: int, seqlen_k: int, which: str = "all") -> torch.Tensor:
    """Element mask ``(B|1, H|1, seqlen_q, seqlen_k)`` (True = inside a listed block) of a :class:`BlockMask`,
    for references. ``which``: ``"all"`` (partial or full blocks), ``"partial"`` or ``"full"``."""
    bq, bk = mask.block_size
    nk = -(-seqlen_k // bk)
    partial, full = block_mask_to_dense_blocks(mask, max(nk, mask.kv_indices.shape[-1]))
    blocks = {"all": partial | full, "partial": partial, "full": full}[which]
    dense = blocks.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)
    return dense[:, :, :seqlen_q, :seqlen_k]


def transpose_block_mask(mask: BlockMask, num_kv_blocks: int) -> QBlockIndex:
    """For every key block, the query blocks that see it (the dK/dV pass of the backward iterates these).

    Built on the device with torch ops (scatter, transpose, stable sort: no host loop, no sync) and cached on
    ``mask`` per ``num_kv_blocks`` (= ``cdiv(seqlen_k, block_size[1])``), so repeated backward passes with the
    same mask build it once.
    """
    cache = mask.__dict__.setdefault("_q_index_cache", {})
    key = int(num_kv_blocks)
    hit = cache.get(key)
    if hit is not None:
        return hit
    partial, full = block_mask_to_dense_blocks(mask, key)
    q_num, q_idx = _compact(partial.transpose(-1, -2))
    fq_num: torch.Tensor | None = None
    fq_idx: torch.Tensor | None = None
    if mask.full_kv_num_blocks is not None:
        fq_num, fq_idx = _compact(full.transpose(-1, -2))
    res = QBlockIndex(q_num, q_idx, fq_num, fq_idx)
    cache[key] = res
    return res


# --------------------------------------------------------------------------- PyTorch's FlexAttention BlockMask
#: converted masks per torch BlockMask (weakly held) and per call signature (lengths, element rules, mask_mod)
_TORCH_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, BlockMask]] = weakref.WeakKeyDictionary()
#: elements evaluated at once by the exactness check (bounds its memory)
_CHECK_CHUNK = 1 << 22


def is_torch_block_mask(obj: object) -> bool:
    """Whether ``obj`` is a ``torch.nn.attention.flex_attention.BlockMask``."""
    if isinstance(obj, BlockMask) or not type(obj).__module__.startswith("torch."):
        return False
    try:
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
    except ImportError:  # a torch without FlexAttention
        return False
    return isinstance(obj, TorchBlockMask)


def as_block_mask(
    block_mask: Any,
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    mask_mod: Callable[..., Any] | None = None,
) -> BlockMask | None:
    """The block mask a kernel call takes: ``None`` and :class:`BlockMask` unchanged, PyTorch's FlexAttention
    ``BlockMask`` converted by :func:`from_torch_block_mask` (the other arguments are the call's, used there);
    anything else is returned as is for the argument checks to reject."""
    if block_mask is None or isinstance(block_mask, BlockMask) or not is_torch_block_mask(block_mask):
        return block_mask
    return from_torch_block_mask(
        block_mask,
        batch,
        nheads,
        seqlen_q,
        seqlen_k,
        causal=causal,
        window_size=window_size,
        attention_chunk=attention_chunk,
        mask_mod=mask_mod,
    )


def _supported_size(size: int) -> int:
    """The block size the kernels use for a torch block size: itself when a power of two >= 32, else the
    smallest power of two >= max(32, size)."""
    return max(32, 1 << max(0, int(size) - 1).bit_length())


def _reblock(blocks: torch.Tensor, dim: int, src: int, dst: int, n_out: int, full: bool) -> torch.Tensor:
    """Bool block grid along ``dim`` from blocks of ``src`` positions to ``n_out`` blocks of ``dst``: a new
    block is set when any (``full=False``) or every (``full=True``) old block it overlaps is; positions past
    the old grid count as set for ``full`` (they lie past the sequence end, where the kernels mask anyway)."""
    if src == dst:
        pad = n_out - blocks.shape[dim]
    else:
        g = math.gcd(src, dst)
        blocks = blocks.repeat_interleave(src // g, dim=dim)  # cells of g positions
        pad = n_out * (dst // g) - blocks.shape[dim]
    if pad > 0:
        shape = list(blocks.shape)
        shape[dim] = pad
        blocks = torch.cat([blocks, blocks.new_full(shape, full)], dim=dim)
    if src == dst:
        return blocks.narrow(dim, 0, n_out)
    blocks = blocks.narrow(dim, 0, n_out * (dst // g))
    shape = list(blocks.shape)
    shape[dim : dim + 1] = [n_out, dst // g]
    grouped = blocks.reshape(shape)
    return grouped.all(dim=dim + 1) if full else grouped.any(dim=dim + 1)


def _element_rules(
    i: torch.Tensor,
    j: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    window_size: tuple[int, int],
    attention_chunk: int,
) -> torch.Tensor:
    """The kernels' built-in element rules at query rows ``i`` / key columns ``j`` (broadcast): inside both
    sequences, causal / window (bottom-right aligned) and chunk, as :func:`fa_core.reference.visible_mask`."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    diag = i + (seqlen_k - seqlen_q)
    ok = (i < seqlen_q) & (j < seqlen_k)
    if right >= 0:
        ok = ok & (j <= diag + right)
    if left >= 0:
        ok = ok & (j >= diag - left)
    if attention_chunk > 0:
        ok = ok & (torch.div(diag, attention_chunk, rounding_mode="floor") == j // attention_chunk)
    return ok


def _check_exact(
    tbm: Any,
    partial: torch.Tensor,
    torch_partial: torch.Tensor,
    torch_full: torch.Tensor,
    size: tuple[int, int],
    seqlen_q: int,
    seqlen_k: int,
    rules: tuple[bool, tuple[int, int], int],
    torch_mask_mod: Callable[..., Any] | None,
) -> None:
    """Raise unless, in every element of the converted partial blocks that the built-in rules let through,
    FlexAttention's semantics of ``tbm`` (listed full block, or listed partial block where its ``mask_mod``
    holds) see the element too: then the kernels, which apply only the built-in rules there, give the same
    result without a ``mask_mod``."""
    bq, bk = size
    tq, tk = (int(x) for x in tbm.BLOCK_SIZE)
    dev = partial.device
    blocks = partial.nonzero()  # (n, 4): b, h, q block, kv block (a host sync: value checks only)
    per = max(1, _CHECK_CHUNK // (bq * bk))
    ar_q = torch.arange(bq, device=dev)
    ar_k = torch.arange(bk, device=dev)
    for start in range(0, blocks.shape[0], per):
        bl = blocks[start : start + per]
        b, h = bl[:, 0, None, None], bl[:, 1, None, None]
        i = (bl[:, 2, None] * bq + ar_q)[:, :, None]  # (n, bq, 1)
        j = (bl[:, 3, None] * bk + ar_k)[:, None, :]  # (n, 1, bk)
        need = _element_rules(i, j, seqlen_q, seqlen_k, *rules)
        if not bool(need.any()):
            continue
        bt = b if torch_full.shape[0] > 1 else torch.zeros_like(b)
        ht = h if torch_full.shape[1] > 1 else torch.zeros_like(h)
        iq = (i // tq).clamp_max(torch_full.shape[2] - 1)
        jk = (j // tk).clamp_max(torch_full.shape[3] - 1)
        seen = torch_full[bt, ht, iq, jk]
        in_partial = torch_partial[bt, ht, iq, jk]
        if torch_mask_mod is not None:
            n, rows, cols = need.shape
            shape = (n, rows, cols)
            ev = need & in_partial & ~seen
            flat = [x.expand(shape)[ev] for x in (b, h, i, j)]
            if flat[0].numel():
                vals = torch.zeros(shape, dtype=torch.bool, device=dev)
                vals[ev] = torch.vmap(torch_mask_mod)(*flat).to(torch.bool)
                in_partial = in_partial & vals
        seen = seen | in_partial
        bad = need & ~seen
        if bool(bad.any()):
            k = int(bad.flatten().nonzero()[0, 0])
            n_i, rem = divmod(k, bq * bk)
            raise FlashAttnValueError(
                "block_mask: this torch BlockMask hides elements that the kernels would show, e.g. batch "
                f"{int(bl[n_i, 0])} head {int(bl[n_i, 1])} query {int(bl[n_i, 2]) * bq + rem // bk} key "
                f"{int(bl[n_i, 3]) * bk + rem % bk}: inside a partial block the kernels apply only the built-in "
                "rules (causal, window_size, attention_chunk) and a @triton.jit mask_mod, never the BlockMask's "
                "Python mask_mod. Pass mask_mod= a @triton.jit twin of block_mask.mask_mod (examples in "
                "fa_core.score_mods), or the built-in rules that express it"
                + (
                    f"; its BLOCK_SIZE {(tq, tk)} also had to become {(bq, bk)} (powers of two >= 32)"
                    if (tq, tk) != (bq, bk)
                    else ""
                )
            )


def from_torch_block_mask(
    tbm: Any,
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    mask_mod: Callable[..., Any] | None = None,
) -> BlockMask:
    """Convert PyTorch's ``torch.nn.attention.flex_attention.BlockMask`` into a :class:`BlockMask` for a call
    with these lengths, element rules and kernel ``mask_mod``.

    Fields read: ``BLOCK_SIZE`` ``(q, kv)``, ``kv_num_blocks`` / ``kv_indices`` ``(B|1, H|1, Q, K)`` (partial
    blocks), ``full_kv_num_blocks`` / ``full_kv_indices`` (full blocks, optional), ``seq_lengths`` and
    ``mask_mod``. The transposed lists (``q_num_blocks`` / ``q_indices`` and the full ones) are not read: the
    backward's transposed index is built from the converted lists (:func:`transpose_block_mask`, once per
    mask), so the forward's and the backward's lists agree by construction, also after the two changes below.

    * Block sizes: the kernels take powers of two >= 32. Other sizes (e.g. 16, or 48) are merged into the
      smallest such size that covers them (16 -> 32, 48 -> 64): a new block is listed when any old block it
      overlaps is, and full when every old block it overlaps is full; the rest are partial.
    * Lengths: a mask built for longer sequences (``seq_lengths``) is cut to this call's blocks, as
      FlexAttention does; one built for shorter sequences raises.
    * Partial blocks and ``mask_mod``: FlexAttention evaluates the mask's ``mask_mod`` (a Python function) in
      partial blocks; our kernels evaluate only a ``@triton.jit`` ``mask_mod`` given to the call, and always
      the built-in rules (sequence ends, ``causal``, ``window_size``, ``attention_chunk``). With a kernel
      ``mask_mod`` the conversion trusts it to be the twin of the mask's. Without one, the result is exact
      only when the built-in rules alone reproduce the mask inside its partial blocks, and this is checked:
      the mask's ``mask_mod`` is evaluated (``torch.vmap``, as FlexAttention's ``create_mask`` does) on the
      elements of the partial blocks that the built-in rules let through, and any element it hides raises a
      :class:`fa_core.errors.FlashAttnValueError` naming ``block_mask`` (materializing the partial blocks'
      element mask for the kernels would need a mask tensor input the kernels do not have). A causal
      ``create_block_mask`` used with ``causal=True``, a sliding window with ``window_size``, document masks
      whose boundaries fall on block edges, or any mask at a length that is not a multiple of the block size
      (its last blocks are partial only through the padding) pass. The check evaluates only the batch / head
      entries the mask holds (index 0 on a broadcast dim, as ``create_block_mask`` with ``B``/``H`` None
      did); it needs a host sync and is skipped where value checks are (``fa_core.settings``, CUDA-graph
      capture, ``torch.compile``). Its cost is once per mask and call signature: the converted mask is cached
      on the torch mask (whose tensors must then not change in place).

    Args:
        tbm: the torch BlockMask; its tensors on the inputs' device.
        batch, nheads, seqlen_q, seqlen_k: the call's sizes.
        causal, window_size, attention_chunk: the call's built-in rules.
        mask_mod: the call's ``@triton.jit`` mask_mod, or None.

    Returns:
        A :class:`BlockMask` ``(B|1, H|1, cdiv(seqlen_q, bq), cdiv(seqlen_k, bk))`` with full blocks when the
        torch mask has any.
    """
    window = (int(window_size[0]), int(window_size[1]))
    key = (int(batch), int(nheads), int(seqlen_q), int(seqlen_k), bool(causal), window, int(attention_chunk),
           None if mask_mod is None else id(mask_mod))  # fmt: skip
    per_mask = _TORCH_CACHE.setdefault(tbm, {})
    hit = per_mask.get(key)
    if hit is not None:
        return hit
    tq, tk = (int(x) for x in tbm.BLOCK_SIZE)
    if tq < 1 or tk < 1:
        raise FlashAttnValueError(f"block_mask.BLOCK_SIZE must be positive, got {(tq, tk)}")
    lens = getattr(tbm, "seq_lengths", None)
    if lens is not None and (int(lens[0]) < seqlen_q or int(lens[1]) < seqlen_k):
        raise FlashAttnValueError(
            f"block_mask was built for seq_lengths {tuple(int(x) for x in lens)}, shorter than this call's "
            f"(seqlen_q, seqlen_k) = {(seqlen_q, seqlen_k)}: build it for these lengths"
        )
    num, idx = tbm.kv_num_blocks, tbm.kv_indices
    if (
        not isinstance(num, torch.Tensor)
        or num.dim() != 3
        or not isinstance(idx, torch.Tensor)
        or idx.dim() != 4
    ):
        raise FlashAttnValueError(
            "block_mask.kv_num_blocks / kv_indices must be 3-D / 4-D tensors (B|1, H|1, Q[, K])"
        )
    ncols = idx.shape[-1]
    t_partial = _scatter_blocks(num, idx, ncols)
    has_full = tbm.full_kv_num_blocks is not None and tbm.full_kv_indices is not None
    t_full = (
        _scatter_blocks(tbm.full_kv_num_blocks, tbm.full_kv_indices, ncols)
        if has_full
        else torch.zeros_like(t_partial)
    )
    bq, bk = _supported_size(tq), _supported_size(tk)
    nq, nk = -(-seqlen_q // bq), -(-seqlen_k // bk)
    listed = _reblock(_reblock(t_partial | t_full, 2, tq, bq, nq, False), 3, tk, bk, nk, False)
    full = _reblock(_reblock(t_full, 2, tq, bq, nq, True), 3, tk, bk, nk, True) & listed
    partial = listed & ~full
    torch_mm = getattr(tbm, "mask_mod", None)
    from torch.nn.attention.flex_attention import noop_mask  # present: is_torch_block_mask imported it

    if torch_mm is noop_mask:
        torch_mm = None
    reblocked = (bq, bk) != (tq, tk)
    if mask_mod is None and (torch_mm is not None or reblocked) and value_checks_enabled(partial):
        _check_exact(
            tbm, partial, t_partial, t_full, (bq, bk), seqlen_q, seqlen_k,
            (bool(causal), window, int(attention_chunk)), torch_mm,
        )  # fmt: skip
    if bool(has_full):
        p_num, p_idx = _compact(partial)
        f_num, f_idx = _compact(full)
        res = BlockMask(p_num, p_idx, (bq, bk), f_num, f_idx)
    else:
        p_num, p_idx = _compact(partial)
        res = BlockMask(p_num, p_idx, (bq, bk))
    per_mask[key] = res
    return res
