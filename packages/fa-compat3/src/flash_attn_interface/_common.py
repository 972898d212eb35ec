"""Helpers shared by :mod:`flash_attn_interface` and its KV-cache half (argument refusal, FP8 routing,
window and varlen utilities)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fa_core import ops
from fa_core import validation as V
from fa_core.errors import FlashAttnValueError
from flash_attn import _extras

Tensor = torch.Tensor

#: FlashAttention-3's helper: copy a tensor only when its last dim is strided
maybe_contiguous = V.contig_last


def round_multiple(x: int, m: int) -> int:
    """``x`` rounded up to a multiple of ``m`` (FlashAttention-3's helper)."""
    return (x + m - 1) // m * m


# ------------------------------------------------------------------------------------------------- helpers
def _refuse(name: str, value: object, why: str) -> None:
    if value is not None:
        raise FlashAttnValueError(
            f"{name} is not supported by Flash Attention Plus's flash_attn_interface: {why}"
        )


def _refuse_qv(qv: object) -> None:
    _refuse("qv", qv, "there is no kernel for the extra query-value term (MLA); pass qv=None")


def _is_fp8(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == V.FP8_DTYPE


#: the widest V head dim FlashAttention-3 takes (with a q head dim of at most 64: MLA's latent width)
MAX_HEADDIM_V = 512


def _v_passes(v: Tensor) -> list[Tensor]:
    """``v`` as column blocks the kernels take (last dim at most :data:`fa_core.validation.MAX_HEADDIM`): ``[v]``
    up to that width; wider V (up to :data:`MAX_HEADDIM_V`) splits into equal blocks of a multiple of 8
    columns (16-byte aligned views, no copy).

    ``softmax(S) [V_1, V_2] = [softmax(S) V_1, softmax(S) V_2]``: one pass per block gives the exact output
    (each pass recomputes S; the lse is the same in every pass), and the gradients of the passes add up to
    the gradient of the whole (``dS`` is linear in ``dO V^T`` and ``rowsum(dO * O)`` over the blocks)."""
    dv = v.shape[-1] if isinstance(v, Tensor) and v.dim() >= 3 else 0
    if dv <= V.MAX_HEADDIM:
        return [v]
    if dv > MAX_HEADDIM_V:
        raise FlashAttnValueError(f"v head dim must be in [1, {MAX_HEADDIM_V}], got {dv}")
    n = -(-dv // V.MAX_HEADDIM)
    return list(v.split(round_multiple(-(-dv // n), 8), dim=-1))


def _in_v_passes(v: Tensor, run: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``run(v_block) -> (out, lse)`` over the column blocks of :func:`_v_passes`: the outputs side by side, the
    lse of the first pass (every pass has the same)."""
    results = [run(part) for part in _v_passes(v)]
    outs = [out for out, _ in results]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)), results[0][1]


def _attention(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """``(out, softmax_lse)`` of one call through fa-core's call path, differentiable (fa-backward) when an
    input requires grad. ``kwargs``: :func:`fa_core.ops.prepare`'s keywords. A V head dim above 256 runs as
    passes over column blocks of V (:func:`_v_passes`)."""
    fab = _extras.BACKWARD

    def run(part: Tensor) -> tuple[Tensor, Tensor]:
        out, lse, _ = ops.attention(
            q, k, part, autograd=None if fab is None else fab.autograd.apply, missing=_extras.require_backward,
            dropout_p=0.0, **kwargs,
        )  # fmt: skip
        return out, lse

    return _in_v_passes(v, run)


def _fp8_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    descales: tuple[Tensor | None, Tensor | None, Tensor | None],
    varlen: dict[str, Any] | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """FP8 forward (fa-core; forward only, bf16 output); a V head dim above 256 in passes (:func:`_v_passes`)."""
    from fa_core.forward import flash_attn_forward, flash_attn_varlen_forward

    qd, kd, vd = descales

    def run(part: Tensor) -> tuple[Tensor, Tensor]:
        if varlen is None:
            res = flash_attn_forward(q, k, part, q_descale=qd, k_descale=kd, v_descale=vd, **kwargs)
        else:
            res = flash_attn_varlen_forward(
                q, k, part, q_descale=qd, k_descale=kd, v_descale=vd, **varlen, **kwargs
            )
        return res[0], res[1]

    return _in_v_passes(v, run)


def _even_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


def _used_rows(cu_seqlens: Tensor, seqused: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Row indices of the first ``seqused[b]`` rows of every sequence and their packed ``cu_seqlens``."""
    V.check_tensor(name, seqused, 1)
    batch = cu_seqlens.shape[0] - 1
    if tuple(seqused.shape) != (batch,) or seqused.dtype != torch.int32:
        raise FlashAttnValueError(
            f"{name} must be an int32 tensor of shape (batch,) = ({batch},), got {seqused.dtype} "
            f"{tuple(seqused.shape)}"
        )
    lens = seqused.to(device=cu_seqlens.device, dtype=torch.int64)
    room = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    if bool(((lens < 0) | (lens > room)).any()):
        raise FlashAttnValueError(f"{name}[b] must lie in [0, seqlen of sequence b]")
    cu_used = torch.zeros(batch + 1, dtype=torch.int64, device=lens.device)
    cu_used[1:] = lens.cumsum(0)
    seq = torch.repeat_interleave(torch.arange(batch, device=lens.device), lens)
    pos = torch.arange(seq.shape[0], device=lens.device) - cu_used[seq]
    rows = cu_seqlens[:-1].to(torch.int64)[seq] + pos
    return rows, cu_used.to(torch.int32)


# ---------------------------------------------------------------------------------------------- public API
