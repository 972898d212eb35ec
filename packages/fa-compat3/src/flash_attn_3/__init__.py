"""``flash_attn_3``: FlashAttention-3's package name on the Flash Attention Plus Triton kernels (fa-compat3).

FlashAttention-3 installs the top-level module ``flash_attn_interface`` (its Python API) and the package
``flash_attn_3``, which re-exports that module's names; libraries such as HF transformers look ``flash_attn_3``
up to detect FlashAttention-3 and then import ``flash_attn_interface``. Both come from fa-compat3 here.

``__version__`` is the FlashAttention-3 API version this package reproduces ("3.0.0"); Flash Attention Plus's
own version is ``__fa_plus_version__``. ``__fa_plus__ = True`` tells the two implementations apart.

When another distribution (e.g. the CUDA ``flash_attn_3`` wheel) also provides ``flash_attn_interface`` or
``flash_attn_3``, the import warns with :class:`FlashAttnPlusConflictWarning` instead of shadowing it silently.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings

from flash_attn_interface import (
    FlashAttnFunc,
    FlashAttnQKVPackedFunc,
    FlashAttnVarlenFunc,
    flash_attn_combine,
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    get_scheduler_metadata,
    maybe_contiguous,
    round_multiple,
)

__version__ = "3.0.0"
__fa_plus_version__ = "0.1.0"
__fa_plus__ = True

#: Local-version label of the metadata-only ``flash-attn-3`` distribution Flash Attention Plus builds for
#: libraries that look FlashAttention-3 up by distribution name (HF transformers): ``3.0.0+faplus...``.
SHIM_LOCAL_LABEL = "faplus"

__all__ = [
    "FlashAttnFunc",
    "FlashAttnPlusConflictWarning",
    "FlashAttnQKVPackedFunc",
    "FlashAttnVarlenFunc",
    "__fa_plus_version__",
    "__version__",
    "flash_attn_combine",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "get_scheduler_metadata",
    "maybe_contiguous",
    "round_multiple",
]


class FlashAttnPlusConflictWarning(UserWarning):
    """Another installed distribution provides ``flash_attn_interface`` or ``flash_attn_3`` too."""


def _foreign_distributions() -> list[str]:
    """``name version`` of every distribution mapped to FlashAttention-3's modules that is not fa-compat3."""
    from fa_core.conflicts import foreign_distributions

    found = foreign_distributions(
        ("flash_attn_interface", "flash_attn_3"), "fa-compat3", "flash-attn-3", SHIM_LOCAL_LABEL
    )
    # the CUDA wheel's extension module lives inside flash_attn_3: a leftover of it counts as well
    if not found:
        try:
            spec = importlib.util.find_spec("flash_attn_3._C")
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            found.append("flash_attn_3._C (the CUDA FlashAttention-3 extension)")
    return found


def _warn_if_shadowing() -> None:
    from fa_core import settings

    if settings.get().silence_conflict:
        return
    others = _foreign_distributions()
    if others:
        warnings.warn(
            f"Flash Attention Plus (fa-compat3 {__fa_plus_version__}) provides `flash_attn_interface` and "
            f"`flash_attn_3`, but {', '.join(others)} is installed as well and provides them too. This process "
            f"imported Flash Attention Plus's flash_attn_3 from {os.path.dirname(__file__)}; other modules may "
            "come from either installation. Keep one: `pip uninstall flash_attn_3` (keeps Flash Attention Plus; "
            "reinstall fa-compat3 afterwards, since the uninstall removes the shared files) or `pip uninstall "
            "fa-compat3` (keeps the CUDA FlashAttention-3). Set FA_PLUS_SILENCE_CONFLICT=1 to silence this "
            "warning.",
            FlashAttnPlusConflictWarning,
            stacklevel=2,
        )


_warn_if_shadowing()
