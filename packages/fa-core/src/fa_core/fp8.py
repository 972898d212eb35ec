"""FP8 (``float8_e4m3fn``) host preparation for the forward: input checks and the stacked descales, the
keys-last copy of V that Hopper's FP8 dot needs, and the output dtype (bf16 for FP8 inputs)."""

from __future__ import annotations

import torch

from fa_core import validation as V
from fa_core.validation import FP8_DTYPE

__all__ = ["fp8_descale", "out_dtype", "transposed_v"]


def out_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if q.dtype == FP8_DTYPE else q.dtype


def fp8_descale(q, k, batch, q_descale, k_descale, v_descale, return_probs):
    """Validate the FP8 inputs; return the stacked ``(3, batch, nheads_k)`` float32 descales, or None."""
    given = [d is not None for d in (q_descale, k_descale, v_descale)]
    if q.dtype != FP8_DTYPE:
        if any(given):
            raise ValueError("q_descale / k_descale / v_descale are only valid with float8_e4m3fn q, k, v")
        return None
    if V.interpreting() or not q.is_cuda:
        raise ValueError(
            "FP8 (float8_e4m3fn) attention needs a CUDA GPU; the CPU interpreter cannot run FP8 dots"
        )
    if torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError(
            f"FP8 attention needs FP8 tensor cores (sm_89 or newer), got {torch.cuda.get_device_name()}"
        )
    if return_probs:
        raise ValueError("return_probs is not supported with FP8 inputs")
    nheads_k = k.shape[-2]
    scales = []
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if d is None:
            scales.append(torch.ones(batch, nheads_k, device=q.device, dtype=torch.float32))
            continue
        V.check_tensor(name, d, 2)
        V.check_device(name, d, "q", q)
        if d.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {d.dtype}")
        if tuple(d.shape) != (batch, nheads_k):
            raise ValueError(
                f"{name} must have shape (batch, nheads_k) = ({batch}, {nheads_k}), got {tuple(d.shape)}"
            )
        scales.append(d)
    return torch.stack(scales).contiguous()


def transposed_v(v: torch.Tensor, varlen: bool) -> torch.Tensor:
    """V with keys last, ``(batch, nheads_k, headdim_v, seqlen_k)`` (varlen ``(nheads_k, headdim_v,
    total_k)``), the key dim padded to a multiple of 16 elements so that its row stride suits TMA.

    Hopper's FP8 tensor-core dot (wgmma) needs both operands K-major; for P @ V the K dim is the key dim, so
    V must be read from a keys-contiguous copy. One copy per call: ~1% of the attention time at 4k keys.
    """
    keys = v.permute(1, 2, 0) if varlen else v.permute(0, 2, 3, 1)
    n = keys.shape[-1]
    padded = -(-n // 16) * 16
    vt = torch.empty(*keys.shape[:-1], padded, dtype=v.dtype, device=v.device)
    vt[..., :n].copy_(keys)
    return vt
