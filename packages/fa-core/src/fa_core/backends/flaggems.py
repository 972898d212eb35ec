"""FlagGems forward backend: fa_core's forward API on top of FlagGems' Triton FlashAttention.

FlagGems (``pip install 'fa-core[flaggems]'``, PyPI ``flag-gems``, verified against 5.0.2) ships two
FlashAttention-2 style forward entry points, both Triton, both CUDA only:

* ``flag_gems.ops.flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal,
  return_debug_mask, *, scale, softcap, window_size_left, window_size_right, seqused_k, alibi_slopes,
  disable_splitkv)`` (aten ``_flash_attention_forward``-like; dense only, cu_* must be None) returning
  ``(out, lse (B, H, S) float32, philox_args (2,) int64 on the GPU, unused, debug_probs)``;
* ``flag_gems.ops.flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k,
  cu_seqlens_k, seqused_k, ..., return_softmax_lse=True, out=None)`` (vLLM's argument order) returning
  ``(out, lse (H, total_q) float32)``.

``import flag_gems`` raises on a machine without a GPU, so it is imported lazily, on the first call.

What this adapter does on top of a plain call (all read from FlagGems 5.0.2's source):

* One-sided windows: FlagGems' dense path treats ``(left, -1)`` and ``(-1, right > 0)`` as *no window*
  and its varlen path computes wrong bounds for ``(left, -1)``. They are rewritten into an equivalent
  two-sided window (``-1`` -> ``seqlen_k - 1``). ``(left >= 0, -1)`` with ``seqlen_q > seqlen_k`` has
  no such equivalent and raises ``NotImplementedError``, as does ``seqlen_k <= right < seqlen_q - 1`` (FlagGems,
  like flash-attn's CUDA host code, reads ``right >= seqlen_k`` as unbounded, which differs from fa_core's
  mask when ``seqlen_q > seqlen_k``). Window values are ``tl.constexpr`` in FlagGems'
  kernels: each distinct window compiles a new kernel.
* Causal ALiBi: FlagGems adds ``slope * (j - seqlen_k + 1)`` instead of ``-slope * |i + diag - j|`` when its
  kernel runs causal; softmax (``out``) is the same, ``lse`` is off by ``slope * (i + 1 - seqlen_q)`` per
  row. That offset is removed so ``lse`` follows fa_core's convention (the backward needs it).
* Varlen decode with GQA (``max_seqlen_q == 1``, ``nheads > nheads_k``, no window/ALiBi): FlagGems swaps
  the query-group and sequence dimensions and returns ``lse`` in the wrong order for ``batch > 1``; it is
  permuted back here. If some sequence has no query (``total_q != batch``) the swap is avoided instead.
* Dense inputs run through FlagGems' *varlen* kernel (``(batch * seqlen, heads, d)`` views, ``cu_seqlens``
  built on the device): measured on an H200 with FlagGems 5.0.2, its dense ``flash_attention_forward``
  returns wrong values or NaN for GQA/MQA (``nheads_k < nheads``), for head dims that are not powers of two
  without a window (80), and for causal/ALiBi decode (``seqlen_q = 1``), while the varlen kernel passed every
  case. The dense kernel is kept only for dropout (the varlen one has none), restricted to the cases that
  passed: ``nheads == nheads_k`` and head dim 32, 64, 128 or 256; anything else raises.
* Dense causal with ``seqlen_q > seqlen_k``: rows with no visible key are set to ``out = 0``,
  ``lse = +inf`` (FlagGems' split-KV path can leave NaN there).
* ``out=``: the dense entry point has no output argument, so the result is copied into ``out``.

Not supported (raise ``NotImplementedError`` naming the feature, never a silent fallback): fp32 inputs;
``headdim_v != headdim``; dense head dims <= 16 (dims that are not 32/64/96/128/192/256 are zero-padded
by FlagGems itself, at the cost of copies); varlen head dims that are not a multiple of 8;
``return_probs``; ``softcap`` together with dropout; dropout in varlen (FlagGems' varlen kernel does not
rescale by ``1/(1-p)`` and returns no RNG state); ``seqused_k`` together with ``cu_seqlens_k`` (FlagGems
only takes ``seqused_k`` for paged caches); a caller-supplied ``rng_state`` with dropout;
``softmax_scale == 0`` (FlagGems reads 0 as "default").

RNG state: with dropout the returned ``rng_state`` is FlagGems' ``[seed, offset]`` taken from torch's
CUDA default generator (Philox, FlagGems' own mask layout), copied to the CPU (one device sync). It
cannot be replayed by fa_core's kernels or fa-backward (their dropout stream differs). Without dropout it
is ``zeros(2)`` like fa_core's.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from fa_core import validation as V
from fa_core.forward import FwdResult

__all__ = [
    "FlagGemsUnavailableError",
    "flaggems_forward",
    "flaggems_varlen_forward",
    "flaggems_window",
    "is_available",
]

_FLAG_GEMS: ModuleType | None = None
_IMPORT_ERROR: str | None = None


class FlagGemsUnavailableError(RuntimeError):
    """FlagGems cannot be used here (no CUDA GPU, not installed, or its import failed)."""


def _flag_gems() -> ModuleType:
    """Import FlagGems once; raise :class:`FlagGemsUnavailableError` with the reason when impossible."""
    global _FLAG_GEMS, _IMPORT_ERROR
    if _FLAG_GEMS is not None:
        return _FLAG_GEMS
    if not torch.cuda.is_available():
        raise FlagGemsUnavailableError(
            "the FlagGems backend needs a CUDA GPU: torch.cuda.is_available() is False "
            "(FlagGems has no CPU implementation; use fa_core's own kernels, backend='triton')"
        )
    if _IMPORT_ERROR is not None:
        raise FlagGemsUnavailableError(_IMPORT_ERROR)
    try:
        import flag_gems  # lazy: the import raises without a GPU

        ops = flag_gems.ops
        missing = [n for n in ("flash_attention_forward", "flash_attn_varlen_func") if not hasattr(ops, n)]
        if missing:
            raise ImportError(
                f"flag_gems {getattr(flag_gems, '__version__', '?')} lacks {', '.join(missing)}"
            )
    except Exception as exc:  # ImportError, or FlagGems' own RuntimeError at import
        _IMPORT_ERROR = (
            f"cannot use the FlagGems backend: importing flag_gems failed ({type(exc).__name__}: {exc}); "
            "install it with `pip install 'fa-core[flaggems]'` (flag-gems >= 5.0)"
        )
        raise FlagGemsUnavailableError(_IMPORT_ERROR) from exc
    _FLAG_GEMS = flag_gems
    return flag_gems


def is_available() -> bool:
    """True when FlagGems can run here (a CUDA GPU and an importable ``flag_gems``). Never raises."""
    try:
        _flag_gems()
    except KeyboardInterrupt:
        raise
    except BaseException:  # documented: never raises
        return False
    return True


def _unsupported(feature: str) -> NotImplementedError:
    return NotImplementedError(f"the FlagGems backend does not support {feature}")


def flaggems_window(
    causal: bool, window_size: tuple[int, int], seqlen_q: int, seqlen_k: int
) -> tuple[int, int]:
    """The ``(left, right)`` window to hand FlagGems so that it masks exactly like fa_core.

    ``seqlen_q``/``seqlen_k`` are the dense lengths or varlen's ``max_seqlen_q``/``max_seqlen_k``
    (``seqlen_k >= 1``). The result is ``(-1, -1)`` (no mask), ``(-1, 0)`` (causal) or two values in
    ``[0, seqlen_k)``: FlagGems turns values ``>= seqlen_k`` into -1 and ignores a lone -1 side.

    Raises:
        NotImplementedError: ``seqlen_q > seqlen_k`` with ``left >= 0`` and an unbounded right side, or
            with ``seqlen_k <= right < seqlen_q - 1``: masks FlagGems cannot express.
    """
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        # FlagGems (like flash-attn's CUDA host code) reads right >= seqlen_k as unbounded; that is only
        # the same mask when every row reaches the last key: i + seqlen_k - seqlen_q + right >= seqlen_k - 1
        if right < seqlen_q - 1:
            raise _unsupported(
                f"window right={right} >= seqlen_k ({seqlen_k}) with seqlen_q ({seqlen_q}) > right + 1: "
                "FlagGems would drop that bound"
            )
        right = -1
    if left < 0 and right <= 0:
        return -1, right  # (-1, -1) or causal (-1, 0)
    if left < 0:
        return seqlen_k - 1, right  # left bound 0 - never cuts: i + diag <= seqlen_k - 1
    if right < 0:
        if seqlen_q > seqlen_k:
            raise _unsupported(
                f"a left-only window {tuple(window_size)} with seqlen_q ({seqlen_q}) > seqlen_k ({seqlen_k})"
            )
        return left, seqlen_k - 1  # i + diag + seqlen_k - 1 >= seqlen_k - 1 for every row
    return left, right


def _common_checks(
    q, k, v, dropout_p, softmax_scale, window_size, softcap, return_probs, rng_state, out, varlen
) -> float:
    """fa_core's argument checks plus FlagGems' limits; returns the softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, t, 3 if varlen else 4)
    if q.device.type != "cuda":
        raise ValueError(f"q is on {q.device}: the FlagGems backend runs on CUDA tensors only")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise _unsupported(f"dtype {q.dtype} (fp16 and bf16 only)")
    V.check_qkv(q, k, v, varlen=varlen)
    V.check_window(window_size)
    V.check_scalars(dropout_p, softcap, softmax_scale)
    d = q.shape[-1]
    if v.shape[-1] != d:
        raise _unsupported(f"a v head dim ({v.shape[-1]}) different from the q/k head dim ({d})")
    if return_probs:
        raise _unsupported("return_probs=True (FlagGems only returns dropout debug masks)")
    if softcap > 0 and dropout_p > 0:
        raise _unsupported("softcap together with dropout")
    if rng_state is not None and dropout_p > 0:
        raise _unsupported("a given rng_state (FlagGems draws its dropout seed from torch's CUDA generator)")
    if out is not None:
        V.check_tensor("out", out)
        expected = (*q.shape[:-1], v.shape[-1])
        if tuple(out.shape) != expected or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be a {q.dtype} tensor of shape {expected} on {q.device}")
        V.check_last_dim_contiguous("out", out)
    if softmax_scale is not None and softmax_scale == 0.0:
        raise _unsupported("softmax_scale=0 (FlagGems reads 0 as the default scale)")
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)


def _zero_rng() -> torch.Tensor:
    return torch.zeros(2, dtype=torch.int64)


def flaggems_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_probs: bool = False,
    out: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
) -> FwdResult:
    """Dense forward through ``flag_gems.ops.flash_attention_forward``; arguments and result as
    :func:`fa_core.flash_attn_forward` (see the module docstring for what FlagGems does not support).

    Raises:
        FlagGemsUnavailableError: no GPU, or FlagGems not importable.
        NotImplementedError: a feature FlagGems lacks. ValueError/TypeError: invalid arguments.
    """
    fg = _flag_gems()
    V.grad_guard(q, k, v)
    scale = _common_checks(
        q, k, v, dropout_p, softmax_scale, window_size, softcap, return_probs, rng_state, out, varlen=False
    )
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k = k.shape[1]
    if d <= 16:
        raise _unsupported(
            f"head dim {d} in the dense path (FlagGems needs > 16; it pads up to 32/64/96/...)"
        )
    V.check_alibi(alibi_slopes, batch, nheads, q)
    rng = rng_state if rng_state is not None else _zero_rng()
    if batch == 0 or seqlen_q == 0 or seqlen_k == 0:
        o = out if out is not None else q.new_empty(*q.shape[:-1], v.shape[-1])
        o.zero_()
        lse = torch.full((batch, nheads, seqlen_q), float("inf"), dtype=torch.float32, device=q.device)
        return FwdResult(o, lse, rng, None)
    left, right = flaggems_window(causal, window_size, seqlen_q, seqlen_k)
    kernel_causal = left < 0 and right == 0
    if dropout_p > 0:
        res, lse, rng = _dense_dropout(
            fg, q, k, v, dropout_p, scale, left, right, kernel_causal, softcap, alibi_slopes
        )
    else:
        if d % 8 != 0:
            raise _unsupported(
                f"head dim {d} (FlagGems' varlen kernel, used for dense inputs, needs a multiple of 8)"
            )
        # (batch, seqlen, h, d) -> (batch * seqlen, h, d) views (copies only for exotic strides)
        nheads_k, dv = k.shape[2], v.shape[-1]
        cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, (batch + 1) * seqlen_k, seqlen_k, dtype=torch.int32, device=q.device)
        out3 = None
        if out is not None and out.is_contiguous():
            out3 = out.view(batch * seqlen_q, nheads, dv)
        res3, lse3 = _run_varlen(
            fg,
            q.reshape(batch * seqlen_q, nheads, d),
            k.reshape(batch * seqlen_k, nheads_k, d),
            v.reshape(batch * seqlen_k, nheads_k, dv),
            cu_q,
            cu_k,
            seqlen_q,
            seqlen_k,
            batch,
            scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            out3,
        )
        res = res3.view(batch, seqlen_q, nheads, dv)
        lse = lse3.reshape(nheads, batch, seqlen_q).permute(1, 0, 2).contiguous()
    if kernel_causal and seqlen_q > seqlen_k:
        empty = seqlen_q - seqlen_k  # rows i < seqlen_q - seqlen_k see no key
        res[:, :empty].zero_()
        lse[:, :, :empty] = float("inf")
    if out is not None and res.data_ptr() != out.data_ptr():
        out.copy_(res)
        res = out
    return FwdResult(res, lse, rng, None)


def flaggems_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_probs: bool = False,
    seqused_k: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
) -> FwdResult:
    """Varlen forward through ``flag_gems.ops.flash_attn_varlen_func``; arguments and result as
    :func:`fa_core.flash_attn_varlen_forward` (see the module docstring for what FlagGems does not support).

    Raises:
        FlagGemsUnavailableError: no GPU, or FlagGems not importable.
        NotImplementedError: a feature FlagGems lacks. ValueError/TypeError: invalid arguments.
    """
    fg = _flag_gems()
    V.grad_guard(q, k, v)
    scale = _common_checks(
        q, k, v, dropout_p, softmax_scale, window_size, softcap, return_probs, rng_state, out, varlen=True
    )
    if dropout_p > 0:
        raise _unsupported("dropout in the varlen path (no 1/(1-p) rescale and no RNG state in FlagGems 5.0)")
    if seqused_k is not None:
        raise _unsupported("seqused_k with cu_seqlens_k (FlagGems takes seqused_k only for paged KV caches)")
    total_q, nheads, d = q.shape
    if d % 8 != 0:
        raise _unsupported(f"head dim {d} in the varlen path (FlagGems needs a multiple of 8)")
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    batch = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, q, max_seqlen_q, "max_seqlen_q")
    batch_k = V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q, max_seqlen_k, "max_seqlen_k")
    if batch_k != batch:
        raise ValueError(f"cu_seqlens_k has {batch_k + 1} entries but cu_seqlens_q has {batch + 1}")
    V.check_alibi(alibi_slopes, batch, nheads, q)
    rng = rng_state if rng_state is not None else _zero_rng()
    if batch == 0 or total_q == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        o = out if out is not None else q.new_empty(*q.shape[:-1], v.shape[-1])
        o.zero_()
        lse = torch.full((nheads, total_q), float("inf"), dtype=torch.float32, device=q.device)
        return FwdResult(o, lse, rng, None)
    res, lse = _run_varlen(
        fg, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, batch, scale, causal,
        window_size, softcap, alibi_slopes, out,
    )  # fmt: skip
    return FwdResult(res, lse, rng, None)


def _run_varlen(
    fg: ModuleType,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    batch: int,
    scale: float,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of FlagGems' varlen kernel with the fixes above; inputs already validated, non-empty."""
    total_q, nheads, _ = q.shape
    nheads_k = k.shape[1]
    left, right = flaggems_window(causal, window_size, max_seqlen_q, max_seqlen_k)
    kernel_causal = right == 0
    # FlagGems' decode path (one query per sequence, GQA) swaps query groups and sequences.
    swapped = max_seqlen_q == 1 and alibi_slopes is None and nheads > nheads_k and left < 0 and right < 0
    if swapped and total_q != batch:
        left, right, swapped = -1, max_seqlen_k - 1, False  # same (full) mask, no swap
    if k.stride() != v.stride():  # FlagGems asserts equal k/v strides
        k, v = k.contiguous(), v.contiguous()
    with torch.cuda.device(q.device):
        res, lse = fg.ops.flash_attn_varlen_func(
            q,
            k,
            v,
            max_seqlen_q,
            cu_seqlens_q.contiguous(),
            max_seqlen_k,
            cu_seqlens_k=cu_seqlens_k.contiguous(),
            seqused_k=None,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=kernel_causal,
            window_size=(left, right),
            softcap=float(softcap),
            alibi_slopes=alibi_slopes,
            return_softmax_lse=True,
            out=out,
        )
    if swapped:
        # kernel layout [head_k][batch][group]; FlagGems reshapes it as if it were [head_k][group][batch]
        groups = nheads // nheads_k
        lse = lse.reshape(nheads_k, batch, groups).permute(0, 2, 1).reshape(nheads, batch)
    if alibi_slopes is not None and kernel_causal:
        cu = cu_seqlens_q.to(torch.int64)
        seq = torch.repeat_interleave(
            torch.arange(batch, device=q.device), cu[1:] - cu[:-1], output_size=total_q
        )
        rows_left = (cu[seq + 1] - 1 - torch.arange(total_q, device=q.device)).to(torch.float32)  # q_len-1-i
        slopes = alibi_slopes[:, None] if alibi_slopes.dim() == 1 else alibi_slopes[seq].t()
        lse = lse + slopes * rows_left
    if out is not None and res.data_ptr() != out.data_ptr():
        out.copy_(res)
        res = out
    return res, lse


_DROPOUT_HEADDIMS = (32, 64, 128, 256)


def _dense_dropout(
    fg: ModuleType,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    scale: float,
    left: int,
    right: int,
    kernel_causal: bool,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlagGems' dense kernel, used only for dropout and only where it was measured correct."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if nheads_k != nheads:
        raise _unsupported(
            f"dropout with GQA/MQA (nheads={nheads}, nheads_k={nheads_k}): FlagGems' dense kernel, the "
            "only one with dropout, gives wrong results there"
        )
    if d not in _DROPOUT_HEADDIMS:
        raise _unsupported(f"dropout with head dim {d} (FlagGems' dense kernel: {_DROPOUT_HEADDIMS} only)")
    with torch.cuda.device(q.device):
        res, lse, philox_args, _unused, _p = fg.ops.flash_attention_forward(
            q,
            k,
            v,
            None,
            None,
            seqlen_q,
            seqlen_k,
            float(dropout_p),
            kernel_causal,
            False,
            scale=scale,
            softcap=float(softcap),
            window_size_left=left,
            window_size_right=right,
            alibi_slopes=alibi_slopes,
        )
    lse = lse.reshape(batch, nheads, seqlen_q)
    if alibi_slopes is not None and kernel_causal:
        # FlagGems' causal ALiBi bias is slope*(j - seqlen_k + 1): lse exceeds ours by slope*(i + 1 - seqlen_q)
        rows = torch.arange(seqlen_q, device=q.device, dtype=torch.float32)
        slopes = alibi_slopes.reshape(1 if alibi_slopes.dim() == 1 else batch, nheads, 1)
        lse = lse + slopes * (seqlen_q - 1 - rows)
    return res, lse, philox_args.to("cpu", torch.int64).reshape(2)
