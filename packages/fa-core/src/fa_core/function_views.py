"""flash-attn 2.8's six autograd Function names (``FlashAttnFunc`` & co) as views of the one call path.

flash-attn exposes ``FlashAttnFunc.apply(q, k, v, dropout_p, ..., return_softmax, is_grad_enabled)`` and its
packed / varlen siblings; code written against them (and HF transformers' older integrations) calls ``.apply``
directly. :func:`function_views` builds those classes over a caller's forward and backward (fa-backward's autograd
layer, or fa-compat's forward-only fallback), checking and normalising the arguments with
:func:`fa_core.ops.prepare` exactly as the public functions do.
"""

from collections.abc import Callable
from typing import Any

import torch

from fa_core.ops import DENSE, KV, QKV, Tensor, prepare

__all__ = ["FUNCTION_VIEWS", "function_view", "function_views"]


_OPTIONS = ("dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic")


def function_view(
    name: str,
    inputs: tuple[str, ...],
    *,
    varlen: bool,
    pack: int,
    forward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]],
    backward: Callable[..., tuple[Tensor | None, ...]],
    paged: Callable[..., Any] | None = None,
) -> type:
    """flash-attn 2.8's autograd Function ``name`` (``FlashAttnFunc`` & co) as a view of the one layer: a
    ``torch.autograd.Function`` with flash-attn's ``forward(ctx, <inputs>, dropout_p, ..., return_softmax,
    [block_table,] is_grad_enabled)`` and ``backward(ctx, dout, *args)`` that checks and normalises the
    arguments (:func:`prepare`) and hands them to the layer's ``forward(ctx, a, b, c, sink, alibi, cu_q, cu_k,
    seqused_k, spec)`` / ``backward(ctx, dout, dlse)``. ``paged(**arguments)``: the call with a
    ``block_table`` (forward only), when the variant has one."""
    import inspect

    tensors = tuple(n for n in inputs if n in ("q", "k", "v", "qkv", "kv"))
    has_table = name == "FlashAttnVarlenFunc"  # flash-attn's paged varlen forward
    names = (
        *inputs,
        *_OPTIONS,
        "return_softmax",
        *(("block_table",) if has_table else ()),
        "is_grad_enabled",
    )

    def fwd(ctx: Any, *args: Any) -> Any:
        bound = dict(zip(names, args))
        if bound.get("block_table") is not None:
            if paged is None:
                raise NotImplementedError(
                    f"{name}: block_table (paged keys) needs fa-compat's flash_attn_varlen_func, or "
                    "flash_attn_with_kvcache (fa-kvcache)"
                )
            return paged(**bound)
        ctx.is_grad_enabled = bool(bound["is_grad_enabled"])
        abc: list[Any] = [bound.get(n) for n in tensors] + [None] * (3 - len(tensors))
        kw: dict[str, Any] = {n: bound[n] for n in _OPTIONS}
        if varlen:
            same = "cu_seqlens" in bound
            kw.update(
                cu_seqlens_q=bound["cu_seqlens" if same else "cu_seqlens_q"],
                cu_seqlens_k=bound["cu_seqlens" if same else "cu_seqlens_k"],
                max_seqlen_q=bound["max_seqlen" if same else "max_seqlen_q"],
                max_seqlen_k=bound["max_seqlen" if same else "max_seqlen_k"],
            )
        want = bool(bound["return_softmax"])
        q, k, v, spec = prepare(
            *abc, pack=pack, varlen=varlen, return_softmax=want and kw["dropout_p"] > 0, **kw
        )
        if pack == DENSE:
            abc = [q, k, v]  # checked (a strided last dim copied)
        ctx.view_return_softmax = want
        cu_q, cu_k = kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k")
        cu_k = None if cu_k is cu_q else cu_k  # None: cu_q's (see attention())
        out, lse, s_dmask, _ = forward(ctx, *abc, None, kw["alibi_slopes"], cu_q, cu_k, None, spec)
        return (out, lse, s_dmask) if want else out

    def bwd(ctx: Any, dout: Tensor, *args: Any) -> tuple[Tensor | None, ...]:
        dlse = args[0] if getattr(ctx, "view_return_softmax", False) and args else None
        grads = backward(ctx, dout, dlse)
        return (*grads[: len(tensors)], *([None] * (len(names) - len(tensors))))

    param = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fwd.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, param) for n in ("ctx", *names)]
    )
    bwd.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("ctx", param), inspect.Parameter("dout", param),
         inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]
    )  # fmt: skip
    doc = (
        f"flash-attn's ``{name}``: ``{name}.apply({', '.join(names)})``, a view of the one autograd layer "
        "(the public functions call the layer directly)."
    )
    return type(
        name,
        (torch.autograd.Function,),
        {"__doc__": doc, "forward": staticmethod(fwd), "backward": staticmethod(bwd)},
    )


#: ``(name, inputs, varlen, pack)`` of flash-attn 2.8's six autograd Functions
FUNCTION_VIEWS = (
    ("FlashAttnFunc", ("q", "k", "v"), False, DENSE),
    ("FlashAttnQKVPackedFunc", ("qkv",), False, QKV),
    ("FlashAttnKVPackedFunc", ("q", "kv"), False, KV),
    ("FlashAttnVarlenFunc", ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
     True, DENSE),
    ("FlashAttnVarlenQKVPackedFunc", ("qkv", "cu_seqlens", "max_seqlen"), True, QKV),
    ("FlashAttnVarlenKVPackedFunc", ("q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
     True, KV),
)  # fmt: skip


def function_views(
    module: str,
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    paged: Callable[..., Any] | None = None,
) -> dict[str, type]:
    """The six ``FlashAttn*Func`` views (see :func:`function_view`), ``__module__`` set to ``module``;
    ``paged`` is given to ``FlashAttnVarlenFunc`` only (its ``block_table`` argument)."""
    views = {}
    for name, inputs, varlen, pack in FUNCTION_VIEWS:
        cls = function_view(
            name, inputs, varlen=varlen, pack=pack, forward=forward, backward=backward,
            paged=paged if name == "FlashAttnVarlenFunc" else None,
        )  # fmt: skip
        cls.__module__ = module
        views[name] = cls
    return views
