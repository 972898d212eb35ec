"""``flash_attn.ops.triton.cross_entropy``: the Triton cross-entropy loss (flash-attn 2.8.x names).

``cross_entropy_loss(logits, labels, precomputed_lse=None, label_smoothing=0.0, logit_scale=1.0,
lse_square_scale=0.0, ignore_index=-100, inplace_backward=False, process_group=None)`` returns
``(losses, z_losses)``, both fp32 ``(batch,)``; ``CrossEntropyLoss`` is its autograd Function (call it with
``.apply`` and the same positional arguments). ``cross_entropy_fwd_kernel`` / ``cross_entropy_bwd_kernel``
are the ``@triton.jit`` kernels, with flash-attn's argument lists. See ``fa_core.cross_entropy``; unlike
flash-attn, CPU tensors run too (through Triton's interpreter).
"""

from fa_core.cross_entropy import (
    CrossEntropyLossFunction,
    cross_entropy_bwd_kernel,
    cross_entropy_fwd_kernel,
    cross_entropy_loss,
)

CrossEntropyLoss = CrossEntropyLossFunction

__all__ = ["CrossEntropyLoss", "cross_entropy_bwd_kernel", "cross_entropy_fwd_kernel", "cross_entropy_loss"]
