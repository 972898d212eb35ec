"""Optional forward backends that fa_core's public functions can route to.

``"triton"`` (aliases ``"native"``, ``"fa-plus"``, ``"default"``) is fa_core's own kernel; ``"flaggems"``
routes to FlagGems' Triton FlashAttention (:mod:`fa_core.backends.flaggems`, needs ``pip install
fa-core[flaggems]`` and a GPU). The backend is chosen per call (``backend=``) or, when the call passes
``None``, by the ``backend`` setting (:mod:`fa_core.settings`, environment variable ``FA_BACKEND``).

Backend modules are imported lazily: importing this package never imports FlagGems (whose import raises
on a machine without a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fa_core import settings
from fa_core.errors import FlashAttnValueError

__all__ = ["BACKENDS", "NATIVE", "available_backends", "get_forward", "get_varlen_forward", "resolve_backend"]

#: The name of fa_core's own kernels.
NATIVE = "triton"
#: Every backend name :func:`resolve_backend` accepts (canonical names).
BACKENDS = (NATIVE, "flaggems")
_ALIASES = {
    "": NATIVE,
    "native": NATIVE,
    "default": NATIVE,
    "fa-plus": NATIVE,
    "fa_plus": NATIVE,
    "triton": NATIVE,
    "flaggems": "flaggems",
    "flag_gems": "flaggems",
    "flag-gems": "flaggems",
}


def resolve_backend(backend: str | None = None) -> str:
    """Canonical backend name: ``backend`` if given, else the ``backend`` setting (``$FA_BACKEND``), else
    ``"triton"``.

    Raises:
        FlashAttnValueError: unknown name (the message lists the known ones).
    """
    name = backend if backend is not None else settings.get().backend
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str or None, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _ALIASES:
        src = "backend" if backend is not None else "FA_BACKEND"
        raise FlashAttnValueError(
            f"{src}={name!r} is not a known backend; choose one of {', '.join(BACKENDS)}"
        )
    return _ALIASES[key]


def available_backends() -> list[str]:
    """Backends usable on this machine right now (never raises)."""
    out = [NATIVE]
    from fa_core.backends import flaggems

    if flaggems.is_available():
        out.append("flaggems")
    return out


def get_forward(backend: str | None = None) -> Callable[..., Any] | None:
    """The dense forward of ``backend`` (see :func:`resolve_backend`), or ``None`` for fa_core's own.

    The returned function takes the keyword arguments of :func:`fa_core.flash_attn_forward` and returns
    a :class:`fa_core.FwdResult`.
    """
    name = resolve_backend(backend)
    if name == NATIVE:
        return None
    from fa_core.backends import flaggems

    return flaggems.flaggems_forward


def get_varlen_forward(backend: str | None = None) -> Callable[..., Any] | None:
    """The varlen forward of ``backend``, or ``None`` for fa_core's own (as :func:`get_forward`)."""
    name = resolve_backend(backend)
    if name == NATIVE:
        return None
    from fa_core.backends import flaggems

    return flaggems.flaggems_varlen_forward
