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

The kernels themselves (aten schema semantics) live in :mod:`fa_backward.sdpa_kernels` and are re-exported
here; this module binds them to the running torch's schemas and handles registration and activation.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from fa_backward.sdpa_kernels import (
    IMPL_NAME,
    call_counts,
    flash_attention_backward,
    flash_attention_forward,
    flash_attention_forward_no_dropout_inplace,
    reset_call_counts,
    sdpa_flash_backward,
    sdpa_flash_forward,
)
from fa_backward.sdpa_kernels import _bshd as _bshd  # re-exported (layout helpers, used by the tests)
from fa_backward.sdpa_kernels import _new_bhsd as _new_bhsd

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

_REGISTRY_FUNCS = (
    "register_flash_attention_impl",
    "activate_flash_attention_impl",
    "restore_flash_attention_impl",
)


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
