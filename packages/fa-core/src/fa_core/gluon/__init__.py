"""Hopper-native forward attention written in Gluon (Triton's explicit-layout dialect).

FlashAttention-3's design on sm_90: TMA loads of Q once and of K/V into a multi-stage shared-memory ring tracked
by mbarriers, asynchronous wgmma for S = QK^T (shared-memory operands) and O += PV (P from registers), the
softmax of tile j overlapped with PV(j - 1) inside each warpgroup, exp2 online softmax. Two kernels exist
(see :mod:`fa_core.gluon._hopper`): a software-pipelined one and a warp-specialized one (a TMA producer warp
plus two or three consumer warpgroups taking turns on the tensor cores); :func:`default_kind` picks the faster
per head dim, mask and length on an H100 (``bench/results/h100-gluon-forward.json``).

Scope: dense bf16/fp16, head dim 64 or 128 (q, k, v alike), non-causal or causal (bottom-right aligned,
``diag = seqlen_k - seqlen_q``), sliding windows, softcap, GQA/MQA, any ``softmax_scale > 0``, tensors
``(batch, seqlen, nheads, headdim)`` (or packed varlen ``(total, nheads, headdim)`` with ``cu_seqlens``) with
a contiguous last dim and 16-byte aligned base and strides (TMA); varlen also with K/V in a paged cache
(``block_table``, optionally ``seqused_k``): the kernels' TMA loads follow the block table. Everything else
(ALiBi, dropout, ``leftpad_k``, FP8, ...) is refused by :func:`supports` and stays with the Triton kernels.

The kernels were written against Triton 3.6's Gluon API; :func:`available` is False under other Triton
versions (this module still imports there: the kernel modules are imported on first use only).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from fa_core.errors import FlashAttnValueError

__all__ = [
    "GLUON_TRITON_VERSION",
    "KINDS",
    "available",
    "default_kind",
    "forward",
    "forward_varlen",
    "head_dims",
    "supports",
    "unsupported_reason",
]

#: the Triton minor version whose Gluon API the kernels are written for
GLUON_TRITON_VERSION = (3, 6)
#: the kernels: "pipelined" (one consumer, in-line TMA), "ws" (warp-specialized, two ping-pong consumers of
#: 64 rows) and "ws3" (three consumers, head dim 64 only)
KINDS = ("pipelined", "ws", "ws3")
_KIND_HEAD_DIMS = {"pipelined": (64, 128), "ws": (64, 128), "ws3": (64,)}
#: below this many query rows, causal d64 runs the pipelined kernel (the 192-row ws3 tiles waste the diagonal)
_WS3_CAUSAL_MIN_SEQLEN = 4096
HEAD_DIMS = (64, 128)

_DTYPES = (torch.bfloat16, torch.float16)


def _triton_version() -> tuple[int, int]:
    try:
        import triton
    except ImportError:
        return (0, 0)
    parts = triton.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


@functools.cache
def _gluon_importable() -> bool:
    if _triton_version() != GLUON_TRITON_VERSION:
        return False
    try:
        from fa_core.gluon import _launch  # noqa: F401
    except Exception:  # any import-time incompatibility means "not available"
        return False
    return True


@functools.cache
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def available(device: torch.device | int | None = None) -> bool:
    """True when the Gluon kernels can run: Triton 3.6 with Gluon's Hopper modules, CUDA, an sm_90 device."""
    if not torch.cuda.is_available() or not _gluon_importable():
        return False
    from fa_core import settings

    if settings.interpreting():
        return False
    if isinstance(device, torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
    elif device is None:
        index = torch.cuda.current_device()
    else:
        index = int(device)
    return _is_sm90(index)


def head_dims(kind: str) -> tuple[int, ...]:
    """The head dims a kernel kind has a tile configuration for."""
    return _KIND_HEAD_DIMS.get(kind, ())


def default_kind(
    head_dim: int, causal: bool, seqlen_q: int | None = None, varlen: bool = False, page_size: int = 0
) -> str:
    """The kernel :func:`forward` / :func:`forward_varlen` use when ``kind`` is not given.

    The faster per head dim, mask and length on an H100 (``bench/results/h100-gluon-forward.json``):
    d128: "ws" (two ping-pong consumers); d64: "ws3" (three consumers), except causal below 4096 query rows
    (``seqlen_q``; the max for varlen), where "pipelined" wins. Varlen d128 runs "pipelined": its "ws"
    varlen path has not been checked on a GPU yet (``tests/test_gluon_gpu.py::test_varlen_matches_reference``).
    Paged varlen (``page_size`` > 0) d128 runs "ws": its producer warp issues the per-page loads off the
    consumers' path (H100, 16k tokens of mean length 2048, 16 heads: 473 / 359 TFLOP/s non-causal / causal
    at page 16 against 300 / 255 for "pipelined", and 434 / 342 for the packed layout on "pipelined"); d64
    with pages below 64 rows runs "ws3" (page 16: 327 / 197 against 216 / 173 for "pipelined").
    """
    if page_size and head_dim == 128:
        return "ws"
    if page_size and head_dim == 64 and page_size < 64:
        return "ws3"
    if head_dim == 64:
        if causal and (seqlen_q is None or seqlen_q < _WS3_CAUSAL_MIN_SEQLEN):
            return "pipelined"
        return "ws3"
    return "pipelined" if varlen else "ws"


def _tma_ok(t: torch.Tensor) -> bool:
    size = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(s > 0 and (s * size) % 16 == 0 for s in t.stride()[:-1])


def unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    out: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
    check_device: bool = True,
    block_table: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    **extras: Any,
) -> str | None:
    """Why :func:`forward` (or, with ``cu_seqlens_*``, :func:`forward_varlen`) cannot take these arguments,
    or None when it can (see :func:`supports`)."""
    if check_device and not (q.is_cuda and available(q.device)):
        return "needs Triton 3.6 Gluon and an sm_90 CUDA device"
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    ndim = 3 if varlen else 4
    paged = block_table is not None
    if paged and not varlen:
        return "block_table needs the varlen arguments"
    if seqused_k is not None and not paged:
        return "seqused_k is supported only with block_table"
    kv_ndim = 4 if paged else ndim
    if q.dim() != ndim or k.dim() != kv_ndim or v.dim() != kv_ndim:
        if paged:
            return "paged varlen needs q (total_q, nheads, headdim) and k, v (num_pages, page_size, nheads_k, headdim)"
        return "dense (batch, seqlen, nheads, headdim) or varlen (total, nheads, headdim) tensors only"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k, v must all be bfloat16 or all float16"
    if check_device and (k.device != q.device or v.device != q.device):
        return "q, k, v must be on one device"
    nheads, head_dim = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    if head_dim not in HEAD_DIMS or k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        return f"head dim must be one of {HEAD_DIMS} for q, k and v"
    if v.shape[:-1] != k.shape[:-1]:
        return "k and v must have the same shape"
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            return "varlen needs both cu_seqlens_q and cu_seqlens_k"
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2 or not cu.is_contiguous():
                return f"{name} must be a contiguous int32 (batch + 1,) tensor"
            if check_device and cu.device != q.device:
                return f"{name} must be on q's device"
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            return "cu_seqlens_q and cu_seqlens_k must have the same length"
        if max_seqlen_q is None or max_seqlen_k is None or min(max_seqlen_q, max_seqlen_k) < 1:
            return "varlen needs max_seqlen_q and max_seqlen_k >= 1"
        batch, seqlen_q, seqlen_k = cu_seqlens_q.numel() - 1, q.shape[0], k.shape[0]
        if block_table is not None:
            reason = _paged_reason(q, k, v, block_table, seqused_k, batch, check_device)
            if reason is not None:
                return reason
            seqlen_k = k.shape[0] * k.shape[1]
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        if k.shape[0] != batch:
            return "k and v must be (batch, seqlen_k, nheads_k, headdim) with q's batch"
    if nheads_k == 0 or nheads % nheads_k:
        return "nheads must be a multiple of nheads_k"
    if min(batch, seqlen_q, nheads, seqlen_k) == 0:
        return "empty tensors"
    if max(seqlen_q, seqlen_k, batch * nheads) >= 2**31:
        return "sizes must fit int32"
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        return "window_size must be a pair of ints"
    if max(abs(left), abs(right)) >= 2**30:
        return "window sides must be < 2**30"
    if not softcap >= 0 or not math.isfinite(softcap):
        return "softcap must be finite and >= 0"
    if alibi_slopes is not None:
        return "ALiBi is not supported"
    if dropout_p:
        return "dropout is not supported"
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        return "softmax_scale must be finite and > 0"
    for name, value in extras.items():
        if value is not None and value is not False and not (isinstance(value, (int, float)) and value == 0):
            return f"{name} is not supported"
    if out is not None and (
        out.shape != q.shape or out.dtype != q.dtype or (check_device and out.device != q.device)
    ):
        return "out must have q's shape, dtype and device"
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t is not None and not _tma_ok(t):
            return f"{name} needs a contiguous last dim and 16-byte aligned base and strides (TMA)"
    # rng_state only matters with dropout, which is refused above
    del rng_state
    return None


def _paged_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    seqused_k: torch.Tensor | None,
    batch: int,
    check_device: bool,
) -> str | None:
    """Why the paged varlen path cannot take these caches / table (k, v already 4-D, same page layout)."""
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.stride(-1) != 1:
        return "block_table must be an int32 (batch, max_pages) tensor with a contiguous last dim"
    if block_table.shape[0] != batch or block_table.shape[1] < 1:
        return "block_table must have one row per sequence and max_pages >= 1"
    if check_device and block_table.device != q.device:
        return "block_table must be on q's device"
    if seqused_k is not None:
        if seqused_k.dtype != torch.int32 or seqused_k.dim() != 1 or seqused_k.numel() != batch:
            return "seqused_k must be an int32 (batch,) tensor"
        if check_device and seqused_k.device != q.device:
            return "seqused_k must be on q's device"
    num_pages, page = k.shape[0], k.shape[1]
    if num_pages < 1 or page < 16 or page & (page - 1):
        return "a paged cache needs num_pages >= 1 and a page size that is a power of two >= 16"
    for name, t in (("k", k), ("v", v)):
        if t.stride(0) != page * t.stride(1):
            return f"the pages of {name} must be contiguous rows (stride(0) == page_size * stride(1))"
    if max(num_pages * page, block_table.shape[1] * page) >= 2**31:
        return "cache rows and max_pages * page_size must fit int32"
    return None


def supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    out: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    **extras: Any,
) -> bool:
    """Whether :func:`forward` (dense) or :func:`forward_varlen` (``cu_seqlens_*`` given) handles this call.

    True only for: :func:`available` on q's device; bf16/fp16 ``q (b, s_q, h, d)``, ``k, v (b, s_k, h_k, d)``
    (varlen: ``q (total_q, h, d)``, ``k, v (total_k, h_k, d)``, contiguous int32 ``cu_seqlens_q/k (b + 1,)``
    on q's device, ``max_seqlen_q/k >= 1``) with ``d`` in {64, 128} and ``h % h_k == 0``; any ``window_size`` (-1 = unbounded
    side) and ``softcap >= 0``, with or without ``causal``; no ALiBi or dropout; ``softmax_scale`` None or
    finite > 0; every stride but the last (which is 1) and the base 16-byte aligned, for q, k, v and ``out``
    (if given: q's shape and dtype); ``rng_state`` is ignored (no dropout). Paged varlen: ``block_table``
    int32 ``(b, max_pages)`` with a contiguous last dim on q's device, k, v ``(num_pages, page, h_k, d)``
    with the page a power of two >= 16 and contiguous pages (``stride(0) == page * stride(1)``), optional
    ``seqused_k`` int32 ``(b,)`` (only with ``block_table``). Any further keyword (``return_probs``,
    ``learnable_sink``, ``attention_chunk``, ``score_mod``, ``q_descale``, ...) must be None / False / 0.
    """
    return (
        unsupported_reason(
            q,
            k,
            v,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            dropout_p=dropout_p,
            softmax_scale=softmax_scale,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            out=out,
            block_table=block_table,
            seqused_k=seqused_k,
            **extras,
        )
        is None
    )


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    out: torch.Tensor | None = None,
    kind: str | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention forward on Hopper with the Gluon kernels.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads_k, headdim)``, bf16/fp16,
            ``headdim`` 64 or 128 (see :func:`supports` for the full predicate).
        softmax_scale: defaults to ``headdim ** -0.5``; must be > 0.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + seqlen_k - seqlen_q).
        window_size: ``(left, right)``: query i sees keys ``i + diag - left <= j <= i + diag + right``
            (-1 = unbounded side; causal sets right = 0).
        softcap: ``softcap * tanh(scores / softcap)`` on the scaled scores; 0 = off.
        out: optional ``(batch, seqlen_q, nheads, headdim)`` buffer of q's dtype with TMA-compatible strides.
        kind: ``"pipelined"`` or ``"ws"`` (default :func:`default_kind`); config: tile override (testing).

    Returns:
        ``(out (batch, seqlen_q, nheads, headdim), lse (batch, nheads, seqlen_q) float32)``; lse in natural
        log; a query row with no visible key gets out = 0 and lse = +inf.

    Raises:
        FlashAttnValueError: the arguments are outside :func:`supports` (the message says which one).
    """
    reason = unsupported_reason(
        q, k, v, causal=causal, window_size=window_size, softcap=softcap, softmax_scale=softmax_scale
    )
    if reason is not None:
        raise FlashAttnValueError(f"fa_core.gluon.forward: {reason}")
    kind = kind or default_kind(q.shape[-1], causal, q.shape[1])
    if kind not in KINDS:
        raise FlashAttnValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if config is None and q.shape[-1] not in head_dims(kind):
        raise FlashAttnValueError(f"kind {kind!r} has no tile for head dim {q.shape[-1]}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not _tma_ok(out):
        raise FlashAttnValueError(
            f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device} with TMA-compatible strides"
        )
    batch, seqlen_q, nheads, head_dim = q.shape
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    from fa_core.gluon import _launch

    with torch.cuda.device(q.device):
        _launch.launch(kind, q, k, v, out, lse, scale, causal, window_size, softcap, config)
    return out, lse


def forward_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    out: torch.Tensor | None = None,
    kind: str | None = None,
    config: dict[str, int] | None = None,
    block_table: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length attention forward on Hopper with the Gluon kernels.

    Args:
        q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_k, headdim)``; sequence i is rows
            ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` of q and ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]`` of k, v
            (int32 ``(batch + 1,)`` on q's device; offsets are clamped to the tensors, never checked on the host).
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (the grid covers ``max_seqlen_q``).
        softmax_scale, causal, window_size, softcap, out, kind, config: as :func:`forward`; ``out`` is
            ``(total_q, nheads, headdim)``. Each sequence is attended on its own (causal aligned bottom-right
            per sequence); the kernels build one TMA descriptor per sequence on the device.
        block_table: optional int32 ``(batch, max_pages)``: k, v are paged caches ``(num_pages, page_size,
            nheads_k, headdim)`` (page a power of two >= 16, pages contiguous rows) and key j of sequence b is
            row ``j % page_size`` of page ``block_table[b, j // page_size]``; ``cu_seqlens_k`` then gives only
            the key lengths. Table entries and lengths are clamped in the kernel (never checked on the host):
            garbage gives garbage output, never an access outside the table or the caches.
        seqused_k: optional int32 ``(batch,)`` (with ``block_table`` only): sequence b has ``seqused_k[b]``
            keys (instead of ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]``).

    Returns:
        ``(out (total_q, nheads, headdim), lse (nheads, total_q) float32)``.

    Raises:
        FlashAttnValueError: the arguments are outside :func:`supports` (the message says which one).
    """
    reason = unsupported_reason(
        q,
        k,
        v,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        softmax_scale=softmax_scale,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        block_table=block_table,
        seqused_k=seqused_k,
    )
    if reason is not None:
        raise FlashAttnValueError(f"fa_core.gluon.forward_varlen: {reason}")
    page_size = k.shape[1] if block_table is not None else 0
    kind = kind or default_kind(q.shape[-1], causal, int(max_seqlen_q), varlen=True, page_size=page_size)
    if kind not in KINDS:
        raise FlashAttnValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if config is None and q.shape[-1] not in head_dims(kind):
        raise FlashAttnValueError(f"kind {kind!r} has no tile for head dim {q.shape[-1]}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not _tma_ok(out):
        raise FlashAttnValueError(
            f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device} with TMA-compatible strides"
        )
    total_q, nheads, head_dim = q.shape
    lse = torch.empty(nheads, total_q, dtype=torch.float32, device=q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    from fa_core.gluon import _launch

    varlen = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    paged = None if block_table is None else (block_table, seqused_k)
    with torch.cuda.device(q.device):
        _launch.launch(kind, q, k, v, out, lse, scale, causal, window_size, softcap, config, varlen, paged)
    return out, lse
