"""``flash_attn.losses.cross_entropy``: the cross-entropy ``nn.Module`` of flash-attn 2.8.x.

``CrossEntropyLoss(ignore_index=-100, reduction="mean", label_smoothing=0.0, logit_scale=1.0,
lse_square_scale=0.0, inplace_backward=False, process_group=None, return_z_loss=False)``, called as
``loss(input, target, precomputed_lse=None)`` with ``input`` (batch, vocab_size) and ``target`` (batch,).
It wraps :func:`flash_attn.ops.triton.cross_entropy.cross_entropy_loss` and reduces its fp32 per-row
losses: ``"mean"`` divides the sum by the number of rows whose target is not ``ignore_index``, ``"sum"``
sums, ``"none"`` keeps ``(batch,)``. With ``return_z_loss=True`` it returns ``(loss, z_loss)``, the z-loss
reduced the same way (for logging; no gradient). Unlike flash-attn, CPU tensors are accepted (Triton's
interpreter).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        logit_scale: float = 1.0,
        lse_square_scale: float = 0.0,
        inplace_backward: bool = False,
        process_group: dist.ProcessGroup | None = None,
        return_z_loss: bool = False,
    ) -> None:
        """
        Arguments:
            ignore_index: rows whose target equals it get loss 0 and no gradient.
            reduction: "mean" (over the rows not ignored), "sum" or "none".
            label_smoothing: float in [0, 1], as torch's ``CrossEntropyLoss``.
            logit_scale: the logits are multiplied by it first.
            lse_square_scale: adds the z-loss ``lse_square_scale * logsumexp(logits) ** 2`` to the loss.
            inplace_backward: write the gradient into the input's storage (saves memory).
            process_group: tensor parallelism: each rank holds one vocab shard of the input.
            return_z_loss: also return the z-loss part (for logging, no gradient).
        """
        super().__init__()
        if reduction not in ("mean", "none", "sum"):
            raise NotImplementedError("Only support reduction = 'mean' or 'none' or 'sum'")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.logit_scale = logit_scale
        self.lse_square_scale = lse_square_scale
        self.inplace_backward = inplace_backward
        self.process_group = process_group
        self.return_z_loss = return_z_loss

    def _reduce(self, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.reduction == "mean":
            return values.sum() / (target != self.ignore_index).sum()
        if self.reduction == "sum":
            return values.sum()
        return values

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, precomputed_lse: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
            input: (batch, vocab_size) logits (this rank's shard with a ``process_group``).
            target: (batch,) integer class indices.
            precomputed_lse: (batch,) logsumexp of the input rows, or None.
        Returns:
            loss: (batch,) with reduction "none", else a scalar; fp32.
            z_loss (only with ``return_z_loss``): reduced like ``loss``.
        """
        loss, z_loss = cross_entropy_loss(
            input,
            target,
            precomputed_lse=precomputed_lse,
            label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale,
            lse_square_scale=self.lse_square_scale,
            ignore_index=self.ignore_index,
            inplace_backward=self.inplace_backward,
            process_group=self.process_group,
        )
        loss = self._reduce(loss, target)
        if not self.return_z_loss:
            return loss
        return loss, self._reduce(z_loss, target)
