"""The optional members behind fa-compat's extras: ``backward`` (fa-backward) and ``kvcache`` (fa-kvcache).

Each is imported once, when ``flash_attn`` is imported, and kept in a module global: the public functions
read the global (a constant for ``torch.compile``'s tracer) and raise :class:`MissingExtraError` naming the
extra to install when it is ``None``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

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
#: ``fa_kvcache`` when installed (with ``flash_attn_with_kvcache``), else None.
KVCACHE: ModuleType | None = _load("fa_kvcache", ("flash_attn_with_kvcache",))


def require_backward() -> ModuleType:
    if BACKWARD is None:
        raise MissingExtraError(BACKWARD_MESSAGE)
    return BACKWARD


def require_kvcache() -> ModuleType:
    if KVCACHE is None:
        raise MissingExtraError(KVCACHE_MESSAGE)
    return KVCACHE
