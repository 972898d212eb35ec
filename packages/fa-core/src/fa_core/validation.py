"""Input checks shared by every package: each raises ``ValueError``/``TypeError`` naming the argument.

Checks on tensor *values* (cu_seqlens monotone, totals) need a device-to-host copy on a GPU; they run by
default and are skipped while a CUDA graph is being captured, under ``torch.compile`` tracing, or when
``fa_core.settings.get().value_checks`` is off (``FA_PLUS_SKIP_VALUE_CHECKS=1``, for serving loops that cannot
afford the synchronisation). Bad values raise :class:`fa_core.errors.FlashAttnValueError` (a ``ValueError``
and a ``RuntimeError``).
"""

from __future__ import annotations

import operator

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fa_core import settings
from fa_core.errors import FlashAttnValueError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: FP8 inputs (with per-(batch, kv-head) descale factors) are accepted by the forward on GPUs.
FP8_DTYPE = torch.float8_e4m3fn
MAX_HEADDIM = 256


#: True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``).
interpreting = settings.interpreting

BF16_INTERPRETER_MESSAGE = (
    "bfloat16 needs a GPU: Triton's CPU interpreter computes bf16 dot products wrongly; use float16 or "
    "float32 on CPU"
)


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether checks that read tensor values (a device sync on GPU) may run now."""
    if not settings.get().value_checks:
        return False
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def traced(t: torch.Tensor) -> bool:
    """Whether this call is being traced (torch.compile / export, compiled autograd, make_fx or another
    dispatch or function mode, fake or functional tensors): then the launches of the rotary, layer-norm and
    cross-entropy kernels go through their custom ops, recorded as one node each."""
    return (
        torch.compiler.is_compiling()
        or type(t) is not torch.Tensor
        or _get_current_dispatch_mode() is not None
        or torch._C._is_torch_function_mode_enabled()
    )


def check_tensor(name: str, t: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise FlashAttnValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_packed(name: str, t: object, ndim: int, axis: int, n: int) -> torch.Tensor:
    """Packed ``qkv`` / ``kv``: rank ``ndim`` with exactly ``n`` slices along ``axis``."""
    t = check_tensor(name, t, ndim)
    if t.shape[axis] != n:
        raise FlashAttnValueError(f"{name} must have {n} slices along dim {axis}, got shape {tuple(t.shape)}")
    return t


def check_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise FlashAttnValueError(
            f"{name} is on {t.device} but {ref_name} is on {ref.device}: all tensors must share a device"
        )


def check_compute_device(name: str, t: torch.Tensor) -> None:
    """Kernels run on CUDA (or other Triton GPU) tensors, or on CPU tensors under the interpreter."""
    if t.device.type == "cpu" and not interpreting():
        raise FlashAttnValueError(
            f"{name} is a CPU tensor: Triton kernels need a GPU tensor, or set TRITON_INTERPRET=1 "
            "before importing fa_core to run them on CPU through the interpreter"
        )
    if t.device.type not in ("cpu", "cuda", "meta", "xpu"):
        raise FlashAttnValueError(f"{name} is on unsupported device {t.device}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...] | None = None) -> None:
    if allowed is None:
        # fp32 only where the interpreter runs the kernel (CPU tests); GPUs get fp16/bf16 as in flash-attn
        allowed = SUPPORTED_DTYPES + ((torch.float32,) if t.device.type == "cpu" else (FP8_DTYPE,))
    if t.dtype == FP8_DTYPE and t.device.type == "cpu":
        raise FlashAttnValueError(
            f"{name} is float8_e4m3fn on CPU: FP8 attention needs a CUDA GPU with FP8 tensor cores"
        )
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {names}")
    if t.dtype == torch.bfloat16 and t.device.type == "cpu" and interpreting():
        raise TypeError(f"{name} has dtype torch.bfloat16 on CPU: {BF16_INTERPRETER_MESSAGE}")


def contig_last(t):
    """flash-attn's ``maybe_contiguous``: copy a tensor only when its (non-trivial) last dim is strided.
    Anything else (None, an empty or last-dim-1 tensor, a non-tensor left for the checks) passes unchanged."""
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    # an empty tensor has no element to reach: its strides do not matter (.contiguous() keeps them)
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise FlashAttnValueError(
            f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}"
        )


#: kernels address a tile as a 64-bit row base plus 32-bit offsets inside the tile (at most 256 rows)
MAX_ROW_STRIDE = (1 << 31) // 256


def check_row_stride(name: str, t: torch.Tensor) -> None:
    """The sequence dim's stride (dim -3) must keep 256 rows' offsets inside int32."""
    if t.numel() > 0 and t.dim() >= 3 and t.stride(-3) >= MAX_ROW_STRIDE:
        raise FlashAttnValueError(
            f"{name} has a sequence stride of {t.stride(-3)} elements; the kernels need < {MAX_ROW_STRIDE} "
            f"(call .contiguous())"
        )


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: bool, allow_v_headdim: bool = True
) -> tuple[int, int, int, int]:
    """Validate q/k/v; return ``(nheads, nheads_k, headdim, headdim_v)``."""
    ndim = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim)
    check_compute_device("q", q)
    check_device("k", k, "q", q)
    check_device("v", v, "q", q)
    check_dtype("q", q)
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}: q, k, v must share a dtype")
    if v.dtype != q.dtype:
        raise TypeError(f"v has dtype {v.dtype} but q has {q.dtype}: q, k, v must share a dtype")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
        check_row_stride(name, t)
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k, dk = k.shape[-2], k.shape[-1]
    dv = v.shape[-1]
    if d == 0 or d > MAX_HEADDIM:
        raise FlashAttnValueError(f"q head dim must be in [1, {MAX_HEADDIM}], got {d}")
    if dk != d:
        raise FlashAttnValueError(f"k head dim {dk} must equal q head dim {d}")
    if dv == 0 or dv > MAX_HEADDIM:
        raise FlashAttnValueError(f"v head dim must be in [1, {MAX_HEADDIM}], got {dv}")
    if not allow_v_headdim and dv != d:
        raise FlashAttnValueError(f"v head dim {dv} must equal q head dim {d}")
    if v.shape[:-1] != k.shape[:-1]:
        raise FlashAttnValueError(
            f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} except the head dim"
        )
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise FlashAttnValueError(
            f"nheads ({nheads}) must be a multiple of nheads_k ({nheads_k}) for GQA/MQA"
        )
    if not varlen:
        if k.shape[0] != q.shape[0]:
            raise FlashAttnValueError(f"k batch {k.shape[0]} does not match q batch {q.shape[0]}")
    return nheads, nheads_k, d, dv


def window_pair(window_size: object) -> tuple[int, int]:
    """``window_size`` as ``(left, right)`` Python ints: any pair of integers (tuple, list, a torch tensor or
    numpy array of two integers, numpy integer scalars); -1 = unbounded side.

    Raises:
        TypeError: a side is not an integer (floats, bools), naming ``window_size``.
        FlashAttnValueError: not a pair, or a side < -1.
    """
    if type(window_size) is tuple and len(window_size) == 2:
        left, right = window_size
        if type(left) is int and type(right) is int and left >= -1 and right >= -1:
            return left, right  # the common call: no further work
    if isinstance(window_size, torch.Tensor):
        if window_size.dtype == torch.bool or window_size.dtype.is_floating_point or window_size.is_complex():
            raise TypeError(f"window_size must hold two integers, got a {window_size.dtype} tensor")
        items = window_size.reshape(-1).tolist() if window_size.dim() == 1 else None
    elif isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__"):
        items = None
    else:
        items = list(window_size)  # type: ignore[call-overload]
    if items is None or len(items) != 2:
        raise FlashAttnValueError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    pair = []
    for side, w in zip(("left", "right"), items):
        if isinstance(w, bool) or type(w).__name__ == "bool_":
            raise TypeError(f"window_size {side} must be an int, got a bool ({w!r})")
        try:
            w = operator.index(w)
        except TypeError:
            raise TypeError(f"window_size {side} must be an int, got {type(w).__name__} {w!r}") from None
        if w < -1:
            raise FlashAttnValueError(f"window_size {side} must be >= -1 (-1 = unbounded), got {w}")
        pair.append(w)
    return pair[0], pair[1]


def check_window(window_size: object) -> None:
    """Raise unless ``window_size`` is a valid pair (see :func:`window_pair`)."""
    window_pair(window_size)


def check_scalars(dropout_p: float, softcap: float, softmax_scale: float | None) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise FlashAttnValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softcap < 0.0:
        raise FlashAttnValueError(f"softcap must be >= 0 (0 = off), got {softcap}")
    if softmax_scale is not None and not softmax_scale == softmax_scale:  # NaN
        raise FlashAttnValueError("softmax_scale is NaN")


def check_alibi(alibi_slopes: torch.Tensor | None, batch: int, nheads: int, q: torch.Tensor) -> None:
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes)
    check_device("alibi_slopes", alibi_slopes, "q", q)
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise FlashAttnValueError(
            f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), got {tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.stride(-1) != 1:
        raise FlashAttnValueError("alibi_slopes must have a contiguous last dimension")


def check_chunk_and_sink(
    attention_chunk: int, learnable_sink: torch.Tensor | None, nheads: int, q: torch.Tensor
) -> None:
    if isinstance(attention_chunk, bool) or not isinstance(attention_chunk, int) or attention_chunk < 0:
        raise FlashAttnValueError(f"attention_chunk must be an int >= 0 (0 = off), got {attention_chunk!r}")
    if learnable_sink is None:
        return
    check_tensor("learnable_sink", learnable_sink, 1)
    check_device("learnable_sink", learnable_sink, "q", q)
    if learnable_sink.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"learnable_sink must be float32/float16/bfloat16, got {learnable_sink.dtype}")
    if learnable_sink.shape[0] != nheads:
        raise FlashAttnValueError(
            f"learnable_sink must have shape ({nheads},), got {tuple(learnable_sink.shape)}"
        )
    if learnable_sink.stride(0) != 1:
        raise FlashAttnValueError("learnable_sink must be contiguous")


def check_mods(score_mod: object, mask_mod: object) -> None:
    """score_mod / mask_mod must be Triton functions (``@triton.jit``): they are inlined into the kernel."""
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is None:
            continue
        if not (callable(fn) and hasattr(fn, "fn")):  # JITFunction, or InterpretedFunction on CPU
            raise TypeError(f"{name} must be a @triton.jit function, got {type(fn).__name__}")


def check_block_mask(
    block_mask,
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    q: torch.Tensor,
    return_probs: bool,
    full_like_partial: bool = False,
) -> None:
    """Shapes, dtypes and (when value checks run) index ranges of a :class:`fa_core.block_sparse.BlockMask`,
    its optional full-block fields included (:func:`check_full_blocks`; ``full_like_partial`` as there)."""
    if block_mask is None:
        return
    if return_probs:
        raise FlashAttnValueError("return_probs is not supported together with block_mask")
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    bq, bk = (int(x) for x in block_mask.block_size)
    for name, size in (("block_mask.block_size[0]", bq), ("block_mask.block_size[1]", bk)):
        if size < 32 or size & (size - 1):
            raise FlashAttnValueError(f"{name} must be a power of two >= 32, got {size}")
    check_tensor("block_mask.kv_num_blocks", num, 3)
    check_tensor("block_mask.kv_indices", idx, 4)
    for name, t in (("block_mask.kv_num_blocks", num), ("block_mask.kv_indices", idx)):
        check_device(name, t, "q", q)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.shape[0] not in (1, batch) or t.shape[1] not in (1, nheads):
            raise FlashAttnValueError(
                f"{name} must have leading dims (batch|1, nheads|1), got {tuple(t.shape)}"
            )
        if t.stride(-1) != 1:
            raise FlashAttnValueError(f"{name} must have a contiguous last dimension")
    if num.shape[:2] != idx.shape[:2]:
        raise FlashAttnValueError(
            f"block_mask.kv_num_blocks {tuple(num.shape)} and kv_indices {tuple(idx.shape)} disagree"
        )
    nq, nk = -(-seqlen_q // bq), -(-seqlen_k // bk)
    if num.shape[2] < nq or idx.shape[2] != num.shape[2]:
        raise FlashAttnValueError(
            f"block_mask needs {nq} query blocks of {bq} rows, got kv_num_blocks {tuple(num.shape)} "
            f"and kv_indices {tuple(idx.shape)}"
        )
    if value_checks_enabled(num):
        if bool((num < 0).any()) or bool((num > idx.shape[3]).any()):
            raise FlashAttnValueError(
                "block_mask.kv_num_blocks entries must lie in [0, kv_indices.shape[-1]]"
            )
        used = torch.arange(idx.shape[3], device=idx.device) < num[..., None].long()
        if bool(((idx < 0) | (idx >= nk))[used].any()):
            raise FlashAttnValueError(
                f"block_mask.kv_indices entries must lie in [0, {nk}) for seqlen_k = {seqlen_k}"
            )
    check_full_blocks(block_mask, batch, nheads, q, full_like_partial)


def check_full_blocks(
    block_mask, batch: int, nheads: int, q: torch.Tensor, like_partial: bool = False
) -> None:
    """The optional full-block lists of a block mask, ``full_kv_num_blocks`` / ``full_kv_indices`` (read with
    getattr: masks without the fields pass). Both or neither; int32 tensors on q's device with a contiguous
    last dim; laid out like the partial lists: the partial lists' trailing dims and leading dims
    ``(batch|1, nheads|1)``, the same for the two full lists (the forward reads them with their own strides),
    or, with ``like_partial``, exactly the partial lists' shapes (the backward reads both with one set of
    strides); when value checks run, counts in ``[0, full_kv_indices.shape[-1]]``.

    Called by :func:`check_block_mask` after the partial lists passed."""
    num = getattr(block_mask, "full_kv_num_blocks", None)
    idx = getattr(block_mask, "full_kv_indices", None)
    if num is None and idx is None:
        return
    if num is None or idx is None:
        raise FlashAttnValueError(
            "block_mask.full_kv_num_blocks and block_mask.full_kv_indices must be given together"
        )
    for name, t, like in (
        ("block_mask.full_kv_num_blocks", num, block_mask.kv_num_blocks),
        ("block_mask.full_kv_indices", idx, block_mask.kv_indices),
    ):
        check_tensor(name, t)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        check_device(name, t, "q", q)
        if like_partial:
            if tuple(t.shape) != tuple(like.shape):
                raise FlashAttnValueError(
                    f"{name} must be shaped like the partial list {tuple(like.shape)}, got {tuple(t.shape)}"
                )
        elif (
            t.dim() != like.dim()
            or t.shape[2:] != like.shape[2:]
            or t.shape[:2] != num.shape[:2]
            or t.shape[0] not in (1, batch)
            or t.shape[1] not in (1, nheads)
        ):
            raise FlashAttnValueError(
                f"{name} must have the partial lists' layout {tuple(like.shape)} with leading dims "
                f"(batch|1, nheads|1) = ({batch}|1, {nheads}|1), got {tuple(t.shape)}"
            )
        if t.stride(-1) != 1:
            raise FlashAttnValueError(f"{name} must have a contiguous last dimension")
    if value_checks_enabled(num):
        if bool((num < 0).any()) or bool((num > idx.shape[-1]).any()):
            raise FlashAttnValueError(
                "block_mask.full_kv_num_blocks entries must lie in [0, full_kv_indices.shape[-1]]"
            )


def check_cu_seqlens(
    name: str, cu: torch.Tensor, total: int | None, q: torch.Tensor, max_seqlen: int | None, max_name: str
) -> int:
    """Validate a ``(batch + 1,)`` int32 prefix-sum tensor; return batch. ``total`` None (keys read through
    a block table): the last entry is not compared with a row count."""
    check_tensor(name, cu, 1)
    check_device(name, cu, "q", q)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.numel() < 1:
        raise FlashAttnValueError(f"{name} must have batch + 1 >= 1 entries")
    if value_checks_enabled(cu):
        vals = cu.cpu()
        if int(vals[0]) != 0:
            raise FlashAttnValueError(f"{name}[0] must be 0, got {int(vals[0])}")
        if bool((vals[1:] < vals[:-1]).any()):
            raise FlashAttnValueError(f"{name} must be non-decreasing, got {vals.tolist()}")
        if total is not None and int(vals[-1]) != total:
            raise FlashAttnValueError(f"{name}[-1] = {int(vals[-1])} does not match the total length {total}")
        if max_seqlen is not None and vals.numel() > 1:
            longest = int((vals[1:] - vals[:-1]).max())
            if longest > max_seqlen:
                raise FlashAttnValueError(
                    f"{max_name} = {max_seqlen} is smaller than the longest sequence ({longest})"
                )
    return cu.numel() - 1


def check_seqused(
    seqused_k: torch.Tensor | None, batch: int, cu_seqlens_k: torch.Tensor, q: torch.Tensor
) -> None:
    if seqused_k is None:
        return
    check_tensor("seqused_k", seqused_k, 1)
    check_device("seqused_k", seqused_k, "q", q)
    if seqused_k.dtype != torch.int32:
        raise TypeError(f"seqused_k must be int32, got {seqused_k.dtype}")
    if seqused_k.numel() != batch:
        raise FlashAttnValueError(
            f"seqused_k must have {batch} entries (one per sequence), got {seqused_k.numel()}"
        )
    if value_checks_enabled(seqused_k):
        used = seqused_k.cpu()
        lens = cu_seqlens_k.cpu()
        avail = lens[1:] - lens[:-1]
        if bool((used < 0).any()) or bool((used > avail).any()):
            raise FlashAttnValueError(
                f"seqused_k must lie in [0, seqlen_k of each sequence]; got {used.tolist()}"
            )


def grad_guard(*tensors: torch.Tensor | None) -> None:
    """fa-core's forward is not differentiable: refuse rather than silently detach."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            "inputs require grad but fa_core only provides the forward pass: install fa-backward "
            "(`pip install fa-backward`) and call its autograd functions (or flash_attn.flash_attn_func), "
            "or run under torch.no_grad()"
        )
