"""What the Hopper Gluon backward passes (:mod:`fa_backward.gluon_dq`, :mod:`fa_backward.gluon_dkdv`) share on
the host: their scope (dtypes, head dims, the device) and the checks each pass's ``unsupported_reason`` runs on
the dense inputs, the options it does not take, the softmax scale and the TMA layouts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fa_core.gluon import _tma_ok
from fa_core.gluon import available as _gluon_available

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)


def available(device: torch.device | int | None = None) -> bool:
    """True when the kernels can run: Triton 3.6 with Gluon's Hopper modules, CUDA, an sm_90 device."""
    return _gluon_available(device)


def dense_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    like_q: Sequence[tuple[str, torch.Tensor]],
    check_device: bool,
) -> str | None:
    """Why dense ``q (b, s_q, h, d)``, ``k, v (b, s_k, h_k, d)`` and the tensors ``like_q`` (name, tensor: q's
    shape and dtype, e.g. ``dout``) are outside the passes' scope, or None."""
    if check_device and not (q.is_cuda and available(q.device)):
        return "needs Triton 3.6 Gluon and an sm_90 CUDA device"
    names = ", ".join(["q", "k", "v", *(name for name, _ in like_q)])
    if any(t.dim() != 4 for t in (q, k, v, *(t for _, t in like_q))):
        return f"dense (batch, seqlen, nheads, headdim) {names} only"
    if q.dtype not in DTYPES or any(t.dtype != q.dtype for t in (k, v, *(t for _, t in like_q))):
        return f"{names} must all be bfloat16 or all float16"
    batch, seqlen_q, nheads, head_dim = q.shape
    _, seqlen_k, nheads_k, _ = k.shape
    if head_dim not in HEAD_DIMS or k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        return f"head dim must be one of {HEAD_DIMS} for q, k and v"
    if k.shape[0] != batch or v.shape != k.shape:
        return "k and v must be (batch, seqlen_k, nheads_k, headdim) with q's batch"
    for name, t in like_q:
        if t.shape != q.shape:
            return f"{name} must have q's shape"
    if nheads_k == 0 or nheads % nheads_k:
        return "nheads must be a multiple of nheads_k"
    if min(batch, seqlen_q, seqlen_k, nheads) == 0:
        return "empty tensors"
    return None


def options_reason(softmax_scale: float | None, extras: dict[str, Any]) -> str | None:
    """Why the softmax scale (None or finite > 0) or a further keyword (None / False / 0, ``window_size`` also
    ``(-1, -1)``: the options the passes do not take) is refused, or None."""
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        return "softmax_scale must be finite and > 0"
    for name, value in extras.items():
        if name == "window_size" and isinstance(value, (tuple, list)) and tuple(value) == (-1, -1):
            continue
        if value is not None and value is not False and not (isinstance(value, (int, float)) and value == 0):
            return f"{name} is not supported"
    return None


def layout_reason(
    q: torch.Tensor,
    tma: Sequence[tuple[str, torch.Tensor]],
    others: Sequence[torch.Tensor],
    check_device: bool,
) -> str | None:
    """Why the tensors loaded or stored through TMA (``tma``: name, tensor) or the ``others`` are not usable:
    all on q's device (with ``check_device``), TMA-compatible layouts. None when they are."""
    if check_device and any(t.device != q.device for t in (*(t for _, t in tma), *others)):
        return "every tensor must be on q's device"
    for name, t in tma:
        if not _tma_ok(t):
            return f"{name} needs a contiguous last dim and 16-byte aligned base and strides (TMA)"
    return None
