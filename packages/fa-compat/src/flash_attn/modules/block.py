"""``flash_attn.modules.block``: flash-attn 2.8.x's Transformer blocks ``Block`` and ``ParallelBlock``.

* :class:`Block`, ``prenorm=True`` (the default): ``dropout -> add -> norm -> mixer -> dropout -> add -> norm
  -> mlp``. The block starts with the residual addition of the previous block's output, so it takes and
  returns the pair ``(hidden_states, residual)`` (``residual=None`` for the first block); the model applies
  the last dropout / add / norm after its last block.
* :class:`Block`, ``prenorm=False``: the classic post-norm block ``norm1(x + dropout(mixer(x)))``, then
  ``norm2(h + dropout(mlp(h)))``; it returns the hidden states alone.
* :class:`ParallelBlock` (GPT-J, GPT-NeoX, PaLM): the mixer and the MLP read the same normalized residual
  stream; takes ``(hidden_states1, hidden_states2, residual)`` and returns the mixer's output, the MLP's
  output and the residual.

``drop_path1`` / ``drop_path2`` are stochastic depth per sample (:class:`StochasticDepth`, the semantics of
``torchvision.ops.StochasticDepth(p, mode="row")``, without needing torchvision). With
``fused_dropout_add_ln=True`` the dropout + residual add + LayerNorm / RMSNorm steps run as one
:func:`flash_attn.ops.triton.layer_norm.layer_norm_fn` (the norm must be ``nn.LayerNorm`` or
:class:`flash_attn.ops.triton.layer_norm.RMSNorm`, the dropout ``nn.Dropout``); stochastic depth then enters
as the kernel's row scale. The defaults build ``MHA(dim, num_heads=dim // 64)``,
``Mlp(dim, hidden_features=4 * dim)`` and ``nn.LayerNorm(dim)``. Submodule names (``mixer``, ``mlp``, ``norm1``, ``norm2``, ``dropout1``,
``dropout2``, ``drop_path1``, ``drop_path2``), signatures and defaults are flash-attn's, so state dicts load
either way.

``sequence_parallel=True`` / ``mark_shared_params=True`` tag the norms' parameters ``_sequence_parallel`` /
``_shared_params`` for :func:`flash_attn.utils.distributed.allreduce_sequence_parallel_grad` /
:func:`flash_attn.utils.distributed.sync_shared_params`.

Differences from flash-attn, all supersets: invalid configurations raise ``ValueError`` instead of failing an
``assert``; the fused path applies an RMSNorm's ``zero_centered_weight`` as the unfused path does (flash-attn
2.8.3 drops it there); ``mixer_kwargs`` is copied, never modified; a norm without a weight
(``elementwise_affine=False``) works on the unfused path.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import Mlp
from flash_attn.ops.triton.layer_norm import RMSNorm, layer_norm_fn

__all__ = ["Block", "ParallelBlock", "StochasticDepth", "stochastic_depth"]


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """Drop whole samples (``mode="row"``: each index of dim 0 independently) or the whole batch
    (``mode="batch"``) with probability ``p`` and scale the survivors by ``1 / (1 - p)``; the identity when not
    ``training`` or ``p == 0``. Same semantics as ``torchvision.ops.stochastic_depth``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    keep = 1.0 - p
    shape = (input.shape[0],) + (1,) * (input.ndim - 1) if mode == "row" else (1,) * input.ndim
    noise = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(keep)
    if keep > 0.0:
        noise.div_(keep)
    return input * noise


class StochasticDepth(nn.Module):
    """:func:`stochastic_depth` as a module (training mode from ``self.training``); no parameters. Same
    constructor, attributes (``p``, ``mode``) and forward as ``torchvision.ops.StochasticDepth``."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        """input: (B, ...) -> same shape."""
        return stochastic_depth(input, self.p, self.mode, self.training)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode})"


def _to_norm_dtype(x: Tensor, norm: nn.Module) -> Tensor:
    """``x`` cast to the norm's weight dtype (unchanged for a norm without a weight)."""
    weight = getattr(norm, "weight", None)
    return x if weight is None else x.to(dtype=weight.dtype)


def _norm_kwargs(norm: nn.Module) -> dict[str, Any]:
    """The arguments of :func:`layer_norm_fn` that describe ``norm`` (nn.LayerNorm or RMSNorm)."""
    return {
        "eps": norm.eps,
        "is_rms_norm": isinstance(norm, RMSNorm),
        "zero_centered_weight": bool(getattr(norm, "zero_centered_weight", False)),
    }


def _check_fusable(norm: nn.Module, dropout: nn.Module) -> None:
    if not isinstance(norm, (nn.LayerNorm, RMSNorm)) or not isinstance(dropout, nn.Dropout):
        raise ValueError(
            "fused_dropout_add_ln=True needs norm_cls building nn.LayerNorm or "
            "flash_attn.ops.triton.layer_norm.RMSNorm and dropout_cls building nn.Dropout, got "
            f"{type(norm).__name__} and {type(dropout).__name__}"
        )


def _tag_parameters(norms: list[nn.Module], sequence_parallel: bool, mark_shared_params: bool) -> None:
    """Mark the norms' parameters for the tensor-parallel helpers of :mod:`flash_attn.utils.distributed`."""
    for norm in norms:
        for p in norm.parameters():
            if sequence_parallel:  # their gradients are all-reduced over the group
                p._sequence_parallel = True  # type: ignore[attr-defined]
            if mark_shared_params:  # their values are broadcast from the group's first rank
                p._shared_params = True  # type: ignore[attr-defined]


def _layer_classes(
    dim: int, mixer_cls: Callable[[int], nn.Module] | None, mlp_cls: Callable[[int], nn.Module] | None
) -> tuple[Callable[[int], nn.Module], Callable[[int], nn.Module]]:
    """``(mixer_cls, mlp_cls)`` with their defaults ``partial(MHA, num_heads=dim // 64)`` and
    ``partial(Mlp, hidden_features=4 * dim)``."""
    if mixer_cls is None:
        mixer_cls = partial(MHA, num_heads=dim // 64)
    if mlp_cls is None:
        mlp_cls = partial(Mlp, hidden_features=4 * dim)
    return mixer_cls, mlp_cls


def _finish_norms(
    block: Any, fused_dropout_add_ln: bool, sequence_parallel: bool, mark_shared_params: bool
) -> None:
    """The end of the blocks' constructors: check that ``norm1`` / ``dropout1`` fit the fused kernel (with
    ``fused_dropout_add_ln``), then tag the parameters of ``norm1`` and ``norm2`` (when the block has one)
    with :func:`_tag_parameters`."""
    if fused_dropout_add_ln:
        _check_fusable(block.norm1, block.dropout1)
    norms = [block.norm1, block.norm2] if hasattr(block, "norm2") else [block.norm1]
    _tag_parameters(norms, sequence_parallel, mark_shared_params)


def _allocate_inference_cache(
    self: Any, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, **kwargs: Any
) -> Any:
    """The mixer's ``allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)``.

    The blocks' ``allocate_inference_cache`` method (``self``: the block)."""
    return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)


def _add_norm(summed: Tensor, norm: nn.Module, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """``(norm(summed), residual)`` of the unfused path: ``summed`` cast to the norm's weight dtype for the
    norm, and kept as the residual stream (in float32 with ``residual_in_fp32``)."""
    normed = norm(_to_norm_dtype(summed, norm))
    return normed, summed.to(torch.float32) if residual_in_fp32 else summed


def _fused_dropout_add_norm(
    x: Tensor,
    residual: Tensor | None,
    dropout: Any,
    norm: Any,
    *,
    training: bool,
    prenorm: bool,
    residual_in_fp32: bool,
    **kwargs: Any,
) -> Any:
    """:func:`layer_norm_fn` of ``norm(dropout(x) + residual)`` with ``norm``'s weight, bias, eps and kind and
    ``dropout``'s probability (in training mode only); ``kwargs``: its other arguments (``rowscale``, or
    ``x1`` / ``weight1`` / ``bias1``)."""
    return layer_norm_fn(
        x,
        norm.weight,
        norm.bias,
        residual=residual,
        dropout_p=dropout.p if training else 0.0,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        **kwargs,
        **_norm_kwargs(norm),
    )


class Block(nn.Module):
    """Transformer block: mixer (attention) and MLP sub-layers, each with dropout, stochastic depth, a residual
    connection and a norm; pre-norm (returns ``(hidden_states, residual)``) or post-norm (returns the hidden
    states). See the module docstring for the two layouts."""

    def __init__(
        self,
        dim: int,
        mixer_cls: Callable[[int], nn.Module] | None = None,
        mlp_cls: Callable[[int], nn.Module] | None = None,
        norm_cls: Callable[[int], nn.Module] = nn.LayerNorm,
        dropout_cls: Callable[[float], nn.Module] = nn.Dropout,
        prenorm: bool = True,
        resid_dropout1: float = 0.0,
        resid_dropout2: float = 0.0,
        drop_path1: float = 0.0,
        drop_path2: float = 0.0,
        fused_dropout_add_ln: bool = False,
        return_residual: bool = False,
        residual_in_fp32: bool = False,
        sequence_parallel: bool = False,
        mark_shared_params: bool = False,
    ) -> None:
        """
        Arguments:
            dim: model width.
            mixer_cls, mlp_cls, norm_cls: called with ``dim`` to build ``mixer`` (default
                ``partial(MHA, num_heads=dim // 64)``), ``mlp`` (default ``partial(Mlp, hidden_features=4 *
                dim)``; an ``nn.Identity`` MLP means a block without the second sub-layer: no ``dropout2`` /
                ``drop_path2`` / ``norm2``) and the norms (default ``nn.LayerNorm``).
            dropout_cls: called with ``resid_dropout1`` / ``resid_dropout2`` to build ``dropout1`` /
                ``dropout2``, applied to the sub-layers' outputs before the residual add.
            prenorm: pre-norm layout (see the module docstring), else post-norm.
            drop_path1, drop_path2: stochastic depth probabilities of the two sub-layers' outputs.
            fused_dropout_add_ln: dropout + add + norm in one Triton kernel (:func:`layer_norm_fn`).
            return_residual: post-norm only: the mixer and the MLP return ``(out, input)`` (built with
                ``return_residual=True``) and the block adds that returned input.
            residual_in_fp32: pre-norm only: the residual stream is kept in float32.
            sequence_parallel, mark_shared_params: tag the norms' parameters ``_sequence_parallel`` /
                ``_shared_params`` (see :mod:`flash_attn.utils.distributed`).
        """
        super().__init__()
        if residual_in_fp32 and not prenorm:
            raise ValueError("residual_in_fp32 is only compatible with prenorm=True")
        self.prenorm = prenorm
        self.fused_dropout_add_ln = fused_dropout_add_ln
        self.return_residual = return_residual
        self.residual_in_fp32 = residual_in_fp32
        mixer_cls, mlp_cls = _layer_classes(dim, mixer_cls, mlp_cls)
        self.mixer = mixer_cls(dim)
        self.dropout1 = dropout_cls(resid_dropout1)
        self.drop_path1 = StochasticDepth(drop_path1, mode="row")
        self.norm1 = norm_cls(dim)
        self.mlp = mlp_cls(dim)
        if not isinstance(self.mlp, nn.Identity):
            self.dropout2 = dropout_cls(resid_dropout2)
            self.drop_path2 = StochasticDepth(drop_path2, mode="row")
            self.norm2 = norm_cls(dim)
        _finish_norms(self, fused_dropout_add_ln, sequence_parallel, mark_shared_params)

    allocate_inference_cache = _allocate_inference_cache

    def _dropout_add_norm(
        self,
        x: Tensor,
        residual: Tensor | None,
        dropout: Any,
        drop_path: Any,
        norm: Any,
        prenorm: bool,
    ) -> Any:
        """``norm(drop_path(dropout(x)) + residual)`` (``residual`` None: no add); with ``prenorm`` the pair
        ``(normed, sum)``, the sum in float32 with ``residual_in_fp32``."""
        if not self.fused_dropout_add_ln:
            summed = drop_path(dropout(x))
            if residual is not None:
                summed = summed + residual
            normed, residual = _add_norm(summed, norm, self.residual_in_fp32)
            return (normed, residual) if prenorm else normed
        rowscale = None
        if self.training and drop_path.p > 0:
            # stochastic depth per sample of dim 0 becomes a scale of each row of x
            rowscale = drop_path(torch.ones(x.shape[:-1], device=x.device, dtype=x.dtype))
        return _fused_dropout_add_norm(
            x,
            residual,
            dropout,
            norm,
            training=self.training,
            prenorm=prenorm,
            residual_in_fp32=self.residual_in_fp32 if prenorm else False,
            rowscale=rowscale,
        )

    def forward(
        self,
        hidden_states: Tensor,
        residual: Tensor | None = None,
        mixer_subset: Any = None,
        mixer_kwargs: dict[str, Any] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """
        Arguments:
            hidden_states: (B, S, dim). Pre-norm: the previous block's MLP output (the embeddings for the
                first block); post-norm: the block's input.
            residual: pre-norm only: the residual stream returned by the previous block (None for the first
                block); must be None for post-norm.
            mixer_subset: pre-norm only, for a cross-attention mixer: index of the sequence dimension passed to
                the mixer as ``mixer_subset`` (e.g. a ViT's CLS token); the residual is indexed the same way.
            mixer_kwargs: extra keyword arguments of the mixer's forward.
        Return:
            pre-norm: ``(hidden_states, residual)``, the MLP's output and the residual stream after the mixer
            (in float32 with ``residual_in_fp32``); post-norm: the normalized output (B, S, dim).
        """
        mixer_kwargs = dict(mixer_kwargs) if mixer_kwargs is not None else {}
        has_mlp = not isinstance(self.mlp, nn.Identity)
        if self.prenorm:
            hidden_states, residual = self._dropout_add_norm(
                hidden_states, residual, self.dropout1, self.drop_path1, self.norm1, prenorm=True
            )
            if mixer_subset is not None:
                mixer_kwargs["mixer_subset"] = mixer_subset
            hidden_states = self.mixer(hidden_states, **mixer_kwargs)
            assert residual is not None
            if mixer_subset is not None:
                residual = residual[:, mixer_subset]
            if has_mlp:
                hidden_states, residual = self._dropout_add_norm(
                    hidden_states, residual, self.dropout2, self.drop_path2, self.norm2, prenorm=True
                )
                hidden_states = self.mlp(hidden_states)
            return hidden_states, residual

        if residual is not None:
            raise ValueError("Block with prenorm=False takes no residual")
        mixer_out = self.mixer(hidden_states, **mixer_kwargs)
        if self.return_residual:  # the mixer returned (out, its input)
            mixer_out, hidden_states = mixer_out
        hidden_states = self._dropout_add_norm(
            mixer_out, hidden_states, self.dropout1, self.drop_path1, self.norm1, prenorm=False
        )
        if has_mlp:
            mlp_out = self.mlp(hidden_states)
            if self.return_residual:  # the MLP returned (out, its input)
                mlp_out, hidden_states = mlp_out
            hidden_states = self._dropout_add_norm(
                mlp_out, hidden_states, self.dropout2, self.drop_path2, self.norm2, prenorm=False
            )
        return hidden_states


class ParallelBlock(nn.Module):
    """Transformer block with the mixer and the MLP side by side (GPT-J, GPT-NeoX, PaLM): ``residual +=
    dropout1(hidden_states1) + dropout2(hidden_states2)``, then ``mixer(norm1(residual))`` and
    ``mlp(norm2(residual))`` (``norm1`` for both with ``tied_norm``)."""

    def __init__(
        self,
        dim: int,
        mixer_cls: Callable[[int], nn.Module] | None = None,
        mlp_cls: Callable[[int], nn.Module] | None = None,
        norm_cls: Callable[[int], nn.Module] = nn.LayerNorm,
        dropout_cls: Callable[[float], nn.Module] = nn.Dropout,
        resid_dropout1: float = 0.0,
        resid_dropout2: float = 0.0,
        tied_norm: bool = False,
        fused_dropout_add_ln: bool = False,
        residual_in_fp32: bool = False,
        sequence_parallel: bool = False,
        mark_shared_params: bool = False,
    ) -> None:
        """
        Arguments:
            dim: model width.
            mixer_cls, mlp_cls, norm_cls, dropout_cls: as in :class:`Block` (same defaults).
            resid_dropout1, resid_dropout2: dropout of the previous block's mixer / MLP output.
            tied_norm: one norm (``norm1``) for both branches; no ``norm2``.
            fused_dropout_add_ln: dropout + add + both norms in one Triton kernel (:func:`layer_norm_fn` with a
                second weight; both inputs then use ``resid_dropout1`` and the norms share ``norm1``'s eps).
            residual_in_fp32: the residual stream is kept in float32.
            sequence_parallel, mark_shared_params: as in :class:`Block`.
        """
        super().__init__()
        self.tied_norm = tied_norm
        self.fused_dropout_add_ln = fused_dropout_add_ln
        self.residual_in_fp32 = residual_in_fp32
        mixer_cls, mlp_cls = _layer_classes(dim, mixer_cls, mlp_cls)
        self.mixer = mixer_cls(dim)
        self.dropout1 = dropout_cls(resid_dropout1)
        self.norm1 = norm_cls(dim)
        self.mlp = mlp_cls(dim)
        self.dropout2 = dropout_cls(resid_dropout2)
        if not tied_norm:
            self.norm2 = norm_cls(dim)
        _finish_norms(self, fused_dropout_add_ln, sequence_parallel, mark_shared_params)

    allocate_inference_cache = _allocate_inference_cache

    def forward(
        self,
        hidden_states1: Tensor,
        hidden_states2: Tensor | None = None,
        residual: Tensor | None = None,
        mixer_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        Arguments:
            hidden_states1: (B, S, dim), the previous block's mixer output (the embeddings for the first
                block).
            hidden_states2: (B, S, dim), the previous block's MLP output; None for the first block.
            residual: the residual stream returned by the previous block; None for the first block.
            mixer_kwargs: extra keyword arguments of the mixer's forward.
        Return:
            ``(hidden_states1, hidden_states2, residual)``: the mixer's output, the MLP's output and the new
            residual stream (in float32 with ``residual_in_fp32``).
        """
        if not self.fused_dropout_add_ln:
            summed = self.dropout1(hidden_states1)
            if residual is not None:
                summed = residual + summed
            if hidden_states2 is not None:  # the first block has a single input (one dropout)
                summed = summed + self.dropout2(hidden_states2)
            normed1, residual = _add_norm(summed, self.norm1, self.residual_in_fp32)
            normed2 = normed1 if self.tied_norm else self.norm2(_to_norm_dtype(summed, self.norm2))
        else:
            norm2: Any = None if self.tied_norm else self.norm2
            normed1, *rest, residual = _fused_dropout_add_norm(
                hidden_states1,
                residual,
                self.dropout1,
                self.norm1,
                training=self.training,
                prenorm=True,
                residual_in_fp32=self.residual_in_fp32,
                x1=hidden_states2,
                weight1=None if norm2 is None else norm2.weight,
                bias1=None if norm2 is None else norm2.bias,
            )
            normed2 = normed1 if self.tied_norm else rest[0]
        mixer_out = self.mixer(normed1, **(mixer_kwargs if mixer_kwargs is not None else {}))
        mlp_out = self.mlp(normed2)
        assert residual is not None
        return mixer_out, mlp_out, residual
