"""``flash_attn.utils.library``: flash-attn 2.8.x's ``triton_op``, :func:`torch.library.triton_op` with an
explicit schema and an opt-out of the decomposition.

``triton_op(name, fn=None, /, *, mutates_args, schema=None, allow_decomposition=True)`` turns ``fn`` (a
Python function that launches Triton kernels, through :func:`torch.library.wrap_triton` where it must be
traceable) into the custom operator ``name`` (``"namespace::op_name"``, a :class:`torch.library.CustomOpDef`,
called like ``fn`` and reachable as ``torch.ops.namespace.op_name``):

* eager calls run ``fn`` with ``wrap_triton`` dispatch off (the kernels launch directly, without the
  higher-order-operator dispatch);
* ``fn`` itself is the fake (meta) implementation, so ``fn`` must be traceable by ``make_fx`` on fake tensors
  (allocations and ``wrap_triton`` launches);
* ``schema``: the operator's schema string without the name, e.g. ``"(Tensor x, float alpha=1.0) -> Tensor"``
  (default values, names and alias annotations as written); None infers it from ``fn``'s type annotations
  (:func:`torch.library.infer_schema`). The mutated arguments of the schema must be ``mutates_args``;
* ``allow_decomposition=True`` (the behaviour of :func:`torch.library.triton_op`): under a functional tensor
  mode (the AOT dispatcher of ``torch.compile``) the operator is replaced by ``fn``'s body, so Inductor sees
  the Triton kernels (and other ops) inside it; ``torch.export`` keeps the operator whole. False keeps it one
  opaque node everywhere, as :func:`torch.library.custom_op` does.

With ``fn`` given the operator is returned; without, a decorator that takes ``fn``.

Differences from flash-attn, all fixes:

* ``schema=None`` infers the schema from ``fn`` (flash-attn infers it from its ``(*args, **kwargs)`` wrapper,
  which :func:`torch.library.infer_schema` refuses);
* a ``name`` without the ``"namespace::op_name"`` form raises ``ValueError`` naming the expected form;
* the decomposition declines (``NotImplemented``) tensor subclasses other than fake / functional tensors, as
  :func:`torch.library.triton_op` of current torch does, so their own ``__torch_dispatch__`` handles the op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.library import CustomOpDef, custom_op, infer_schema

__all__ = ["triton_op"]


@contextlib.contextmanager
def _direct_triton_launches() -> Iterator[None]:
    """Launch ``wrap_triton`` kernels directly (no higher-order-operator dispatch) for the duration."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # a torch without the switch always launches directly in eager mode
        yield
        return
    with set_wrap_triton_enabled(False):
        yield


def _decomposition_disabled() -> bool:
    """True while ``torch.export`` keeps custom Triton operators whole."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return bool(custom_triton_ops_decomposition_disabled())


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"triton_op: name must be a str 'namespace::op_name', got {type(name).__name__}")
    parts = name.split("::")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"triton_op: name must have the form 'namespace::op_name', got {name!r}")
    return name


def triton_op(
    name: str,
    fn: Callable[..., Any] | None = None,
    /,
    *,
    mutates_args: str | Iterable[str],
    schema: str | None = None,
    allow_decomposition: bool = True,
) -> Callable[..., Any]:
    """Create the custom operator ``name`` backed by ``fn`` (see the module docstring).

    Arguments:
        name: ``"namespace::op_name"``.
        fn: the implementation; None returns a decorator.
        mutates_args: names of the arguments ``fn`` writes to (``()`` for none), or ``"unknown"``.
        schema: the schema string (arguments and returns), or None to infer it from ``fn``'s annotations.
        allow_decomposition: decompose into ``fn``'s body under functional tensor modes (``torch.compile``).
    Return:
        the :class:`torch.library.CustomOpDef`, or a decorator returning it when ``fn`` is None.
    """
    _check_name(name)
    mutated: str | tuple[str, ...] = mutates_args if isinstance(mutates_args, str) else tuple(mutates_args)

    def dec(fn: Callable[..., Any]) -> CustomOpDef:
        op_schema = schema if schema is not None else infer_schema(fn, mutates_args=mutated)

        def backend_fn(*args: Any, **kwargs: Any) -> Any:
            with _direct_triton_launches():
                return fn(*args, **kwargs)

        backend_fn.__name__ = getattr(fn, "__name__", "triton_op")
        backend_fn.__qualname__ = getattr(fn, "__qualname__", backend_fn.__name__)
        result = custom_op(name, backend_fn, mutates_args=mutated, schema=op_schema)
        # fn is traceable on fake tensors (allocations + wrap_triton launches): it is its own fake kernel
        result.register_fake(fn)

        if allow_decomposition:
            from torch._subclasses.fake_tensor import FakeTensor
            from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

            def functional_decomp(mode: Any, op: Any, types: Any, args: Any, kwargs: Any) -> Any:
                if _decomposition_disabled():
                    return mode.__torch_dispatch__(op, types, args, kwargs)
                if any(
                    not issubclass(t, FakeTensor) and t not in (torch.Tensor, FunctionalTensor) for t in types
                ):
                    return NotImplemented
                with mode:
                    return fn(*args, **kwargs)

            result.register_torch_dispatch(FunctionalTensorMode, functional_decomp)
        return result

    if fn is None:
        return dec
    return dec(fn)
