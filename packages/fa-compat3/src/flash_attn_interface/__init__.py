"""FlashAttention-3's ``flash_attn_interface`` module on the Flash Attention Plus Triton kernels (fa-compat3).

Same function names, parameter names, order and defaults, and return values as the ``flash_attn_interface``
module that FlashAttention-3 (distribution ``flash_attn_3``, 3.0.0) installs. Shapes: dense q ``(batch,
seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k, nheads_k, headdim[_v])``; varlen q ``(total_q, nheads,
headdim)``, k/v ``(total_k, nheads_k, headdim[_v])`` with int32 ``cu_seqlens`` ``(batch + 1,)``; nheads a
multiple of nheads_k (GQA / MQA). ``headdim`` up to 256, ``headdim_v`` up to 512 (above 256, as FlashAttention-3
takes with ``headdim`` 64 for MLA's latent width, the kernels run one pass per column block of V: exact, each pass
recomputing the scores). Causal masks and windows are aligned bottom-right; a row that sees no key gives
``out = 0`` and ``softmax_lse = +inf``.

Return conventions (FlashAttention-3's): ``flash_attn_func`` / ``flash_attn_varlen_func`` /
``flash_attn_qkvpacked_func`` return ``out``, or ``(out, softmax_lse)`` with ``return_attn_probs=True`` (no
probabilities: FlashAttention-3 never returns them); ``flash_attn_with_kvcache`` returns ``out``, or ``(out,
softmax_lse, out_accum, softmax_lse_accum)`` with ``return_softmax_lse=True`` (the two split accumulators are
empty tensors here: the split-KV decode combines its partial results inside the call). ``softmax_lse`` is
float32 ``(batch, nheads, seqlen_q)``, or ``(nheads, total_q)`` for a varlen q.

Arguments that only tune FlashAttention-3's CUDA launch (``num_splits`` outside the KV cache, ``pack_gqa``,
``sm_margin``, ``scheduler_metadata``) are accepted and ignored: the Triton kernels choose their own tiling and
results do not depend on them. ``deterministic`` is accepted: the backward is always deterministic. Arguments
that would change a result but have no kernel here raise :class:`fa_core.errors.FlashAttnValueError` (a
``ValueError`` and a ``RuntimeError``) naming the argument: ``qv`` (the extra query-value term of MLA decoding),
and in ``flash_attn_with_kvcache`` ``cu_seqlens_k_new`` without ``cu_seqlens_q``, and ``cu_seqlens_q`` together
with FP8 inputs or with ``cache_leftpad`` and ``page_table``.

FP8: ``float8_e4m3fn`` q, k, v with ``q_descale`` / ``k_descale`` / ``v_descale`` ``(batch, nheads_k)`` float32
(default 1) run the FP8 forward of fa-core (CUDA GPU with FP8 tensor cores; forward only, as in
FlashAttention-3; output bf16). With 16-bit inputs the descales are ignored, as FlashAttention-3 ignores them. In
``flash_attn_with_kvcache`` an FP8 q (and FP8 new k / v) is dequantised to bf16 and the FP8 cache is read with
``k_descale`` / ``v_descale`` (fa-kvcache's FP8 cache path); the output is bf16 as in FlashAttention-3.

Gradients flow through fa-backward's autograd layer (also for ``attention_chunk``, which FlashAttention-3's
backward refuses); ``flash_attn_with_kvcache`` and ``flash_attn_combine`` results are plain tensors (the KV-cache
call runs without autograd, as in FlashAttention-3).
"""

from __future__ import annotations

from typing import Any

import torch

from fa_core import ops
from fa_core import validation as V
from fa_core.errors import FlashAttnValueError

__all__ = [
    "FlashAttnFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnVarlenFunc",
    "flash_attn_combine",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "get_scheduler_metadata",
    "maybe_contiguous",
    "round_multiple",
]

from flash_attn_interface._common import (
    Tensor,
    _attention,
    _even_cu_seqlens,
    _fp8_attention,
    _is_fp8,
    _refuse_qv,
    _used_rows,
    maybe_contiguous,
    round_multiple,
)
from flash_attn_interface._kvcache import flash_attn_combine, flash_attn_with_kvcache, get_scheduler_metadata


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    deterministic: bool = False,
    num_heads_q: int | None = None,
    sm_margin: int = 0,
    return_attn_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Self-attention over a packed qkv tensor.

    Args:
        qkv: ``(batch, seqlen, 3, nheads, headdim)``, or ``(batch, seqlen, nheads_q + 2 * nheads_k, headdim)``
            with ``num_heads_q`` (GQA: q heads first, then k heads, then v heads).
        softmax_scale: default ``headdim ** -0.5``. causal: bottom-right aligned causal mask.
        q_descale, k_descale, v_descale: ``(batch, nheads_k)`` float32 with a ``float8_e4m3fn`` qkv (forward
            only, bf16 output); ignored otherwise.
        window_size: ``(left, right)`` sliding window, -1 = unbounded. attention_chunk: keys visible only in
            the query's chunk of that many positions; 0 = off. softcap: ``softcap * tanh(s / softcap)``; 0 = off.
        deterministic: accepted (the backward is always deterministic). sm_margin: ignored (launch tuning).
        return_attn_probs: also return ``softmax_lse``.

    Returns:
        ``out (batch, seqlen, nheads, headdim)``, or ``(out, softmax_lse (batch, nheads, seqlen))``. The backward
        writes one ``dqkv``.
    """
    V.check_tensor("qkv", qkv)
    if qkv.dim() not in (4, 5):
        raise FlashAttnValueError(f"qkv must have 4 or 5 dimensions, got shape {tuple(qkv.shape)}")
    opts: dict[str, Any] = dict(
        softmax_scale=softmax_scale, causal=causal, window_size=V.window_pair(window_size), softcap=softcap,
        attention_chunk=attention_chunk,
    )  # fmt: skip
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise FlashAttnValueError(
                f"qkv must have shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}"
            )
        if _is_fp8(qkv):
            q, k, v = qkv.unbind(dim=2)
            out, lse = _fp8_attention(q, k, v, (q_descale, k_descale, v_descale), None, **opts)
        else:
            out, lse = _attention(qkv, None, None, pack=ops.QKV, deterministic=deterministic, **opts)  # type: ignore[arg-type]
    else:
        if num_heads_q is None:
            raise FlashAttnValueError(
                "num_heads_q is required with a 4-D qkv (batch, seqlen, nheads_q + 2 * nheads_k, headdim)"
            )
        nheads_k = (qkv.shape[2] - num_heads_q) // 2
        if num_heads_q <= 0 or nheads_k <= 0 or num_heads_q + 2 * nheads_k != qkv.shape[2]:
            raise FlashAttnValueError(
                f"num_heads_q={num_heads_q} does not split qkv's {qkv.shape[2]} heads into q + 2 * k heads"
            )
        q, k, v = qkv.split([num_heads_q, nheads_k, nheads_k], dim=2)
        if _is_fp8(qkv):
            out, lse = _fp8_attention(q, k, v, (q_descale, k_descale, v_descale), None, **opts)
        else:
            out, lse = _attention(q, k, v, deterministic=deterministic, **opts)
    return (out, lse) if return_attn_probs else out


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    deterministic: bool = False,
    sm_margin: int = 0,
    return_attn_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dense attention.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k: ``(batch, seqlen_k, nheads_k, headdim)``;
            v: ``(batch, seqlen_k, nheads_k, headdim_v)``, ``headdim_v`` up to 512 (above 256: one pass per column
            block of V). fp16 / bf16 (fp32 on CPU) or ``float8_e4m3fn``.
        softmax_scale: default ``headdim ** -0.5``. causal: bottom-right aligned causal mask.
        qv: must be None (no kernel for the MLA query-value term here).
        q_descale, k_descale, v_descale: ``(batch, nheads_k)`` float32 dequantisation factors of FP8 inputs
            (forward only, bf16 output); ignored for 16-bit inputs.
        window_size: ``(left, right)``; query i sees keys ``[i + sk - sq - left, i + sk - sq + right]``;
            -1 = unbounded. attention_chunk: keys visible only within the query's chunk; 0 = off.
        softcap: ``softcap * tanh(scores / softcap)``; 0 = off.
        num_splits, pack_gqa, sm_margin: ignored (FlashAttention-3 launch tuning; results do not depend on it).
        deterministic: accepted (the backward is always deterministic).
        return_attn_probs: also return ``softmax_lse``.

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)``, or ``(out, softmax_lse (batch, nheads, seqlen_q))``.
    """
    _refuse_qv(qv)
    opts: dict[str, Any] = dict(
        softmax_scale=softmax_scale, causal=causal, window_size=V.window_pair(window_size), softcap=softcap,
        attention_chunk=attention_chunk,
    )  # fmt: skip
    if _is_fp8(q):
        out, lse = _fp8_attention(q, k, v, (q_descale, k_descale, v_descale), None, **opts)
    else:
        out, lse = _attention(q, k, v, deterministic=deterministic, **opts)
    return (out, lse) if return_attn_probs else out


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    seqused_q: Tensor | None = None,
    seqused_k: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    deterministic: bool = False,
    sm_margin: int = 0,
    return_attn_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Variable-length attention over packed sequences.

    Args:
        q: ``(total_q, nheads, headdim)`` with ``cu_seqlens_q`` int32 ``(batch + 1,)``, or ``(batch, seqlen_q,
            nheads, headdim)`` with ``cu_seqlens_q=None`` (every sequence ``seqlen_q`` rows).
        k, v: ``(total_k, nheads_k, headdim[_v])`` with ``cu_seqlens_k``, or ``(batch, seqlen_k, nheads_k,
            headdim[_v])`` with ``cu_seqlens_k=None``.
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (int or 0-dim tensor; None = derived
            from the cu_seqlens, one host sync).
        seqused_q: optional int32 ``(batch,)``: sequence b has only its first ``seqused_q[b]`` query rows (causal
            / window alignment use that length); the other rows give ``out = 0`` and ``softmax_lse = +inf``.
        seqused_k: optional int32 ``(batch,)``: sequence b uses only its first ``seqused_k[b]`` keys.
        Other arguments: as :func:`flash_attn_func`, aligned per sequence.

    Returns:
        ``out`` shaped like q (last dim ``headdim_v``), or ``(out, softmax_lse)`` with ``softmax_lse`` ``(nheads,
        total_q)`` (``(batch, nheads, seqlen_q)`` for a 4-D q).
    """
    _refuse_qv(qv)
    batched_q = cu_seqlens_q is None
    shape_q: tuple[int, ...] = ()
    if batched_q:
        V.check_tensor("q", q, 4)
        shape_q = tuple(q.shape)
        cu_seqlens_q = _even_cu_seqlens(q.shape[0], q.shape[1], q.device)
        max_seqlen_q = q.shape[1]
        q = q.reshape(-1, *q.shape[2:])
    if cu_seqlens_k is None:
        V.check_tensor("k", k, 4)
        V.check_tensor("v", v, 4)
        cu_seqlens_k = _even_cu_seqlens(k.shape[0], k.shape[1], k.device)
        max_seqlen_k = k.shape[1]
        k, v = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    cu_q = V.check_tensor("cu_seqlens_q", cu_seqlens_q, 1)
    cu_k = V.check_tensor("cu_seqlens_k", cu_seqlens_k, 1)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
    total_q = q.shape[0] if isinstance(q, torch.Tensor) else 0
    rows = None
    q_in, cu_q_in = q, cu_q
    if seqused_q is not None:
        rows, cu_q_in = _used_rows(cu_q, seqused_q, "seqused_q")
        q_in = q.index_select(0, rows)
    opts: dict[str, Any] = dict(
        softmax_scale=softmax_scale, causal=causal, window_size=V.window_pair(window_size), softcap=softcap,
        attention_chunk=attention_chunk,
    )  # fmt: skip
    var = dict(
        cu_seqlens_q=cu_q_in, cu_seqlens_k=cu_k, max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k), seqused_k=seqused_k,
    )  # fmt: skip
    if _is_fp8(q):
        out, lse = _fp8_attention(q_in, k, v, (q_descale, k_descale, v_descale), var, **opts)
    else:
        out, lse = _attention(q_in, k, v, varlen=True, deterministic=deterministic, **var, **opts)
    if rows is not None:
        out = out.new_zeros(total_q, *out.shape[1:]).index_copy(0, rows, out)
        lse = lse.new_full((lse.shape[0], total_q), float("inf")).index_copy(1, rows, lse)
    if batched_q:
        batch, seqlen_q = shape_q[0], shape_q[1]
        out = out.reshape(batch, seqlen_q, *out.shape[1:])
        lse = lse.reshape(lse.shape[0], batch, seqlen_q).transpose(0, 1).contiguous()
    return (out, lse) if return_attn_probs else out


class FlashAttnQKVPackedFunc:
    """FlashAttention-3's ``FlashAttnQKVPackedFunc`` name: ``apply`` takes its positional arguments and runs
    :func:`flash_attn_qkvpacked_func` (gradients flow through fa-backward's autograd layer; this class is not a
    ``torch.autograd.Function`` itself)."""

    @staticmethod
    def apply(
        qkv: Tensor,
        softmax_scale: float | None,
        causal: bool,
        q_descale: Tensor | None = None,
        k_descale: Tensor | None = None,
        v_descale: Tensor | None = None,
        window_size: tuple[int, int] = (-1, -1),
        attention_chunk: int = 0,
        softcap: float = 0.0,
        deterministic: bool = False,
        num_heads_q: int | None = None,
        sm_margin: int = 0,
        return_softmax: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return flash_attn_qkvpacked_func(
            qkv, softmax_scale, causal, q_descale, k_descale, v_descale, window_size, attention_chunk, softcap,
            deterministic, num_heads_q, sm_margin, return_softmax,
        )  # fmt: skip


class FlashAttnFunc:
    """FlashAttention-3's ``FlashAttnFunc`` name: ``apply`` takes its positional arguments and runs
    :func:`flash_attn_func` (not a ``torch.autograd.Function`` itself)."""

    @staticmethod
    def apply(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        softmax_scale: float | None,
        causal: bool,
        qv: Tensor | None = None,
        q_descale: Tensor | None = None,
        k_descale: Tensor | None = None,
        v_descale: Tensor | None = None,
        window_size: tuple[int, int] = (-1, -1),
        attention_chunk: int = 0,
        softcap: float = 0.0,
        num_splits: int = 1,
        pack_gqa: bool | None = None,
        deterministic: bool = False,
        sm_margin: int = 0,
        return_softmax: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return flash_attn_func(
            q, k, v, softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size, attention_chunk,
            softcap, num_splits, pack_gqa, deterministic, sm_margin, return_softmax,
        )  # fmt: skip


class FlashAttnVarlenFunc:
    """FlashAttention-3's ``FlashAttnVarlenFunc`` name: ``apply`` takes its positional arguments (``seqused_q``
    / ``seqused_k`` before ``max_seqlen_q``, as FlashAttention-3's class orders them) and runs
    :func:`flash_attn_varlen_func` (not a ``torch.autograd.Function`` itself)."""

    @staticmethod
    def apply(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor | None,
        cu_seqlens_k: Tensor | None,
        seqused_q: Tensor | None,
        seqused_k: Tensor | None,
        max_seqlen_q: int | None,
        max_seqlen_k: int | None,
        softmax_scale: float | None,
        causal: bool,
        qv: Tensor | None = None,
        q_descale: Tensor | None = None,
        k_descale: Tensor | None = None,
        v_descale: Tensor | None = None,
        window_size: tuple[int, int] = (-1, -1),
        attention_chunk: int = 0,
        softcap: float = 0.0,
        num_splits: int = 1,
        pack_gqa: bool | None = None,
        deterministic: bool = False,
        sm_margin: int = 0,
        return_softmax: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, softmax_scale,
            causal, qv, q_descale, k_descale, v_descale, window_size, attention_chunk, softcap, num_splits,
            pack_gqa, deterministic, sm_margin, return_softmax,
        )  # fmt: skip


from flash_attn_interface import _ops  # noqa: E402

_ops.register()
