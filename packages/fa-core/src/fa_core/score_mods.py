"""Worked examples of user ``score_mod`` / ``mask_mod`` functions, each with its derivative and PyTorch twin.

Kernel functions are ``@triton.jit`` and compiled into the attention kernels (passed as constexprs):

* ``score_mod(score, b, h, q_idx, kv_idx) -> score``: ``score`` is the fp32 logit tile in natural-log units
  (after ``softmax_scale``, softcap and ALiBi), ``b`` / ``h`` the batch and query-head indices (scalars),
  ``q_idx`` / ``kv_idx`` int32 broadcastable position tiles (relative to the start of the sequence). The
  function must be elementwise (the backward calls it on transposed tiles).
* ``score_mod_grad(score, b, h, q_idx, kv_idx)``: ``d score_mod(score, ...) / d score`` at the same
  (unmodified) score; the backward multiplies the logit gradient by it. Any score_mod that adds a bias has
  derivative 1: :func:`additive_grad`.
* ``mask_mod(b, h, q_idx, kv_idx) -> bool``: False masks the element out; no derivative is needed.

Each kernel function has a PyTorch twin (suffix ``_torch``) with the same arguments, as
:func:`fa_core.attention_ref` and FlexAttention take them. Constants (bias scale, softcap, prefix length)
are module-level: copy an example and change them to make your own (a kernel function cannot capture values).

Example::

    from fa_backward.programmable import attention
    from fa_core import score_mods as sm

    out, lse = attention(
        q, k, v, causal=True, score_mod=sm.relative_position_bias, score_mod_grad=sm.additive_grad
    )
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa_core.block_sparse import BlockMask, block_mask_from_dense
from fa_core.masking import tanh

__all__ = [
    "PREFIX_LENGTH",
    "REL_BIAS_SCALE",
    "TANH_SOFTCAP",
    "additive_grad",
    "alibi",
    "alibi_slopes",
    "alibi_torch",
    "document_block_mask",
    "document_mask_torch",
    "prefix_lm",
    "prefix_lm_torch",
    "relative_position_bias",
    "relative_position_bias_torch",
    "tanh_softcap",
    "tanh_softcap_grad",
    "tanh_softcap_torch",
]

#: :func:`relative_position_bias` adds ``REL_BIAS_SCALE * (q_idx - kv_idx)``.
REL_BIAS_SCALE = 0.01
#: :func:`tanh_softcap` computes ``TANH_SOFTCAP * tanh(score / TANH_SOFTCAP)``.
TANH_SOFTCAP = 4.0
#: :func:`prefix_lm`: the first ``PREFIX_LENGTH`` keys are visible from every query (bidirectional prefix).
PREFIX_LENGTH = 16


@triton.jit
def additive_grad(score, b, h, q_idx, kv_idx):
    """Derivative of any score_mod of the form ``score + bias(b, h, q_idx, kv_idx)``: 1."""
    return score * 0.0 + 1.0


# ---------------------------------------------------------------------------------- relative position bias
@triton.jit
def relative_position_bias(score, b, h, q_idx, kv_idx):
    """``score + 0.01 * q_idx - 0.01 * kv_idx`` (FlexAttention's relative-position example, scaled); derivative:
    :func:`additive_grad`."""
    # the bias as two scaled index vectors (one conversion per row / column: int -> float runs at a quarter of
    # the FP32 rate, like exp2); ``score + q_bias`` fuses with the kernel's ``q @ k^T * scale`` into one FMA,
    # so the element pays an FMA and an add
    return (score + 0.01 * q_idx.to(tl.float32)) - 0.01 * kv_idx.to(tl.float32)


def relative_position_bias_torch(score, b, h, q_idx, kv_idx):
    return (score + REL_BIAS_SCALE * q_idx.to(score.dtype)) - REL_BIAS_SCALE * kv_idx.to(score.dtype)


# ------------------------------------------------------------------------------------------------- ALiBi
@triton.jit
def alibi(score, b, h, q_idx, kv_idx):
    """ALiBi with slope ``2^-(h+1)`` (the standard slopes of an 8-head model): ``score - slope * |q_idx -
    kv_idx|``. Equal to the built-in ``alibi_slopes=alibi_slopes(nheads)`` when ``seqlen_q == seqlen_k`` (the
    built-in aligns the diagonal bottom-right, a score_mod sees raw positions). Derivative: :func:`additive_grad`."""
    slope = tl.exp2(-(h + 1).to(tl.float32))
    # fp32 difference of converted index vectors (see relative_position_bias)
    return score - slope * tl.abs(q_idx.to(tl.float32) - kv_idx.to(tl.float32))


def alibi_torch(score, b, h, q_idx, kv_idx):
    slope = torch.exp2(-(h + 1).to(score.dtype))
    return score - slope * (q_idx.to(score.dtype) - kv_idx.to(score.dtype)).abs()


def alibi_slopes(nheads: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(nheads,)`` float32 slopes ``2^-(h+1)`` of :func:`alibi`, for the built-in ``alibi_slopes``."""
    return torch.exp2(-(torch.arange(nheads, device=device, dtype=torch.float32) + 1))


# -------------------------------------------------------------------------------------------- tanh softcap
@triton.jit
def tanh_softcap(score, b, h, q_idx, kv_idx):
    """``4 * tanh(score / 4)``: equal to the built-in ``softcap=TANH_SOFTCAP`` (without ALiBi)."""
    return 4.0 * tanh(score * 0.25)


@triton.jit
def tanh_softcap_grad(score, b, h, q_idx, kv_idx):
    """Derivative of :func:`tanh_softcap`: ``1 - tanh(score / 4)^2``."""
    t = tanh(score * 0.25)
    return 1.0 - t * t


def tanh_softcap_torch(score, b, h, q_idx, kv_idx):
    return TANH_SOFTCAP * torch.tanh(score / TANH_SOFTCAP)


# --------------------------------------------------------------------------------------------- prefix-LM
@triton.jit
def prefix_lm(b, h, q_idx, kv_idx):
    """Prefix-LM mask_mod: causal (top-left aligned), except that the first 16 keys (the prefix) are seen by
    every query, bidirectionally."""
    return (kv_idx <= q_idx) | (kv_idx < 16)


def prefix_lm_torch(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) | (kv_idx < PREFIX_LENGTH)


# ------------------------------------------------------------------------------------------ document masks
def document_mask_torch(document_ids: torch.Tensor):
    """PyTorch mask function ``(b, h, q_idx, kv_idx)`` of "same document" for ``document_ids (B|1, seqlen)``
    (self-attention, ``seqlen_q == seqlen_k``), for references and FlexAttention."""
    docs = document_ids

    def mask(b, h, q_idx, kv_idx):
        bb = b if docs.shape[0] > 1 else b * 0
        return docs[bb, q_idx] == docs[bb, kv_idx]

    return mask


def document_block_mask(
    document_ids: torch.Tensor, block_size: tuple[int, int] = (128, 128), causal: bool = False
) -> BlockMask:
    """Block mask of document masking (packed documents, each token attends only inside its document).

    Args:
        document_ids: ``(batch|1, seqlen)`` integer document index of every token, non-decreasing along the
            sequence, every document boundary a multiple of both block sizes (then every listed block is
            full and the block mask alone is exact, with no mask_mod).
        causal: also drop the blocks above the diagonal (pass ``causal=True`` to the kernel as well).

    Returns:
        A :class:`BlockMask` ``(batch|1, 1, ...)`` with full blocks only. Built on the device.
    """
    if (
        not isinstance(document_ids, torch.Tensor)
        or document_ids.dim() != 2
        or document_ids.is_floating_point()
    ):
        raise ValueError("document_ids must be an integer tensor of shape (batch|1, seqlen)")
    bq, bk = (int(x) for x in block_size)
    seqlen = document_ids.shape[1]
    step = max(bq, bk)
    change = document_ids[:, 1:] != document_ids[:, :-1]
    pos = torch.arange(1, seqlen, device=document_ids.device)
    if bool((change & (pos % step != 0)).any()) or bool((document_ids[:, 1:] < document_ids[:, :-1]).any()):
        raise ValueError(
            f"document_ids must be non-decreasing with every document boundary a multiple of the block size {step}"
        )
    # one document per block: the id of the block's first token
    dq = document_ids[:, ::bq]
    dk = document_ids[:, ::bk]
    same = dq[:, :, None] == dk[:, None, :]
    if causal:
        qb = torch.arange(dq.shape[1], device=document_ids.device)[:, None] * bq
        kb = torch.arange(dk.shape[1], device=document_ids.device)[None, :] * bk
        same = same & (kb <= qb + bq - 1)
    blocks = same[:, None]
    return block_mask_from_dense(blocks, (bq, bk), full_blocks=blocks)
