"""Rotary position embedding (RoPE) as a Triton kernel.

Semantics follow ``flash_attn.ops.triton.rotary.apply_rotary`` of flash-attn 2.8.x:

* ``x`` is ``(batch, seqlen, nheads, headdim)``, or ``(total_seqlen, nheads, headdim)`` when
  ``cu_seqlens`` is given (varlen).
* ``cos``/``sin`` are ``(seqlen_ro, rotary_dim / 2)``; only the first ``rotary_dim`` channels of
  ``x`` are rotated, the remaining ``headdim - rotary_dim`` channels are passed through.
* Token ``m`` of sequence ``b`` uses row ``m + seqlen_offsets[b]`` of ``cos``/``sin``.  Rows at or
  beyond ``seqlen_ro`` (only reachable with tensor offsets, which are not checked on the host to
  avoid a device sync) act as the identity rotation (cos = 1, sin = 0), like upstream; so do negative
  rows (a negative tensor offset). Varlen ``cu_seqlens`` entries are clamped to ``[0, total_seqlen]``
  (end >= start) in the kernel: whatever the values (host checks off, ``torch.compile``), no access
  leaves ``x``, ``cos`` or ``sin``.
* Non-interleaved (GPT-NeoX): channel ``i`` pairs with ``i + rotary_dim / 2``.
  Interleaved (GPT-J): channel ``2i`` pairs with ``2i + 1``.
* ``conjugate=True`` rotates by the negative angle (the inverse / the backward pass).

The kernel computes in fp32 and rounds once on store.

Under ``torch.compile`` (any backend, static or dynamic shapes, ``fullgraph=True``), export or ``make_fx``,
and whenever autograd records the call, launches go through two ``torch.library`` custom ops, so a tracer
records one opaque node per rotation and never traces the Triton launch:

* ``torch.ops.fa_core.rotary``: out of place, differentiable (the gradient is the conjugate rotation of the
  incoming gradient, registered with ``torch.library.register_autograd``);
* ``torch.ops.fa_core.rotary_inplace``: rotates ``x`` in place (``mutates_args=("x",)``), not differentiable.

In place with a gradient, :func:`apply_rotary` runs the out-of-place op and copies the rotated channels back
into ``x`` (an in-place ``copy_`` that autograd tracks), so every form is differentiable without an
``autograd.Function``. A plain eager call that records no gradient launches the kernel directly (the same
launch; the ops' Python dispatch would cost more than the kernel at decode sizes).

:data:`rotary_kernel` compiles once per class of its constexprs (rotary dim, interleaved, conjugate, tensor
or int offsets, varlen) and of Triton's specialization of the pointer / stride arguments (dtype, 16-byte
alignment, stride 1): the sequence length, head count, table length and integer offset are
``do_not_specialize`` and the batch size is only a grid dimension, so new batch sizes and sequence lengths
reuse the compiled kernel.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import triton
import triton.language as tl

from fa_core.errors import FlashAttnValueError
from fa_core.forward_configs import cdiv, next_pow2
from fa_core.masking import varlen_bounds
from fa_core.validation import traced, value_checks_enabled

__all__ = [
    "apply_rotary",
    "load_cos_sin",
    "rotary_kernel",
    "rotary_launch",
    "rotary_pair_cols",
    "rotate_pair",
]

_SUPPORTED_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def rotary_pair_cols(offs_k, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Columns of the two channels of rotated pair ``offs_k``: ``(2i, 2i + 1)`` interleaved (GPT-J style),
    ``(i, i + HALF)`` otherwise (GPT-NeoX style)."""
    if INTERLEAVED:
        k0 = 2 * offs_k
        k1 = 2 * offs_k + 1
    else:
        k0 = offs_k
        k1 = offs_k + HALF
    return k0, k1


@triton.jit
def load_cos_sin(COS, SIN, pos, offs_k, HALF: tl.constexpr, mask):
    """fp32 ``cos``/``sin`` ``(rows, pairs)`` of the contiguous ``(seqlen_ro, HALF)`` tables at positions ``pos``;
    where ``mask`` is False (rows past the table, padding) the identity rotation (cos 1, sin 0)."""
    cs_off = pos[:, None].to(tl.int64) * HALF + offs_k[None, :]
    cos = tl.load(COS + cs_off, mask=mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + cs_off, mask=mask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def rotate_pair(x0, x1, cos, sin):
    """The rotated pair in fp32 (rounded once by the caller's store)."""
    return x0 * cos - x1 * sin, x0 * sin + x1 * cos


# Integers that change with the problem size are never specialized (no recompile when they hit 1 or a
# multiple of 16); strides keep Triton's specialization (stride 1 / multiples of 16 give vector loads).
@triton.jit(do_not_specialize=["seqlen", "nheads", "seqlen_ro", "total_rows", "SEQLEN_OFFSETS"])
def rotary_kernel(
    OUT,
    X,
    COS,
    SIN,
    CU_SEQLENS,
    SEQLEN_OFFSETS,  # int scalar, or pointer to (batch,) ints when IS_OFFSETS_TENSOR
    seqlen,
    nheads,
    seqlen_ro,
    total_rows,  # varlen: rows of x (cu_seqlens entries are clamped to it); unused otherwise
    stride_out_b,
    stride_out_m,
    stride_out_h,
    stride_out_k,
    stride_x_b,
    stride_x_m,
    stride_x_h,
    stride_x_k,
    ROTARY_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two >= ROTARY_DIM // 2
    IS_OFFSETS_TENSOR: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    HALF: tl.constexpr = ROTARY_DIM // 2
    pid_h = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_b = tl.program_id(2)

    # int64 base offsets: batch * batch_stride can exceed 2**31 for large activations.
    if IS_VARLEN:
        # entries clamped to [0, total_rows] (end >= start): any cu_seqlens values stay inside x
        start, length = varlen_bounds(CU_SEQLENS, pid_b, total_rows)
        start = start.to(tl.int64)
        seqlen = length.to(tl.int32)
        X = X + start * stride_x_m
        OUT = OUT + start * stride_out_m
    else:
        X = X + pid_b.to(tl.int64) * stride_x_b
        OUT = OUT + pid_b.to(tl.int64) * stride_out_b

    if pid_m * BLOCK_M >= seqlen:
        return

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)

    if IS_OFFSETS_TENSOR:
        pos = offs_m + tl.load(SEQLEN_OFFSETS + pid_b).to(tl.int32)
    else:
        pos = offs_m + SEQLEN_OFFSETS

    # cos/sin are contiguous (seqlen_ro, HALF); rows outside the table (past its end, or negative from a
    # negative or overflowing offset) become the identity rotation and are never read.
    in_table = (pos >= 0) & (pos < seqlen_ro)
    cos, sin = load_cos_sin(COS, SIN, pos, offs_k, HALF, in_table[:, None] & (offs_k[None, :] < HALF))
    if CONJUGATE:
        sin = -sin
    cos = cos[None, :, :]
    sin = sin[None, :, :]

    k0, k1 = rotary_pair_cols(offs_k, HALF, INTERLEAVED)
    mask = (
        (offs_h[:, None, None] < nheads) & (offs_m[None, :, None] < seqlen) & (offs_k[None, None, :] < HALF)
    )
    row_x = offs_h[:, None, None].to(tl.int64) * stride_x_h + offs_m[None, :, None].to(tl.int64) * stride_x_m
    row_o = (
        offs_h[:, None, None].to(tl.int64) * stride_out_h + offs_m[None, :, None].to(tl.int64) * stride_out_m
    )
    x0 = tl.load(X + row_x + k0[None, None, :] * stride_x_k, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(X + row_x + k1[None, None, :] * stride_x_k, mask=mask, other=0.0).to(tl.float32)
    o0, o1 = rotate_pair(x0, x1, cos, sin)
    tl.store(OUT + row_o + k0[None, None, :] * stride_out_k, o0.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + row_o + k1[None, None, :] * stride_out_k, o1.to(OUT.dtype.element_ty), mask=mask)


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def rotary_launch(
    out: torch.Tensor,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: torch.Tensor | None,
    seqlen_offset: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    interleaved: bool,
    conjugate: bool,
) -> None:
    """Launch :data:`rotary_kernel`: rotate the first ``rotary_dim`` channels of ``x`` into ``out``.

    No validation and no autograd (callers: the custom ops below, and kernels' hosts that already checked
    their arguments). ``out`` may be ``x`` (in place); its other channels are not written.

    x, out: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with ``cu_seqlens``.
    cos, sin: (seqlen_ro, rotary_dim / 2). seqlen_offsets: (batch,) int32/int64 or None (then the int
    ``seqlen_offset`` applies to every sequence). cu_seqlens: (batch + 1,) or None; max_seqlen: the longest
    sequence with ``cu_seqlens`` (unused without).
    """
    is_varlen = cu_seqlens is not None
    if cu_seqlens is not None:
        batch, seqlen, nheads = cu_seqlens.shape[0] - 1, int(max_seqlen), x.shape[1]
        cu_seqlens = cu_seqlens.contiguous()
    else:
        batch, seqlen, nheads = x.shape[0], x.shape[1], x.shape[2]
    if x.numel() == 0 or batch <= 0 or seqlen <= 0 or nheads == 0:
        return
    cos, sin = cos.contiguous(), sin.contiguous()
    seqlen_ro, half = cos.shape
    rotary_dim = 2 * half
    offsets: torch.Tensor | int = (
        seqlen_offsets.contiguous() if seqlen_offsets is not None else int(seqlen_offset)
    )
    block_m = 8 if rotary_dim <= 128 else 4
    block_h = 2
    grid = (cdiv(nheads, block_h), cdiv(seqlen, block_m), batch)
    strides_out = (0 if is_varlen else out.stride(0), out.stride(-3), out.stride(-2), out.stride(-1))
    strides_x = (0 if is_varlen else x.stride(0), x.stride(-3), x.stride(-2), x.stride(-1))
    # Launch on x's device, not the current one (multi-GPU).
    with torch.cuda.device(x.device.index) if x.is_cuda else contextlib.nullcontext():
        rotary_kernel[grid](
            out,
            x,
            cos,
            sin,
            cu_seqlens,
            offsets,
            seqlen,
            nheads,
            seqlen_ro,
            x.shape[0] if is_varlen else 0,
            *strides_out,
            *strides_x,
            ROTARY_DIM=rotary_dim,
            BLOCK_K=next_pow2(half),
            IS_OFFSETS_TENSOR=seqlen_offsets is not None,
            IS_VARLEN=is_varlen,
            INTERLEAVED=bool(interleaved),
            CONJUGATE=bool(conjugate),
            BLOCK_H=block_h,
            BLOCK_M=block_m,
        )


_OP_ARGS = (
    "Tensor cos, Tensor sin, Tensor? seqlen_offsets, SymInt seqlen_offset, Tensor? cu_seqlens, "
    "SymInt max_seqlen, bool interleaved, bool conjugate"
)


def _rotate_out_of_place(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: torch.Tensor | None,
    seqlen_offset: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    interleaved: bool,
    conjugate: bool,
) -> torch.Tensor:
    """A new tensor like ``x`` (``empty_like`` strides): rotated channels, pass-through channels copied."""
    out = torch.empty_like(x)
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim < x.shape[-1]:
        # a plain copy covers every row, including varlen rows outside every sequence
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    if rotary_dim > 0:
        rotary_launch(
            out, x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate
        )
    return out


@torch.library.custom_op("fa_core::rotary", mutates_args=(), schema=f"(Tensor x, {_OP_ARGS}) -> Tensor")
def _rotary_op(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: torch.Tensor | None,
    seqlen_offset: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    interleaved: bool,
    conjugate: bool,
) -> torch.Tensor:
    """Out-of-place rotation (see :func:`_rotate_out_of_place`)."""
    return _rotate_out_of_place(
        x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate
    )


@_rotary_op.register_fake
def _rotary_fake(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate):
    return torch.empty_like(x)


def _rotary_setup_context(ctx, inputs, output) -> None:
    _, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
    ctx.seqlen_offset = seqlen_offset
    ctx.max_seqlen = max_seqlen
    ctx.interleaved = interleaved
    ctx.conjugate = conjugate


def _rotary_backward(ctx, grad: torch.Tensor):
    # A rotation is orthogonal: the gradient is the inverse (conjugate) rotation of the incoming gradient,
    # computed out of place (the incoming gradient may be the caller's tensor or an expanded view).
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    dx = torch.ops.fa_core.rotary(
        grad,
        cos,
        sin,
        seqlen_offsets,
        ctx.seqlen_offset,
        cu_seqlens,
        ctx.max_seqlen,
        ctx.interleaved,
        not ctx.conjugate,
    )
    return dx, None, None, None, None, None, None, None, None


_rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


@torch.library.custom_op(
    "fa_core::rotary_inplace", mutates_args=("x",), schema=f"(Tensor(a!) x, {_OP_ARGS}) -> ()"
)
def _rotary_inplace_op(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: torch.Tensor | None,
    seqlen_offset: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    interleaved: bool,
    conjugate: bool,
) -> None:
    """In-place rotation of the first ``rotary_dim`` channels of ``x``."""
    if cos.shape[1] > 0:
        rotary_launch(
            x, x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate
        )


@_rotary_inplace_op.register_fake
def _rotary_inplace_fake(
    x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate
) -> None:
    return None


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    interleaved: bool = False,
    inplace: bool = False,
    conjugate: bool = False,
) -> torch.Tensor:
    """Apply rotary embedding to the first ``rotary_dim`` channels of ``x``.

    Arguments:
        x: (batch, seqlen, nheads, headdim) if ``cu_seqlens`` is None,
            else (total_seqlen, nheads, headdim). fp16, bf16 or fp32.
        cos, sin: (seqlen_ro, rotary_dim / 2), floating point, same device as ``x``.
        seqlen_offsets: int, or int32/int64 tensor of shape (batch,). Sequence ``b`` starts at
            row ``seqlen_offsets[b]`` of cos/sin (KV-cache decoding).
        cu_seqlens: (batch + 1,) int32/int64 cumulative sequence lengths, or None.
        max_seqlen: int, required with ``cu_seqlens`` (upper bound of every sequence length).
        interleaved: rotate pairs (2i, 2i+1) (GPT-J) instead of (i, i + rotary_dim/2) (GPT-NeoX).
        inplace: write the result into ``x`` and return ``x``.
        conjugate: rotate by the negative angle (inverse rotation, used for the backward pass).
    Returns:
        out: same shape and dtype as ``x``; ``x`` itself when ``inplace``.

    Differentiable with respect to ``x`` (not ``cos`` / ``sin``), in place or not; works under
    ``torch.compile(fullgraph=True)`` and CUDA-graph capture (one custom-op node per call).
    """
    x = _check_tensor("x", x)
    cos = _check_tensor("cos", cos)
    sin = _check_tensor("sin", sin)
    if x.dtype not in _SUPPORTED_X_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
        if t.device != x.device:
            raise FlashAttnValueError(f"{name} must be on the same device as x ({x.device}), got {t.device}")
        if t.dim() != 2:
            raise FlashAttnValueError(
                f"{name} must have shape (seqlen_ro, rotary_dim / 2), got {tuple(t.shape)}"
            )
    if sin.shape != cos.shape:
        raise FlashAttnValueError(
            f"sin must have the same shape as cos {tuple(cos.shape)}, got {tuple(sin.shape)}"
        )

    if cu_seqlens is None:
        if x.dim() != 4:
            raise FlashAttnValueError(
                f"x must have shape (batch, seqlen, nheads, headdim), got {tuple(x.shape)}"
            )
        batch, seqlen, _, headdim = x.shape
        max_seqlen_arg: int = 0
    else:
        cu_seqlens = _check_tensor("cu_seqlens", cu_seqlens)
        if x.dim() != 3:
            raise FlashAttnValueError(
                f"x must have shape (total_seqlen, nheads, headdim) when cu_seqlens is given, got {tuple(x.shape)}"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise FlashAttnValueError(
                f"cu_seqlens must have shape (batch + 1,), got {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.device != x.device:
            raise FlashAttnValueError(
                f"cu_seqlens must be on the same device as x ({x.device}), got {cu_seqlens.device}"
            )
        if max_seqlen is None:
            raise FlashAttnValueError("max_seqlen must be passed when cu_seqlens is given")
        # max_seqlen may arrive as a 0-dim integer tensor (e.g. from HF's cu_seqlens.diff().max()).
        if isinstance(max_seqlen, torch.Tensor):
            max_seqlen = int(max_seqlen)
        elif not isinstance(max_seqlen, (int, torch.SymInt)):
            max_seqlen = operator.index(max_seqlen)
        if max_seqlen < 0:
            raise FlashAttnValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
        _, _, headdim = x.shape
        batch = cu_seqlens.shape[0] - 1
        seqlen = max_seqlen
        max_seqlen_arg = max_seqlen
        cu_seqlens = cu_seqlens.contiguous()
        if value_checks_enabled(cu_seqlens):
            # a decreasing or short cu_seqlens would leave rows silently un-rotated
            vals = cu_seqlens.cpu()
            if int(vals[0]) != 0 or bool((vals[1:] < vals[:-1]).any()) or int(vals[-1]) != x.shape[0]:
                raise FlashAttnValueError(
                    f"cu_seqlens must start at 0, be non-decreasing and end at total_seqlen = {x.shape[0]}, "
                    f"got {vals.tolist()}"
                )
            if batch and int((vals[1:] - vals[:-1]).max()) > max_seqlen:
                raise FlashAttnValueError(f"max_seqlen = {max_seqlen} is smaller than the longest sequence")

    seqlen_ro, half = cos.shape
    rotary_dim = 2 * half
    if rotary_dim == 0:
        raise FlashAttnValueError("cos/sin must have rotary_dim / 2 >= 1 columns, got 0")
    if rotary_dim > headdim:
        raise FlashAttnValueError(
            f"rotary_dim ({rotary_dim} = 2 * cos.shape[1]) must be <= headdim ({headdim})"
        )

    offsets_tensor: torch.Tensor | None = None
    offset_int: int = 0
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.shape != (batch,):
            raise FlashAttnValueError(
                f"seqlen_offsets tensor must have shape ({batch},), got {tuple(seqlen_offsets.shape)}"
            )
        if seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"seqlen_offsets tensor must be int32 or int64, got {seqlen_offsets.dtype}")
        if seqlen_offsets.device != x.device:
            raise FlashAttnValueError(
                f"seqlen_offsets must be on the same device as x ({x.device}), got {seqlen_offsets.device}"
            )
        offsets_tensor = seqlen_offsets.contiguous()
        # Values are not checked against seqlen_ro: that would need a device sync.
        if seqlen_ro < seqlen:
            raise FlashAttnValueError(f"cos/sin seqlen_ro ({seqlen_ro}) must be >= seqlen ({seqlen})")
    else:
        if isinstance(seqlen_offsets, bool):
            raise TypeError("seqlen_offsets must be an int or an integer tensor, got bool")
        if isinstance(seqlen_offsets, (int, torch.SymInt)):
            # as is: operator.index would specialize a symbolic int under torch.compile (a recompile per value)
            offset_int = seqlen_offsets
        else:
            try:
                offset_int = operator.index(seqlen_offsets)
            except TypeError:
                raise TypeError(
                    f"seqlen_offsets must be an int or an integer tensor, got {type(seqlen_offsets).__name__}"
                ) from None
        if offset_int < 0:
            raise FlashAttnValueError(f"seqlen_offsets must be >= 0, got {offset_int}")
        if offset_int + seqlen > seqlen_ro:
            raise FlashAttnValueError(
                f"cos/sin seqlen_ro ({seqlen_ro}) must be >= seqlen_offsets + seqlen "
                f"({offset_int} + {seqlen})"
            )

    cos, sin = cos.contiguous(), sin.contiguous()
    args = (
        cos,
        sin,
        offsets_tensor,
        offset_int,
        cu_seqlens,
        max_seqlen_arg,
        bool(interleaved),
        bool(conjugate),
    )
    records_grad = torch.is_grad_enabled() and x.requires_grad
    if not records_grad and not traced(x):
        # plain eager call: the same launch as the ops, without their dispatch cost
        if inplace:
            rotary_launch(x, x, *args)
            return x
        return _rotate_out_of_place(x, *args)
    if not inplace:
        return torch.ops.fa_core.rotary(x, *args)
    if records_grad:
        # Autograd records an in-place custom op only through a functional op: rotate out of place and copy
        # the rotated channels back (a tracked in-place copy_; x may be a view of a packed qkv / kv).
        out = torch.ops.fa_core.rotary(x, *args)
        x[..., :rotary_dim].copy_(out[..., :rotary_dim])
        return x
    torch.ops.fa_core.rotary_inplace(x, *args)
    return x
