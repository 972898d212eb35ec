"""Settings of Flash Attention Plus: read once from the environment, overridable in code.

Every switch the library honours is a field of :class:`Settings`; nothing else reads ``os.environ``. The
environment is read on first use (:func:`get`); :func:`override` changes fields for the duration of a ``with``
block (tests, tuners) and restores them afterwards.

=================================  ==============================  ============================================
environment variable               field (default)                 effect
=================================  ==============================  ============================================
``FA_PLUS_AUTOTUNE``               ``autotune`` (``True``)         ``0``: one fixed tile per shape class, no
                                                                   autotuning (fast start, CPU tests)
``FA_PLUS_TMA``                    ``tma`` (``True``)              ``0``: pointer loads instead of Hopper tensor
                                                                   descriptors, forward and backward
``FA_PLUS_FAST_LAUNCH``            ``fast_launch`` (``True``)      ``0``: launch through Triton's own path
                                                                   instead of the cached launcher
``FA_PLUS_SKIP_VALUE_CHECKS``      ``value_checks`` (``True``)     ``1``: skip checks that read tensor values
                                                                   on the host (a device sync); kernels still
                                                                   clamp every index they read
``FA_PLUS_GLUON``                  ``gluon`` (``True``)            ``0``: never take the Gluon (Hopper) forward;
                                                                   the Triton kernels run every call
``FA_BACKEND``                     ``backend`` (``""``)            ``flaggems``: the dense forward runs on
                                                                   FlagGems where it covers the call
``FA_PLUS_SILENCE_CONFLICT``       ``silence_conflict``            ``1``: no warning when the CUDA flash-attn is
                                   (``False``)                     installed beside this one
=================================  ==============================  ============================================

``TRITON_INTERPRET`` is Triton's own switch (kernels on CPU tensors); :func:`interpreting` reads it live,
since Triton itself does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

__all__ = ["Settings", "get", "interpreting", "override", "reload"]


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be 0 or 1, got {raw!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The library's switches (see the module docstring for the environment variables)."""

    autotune: bool = True
    tma: bool = True
    fast_launch: bool = True
    value_checks: bool = True
    gluon: bool = True
    backend: str = ""
    silence_conflict: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            autotune=_flag("FA_PLUS_AUTOTUNE", True),
            tma=_flag("FA_PLUS_TMA", True),
            fast_launch=_flag("FA_PLUS_FAST_LAUNCH", True),
            value_checks=not _flag("FA_PLUS_SKIP_VALUE_CHECKS", False),
            gluon=_flag("FA_PLUS_GLUON", True),
            backend=os.environ.get("FA_BACKEND", "").strip().lower(),
            silence_conflict=_flag("FA_PLUS_SILENCE_CONFLICT", False),
        )


_current: Settings | None = None


def get() -> Settings:
    """The settings in force (the environment is read on the first call)."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def reload() -> Settings:
    """Read the environment again (for programs that change it after import)."""
    global _current
    _current = Settings.from_env()
    return _current


@contextlib.contextmanager
def override(**changes: object) -> Iterator[Settings]:
    """``with settings.override(autotune=False): ...``: the given fields changed inside the block."""
    global _current
    before = get()
    _current = dataclasses.replace(before, **changes)  # type: ignore[arg-type]
    try:
        yield _current
    finally:
        _current = before


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
