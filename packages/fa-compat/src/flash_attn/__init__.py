"""``flash_attn``: flash-attn 2.8.x's Python API on the Flash Attention Plus Triton kernels (fa-compat).

``__version__`` is the flash-attn API version this package reproduces ("2.8.3"), so that libraries comparing
``flash_attn.__version__`` against flash-attn releases take the 2.8 code paths; Flash Attention Plus's own
version is ``__fa_plus_version__``. ``__fa_plus__ = True`` tells the two implementations apart.

When another distribution (e.g. the CUDA ``flash-attn`` wheel) also provides the ``flash_attn`` package, the
import warns with :class:`FlashAttnPlusConflictWarning` instead of shadowing it silently (see README).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings

from flash_attn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__version__ = "2.8.3"
__fa_plus_version__ = "0.1.0"
__fa_plus__ = True

__all__ = [
    "FlashAttnPlusConflictWarning",
    "__fa_plus_version__",
    "__version__",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

#: Local-version label of the metadata-only ``flash-attn`` distribution Flash Attention Plus builds for
#: libraries that look flash-attn up by distribution name (HF transformers): ``2.8.3+faplus...``.
SHIM_LOCAL_LABEL = "faplus"


class FlashAttnPlusConflictWarning(UserWarning):
    """Another installed distribution provides the ``flash_attn`` package too."""


def _foreign_distributions() -> list[str]:
    """``name version`` of every distribution mapped to ``flash_attn`` that is not Flash Attention Plus."""
    from fa_core.conflicts import foreign_distributions

    found = foreign_distributions(("flash_attn",), "fa-compat", "flash-attn", SHIM_LOCAL_LABEL)
    # The CUDA wheel's extension module is a top-level module of its own: a leftover of it counts as well.
    if importlib.util.find_spec("flash_attn_2_cuda") is not None and not found:
        found.append("flash_attn_2_cuda (the CUDA flash-attn extension)")
    return found


def _warn_if_shadowing() -> None:
    from fa_core import settings

    if settings.get().silence_conflict:
        return
    others = _foreign_distributions()
    if others:
        warnings.warn(
            f"Flash Attention Plus (fa-compat {__fa_plus_version__}) provides the `flash_attn` package, but "
            f"{', '.join(others)} is installed as well and provides it too. Both write into the same "
            f"`flash_attn/` folder: this process imported Flash Attention Plus's flash_attn from "
            f"{os.path.dirname(__file__)}, but other flash_attn modules may come from either installation. "
            "Keep one: `pip uninstall flash-attn` (keeps Flash Attention Plus; reinstall fa-compat afterwards, "
            "since the uninstall removes the shared files) or `pip uninstall fa-compat` (keeps the CUDA "
            "flash-attn). Set FA_PLUS_SILENCE_CONFLICT=1 to silence this warning.",
            FlashAttnPlusConflictWarning,
            stacklevel=2,
        )


_warn_if_shadowing()
