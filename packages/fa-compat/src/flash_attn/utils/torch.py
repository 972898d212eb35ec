"""``flash_attn.utils.torch``: flash-attn 2.8.x's autocast decorators for ``torch.autograd.Function``.

* :func:`custom_fwd`: :func:`torch.amp.custom_fwd` with ``device_type="cuda"``. Decorates a Function's
  ``forward``, bare (``@custom_fwd``) or with arguments (``@custom_fwd(cast_inputs=torch.float32)``). Under
  CUDA autocast it records the autocast state for the backward and, with ``cast_inputs``, runs the forward
  with autocast off and its floating-point CUDA tensor arguments cast to ``cast_inputs``.
* :func:`custom_bwd`: :func:`torch.amp.custom_bwd` with ``device_type="cuda"``: the decorated ``backward``
  runs under the autocast state that the ``custom_fwd`` forward recorded.
* :func:`custom_amp_decorator`: the factory behind both: ``custom_amp_decorator(dec, cuda_amp_deprecated)``
  returns ``dec`` with ``device_type="cuda"`` supplied when ``cuda_amp_deprecated`` (``dec`` is one of
  :mod:`torch.amp`'s decorators, which take ``device_type``) and ``dec`` unchanged otherwise.

Outside CUDA autocast (CPU tensors, autocast off) the decorators change nothing. They are the
:mod:`torch.amp` decorators themselves (no ``torch.cuda.amp`` fallback: fa-compat needs torch >= 2.6, which has
them), so the forward's ``ctx`` gets :mod:`torch.amp`'s ``_fwd_used_autocast`` / ``_dtype`` attributes.

Difference from flash-attn, a superset: an explicit ``device_type`` argument is honoured
(``@custom_fwd(device_type="cpu")`` follows CPU autocast); flash-attn overwrites it with ``"cuda"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["custom_amp_decorator", "custom_bwd", "custom_fwd"]

#: the device whose autocast the decorators follow unless ``device_type`` is given
_DEFAULT_DEVICE_TYPE = "cuda"


def custom_amp_decorator(dec: Callable[..., Any], cuda_amp_deprecated: bool) -> Callable[..., Any]:
    """Wrap one of :mod:`torch.amp`'s ``custom_fwd`` / ``custom_bwd``.

    Arguments:
        dec: the decorator factory, called as ``dec(fn, **kwargs)`` or ``dec(**kwargs)``.
        cuda_amp_deprecated: True when ``dec`` takes ``device_type`` (:mod:`torch.amp`'s decorators): the
            wrapper then passes ``device_type="cuda"`` unless the caller gives one. False passes the
            arguments through unchanged (``torch.cuda.amp``'s decorators, which take no ``device_type``).
    Return:
        ``decorator(*args, **kwargs)``, used like ``dec``: bare on a function or called with keyword
        arguments.
    """

    def decorator(*args: Any, **kwargs: Any) -> Any:
        if cuda_amp_deprecated:
            kwargs.setdefault("device_type", _DEFAULT_DEVICE_TYPE)
        return dec(*args, **kwargs)

    return decorator


def custom_fwd(*args: Any, **kwargs: Any) -> Any:
    """:func:`torch.amp.custom_fwd` with ``device_type="cuda"`` unless given.

    ``@custom_fwd`` or ``@custom_fwd(cast_inputs=dtype)`` on a ``torch.autograd.Function``'s ``forward``;
    ``custom_fwd(fn)`` / ``custom_fwd(fn, cast_inputs=dtype, device_type=...)`` return the wrapped function,
    ``custom_fwd(**kwargs)`` a decorator.
    """
    kwargs.setdefault("device_type", _DEFAULT_DEVICE_TYPE)
    return torch.amp.custom_fwd(*args, **kwargs)


def custom_bwd(*args: Any, **kwargs: Any) -> Any:
    """:func:`torch.amp.custom_bwd` with ``device_type="cuda"`` unless given.

    ``@custom_bwd`` on the ``backward`` of a Function whose ``forward`` is decorated with :func:`custom_fwd`
    (of the same ``device_type``): the backward runs under the forward's autocast state.
    """
    kwargs.setdefault("device_type", _DEFAULT_DEVICE_TYPE)
    return torch.amp.custom_bwd(*args, **kwargs)
