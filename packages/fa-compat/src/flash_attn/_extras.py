"""The optional members behind fa-compat's extras: ``backward`` (fa-backward) and ``kvcache`` (fa-kvcache).

Each is imported once and kept in a module global: the public functions read the global (a constant for
``torch.compile``'s tracer) and raise :class:`MissingExtraError` naming the extra to install when it is
``None``. fa-backward is imported with ``flash_attn`` (it imports no Triton until its first launch);
fa-kvcache, whose import imports Triton and its kernels, on the first read of ``KVCACHE``
(module ``__getattr__``), so that ``import flash_attn`` stays cheap.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

__all__ = ["BACKWARD", "KVCACHE", "MissingExtraError", "require_backward", "require_kvcache"]


class MissingExtraError(ImportError):
    """A feature needs an optional member of Flash Attention Plus that is not installed."""


BACKWARD_MESSAGE = (
    "flash_attn (Flash Attention Plus): the inputs require grad, but the backward pass lives in the optional "
    "package fa-backward, which is not installed. Install it with `pip install fa-compat[backward]` (or "
    "`pip install fa-compat[all]`), or run the forward under torch.no_grad() / with inputs that do not "
    "require grad."
)
KVCACHE_MESSAGE = (
    "flash_attn (Flash Attention Plus): flash_attn_with_kvcache lives in the optional package fa-kvcache, "
    "which is not installed. Install it with `pip install fa-compat[kvcache]` (or `pip install fa-compat[all]`)."
)


def _load(name: str, attrs: tuple[str, ...]) -> ModuleType | None:
    """Import an optional member; None when it is absent or too old to have the functions used here."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the member is there but one of *its* imports is missing: a real error
            raise
        return None
    if not all(hasattr(module, a) for a in attrs):
        return None
    return module


#: ``fa_backward`` when installed (with ``flash_attn_backward`` / ``flash_attn_varlen_backward``), else None.
BACKWARD: ModuleType | None = _load("fa_backward", ("flash_attn_backward", "flash_attn_varlen_backward"))
#: ``fa_kvcache`` when installed (with ``flash_attn_with_kvcache``), else None: bound on the first read
KVCACHE: ModuleType | None


def __getattr__(name: str) -> Any:
    # ``KVCACHE``: ``fa_kvcache`` when installed (with ``flash_attn_with_kvcache``), else None; loaded on first
    # use and then kept as a plain module global
    if name == "KVCACHE":
        module = _load("fa_kvcache", ("flash_attn_with_kvcache",))
        globals()["KVCACHE"] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_backward() -> ModuleType:
    if BACKWARD is None:
        raise MissingExtraError(BACKWARD_MESSAGE)
    return BACKWARD


def require_kvcache() -> ModuleType:
    module = sys.modules[__name__].KVCACHE  # loads it on the first call
    if module is None:
        raise MissingExtraError(KVCACHE_MESSAGE)
    return module
