"""Cross-entropy loss over a (possibly vocab-sharded) logits matrix, as Triton kernels.

Semantics follow ``flash_attn.ops.triton.cross_entropy.cross_entropy_loss`` of flash-attn 2.8.x:

* ``logits`` is ``(batch, vocab)`` (fp16, bf16 or fp32; any row stride, unit column stride after an
  optional copy), ``labels`` is ``(batch,)`` integer. Both results are fp32 ``(batch,)``.
* With ``x = logits * logit_scale`` (fp32) and ``lse = logsumexp(x)`` per row, the per-row loss is
  ``lse - (1 - s) * x[label] - s * sum(x) / total_classes`` for label smoothing ``s`` (torch's
  ``CrossEntropyLoss(label_smoothing=s)``; ``s = 0`` gives ``lse - x[label]``), plus the z-loss
  ``lse_square_scale * lse ** 2``, which is also returned on its own (for logging, not differentiable).
* Rows whose label is ``ignore_index`` get loss 0, z-loss 0 and a zero gradient. A label outside
  ``[0, vocab)`` that is not ``ignore_index`` contributes no ``x[label]`` term (with smoothing, only the
  smoothing share ``s * (lse - sum(x) / total_classes)``), as in flash-attn.
* ``precomputed_lse`` (fp32 ``(batch,)``) skips the logsumexp pass; it is used only where it is exact,
  ``logit_scale == 1`` and no smoothing, and ignored otherwise (flash-attn's rule).
* The gradient is ``dloss * logit_scale * (softmax(x) * (1 + 2 * lse_square_scale * lse) - (1 - s) * onehot
  - s / total_classes)`` in the logits' dtype; ``inplace_backward=True`` writes it into the saved logits'
  storage and returns that tensor (no second ``(batch, vocab)`` buffer).
* Tensor parallelism (``process_group`` with world size ``W > 1``): rank ``r`` holds the columns
  ``[r * vocab, (r + 1) * vocab)`` of a ``W * vocab`` vocabulary. Each rank computes its shard's lse and its
  share of the label / smoothing terms (a label outside the shard contributes only the smoothing share,
  ``total_classes = W * vocab``); the shard lse are all-gathered and combined with a logsumexp, the shares
  all-reduced (sum), and the global lse (plus z-loss) added on every rank. The backward needs no
  communication: each rank writes the gradient of its own columns from the global lse.

Kernels: the forward runs one program per row and loops over the row in blocks of ``BLOCK_SIZE`` columns
with an online logsumexp (running max and rescaled sum), so a 128k vocabulary never sits in one block; the
backward runs one program per (row, column block). Both kernels keep flash-attn's argument lists, so a
direct launch written for flash-attn works unchanged. Block sizes follow the vocabulary (up to 16k columns
per forward block, 4k per backward block); :func:`override_block_sizes` forces others (e.g. small blocks
that run the multi-block loop on a small vocabulary under the interpreter).

Under ``torch.compile`` (``fullgraph=True``; aot_eager and inductor; static or dynamic shapes) and other
tracers, each launch is one opaque ``torch.library`` custom-op node (shapes from fake implementations; a
tracer never enters the Triton launch), and :class:`CrossEntropyLossFunction` stays the
only autograd layer (its forward and backward call the ops; the ops have no autograd formula of their own):

* ``torch.ops.fa_core.cross_entropy_fwd``: losses, lse and z-losses (fp32 ``(batch,)`` each, new tensors);
* ``torch.ops.fa_core.cross_entropy_bwd``: the logits' gradient in a new contiguous tensor;
* ``torch.ops.fa_core.cross_entropy_bwd_inplace``: the gradient written into the logits
  (``mutates_args=("logits",)``), for ``inplace_backward=True`` while tracing. The logits hold their gradient
  after the backward, as in eager mode; inductor keeps the write in place (no second ``(batch, vocab)``
  buffer), a backend without re-inplacing (aot_eager) computes it out of place and copies it back. Eagerly,
  the backward launches the kernel into the logits directly (their version counter is left unchanged).

The tensor-parallel loss (``process_group`` of world size > 1) runs eagerly only: :func:`cross_entropy_loss`
with a ``process_group`` is a graph break (``fullgraph=True`` reports it), and a traced
``CrossEntropyLossFunction.apply`` with world size > 1 raises :class:`~fa_core.errors.FlashAttnValueError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from fa_core.errors import FlashAttnValueError
from fa_core.forward_configs import cdiv, next_pow2
from fa_core.validation import traced

__all__ = [
    "CrossEntropyLossFunction",
    "cross_entropy_bwd",
    "cross_entropy_bwd_kernel",
    "cross_entropy_fwd",
    "cross_entropy_fwd_kernel",
    "cross_entropy_loss",
    "cross_entropy_loss_ref",
    "override_block_sizes",
]

#: Largest forward / backward column block (a power of two); smaller vocabularies use next_pow2(vocab).
MAX_FWD_BLOCK = 16 * 1024
MAX_BWD_BLOCK = 4 * 1024

_BLOCK_OVERRIDE: dict[str, int | None] = {"forward": None, "backward": None}


def _has_smoothing(args: dict[str, Any]) -> bool:
    return args["smoothing"] > 0.0


# The vocabulary size and label offsets change between models and shards: never specialized on (no recompile
# when they hit 1 or a multiple of 16); the row stride keeps Triton's specialization (aligned vector loads).
@triton.heuristics({"HAS_SMOOTHING": _has_smoothing})
@triton.jit(do_not_specialize=["ignore_index", "total_classes", "class_start_idx", "n_cols"])
def cross_entropy_fwd_kernel(
    loss_ptr,  # (n_rows,) fp32 out
    lse_ptr,  # (n_rows,) fp32: out, or in with PRECOMPUTED_LSE
    z_loss_ptr,  # (n_rows,) fp32 out (not written with SPLIT)
    logits_ptr,  # (n_rows, n_cols), unit column stride
    labels_ptr,  # (n_rows,) integer
    smoothing,
    logit_scale,
    lse_square_scale,
    ignore_index,
    total_classes,  # columns of the whole vocabulary (all shards)
    class_start_idx,  # first global column of this shard
    n_cols,
    logits_row_stride,
    BLOCK_SIZE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SPLIT: tl.constexpr,  # a vocab shard: the loss leaves out lse (added after the all-reduce), no z-loss
    PRECOMPUTED_LSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    cols = tl.arange(0, BLOCK_SIZE)
    sum_x = 0.0
    if PRECOMPUTED_LSE:
        lse = tl.load(lse_ptr + row).to(tl.float32)
    else:
        # online logsumexp over the row's column blocks: running max m, sum of exp(x - m) l
        m = -float("inf")
        acc = 0.0
        for start in range(0, n_cols, BLOCK_SIZE):
            offs = start + cols
            in_row = offs < n_cols
            x = tl.load(row_ptr + offs, mask=in_row, other=-float("inf")).to(tl.float32) * logit_scale
            m_new = tl.maximum(m, tl.max(x, axis=0))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                sum_x += tl.sum(tl.where(in_row, x, 0.0), axis=0)
        lse = m + tl.log(acc)
        tl.store(lse_ptr + row, lse)

    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    local = label - class_start_idx
    in_shard = valid & (local >= 0) & (local < n_cols)
    x_label = tl.load(row_ptr + local, mask=in_shard, other=0.0).to(tl.float32) * logit_scale
    if SPLIT:
        lse_term = 0.0
    else:
        lse_term = lse
    if HAS_SMOOTHING:
        smooth = smoothing * sum_x / total_classes
        loss = tl.where(
            in_shard, lse_term - smooth - (1.0 - smoothing) * x_label, smoothing * lse_term - smooth
        )
    else:
        loss = tl.where(in_shard, lse_term - x_label, 0.0)
    if not SPLIT:
        z_loss = tl.where(valid, lse_square_scale * lse * lse, 0.0)
        loss += z_loss
        tl.store(z_loss_ptr + row, z_loss)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))


@triton.heuristics({"HAS_SMOOTHING": _has_smoothing})
@triton.jit(
    do_not_specialize=["ignore_index", "total_classes", "class_start_idx", "n_cols", "dloss_row_stride"]
)
def cross_entropy_bwd_kernel(
    dlogits_ptr,  # (n_rows, n_cols) out, unit column stride; may be logits_ptr (in place)
    dloss_ptr,  # (n_rows,) incoming gradient of the loss, any stride (0 for an expanded one)
    logits_ptr,
    lse_ptr,  # (n_rows,) fp32, the lse of the whole vocabulary
    labels_ptr,
    smoothing,
    logit_scale,
    lse_square_scale,
    ignore_index,
    total_classes,
    class_start_idx,
    n_cols,
    logits_row_stride,
    dlogits_row_stride,
    dloss_row_stride,
    BLOCK_SIZE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_row = offs < n_cols
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    dloss = tl.load(dloss_ptr + row * dloss_row_stride, mask=valid, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    x = tl.load(logits_ptr + row * logits_row_stride + offs, mask=in_row, other=0.0).to(tl.float32)
    # d(lse + z * lse^2)/dx = softmax(x) * (1 + 2 z lse)
    grad = tl.exp(x * logit_scale - lse) * (1.0 + 2.0 * lse_square_scale * lse)
    is_label = offs == label - class_start_idx
    if HAS_SMOOTHING:
        grad = grad - tl.where(is_label, 1.0 - smoothing, 0.0) - smoothing / total_classes
    else:
        grad = grad - tl.where(is_label, 1.0, 0.0)
    grad = tl.where(valid, grad * (dloss * logit_scale), 0.0)
    tl.store(
        dlogits_ptr + row * dlogits_row_stride + offs, grad.to(dlogits_ptr.dtype.element_ty), mask=in_row
    )


@contextlib.contextmanager
def override_block_sizes(forward: int | None = None, backward: int | None = None) -> Iterator[None]:
    """Within the block, launches use these column block sizes (powers of two; None keeps the default).

    The forward's size is read when the forward runs and kept for its backward."""
    for name, value in (("forward", forward), ("backward", backward)):
        if value is not None and (value < 1 or value & (value - 1)):
            raise FlashAttnValueError(f"{name} block size must be a power of two, got {value}")
    saved = dict(_BLOCK_OVERRIDE)
    _BLOCK_OVERRIDE.update(forward=forward, backward=backward)
    try:
        yield
    finally:
        _BLOCK_OVERRIDE.update(saved)


def _device_context(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    # launch on the tensor's device, not the current one (multi-GPU)
    return torch.cuda.device(t.device.index) if t.is_cuda else contextlib.nullcontext()


def cross_entropy_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    precomputed_lse: torch.Tensor | None,
    smoothing: float,
    logit_scale: float,
    lse_square_scale: float,
    ignore_index: int,
    total_classes: int,
    class_start_idx: int,
    split: bool,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch :data:`cross_entropy_fwd_kernel` (no checks, no autograd, no communication).

    logits: (n_rows, n_cols) with unit column stride; labels: (n_rows,) contiguous. precomputed_lse: fp32
    (n_rows,) contiguous, used as the lse (only valid with logit_scale 1 and no smoothing), or None.
    ``split``: ``logits`` is one shard of a vocabulary of ``total_classes`` columns starting at global
    column ``class_start_idx``; the losses then leave out lse and z-loss (see the module docstring).
    Returns losses (n_rows,) fp32, lse (n_rows,) fp32 (``precomputed_lse`` itself when given) and z_losses
    (n_rows,) fp32 (unwritten with ``split``).
    """
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    z_losses = torch.empty_like(losses)
    lse = precomputed_lse if precomputed_lse is not None else torch.empty_like(losses)
    block = block_size or min(next_pow2(n_cols), MAX_FWD_BLOCK)
    num_warps = 4 if block < 2048 else (8 if block < 8192 else 16)
    if n_rows == 0:
        return losses, lse, z_losses
    with _device_context(logits):
        cross_entropy_fwd_kernel[(n_rows,)](
            losses,
            lse,
            z_losses,
            logits,
            labels,
            float(smoothing),
            float(logit_scale),
            float(lse_square_scale),
            int(ignore_index),
            int(total_classes),
            int(class_start_idx),
            n_cols,
            logits.stride(0),
            BLOCK_SIZE=block,
            SPLIT=bool(split),
            PRECOMPUTED_LSE=precomputed_lse is not None,
            num_warps=num_warps,
        )
    return losses, lse, z_losses


def cross_entropy_bwd(
    dlogits: torch.Tensor,
    dlosses: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    smoothing: float,
    logit_scale: float,
    lse_square_scale: float,
    ignore_index: int,
    total_classes: int,
    class_start_idx: int,
    block_size: int | None = None,
) -> torch.Tensor:
    """Launch :data:`cross_entropy_bwd_kernel`: write the logits' gradient into ``dlogits`` and return it.

    dlogits, logits: (n_rows, n_cols) with unit column stride (``dlogits`` may be ``logits``: in place).
    dlosses: (n_rows,) any stride. lse: fp32 (n_rows,) of the whole vocabulary. labels: (n_rows,).
    """
    n_rows, n_cols = logits.shape
    block = block_size or min(next_pow2(n_cols), MAX_BWD_BLOCK)
    if n_rows == 0 or n_cols == 0:
        return dlogits
    with _device_context(logits):
        cross_entropy_bwd_kernel[(n_rows, cdiv(n_cols, block))](
            dlogits,
            dlosses,
            logits,
            lse,
            labels,
            float(smoothing),
            float(logit_scale),
            float(lse_square_scale),
            int(ignore_index),
            int(total_classes),
            int(class_start_idx),
            n_cols,
            logits.stride(0),
            dlogits.stride(0),
            dlosses.stride(0),
            BLOCK_SIZE=block,
            num_warps=4 if block < 2048 else 8,
        )
    return dlogits


# ------------------------------------------------------------------------------------------------ custom ops
# One opaque node per launch for torch.compile / export / make_fx: a tracer records the op (shapes from the
# fake implementations) and never traces the Triton launch. Autograd stays in CrossEntropyLossFunction. The
# schemas name every argument; the Python bodies take the scalar tail as ``*args`` in schema order.
_SCALARS = (
    "float smoothing, float logit_scale, float lse_square_scale, int ignore_index, SymInt total_classes, "
    "SymInt class_start_idx"
)
_BWD_ARGS = f"Tensor lse, Tensor labels, {_SCALARS}, int? block_size"


def _unit_col_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op(
    "fa_core::cross_entropy_fwd",
    mutates_args=(),
    schema=f"(Tensor logits, Tensor labels, Tensor? precomputed_lse, {_SCALARS}, bool split, int? block_size) "
    "-> (Tensor, Tensor, Tensor)",
)
def _cross_entropy_fwd_op(
    logits: torch.Tensor, labels: torch.Tensor, precomputed_lse: torch.Tensor | None, *args: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_fwd` on inputs of any strides; the lse returned is a new tensor (a copy of
    ``precomputed_lse`` when given: an op's outputs never alias its inputs)."""
    if precomputed_lse is not None:
        precomputed_lse = precomputed_lse.to(torch.float32, copy=True).contiguous()
    # args: smoothing, logit_scale, lse_square_scale, ignore_index, total_classes, class_start_idx, split,
    # block_size (the order of cross_entropy_fwd's parameters)
    return cross_entropy_fwd(_unit_col_stride(logits), labels.contiguous(), precomputed_lse, *args)


@_cross_entropy_fwd_op.register_fake
def _cross_entropy_fwd_fake(logits, labels, precomputed_lse, *args):
    losses = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return losses, torch.empty_like(losses), torch.empty_like(losses)


def _bwd_into(dlogits: torch.Tensor, dlosses: torch.Tensor, logits: torch.Tensor, *args: Any) -> None:
    lse, labels, *rest = args  # rest: the scalars and block_size, in cross_entropy_bwd's order
    cross_entropy_bwd(dlogits, dlosses, logits, lse.contiguous(), labels.contiguous(), *rest)


@torch.library.custom_op(
    "fa_core::cross_entropy_bwd",
    mutates_args=(),
    schema=f"(Tensor dlosses, Tensor logits, {_BWD_ARGS}) -> Tensor",
)
def _cross_entropy_bwd_op(dlosses: torch.Tensor, logits: torch.Tensor, *args: Any) -> torch.Tensor:
    """The logits' gradient in a new contiguous tensor of the logits' dtype (:func:`cross_entropy_bwd`)."""
    logits = _unit_col_stride(logits)
    dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _bwd_into(dlogits, dlosses, logits, *args)
    return dlogits


@_cross_entropy_bwd_op.register_fake
def _cross_entropy_bwd_fake(dlosses, logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "fa_core::cross_entropy_bwd_inplace",
    mutates_args=("logits",),
    schema=f"(Tensor dlosses, Tensor(a!) logits, {_BWD_ARGS}) -> ()",
)
def _cross_entropy_bwd_inplace_op(dlosses: torch.Tensor, logits: torch.Tensor, *args: Any) -> None:
    """Overwrite ``logits`` with their gradient (through a copy when their columns are strided)."""
    target = _unit_col_stride(logits)
    _bwd_into(target, dlosses, target, *args)
    if target is not logits:
        logits.copy_(target)


@_cross_entropy_bwd_inplace_op.register_fake
def _cross_entropy_bwd_inplace_fake(dlosses, logits, *args) -> None:
    return None


def _check_inputs(
    logits: object, labels: object, precomputed_lse: object, logit_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("logits and labels must be torch.Tensor")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating point tensor, got {logits.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise FlashAttnValueError(
            f"logits must have shape (batch, vocab_size >= 1), got {tuple(logits.shape)}"
        )
    if labels.shape != (logits.shape[0],):
        raise FlashAttnValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise FlashAttnValueError(
            f"labels must be on the logits' device ({logits.device}), got {labels.device}"
        )
    if not logit_scale > 0.0:
        raise FlashAttnValueError(f"logit_scale must be > 0, got {logit_scale}")
    if precomputed_lse is not None:
        if not isinstance(precomputed_lse, torch.Tensor) or precomputed_lse.shape != (logits.shape[0],):
            raise FlashAttnValueError(f"precomputed_lse must be a tensor of shape ({logits.shape[0]},)")
        if precomputed_lse.device != logits.device:
            raise FlashAttnValueError("precomputed_lse must be on the logits' device")
    return logits, labels


class CrossEntropyLossFunction(torch.autograd.Function):
    """``flash_attn.ops.triton.cross_entropy.CrossEntropyLoss``: the autograd Function behind
    :func:`cross_entropy_loss` (same positional arguments; returns ``(losses, z_losses)``). Its forward and
    backward launch through the ``fa_core::cross_entropy_*`` custom ops, so ``torch.compile`` traces it
    whole."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        precomputed_lse: torch.Tensor | None = None,
        smoothing: float = 0.0,
        logit_scale: float = 1.0,
        lse_square_scale: float = 0.0,
        ignore_index: int = -100,
        inplace_backward: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = _check_inputs(logits, labels, precomputed_lse, logit_scale)
        n_rows, n_cols = logits.shape
        world_size = 1 if process_group is None else dist.get_world_size(process_group)
        rank = 0 if process_group is None else dist.get_rank(process_group)
        total_classes = world_size * n_cols
        class_start_idx = rank * n_cols
        split = world_size > 1
        if split and traced(logits):
            raise FlashAttnValueError(
                "the tensor-parallel cross-entropy loss (process_group of world size > 1) runs eagerly only: "
                "call cross_entropy_loss, which leaves it out of the traced graph"
            )
        lse_in = None
        if precomputed_lse is not None and logit_scale == 1.0 and smoothing == 0.0:
            lse_in = precomputed_lse.to(torch.float32).contiguous()
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        labels = labels.contiguous()
        fwd_block = _BLOCK_OVERRIDE["forward"]
        losses, lse, z_losses = torch.ops.fa_core.cross_entropy_fwd(
            logits,
            labels,
            lse_in,
            smoothing,
            logit_scale,
            lse_square_scale,
            ignore_index,
            total_classes,
            class_start_idx,
            split,
            fwd_block,
        )
        if split:
            # losses hold this shard's -(1 - s) x[label] - s sum(x) / total_classes; add the global lse
            gathered = torch.empty(world_size, n_rows, dtype=lse.dtype, device=lse.device)
            dist.all_gather(list(gathered.unbind(0)), lse, group=process_group)
            handle = dist.all_reduce(losses, op=dist.ReduceOp.SUM, group=process_group, async_op=True)
            lse = torch.logsumexp(gathered, dim=0)
            assert handle is not None
            handle.wait()
            ignored = labels == ignore_index
            losses += lse
            if lse_square_scale != 0.0:
                z_losses = (lse_square_scale * lse.square()).masked_fill_(ignored, 0.0)
                losses += z_losses
            else:
                z_losses = torch.zeros_like(losses)
            losses.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(logits, lse, labels)
        ctx.mark_non_differentiable(z_losses)
        ctx.smoothing = smoothing
        ctx.logit_scale = logit_scale
        ctx.lse_square_scale = lse_square_scale
        ctx.ignore_index = ignore_index
        ctx.total_classes = total_classes
        ctx.class_start_idx = class_start_idx
        ctx.inplace_backward = inplace_backward
        ctx.bwd_block = _BLOCK_OVERRIDE["backward"]
        return losses, z_losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor, grad_z_losses: torch.Tensor) -> tuple[Any, ...]:
        del grad_z_losses  # the z-loss output is for logging; its gradient flows through the losses
        logits, lse, labels = ctx.saved_tensors
        args = (
            lse,
            labels,
            ctx.smoothing,
            ctx.logit_scale,
            ctx.lse_square_scale,
            ctx.ignore_index,
            ctx.total_classes,
            ctx.class_start_idx,
            ctx.bwd_block,
        )
        if ctx.inplace_backward:
            dlogits = logits
            if traced(logits):
                # a tracer sees the write into the logits as a mutation (functionalized, or kept in place)
                torch.ops.fa_core.cross_entropy_bwd_inplace(grad_losses, logits, *args)
            else:
                # eager: the bare launch, as ever (the logits' version counter is left alone)
                _bwd_into(logits, grad_losses, logits, *args)
        else:
            dlogits = torch.ops.fa_core.cross_entropy_bwd(grad_losses, logits, *args)
        return dlogits, None, None, None, None, None, None, None, None


@torch.compiler.disable(reason="the tensor-parallel cross-entropy loss (process_group) runs eagerly only")
def _apply_eager(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor-parallel loss (collectives on the host): never traced, a graph break under torch.compile."""
    return CrossEntropyLossFunction.apply(*args)


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    precomputed_lse: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy loss (differentiable with respect to ``logits``).

    Arguments:
        logits: (batch, vocab_size), fp16 / bf16 / fp32; with ``process_group``, this rank's vocab shard
            (global columns ``[rank * vocab_size, (rank + 1) * vocab_size)``).
        labels: (batch,) integer, global class indices; ``ignore_index`` rows get loss 0 and no gradient.
        precomputed_lse: (batch,) logsumexp of the (local) logits rows, or None; used only when
            ``logit_scale == 1`` and ``label_smoothing == 0``.
        label_smoothing: float in [0, 1], as torch's ``CrossEntropyLoss(label_smoothing=...)``.
        logit_scale: float > 0; the logits are multiplied by it first.
        lse_square_scale: float; adds the z-loss ``lse_square_scale * lse ** 2`` to each row's loss.
        ignore_index: int.
        inplace_backward: write the gradient into the logits' storage (saves a (batch, vocab) buffer; the
            logits' values are lost after the backward). Under torch.compile, a mutation of the logits (see
            the module docstring).
        process_group: a torch.distributed group whose ranks each hold one vocab shard, or None. Eager only:
            under torch.compile the call is a graph break (an error with ``fullgraph=True``).
    Returns:
        losses: (batch,) fp32, z-loss included.
        z_losses: (batch,) fp32, the z-loss part alone (not differentiable).
    """
    apply = CrossEntropyLossFunction.apply if process_group is None else _apply_eager
    return apply(
        logits,
        labels,
        precomputed_lse,
        label_smoothing,
        logit_scale,
        lse_square_scale,
        ignore_index,
        inplace_backward,
        process_group,
    )


def cross_entropy_loss_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of :func:`cross_entropy_loss` on the full vocabulary (fp32, differentiable).

    logits: (batch, vocab_size); labels: (batch,) in ``[0, vocab_size)`` or ``ignore_index``.
    Returns losses and z_losses, (batch,) fp32 each.
    """
    x = logits.float() * logit_scale
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != ignore_index
    x_label = x.gather(1, torch.where(valid, labels, 0).long()[:, None])[:, 0]
    s = label_smoothing
    losses = lse - (1.0 - s) * x_label - s * x.mean(dim=-1)
    z_losses = torch.where(valid, lse_square_scale * lse.square(), 0.0)
    losses = torch.where(valid, losses + z_losses, 0.0)
    return losses, z_losses
