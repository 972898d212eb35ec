"""``flash_attn.ops.layer_norm``: flash-attn 2.8.x's fused dropout + residual add + LayerNorm, on Triton.

flash-attn implements this module with its CUDA extension ``dropout_layer_norm``; here the same functions run
the Triton kernels of :mod:`fa_core.layer_norm` (see :mod:`flash_attn.ops._dropout_norm` for how the
per-column scale and the row subsets are composed around them). Shapes: ``x0`` is ``(..., N)`` with ``N =
weight.numel()``; the leading dimensions are flattened into rows. The pre-norm sum is

    ``x = dropout(x0 * rowscale[..., None] * layerscale) + residual``

computed in fp32; the output ``norm(x) * weight + bias`` has ``x0``'s dtype, ``x`` (returned with
``prenorm``) the residual dtype: ``residual``'s, else fp32 with ``residual_in_fp32``, else ``x0``'s. The
weights may be fp32 with fp16 / bf16 activations.

Return values follow flash-attn: ``out``, then ``x`` (``prenorm``), then the dropout mask
(``return_dropout_mask``): uint8, ``x0``-shaped, 1 where the element was kept, all ones when ``dropout_p`` is
0. A lone ``out`` is returned bare. The masks come from the Triton kernels' counter-based generator seeded
through ``torch.randint`` (reproducible under ``torch.manual_seed``), so they differ from CUDA's Philox
stream; the backward pass regenerates the same masks from per-row seeds instead of storing them.

Decisions (where flash-attn's extension has limits or undefined behaviour):

* Any hidden size works (the extension takes multiples of 8 up to 8192); inputs need not be contiguous or
  16-byte aligned, and ``rowscale`` may have any floating dtype.
* The subset variant accepts ``x0_subset`` and ``out_subset`` independently (either may be None: then ``x0``
  / the output covers every row), applies ``rowscale_const`` in every case, and zero-fills output rows that no
  ``out_subset`` entry names. ``x0`` rows that several ``x0_subset`` entries name receive the sum of their
  gradients (the returned mask row is the mask of one of those copies); rows that none names get a zero
  gradient and, with dropout, a zero mask row.
* With ``layerscale`` the product ``x0 * layerscale`` is formed in fp32 before the kernel (one extra fp32
  ``x0``-sized buffer), and the subset variant gathers the ``x0`` rows into a full-size matrix first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import init

from fa_core.errors import FlashAttnValueError
from flash_attn.ops._dropout_norm import (
    as_rows,
    gather_rows,
    keep_mask,
    norm_backward,
    norm_forward,
    scatter_add_rows,
    scatter_rows,
    subset_index,
)

__all__ = [
    "DropoutAddLayerNorm",
    "DropoutAddLayerNormFn",
    "DropoutAddLayerNormParallelResidualFn",
    "DropoutAddLayerNormSubsetFn",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_parallel_residual",
    "dropout_add_layer_norm_subset",
    "layer_norm",
    "maybe_align",
]


def maybe_align(x: Tensor, alignment_in_bytes: int = 16) -> Tensor:
    """``x`` if its data pointer is a multiple of ``alignment_in_bytes``, else a copy (flash-attn's helper; the
    Triton kernels themselves need no alignment)."""
    return x if x.data_ptr() % alignment_in_bytes == 0 else x.clone()


def _x0_rows(x0: Tensor, n: int) -> Tensor:
    if x0.shape[-1] != n:
        raise FlashAttnValueError(f"x0's last dimension must be the hidden size {n}, got {tuple(x0.shape)}")
    return as_rows("x0", x0, x0.numel() // n, n)


def _rowscale(rowscale: Tensor | None, rows: int) -> Tensor | None:
    if rowscale is None:
        return None
    if rowscale.numel() != rows:
        raise FlashAttnValueError(
            f"rowscale must have {rows} elements (x0.shape[:-1]), got {rowscale.numel()}"
        )
    return rowscale.reshape(-1)


def _reshape_grad(g: Tensor | None, shape: torch.Size) -> Tensor | None:
    return g.reshape(shape) if g is not None else None


class DropoutAddLayerNormFn(torch.autograd.Function):
    """``apply(x0, residual, gamma, beta, rowscale, colscale, dropout_p, epsilon, residual_in_fp32=False,
    prenorm=False, is_rms_norm=False, return_dmask=False)``: see :func:`dropout_add_layer_norm`
    (``colscale`` is its ``layerscale``; ``is_rms_norm`` selects RMSNorm). Differentiable in ``x0``,
    ``residual``, ``gamma``, ``beta`` and ``colscale``."""

    @staticmethod
    def forward(
        ctx: Any,
        x0: Tensor,
        residual: Tensor | None,
        gamma: Tensor,
        beta: Tensor | None,
        rowscale: Tensor | None,
        colscale: Tensor | None,
        dropout_p: float,
        epsilon: float,
        residual_in_fp32: bool = False,
        prenorm: bool = False,
        is_rms_norm: bool = False,
        return_dmask: bool = False,
    ) -> Any:
        n = gamma.numel()
        x0_rows = _x0_rows(x0, n)
        m = x0_rows.shape[0]
        res_rows = as_rows("residual", residual, m, n) if residual is not None else None
        rs = _rowscale(rowscale, m)
        f = norm_forward(
            x0_rows, res_rows, gamma, beta, epsilon, dropout_p, rowscale=rs, colscale=colscale,
            residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms_norm,
            return_dropout_mask=return_dmask and dropout_p > 0.0,
        )  # fmt: skip
        ctx.save_for_backward(
            f.x, x0_rows if colscale is not None else None, gamma, beta, rs, colscale, f.mean, f.rstd, f.seeds
        )
        ctx.x0_shape, ctx.x0_dtype = x0.shape, x0.dtype
        ctx.residual_shape = residual.shape if residual is not None else None
        ctx.eps, ctx.dropout_p, ctx.prenorm, ctx.is_rms_norm = epsilon, dropout_p, prenorm, is_rms_norm
        outs = [f.out.view(x0.shape)]
        if prenorm:
            outs.append(f.x.view(x0.shape))
        if return_dmask:
            dmask = keep_mask(f.mask, m, n, x0.device).view(x0.shape)
            ctx.mark_non_differentiable(dmask)
            outs.append(dmask)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @staticmethod
    def backward(ctx: Any, dz: Tensor, *args: Tensor | None) -> tuple[Tensor | None, ...]:
        x, x0, gamma, beta, rowscale, colscale, mean, rstd, seeds = ctx.saved_tensors
        n = x.shape[1]
        dx = args[0].reshape(-1, n) if ctx.prenorm and args[0] is not None else None
        g = norm_backward(
            dz.reshape(-1, n), None, dx, x, gamma, beta, None, None, mean, rstd, seeds, rowscale, colscale, x0,
            ctx.eps, ctx.dropout_p, ctx.residual_shape is not None, False, ctx.is_rms_norm, ctx.x0_dtype,
        )  # fmt: skip
        return (
            g.dx0.reshape(ctx.x0_shape),
            _reshape_grad(g.dresidual, ctx.residual_shape),
            g.dweight,
            g.dbias,
            None,
            g.dcolscale,
            *([None] * 6),
        )


class DropoutAddLayerNormSubsetFn(torch.autograd.Function):
    """``apply(x0, residual, gamma, beta, colscale, x0_subset, out_subset, dropout_p, epsilon, rowscale_const,
    out_numrows, residual_in_fp32=False, prenorm=False, is_rms_norm=False, return_dmask=False)``: see
    :func:`dropout_add_layer_norm_subset`. Differentiable in ``x0``, ``residual``, ``gamma``, ``beta`` and
    ``colscale``."""

    @staticmethod
    def forward(
        ctx: Any,
        x0: Tensor,
        residual: Tensor | None,
        gamma: Tensor,
        beta: Tensor | None,
        colscale: Tensor | None,
        x0_subset: Tensor | None,
        out_subset: Tensor | None,
        dropout_p: float,
        epsilon: float,
        rowscale_const: float,
        out_numrows: int,
        residual_in_fp32: bool = False,
        prenorm: bool = False,
        is_rms_norm: bool = False,
        return_dmask: bool = False,
    ) -> Any:
        n = gamma.numel()
        x0_rows = _x0_rows(x0, n)
        x0_numrows = x0_rows.shape[0]
        if x0_subset is not None:
            rows = x0_subset.numel()
            x0_index = subset_index("x0_subset", x0_subset, rows, x0_numrows)
            x_rows = gather_rows(x0_rows, x0_index)
        else:
            rows, x0_index, x_rows = x0_numrows, None, x0_rows
        res_rows = as_rows("residual", residual, rows, n) if residual is not None else None
        out_index = (
            subset_index("out_subset", out_subset, rows, out_numrows) if out_subset is not None else None
        )
        rs = (
            torch.full((rows,), rowscale_const, dtype=torch.float32, device=x0.device)
            if rowscale_const != 1.0
            else None
        )
        f = norm_forward(
            x_rows, res_rows, gamma, beta, epsilon, dropout_p, rowscale=rs, colscale=colscale,
            residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms_norm,
            return_dropout_mask=return_dmask and dropout_p > 0.0,
        )  # fmt: skip
        ctx.save_for_backward(
            f.x, x_rows if colscale is not None else None, gamma, beta, rs, colscale, f.mean, f.rstd, f.seeds,
            x0_index, out_index,
        )  # fmt: skip
        ctx.x0_shape, ctx.x0_dtype, ctx.x0_numrows = x0.shape, x0.dtype, x0_numrows
        ctx.residual_shape = residual.shape if residual is not None else None
        ctx.eps, ctx.dropout_p, ctx.prenorm, ctx.is_rms_norm = epsilon, dropout_p, prenorm, is_rms_norm
        row_shape = (-1, *x0.shape[1:])
        z = scatter_rows(f.out, out_index, out_numrows) if out_index is not None else f.out
        outs = [z.view(row_shape)]
        if prenorm:
            outs.append(f.x.view(row_shape))
        if return_dmask:
            dmask = keep_mask(f.mask, x0_numrows, n, x0.device)
            if x0_index is not None and f.mask is not None:
                dmask = scatter_rows(dmask, x0_index, x0_numrows)
            dmask = dmask.view(x0.shape)
            ctx.mark_non_differentiable(dmask)
            outs.append(dmask)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @staticmethod
    def backward(ctx: Any, dz: Tensor, *args: Tensor | None) -> tuple[Tensor | None, ...]:
        x, x0, gamma, beta, rowscale, colscale, mean, rstd, seeds, x0_index, out_index = ctx.saved_tensors
        n = x.shape[1]
        dz_rows = dz.reshape(-1, n)
        if out_index is not None:
            dz_rows = gather_rows(dz_rows, out_index)
        dx = args[0].reshape(-1, n) if ctx.prenorm and args[0] is not None else None
        g = norm_backward(
            dz_rows, None, dx, x, gamma, beta, None, None, mean, rstd, seeds, rowscale, colscale, x0, ctx.eps,
            ctx.dropout_p, ctx.residual_shape is not None, False, ctx.is_rms_norm, ctx.x0_dtype,
        )  # fmt: skip
        dx0 = g.dx0 if x0_index is None else scatter_add_rows(g.dx0, x0_index, ctx.x0_numrows)
        return (
            dx0.reshape(ctx.x0_shape),
            _reshape_grad(g.dresidual, ctx.residual_shape),
            g.dweight,
            g.dbias,
            g.dcolscale,
            *([None] * 10),
        )


class DropoutAddLayerNormParallelResidualFn(torch.autograd.Function):
    """``apply(x0, x1, residual, gamma0, beta0, gamma1, beta1, dropout_p, epsilon, residual_in_fp32=False,
    prenorm=False, is_rms_norm=False, return_dmask=False)``: see
    :func:`dropout_add_layer_norm_parallel_residual`. Differentiable in every tensor argument."""

    @staticmethod
    def forward(
        ctx: Any,
        x0: Tensor,
        x1: Tensor | None,
        residual: Tensor | None,
        gamma0: Tensor,
        beta0: Tensor | None,
        gamma1: Tensor | None,
        beta1: Tensor | None,
        dropout_p: float,
        epsilon: float,
        residual_in_fp32: bool = False,
        prenorm: bool = False,
        is_rms_norm: bool = False,
        return_dmask: bool = False,
    ) -> Any:
        n = gamma0.numel()
        x0_rows = _x0_rows(x0, n)
        m = x0_rows.shape[0]
        x1_rows = as_rows("x1", x1, m, n) if x1 is not None else None
        res_rows = as_rows("residual", residual, m, n) if residual is not None else None
        f = norm_forward(
            x0_rows, res_rows, gamma0, beta0, epsilon, dropout_p, x1=x1_rows, weight1=gamma1, bias1=beta1,
            residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms_norm,
            return_dropout_mask=return_dmask and dropout_p > 0.0,
        )  # fmt: skip
        ctx.save_for_backward(f.x, gamma0, beta0, gamma1, beta1, f.mean, f.rstd, f.seeds)
        ctx.x0_shape, ctx.x0_dtype = x0.shape, x0.dtype
        ctx.x1_shape = x1.shape if x1 is not None else None
        ctx.residual_shape = residual.shape if residual is not None else None
        ctx.eps, ctx.dropout_p, ctx.prenorm, ctx.is_rms_norm = epsilon, dropout_p, prenorm, is_rms_norm
        outs: list[Tensor | None] = [
            f.out.view(x0.shape),
            f.out1.view(x0.shape) if f.out1 is not None else None,
        ]
        if prenorm:
            outs.append(f.x.view(x0.shape))
        if return_dmask:
            dmask0 = keep_mask(f.mask, m, n, x0.device).view(x0.shape)
            dmask1 = keep_mask(f.mask1, m, n, x0.device).view(x0.shape)
            ctx.mark_non_differentiable(dmask0, dmask1)
            outs.extend([dmask0, dmask1])
        return tuple(outs)

    @staticmethod
    def backward(
        ctx: Any, dz0: Tensor, dz1: Tensor | None, *args: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, gamma0, beta0, gamma1, beta1, mean, rstd, seeds = ctx.saved_tensors
        n = x.shape[1]
        dx = args[0].reshape(-1, n) if ctx.prenorm and args[0] is not None else None
        g = norm_backward(
            dz0.reshape(-1, n), dz1.reshape(-1, n) if dz1 is not None else None, dx, x, gamma0, beta0, gamma1,
            beta1, mean, rstd, seeds, None, None, None, ctx.eps, ctx.dropout_p, ctx.residual_shape is not None,
            ctx.x1_shape is not None, ctx.is_rms_norm, ctx.x0_dtype,
        )  # fmt: skip
        return (
            g.dx0.reshape(ctx.x0_shape),
            _reshape_grad(g.dx1, ctx.x1_shape),
            _reshape_grad(g.dresidual, ctx.residual_shape),
            g.dweight,
            g.dbias,
            g.dweight1,
            g.dbias1,
            *([None] * 6),
        )


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, epsilon: float) -> Tensor:
    """LayerNorm over the last dimension: ``x`` (..., N), ``weight`` / ``bias`` (N,); returns (..., N) in
    ``x``'s dtype."""
    return DropoutAddLayerNormFn.apply(x, None, weight, bias, None, None, 0.0, epsilon, False)


def dropout_add_layer_norm(
    x0: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    dropout_p: float,
    epsilon: float,
    rowscale: Tensor | None = None,
    layerscale: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_dropout_mask: bool = False,
) -> Any:
    """``LayerNorm(dropout(x0 * rowscale * layerscale) + residual)``, fused.

    Arguments:
        x0: (..., N). residual: like ``x0`` (may have another dtype) or None.
        weight, bias: (N,); ``bias`` may be None.
        dropout_p: in [0, 1); pass 0.0 in eval mode.
        epsilon: added to the variance.
        rowscale: ``x0.shape[:-1]``, a per-row scale of ``x0`` (e.g. a stochastic-depth mask), or None.
        layerscale: (N,), a per-column scale of ``x0`` (LayerScale), or None; it receives a gradient.
        prenorm: also return the pre-norm sum (the next residual stream).
        residual_in_fp32: without ``residual``, keep the pre-norm sum in fp32 (otherwise ``x0``'s dtype).
        return_dropout_mask: also return the uint8 keep mask, ``x0``-shaped.
    Return:
        ``out`` (..., N) in ``x0``'s dtype; ``(out, x)`` with ``prenorm``; the mask appended with
        ``return_dropout_mask``.
    """
    return DropoutAddLayerNormFn.apply(
        x0, residual, weight, bias, rowscale, layerscale, dropout_p, epsilon, residual_in_fp32, prenorm, False,
        return_dropout_mask,
    )  # fmt: skip


def dropout_add_layer_norm_subset(
    x0: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    dropout_p: float,
    epsilon: float,
    layerscale: Tensor | None = None,
    x0_subset: Tensor | None = None,
    out_subset: Tensor | None = None,
    rowscale_const: float = 1.0,
    out_numrows: int = 0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_dropout_mask: bool = False,
) -> Any:
    """:func:`dropout_add_layer_norm` on row subsets (stochastic depth without materializing dropped rows).

    With ``R`` full rows (``x0_subset.numel()``, or ``x0``'s row count without ``x0_subset``), full row ``i``
    is ``x[i] = dropout(x0[x0_subset[i] - 1] * rowscale_const * layerscale) + residual[i]``, with no ``x0``
    term where ``x0_subset[i] == 0``, and its normalization goes to output row ``out_subset[i] - 1`` (nowhere
    where ``out_subset[i] == 0``).

    Arguments:
        x0: (R0, ..., N) holding only the kept rows. residual: R full rows (e.g. (B, S, N)) or None.
        x0_subset, out_subset: integer tensors with R elements (e.g. (B, S)), 1-based row maps, or None.
        rowscale_const: scale of every ``x0`` row (e.g. ``1 / (1 - drop_path_rate)``).
        out_numrows: the number of output rows (with ``out_subset``).
        Other arguments as in :func:`dropout_add_layer_norm`.
    Return:
        ``out`` (-1, \\*x0.shape[1:]) holding ``out_numrows`` rows (R without ``out_subset``); ``x``
        (-1, \\*x0.shape[1:]) with R rows (``prenorm``); the uint8 keep mask, ``x0``-shaped
        (``return_dropout_mask``).
    """
    return DropoutAddLayerNormSubsetFn.apply(
        x0, residual, weight, bias, layerscale, x0_subset, out_subset, dropout_p, epsilon, rowscale_const,
        out_numrows, residual_in_fp32, prenorm, False, return_dropout_mask,
    )  # fmt: skip


def dropout_add_layer_norm_parallel_residual(
    x0: Tensor,
    x1: Tensor | None,
    residual: Tensor | None,
    weight0: Tensor,
    bias0: Tensor | None,
    weight1: Tensor | None,
    bias1: Tensor | None,
    dropout_p: float,
    epsilon: float,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    return_dropout_mask: bool = False,
) -> Any:
    """Parallel-residual block (GPT-J / GPT-NeoX): ``x = dropout(x0) + dropout(x1) + residual`` (independent
    masks), normalized with two weight sets sharing the statistics.

    Arguments:
        x0: (..., N). x1, residual: like ``x0`` or None.
        weight0, bias0: (N,) of the first norm; weight1, bias1: (N,) of the second (None: no second output).
        Other arguments as in :func:`dropout_add_layer_norm`.
    Return:
        ``(out0, out1)`` (``out1`` None without ``weight1``), then ``x`` (``prenorm``), then the keep masks
        ``dmask0, dmask1`` (``return_dropout_mask``; ``dmask1`` is all ones without ``x1``).
    """
    return DropoutAddLayerNormParallelResidualFn.apply(
        x0, x1, residual, weight0, bias0, weight1, bias1, dropout_p, epsilon, residual_in_fp32, prenorm, False,
        return_dropout_mask,
    )  # fmt: skip


class DropoutAddLayerNorm(torch.nn.Module):
    """``LayerNorm(dropout(x0) + residual)`` over ``hidden_size`` with a weight (ones) and a bias (zeros);
    dropout ``p`` applies in training mode only. ``forward(x0, residual=None)`` returns ``out``, or
    ``(out, x)`` with ``prenorm`` (see :func:`dropout_add_layer_norm`)."""

    def __init__(
        self,
        hidden_size: int,
        prenorm: bool = False,
        p: float = 0.0,
        eps: float = 1e-5,
        residual_in_fp32: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.p = p
        self.eps = eps
        self.residual_in_fp32 = residual_in_fp32
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.ones_(self.weight)
        init.zeros_(self.bias)

    def forward(self, x0: Tensor, residual: Tensor | None = None) -> Any:
        return dropout_add_layer_norm(
            x0,
            residual,
            self.weight,
            self.bias,
            self.p if self.training else 0.0,
            self.eps,
            prenorm=self.prenorm,
            residual_in_fp32=self.residual_in_fp32,
        )
