"""The exception raised for bad input values.

flash-attn's CUDA extension reports bad arguments as ``RuntimeError`` (``TORCH_CHECK``); Python code written
for this project catches ``ValueError``. :class:`FlashAttnValueError` is both, so either ``except`` clause
catches it. Every check that reads an argument's value and finds it out of range raises this class, naming the
argument, before any output is written.
"""

from __future__ import annotations

__all__ = ["FlashAttnValueError"]


class FlashAttnValueError(ValueError, RuntimeError):
    """A bad argument value (shape, range, capacity). Catchable as ``ValueError`` and as ``RuntimeError``."""
