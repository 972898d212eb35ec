"""Flash Attention Plus as the flash backend of ``torch.nn.functional.scaled_dot_product_attention``.

torch >= 2.11 lets a provider replace the kernels behind SDPA's flash backend:
``torch.nn.attention.register_flash_attention_impl(name, register_fn=...)`` records a callable, and
``activate_flash_attention_impl(name)`` runs it; the callable overrides aten's flash ops for the CUDA
dispatch key with a ``torch.library.Library("aten", "IMPL")`` and returns a handle whose ``remove()``
gives torch its own kernels back (``restore_flash_attention_impl()``). torch's FA3 / FA4 plug in that way.

Importing this module registers ours under :data:`IMPL_NAME` (``"FA_PLUS"``) and never activates it::

    import fa_backward.sdpa

    fa_backward.sdpa.activate()  # or torch.nn.attention.activate_flash_attention_impl("FA_PLUS")

Overridden ops (those the running torch has): ``_scaled_dot_product_flash_attention`` and its backward
(what SDPA calls, layout ``(batch, nheads, seqlen, headdim)``), ``_flash_attention_forward`` /
``_flash_attention_backward`` (layout ``(batch, seqlen, nheads, headdim)`` or packed varlen
``(total, nheads, headdim)`` with ``cum_seq_q/k``: nested-tensor SDPA and ``torch.nn.attention.varlen``),
and ``_flash_attention_forward_no_dropout_inplace``. The FP8 ``.quantized`` overloads stay torch's.

Each registered kernel binds its arguments by the op's own schema (so that torch versions that add or
reorder keyword arguments keep working), adapts layouts with transposed *views* (a copy only when the
last dim is strided) and returns exactly what the aten schema promises: logsumexp float32
``(batch, nheads, seqlen_q)`` (varlen ``(nheads, total_q)``), ``rng_state`` uint64 ``(2,)`` holding our
dropout ``[seed, offset]`` (kept on the CPU: the backward reads it without a device sync), ``unused``
uint64 ``()``, an empty debug mask unless asked for.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from fa_backward.backward import flash_attn_backward, flash_attn_varlen_backward
from fa_core.forward import flash_attn_forward, flash_attn_varlen_forward
from fa_core.validation import contig_last

__all__ = [
    "IMPL_NAME",
    "activate",
    "call_counts",
    "enabled",
    "flash_attention_backward",
    "flash_attention_forward",
    "flash_attention_forward_no_dropout_inplace",
    "is_active",
    "is_supported",
    "register",
    "reset_call_counts",
    "restore",
    "sdpa_flash_backward",
    "sdpa_flash_forward",
]

#: The name under which torch's flash-attention registry knows us.
IMPL_NAME = "FA_PLUS"

_REGISTRY_FUNCS = (
    "register_flash_attention_impl",
    "activate_flash_attention_impl",
    "restore_flash_attention_impl",
)

# How many times our registered kernels ran (tests and users check that SDPA really routed to us).
_CALLS = {"forward": 0, "backward": 0}


def call_counts() -> dict[str, int]:
    """``{"forward": n, "backward": m}``: calls of our SDPA kernels since import / the last reset."""
    return dict(_CALLS)


def reset_call_counts() -> None:
    """Zero the counters of :func:`call_counts`."""
    for key in _CALLS:
        _CALLS[key] = 0


# ------------------------------------------------------------------------------------ layout helpers


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """``(b, h, s, d)`` -> ``(b, s, h, d)`` as a view (a copy only when the last dim is strided)."""
    return contig_last(t.transpose(1, 2))


def _new_bhsd(batch: int, nheads: int, seqlen: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """A ``(b, h, s, d)`` tensor whose memory is ``(b, s, h, d)``: the layout torch's own flash kernel
    returns (``out.transpose(1, 2)`` is then contiguous, which attention layers reshape for free)."""
    return like.new_empty(batch, seqlen, nheads, d).transpose(1, 2)


def _grad_like(t: torch.Tensor, bhsd: bool) -> torch.Tensor:
    """A gradient buffer with ``t``'s layout (autograd then accumulates into ``.grad`` without a copy),
    falling back to a layout with a contiguous last dim."""
    g = torch.empty_like(t)
    if g.shape[-1] <= 1 or g.stride(-1) == 1:
        return g
    if bhsd:
        return _new_bhsd(t.shape[0], t.shape[1], t.shape[2], t.shape[3], t)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _rng_outputs(
    rng_state: torch.Tensor, dropout_p: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The schema's ``(rng_state, unused)``: uint64 ``(2,)`` and ``()`` as torch's meta functions declare.

    With dropout, ``rng_state`` holds our ``[seed, offset]`` on the CPU (no device sync when the backward
    reads it). Without dropout nothing reads them: uninitialised device tensors cost no kernel launch.
    """
    if dropout_p <= 0.0:
        return (
            torch.empty(2, dtype=torch.uint64, device=device),
            torch.empty((), dtype=torch.uint64, device=device),
        )
    seed, offset = (int(x) for x in rng_state.tolist())
    return torch.tensor([seed, offset], dtype=torch.uint64), torch.zeros((), dtype=torch.uint64)


def _rng_input(rng_state: torch.Tensor | None, dropout_p: float) -> torch.Tensor | None:
    """Our int64 ``[seed, offset]`` back from the schema's ``rng_state`` (only read with dropout)."""
    if dropout_p <= 0.0:
        return None
    if rng_state is None or rng_state.numel() != 2:
        raise RuntimeError(
            f"{IMPL_NAME}: dropout backward needs the rng_state (2,) [seed, offset] returned by this "
            "backend's forward; was the forward run by another flash implementation?"
        )
    return torch.tensor([int(x) for x in rng_state.tolist()], dtype=torch.int64)


def _debug_mask(probs: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if probs is None:
        return torch.empty(0, dtype=like.dtype, device=like.device)
    return probs.to(like.dtype)


def _window(left: int | None, right: int | None) -> tuple[int, int]:
    return (-1 if left is None else int(left), -1 if right is None else int(right))


# ------------------------------------------------------------------ the kernels (aten schema semantics)


def sdpa_flash_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    return_debug_mask: bool = False,
    *,
    scale: float | None = None,
) -> tuple[Any, ...]:
    """``aten::_scaled_dot_product_flash_attention`` on our kernels.

    Args:
        query ``(batch, nheads, seqlen_q, d)``, key / value ``(batch, nheads_k, seqlen_k, d)``: SDPA's
            layout, any strides (SDPA passes GQA as ``nheads_k < nheads``: our kernels read kv head
            ``h // (nheads // nheads_k)``, i.e. ``repeat_interleave`` semantics, as ``enable_gqa``).
        dropout_p, is_causal (bottom-right aligned, as torch's flash kernel; SDPA only sends it with
            ``seqlen_q == seqlen_k``), scale (default ``d ** -0.5``).
        return_debug_mask: also return the probabilities ``(batch, nheads, seqlen_q, seqlen_k)`` in q's dtype
            (dropped entries negated; testing only).

    Returns:
        ``(output, logsumexp, cum_seq_q=None, cum_seq_k=None, max_q, max_k, rng_state, unused,
        debug_attn_mask)``; output ``(batch, nheads, seqlen_q, d_v)`` (memory ``(b, s, h, d)``),
        logsumexp float32 ``(batch, nheads, seqlen_q)``.
    """
    batch, nheads, seqlen_q, _ = query.shape
    out = _new_bhsd(batch, nheads, seqlen_q, value.shape[-1], query)
    # below the autograd key the inputs may still say requires_grad: fa_core's grad guard must not fire
    with torch.no_grad():
        res = flash_attn_forward(
            _bshd(query),
            _bshd(key),
            _bshd(value),
            dropout_p=float(dropout_p),
            softmax_scale=scale,
            causal=bool(is_causal),
            return_probs=bool(return_debug_mask),
            out=out.transpose(1, 2),
        )
    _CALLS["forward"] += 1
    rng_state, unused = _rng_outputs(res.rng_state, float(dropout_p), query.device)
    return (
        out,
        res.lse,
        None,
        None,
        seqlen_q,
        key.shape[2],
        rng_state,
        unused,
        _debug_mask(res.probs, query),
    )


def sdpa_flash_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    cum_seq_q: torch.Tensor | None,
    cum_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    philox_seed: torch.Tensor | None,
    philox_offset: torch.Tensor | None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten::_scaled_dot_product_flash_attention_backward`` on our kernels: ``(dq, dk, dv)`` shaped
    (and, where possible, laid out) like query, key, value."""
    dq, dk, dv = _grad_like(query, True), _grad_like(key, True), _grad_like(value, True)
    flash_attn_backward(
        _bshd(grad_out),
        _bshd(query),
        _bshd(key),
        _bshd(value),
        _bshd(out),
        logsumexp,
        dq=dq.transpose(1, 2),
        dk=dk.transpose(1, 2),
        dv=dv.transpose(1, 2),
        dropout_p=float(dropout_p),
        softmax_scale=scale,
        causal=bool(is_causal),
        rng_state=_rng_input(philox_seed, float(dropout_p)),
    )
    _CALLS["backward"] += 1
    return dq, dk, dv


def flash_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cum_seq_q: torch.Tensor | None,
    cum_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    return_debug_mask: bool,
    *,
    scale: float | None = None,
    window_size_left: int | None = None,
    window_size_right: int | None = None,
    seqused_k: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[Any, ...]:
    """``aten::_flash_attention_forward`` on our kernels: dense ``(batch, seqlen, nheads, d)`` or, with
    ``cum_seq_q`` / ``cum_seq_k``, packed ``(total, nheads, d)``.

    ``num_splits`` is a performance hint (ignored); ``block_table`` (paged KV) is refused. ``out`` is
    not in the schema: :func:`flash_attention_forward_no_dropout_inplace` passes its buffer through it.

    Returns:
        ``(output, logsumexp, rng_state, unused, debug_attn_mask)``; logsumexp float32
        ``(batch, nheads, seqlen_q)`` dense, ``(nheads, total_q)`` varlen.
    """
    if block_table is not None:
        raise RuntimeError(f"{IMPL_NAME}: paged KV (block_table) is not supported by this backend")
    kw: dict[str, Any] = dict(
        dropout_p=float(dropout_p),
        softmax_scale=scale,
        causal=bool(is_causal),
        window_size=_window(window_size_left, window_size_right),
        alibi_slopes=alibi_slopes,
        return_probs=bool(return_debug_mask),
        out=out,
    )
    q, k, v = contig_last(query), contig_last(key), contig_last(value)
    if (cum_seq_q is None) != (cum_seq_k is None):
        raise RuntimeError(f"{IMPL_NAME}: cum_seq_q and cum_seq_k must be given together")
    if cum_seq_q is None and seqused_k is not None:
        raise RuntimeError(f"{IMPL_NAME}: seqused_k needs the varlen path (cum_seq_q / cum_seq_k)")
    with torch.no_grad():  # as in sdpa_flash_forward: we run below autograd
        if cum_seq_q is None or cum_seq_k is None:
            res = flash_attn_forward(q, k, v, **kw)
        else:
            res = flash_attn_varlen_forward(
                q, k, v, cum_seq_q, cum_seq_k, int(max_q), int(max_k), seqused_k=seqused_k, **kw
            )
    _CALLS["forward"] += 1
    rng_state, unused = _rng_outputs(res.rng_state, float(dropout_p), query.device)
    return res.out, res.lse, rng_state, unused, _debug_mask(res.probs, query)


def flash_attention_forward_no_dropout_inplace(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cum_seq_q: torch.Tensor | None,
    cum_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    return_debug_mask: bool,
    *,
    scale: float | None = None,
    window_size_left: int | None = None,
    window_size_right: int | None = None,
    seqused_k: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``aten::_flash_attention_forward_no_dropout_inplace``: writes ``out``, returns the logsumexp."""
    if dropout_p:
        raise RuntimeError(f"{IMPL_NAME}: _flash_attention_forward_no_dropout_inplace got dropout_p != 0")
    return flash_attention_forward(
        query,
        key,
        value,
        cum_seq_q,
        cum_seq_k,
        max_q,
        max_k,
        0.0,
        is_causal,
        return_debug_mask,
        scale=scale,
        window_size_left=window_size_left,
        window_size_right=window_size_right,
        seqused_k=seqused_k,
        alibi_slopes=alibi_slopes,
        block_table=block_table,
        num_splits=num_splits,
        out=out,
    )[1]


def flash_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    cum_seq_q: torch.Tensor | None,
    cum_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    is_causal: bool,
    rng_state: torch.Tensor | None,
    unused: torch.Tensor | None,
    *,
    scale: float | None = None,
    window_size_left: int | None = None,
    window_size_right: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten::_flash_attention_backward`` on our kernels (dense or varlen, as the forward).

    The schema carries no ``alibi_slopes`` / ``seqused_k``: as with torch's own kernel, gradients of a
    forward that used them are those of attention without them.
    """
    dq, dk, dv = _grad_like(query, False), _grad_like(key, False), _grad_like(value, False)
    left, right = _window(window_size_left, window_size_right)
    kw: dict[str, Any] = dict(
        dropout_p=float(dropout_p),
        softmax_scale=scale,
        causal=bool(is_causal),
        window_size_left=left,
        window_size_right=right,
        rng_state=_rng_input(rng_state, float(dropout_p)),
    )
    g, q, k, v, o = (contig_last(t) for t in (grad_out, query, key, value, out))
    if cum_seq_q is None:
        flash_attn_backward(g, q, k, v, o, logsumexp, dq=dq, dk=dk, dv=dv, **kw)
    else:
        if cum_seq_k is None:
            raise RuntimeError(f"{IMPL_NAME}: cum_seq_q and cum_seq_k must be given together")
        flash_attn_varlen_backward(
            g,
            q,
            k,
            v,
            o,
            logsumexp,
            dq,
            dk,
            dv,
            cum_seq_q,
            cum_seq_k,
            int(max_q),
            int(max_k),
            **kw,
        )
    _CALLS["backward"] += 1
    return dq, dk, dv


# ---------------------------------------------------------------------------- dispatcher registration

#: aten op (default overload) -> our implementation. Ops missing from the running torch are skipped.
_KERNELS: dict[str, Callable[..., Any]] = {
    "_scaled_dot_product_flash_attention": sdpa_flash_forward,
    "_scaled_dot_product_flash_attention_backward": sdpa_flash_backward,
    "_flash_attention_forward": flash_attention_forward,
    "_flash_attention_backward": flash_attention_backward,
    "_flash_attention_forward_no_dropout_inplace": flash_attention_forward_no_dropout_inplace,
}


def _schema(op_name: str) -> Any | None:
    packet = getattr(torch.ops.aten, op_name, None)
    overload = getattr(packet, "default", None) if packet is not None else None
    return getattr(overload, "_schema", None)


def _bind(schema: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (value, default)}`` for every schema argument, whichever way the dispatcher passed it
    (positionally, by keyword, or left out because it equals its default)."""
    bound: dict[str, tuple[Any, Any]] = {}
    for i, arg in enumerate(schema.arguments):
        default = arg.default_value if arg.has_default_value() else None
        if i < len(args):
            value = args[i]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        elif arg.has_default_value():
            value = default
        else:
            value = None  # an optional Tensor the dispatcher dropped
        bound[arg.name] = (value, default)
    return bound


def _make_kernel(op_name: str, fn: Callable[..., Any], schema: Any) -> Callable[..., Any]:
    """Wrap ``fn`` so that it accepts the call as the running torch's schema makes it; an argument that
    ``fn`` does not know is accepted only at its default value (a newer torch's feature we lack)."""
    known = set(inspect.signature(fn).parameters)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        bound = _bind(schema, args, kwargs)
        for name, (value, default) in bound.items():
            if name not in known and value is not None and value != default:
                raise RuntimeError(f"{IMPL_NAME} {op_name}: argument {name}={value!r} is not supported")
        call = {name: value for name, (value, _) in bound.items() if name in known}
        # Python kernels get no device guard from the dispatcher: launch on the inputs' GPU, not the
        # current one (several GPUs in one process)
        device = next((v.device for v in args if isinstance(v, torch.Tensor) and v.is_cuda), None)
        guard = torch.cuda.device(device) if device is not None else contextlib.nullcontext()
        try:
            with guard:
                return fn(**call)
        except (ValueError, TypeError) as exc:  # fa_core's input checks: name the backend in the message
            raise RuntimeError(f"{IMPL_NAME} flash backend ({op_name}): {exc}") from exc

    kernel.__name__ = f"fa_plus_{op_name.lstrip('_')}"
    kernel.__doc__ = fn.__doc__
    return kernel


def _register_kernels(dispatch_key: str = "CUDA") -> torch.library.Library:
    """Override aten's flash ops for ``dispatch_key`` (``"CPU"`` only in tests, to drive the dispatcher
    path through Triton's interpreter). The overrides live as long as the returned Library."""
    lib = torch.library.Library("aten", "IMPL", dispatch_key)
    for op_name, fn in _KERNELS.items():
        schema = _schema(op_name)
        if schema is not None:
            lib.impl(op_name, _make_kernel(op_name, fn, schema), dispatch_key)
    return lib


@dataclass
class FAPlusHandle:
    """What the registry keeps while ours is active; ``remove()`` gives torch its kernels back."""

    library: torch.library.Library | None

    def remove(self) -> None:
        global _HANDLE
        lib, self.library = self.library, None
        if lib is not None and hasattr(lib, "_destroy"):
            lib._destroy()  # deregister now rather than whenever the Library is garbage-collected
        if _HANDLE is self:
            _HANDLE = None


_HANDLE: FAPlusHandle | None = None


def _no_cuda_message() -> str:
    return (
        f"{IMPL_NAME}: activating Flash Attention Plus as SDPA's flash backend needs a CUDA GPU "
        "(torch.cuda.is_available() is False); SDPA keeps its own kernels"
    )


def _register_fn(*_args: Any, **_kwargs: Any) -> FAPlusHandle:
    """The callable given to ``register_flash_attention_impl``: run by ``activate_flash_attention_impl``
    (which passes nothing today; anything a later torch passes is ignored)."""
    global _HANDLE
    if not torch.cuda.is_available():
        raise RuntimeError(_no_cuda_message())
    if _HANDLE is not None:  # activated twice without the registry knowing (e.g. torch < its tracking)
        _HANDLE.remove()
    _HANDLE = FAPlusHandle(_register_kernels("CUDA"))
    return _HANDLE


def _registry() -> ModuleType | None:
    """The module holding torch's flash-implementation registry functions, or None (torch < 2.11)."""
    import torch.nn.attention as attention

    if all(hasattr(attention, f) for f in _REGISTRY_FUNCS):
        return attention
    try:
        from torch.nn.attention import _registry as reg
    except ImportError:
        return None
    return reg if all(hasattr(reg, f) for f in _REGISTRY_FUNCS) else None


def _require_registry() -> ModuleType:
    reg = _registry()
    if reg is None:
        raise RuntimeError(
            f"{IMPL_NAME}: this torch ({torch.__version__}) has no flash-attention registry "
            "(torch.nn.attention.register_flash_attention_impl, torch >= 2.11)"
        )
    return reg


def is_supported() -> bool:
    """True when this torch has the registry and a CUDA GPU is visible (activation can succeed)."""
    return _registry() is not None and torch.cuda.is_available()


def register() -> bool:
    """Register :data:`IMPL_NAME` with torch's registry (done on import; idempotent). Never activates.
    Returns False when this torch has no registry."""
    reg = _registry()
    if reg is None:
        return False
    reg.register_flash_attention_impl(IMPL_NAME, register_fn=_register_fn)
    return True


def is_active() -> bool:
    """True while our kernels are SDPA's flash backend."""
    return _HANDLE is not None and _HANDLE.library is not None


# cuDNN's SDPA flag as it was before activate() turned it off (None: activate() did not touch it)
_CUDNN_WAS_ENABLED: bool | None = None


def activate(disable_cudnn: bool = True) -> None:
    """Make our kernels SDPA's flash backend (``activate_flash_attention_impl("FA_PLUS")``).

    Args:
        disable_cudnn: also turn SDPA's cuDNN backend off until :func:`restore`: on H100/B200 torch
            prefers cuDNN to flash, so without this SDPA may never reach the flash backend.

    Raises:
        RuntimeError: no CUDA GPU, or torch without the registry (< 2.11).
    """
    global _CUDNN_WAS_ENABLED
    reg = _require_registry()
    if not torch.cuda.is_available():
        raise RuntimeError(_no_cuda_message())
    register()  # in case another provider re-registered the name
    reg.activate_flash_attention_impl(IMPL_NAME)
    if disable_cudnn and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        _CUDNN_WAS_ENABLED = True


def restore() -> None:
    """Give SDPA torch's own flash kernels back (and re-enable cuDNN if :func:`activate` disabled it)."""
    global _CUDNN_WAS_ENABLED
    if is_active():
        reg = _registry()
        current = getattr(reg, "current_flash_attention_impl", None)
        if reg is not None and (current is None or current() == IMPL_NAME):
            reg.restore_flash_attention_impl()
        if _HANDLE is not None:  # the registry did not hold our handle: remove it ourselves
            _HANDLE.remove()
    if _CUDNN_WAS_ENABLED:
        torch.backends.cuda.enable_cudnn_sdp(True)
    _CUDNN_WAS_ENABLED = None


@contextlib.contextmanager
def enabled(disable_cudnn: bool = True) -> Iterator[None]:
    """``with fa_backward.sdpa.enabled(): ...``: :func:`activate` for the block, :func:`restore` after."""
    activate(disable_cudnn=disable_cudnn)
    try:
        yield
    finally:
        restore()


register()
