"""Argument forms of every public rotary function, shared by the compile tests on CPU (interpreter,
backends eager / aot_eager / inductor) and on the GPU (inductor).

A :class:`Case` is one public function called with one argument form. ``make_fn()`` returns a fresh callable
``fn(x, cos, sin, cos_k, sin_k, offsets, cu_seqlens)`` (a fresh ``RotaryEmbedding`` for the module forms, so
a compiled run also goes through the cos/sin cache build); ``ref`` computes the same result with plain
PyTorch (``fa_core.rotary_ref``) in the dtype of its inputs: float64 inputs give the truth, inputs in the
test dtype give the low-precision baseline of the 2x rule. ``inplace`` cases rotate their input: the test
checks that it was written, and with a gradient they are called on a non-leaf copy of ``x``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from fa_core.rotary_ref import apply_rotary_ref
from flash_attn.layers.rotary import (
    RotaryEmbedding,
    apply_rotary_emb,
    apply_rotary_emb_func,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
)
from flash_attn.ops.triton.rotary import apply_rotary

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class Dims:
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    varlen: tuple[int, ...]  # sequence lengths of the varlen forms


@dataclasses.dataclass
class Case:
    name: str
    make_fn: Callable[[], Callable[..., Any]]
    ref: Callable[..., Tensor]
    inputs: dict[str, Any]  # x, cos, sin, cos_k, sin_k, offsets, cu_seqlens
    inplace: bool
    inplace_on_leaf: bool = True  # a leaf that requires grad is rotated in place too (else fn copies it)
    # compiled == eager bit for bit (the module forms build their cos / sin tables inside the compiled
    # graph, where inductor's cos / sin may round an entry differently: compared to the reference only)
    exact: bool = True

    def args(self, x: Tensor | None = None, dtype: torch.dtype | None = None) -> tuple[Any, ...]:
        """The positional arguments of ``fn`` / ``ref``: ``x`` replaces the input, ``dtype`` casts the floating
        tensors (float64: the truth)."""
        vals = dict(self.inputs)
        if x is not None:
            vals["x"] = x
        if dtype is not None:
            for k in ("x", "cos", "sin", "cos_k", "sin_k"):
                if isinstance(vals[k], Tensor):
                    vals[k] = vals[k].to(dtype)
        return tuple(vals[k] for k in ("x", "cos", "sin", "cos_k", "sin_k", "offsets", "cu_seqlens"))


def _cos_sin(seqlen_ro: int, rotary_dim: int, dtype: torch.dtype, device: str) -> tuple[Tensor, Tensor]:
    angle = torch.rand(seqlen_ro, rotary_dim // 2, device=device, dtype=torch.float32) * 2 * torch.pi
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def _offsets(kind: str, batch: int, device: str) -> int | Tensor:
    if kind == "zero":
        return 0
    if kind == "int":
        return 3
    return torch.randint(0, 6, (batch,), dtype=torch.int32, device=device)


def _cu(lengths: tuple[int, ...], device: str) -> Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _module_tables(
    dim: int, seqlen: int, scale_base: float | None, dtype: torch.dtype, device: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cos / sin (and XPos' K tables) as RotaryEmbedding(dim, base=10000) builds them for ``seqlen`` rows."""
    t = torch.arange(seqlen, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(t, inv_freq)
    if scale_base is None:
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return cos, sin, cos, sin
    scale = (torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
    power = (torch.arange(seqlen, dtype=torch.float32, device=device) - seqlen // 2) / scale_base
    sc = scale ** power[:, None]
    return (
        (freqs.cos() * sc).to(dtype),
        (freqs.sin() * sc).to(dtype),
        (freqs.cos() / sc).to(dtype),
        (freqs.sin() / sc).to(dtype),
    )


def build(name: str, device: str, dtype: torch.dtype, d: Dims) -> Case:
    """The case called ``name`` (see :data:`NAMES`) on fresh random inputs."""
    parts = dict(p.split("=") for p in name.split(",")[1:])
    kind = name.split(",")[0]
    off_kind = parts.get("off", "zero")
    interleaved = parts.get("il", "0") == "1"
    inplace = parts.get("inplace", "0") == "1"
    rotary_dim = d.headdim if parts.get("rd", "full") == "full" else d.headdim // 2
    b, s, h, hd = d.batch, d.seqlen, d.nheads, d.headdim
    seqlen_ro = s + 8
    cos, sin = _cos_sin(seqlen_ro, rotary_dim, dtype, device)
    cos_k: Tensor | None = None
    sin_k: Tensor | None = None
    offsets = _offsets(off_kind, b, device)
    cu: Tensor | None = None
    inputs: dict[str, Any]

    def rot(x: Tensor, c: Tensor, sn: Tensor, offs: Any, **kw: Any) -> Tensor:
        return apply_rotary_ref(x, c, sn, seqlen_offsets=offs, interleaved=interleaved, **kw)

    if kind in ("emb", "func", "ops"):
        conjugate = kind == "ops"
        call = {"emb": apply_rotary_emb, "func": apply_rotary_emb_func}.get(kind)
        varlen = parts.get("varlen", "0") == "1"
        if varlen:
            cu = _cu(d.varlen, device)
            offsets = _offsets(off_kind, len(d.varlen), device)
            x = torch.randn(sum(d.varlen), h, hd, device=device, dtype=dtype)
            max_seqlen = max(d.varlen)
        else:
            x = torch.randn(b, s, h, hd, device=device, dtype=dtype)
            max_seqlen = None

        def make_fn() -> Callable[..., Any]:
            def fn(x, cos, sin, cos_k, sin_k, offsets, cu_seqlens):
                if kind == "ops":
                    if inplace and x.requires_grad:
                        # differentiable in place, on a tensor autograd lets it write (not a leaf)
                        x = x.clone()
                    return apply_rotary(
                        x,
                        cos,
                        sin,
                        seqlen_offsets=offsets,
                        cu_seqlens=cu_seqlens,
                        max_seqlen=max_seqlen,
                        interleaved=interleaved,
                        inplace=inplace,
                        conjugate=True,
                    )
                assert call is not None
                return call(
                    x,
                    cos,
                    sin,
                    interleaved=interleaved,
                    inplace=inplace,
                    seqlen_offsets=offsets,
                    cu_seqlens=cu_seqlens,
                    max_seqlen=max_seqlen,
                )

            return fn

        def ref(x, cos, sin, cos_k, sin_k, offsets, cu_seqlens):
            return rot(x, cos, sin, offsets, cu_seqlens=cu_seqlens, conjugate=conjugate)

    elif kind == "qkv":
        gqa = parts.get("gqa", "0") == "1"
        if parts.get("sepk", "0") == "1":
            cos_k, sin_k = _cos_sin(seqlen_ro, rotary_dim, dtype, device)
        hk = max(h // 2, 1) if gqa else h
        num_heads_q = h if gqa else None
        x = (
            torch.randn(b, s, h + 2 * hk, hd, device=device, dtype=dtype)
            if gqa
            else torch.randn(b, s, 3, h, hd, device=device, dtype=dtype)
        )
        inplace = True

        def make_fn() -> Callable[..., Any]:
            def fn(x, cos, sin, cos_k, sin_k, offsets, cu_seqlens):
                return apply_rotary_emb_qkv_(
                    x,
                    cos,
                    sin,
                    cos_k,
                    sin_k,
                    interleaved=interleaved,
                    seqlen_offsets=offsets,
                    num_heads_q=num_heads_q,
                )

            return fn

        def ref(x, cos, sin, cos_k, sin_k, offsets, cu_seqlens):
            ck = cos if cos_k is None else cos_k
            sk = sin if sin_k is None else sin_k
            if gqa:
                q, k, v = x[:, :, :h], x[:, :, h : h + hk], x[:, :, h + hk :]
                return torch.cat([rot(q, cos, sin, offsets), rot(k, ck, sk, offsets), v], dim=2)
            q, k, v = x.unbind(2)
            return torch.stack([rot(q, cos, sin, offsets), rot(k, ck, sk, offsets), v], dim=2)

    elif kind == "kv":
        x = torch.randn(b, s, 2, h, hd, device=device, dtype=dtype)
        inplace = True

        def make_fn() -> Callable[..., Any]:
            def fn(x, cos, sin, cos_k, sin_k, offsets, cu_seqlens):
                return apply_rotary_emb_kv_(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)

            return fn

        def ref(x, cos, sin, cos_k, sin_k, offsets, cu_seqlens):
            k, v = x.unbind(2)
            return torch.stack([rot(k, cos, sin, offsets), v], dim=2)

    elif kind in ("module", "module_kv"):
        scale_base = 512.0 if parts.get("xpos", "0") == "1" else None
        tensor_offsets = isinstance(offsets, Tensor)
        max_seqlen = seqlen_ro if tensor_offsets else None
        n_rows = seqlen_ro if tensor_offsets else s + int(offsets)
        cos, sin, cos_k, sin_k = _module_tables(rotary_dim, n_rows, scale_base, dtype, device)
        x = torch.randn(b, s, 3, h, hd, device=device, dtype=dtype)
        inplace = kind == "module"

        def make_fn() -> Callable[..., Any]:
            mod = RotaryEmbedding(rotary_dim, interleaved=interleaved, scale_base=scale_base, device=device)

            def fn(x, cos, sin, cos_k, sin_k, offsets, cu_seqlens):
                # cos / sin are not used: the module builds its own tables
                if kind == "module":
                    return mod(x, seqlen_offset=offsets, max_seqlen=max_seqlen)
                # separate q and kv tensors (views of one tensor would alias the two in-place outputs)
                q, kv = x[:, :, 0].clone(), x[:, :, 1:].clone()
                q, kv = mod(q, kv, seqlen_offset=offsets, max_seqlen=max_seqlen)
                return torch.cat([q.unsqueeze(2), kv], dim=2)

            return fn

        def ref(x, cos, sin, cos_k, sin_k, offsets, cu_seqlens):
            q, k, v = x.unbind(2)
            return torch.stack([rot(q, cos, sin, offsets), rot(k, cos_k, sin_k, offsets), v], dim=2)

    else:
        raise ValueError(f"unknown case {name}")

    inputs = dict(x=x, cos=cos, sin=sin, cos_k=cos_k, sin_k=sin_k, offsets=offsets, cu_seqlens=cu)
    return Case(
        name,
        make_fn,
        ref,
        inputs,
        inplace,
        inplace_on_leaf=kind != "ops",
        exact=not kind.startswith("module"),
    )


def _grid() -> list[str]:
    names = []
    forms = [("0", "full"), ("1", "half")]  # (interleaved, rotary dim): both orders of pairs, partial rotary
    for i, off in enumerate(("zero", "int", "tensor")):
        for inplace in ("0", "1"):
            il, rd = forms[(i + int(inplace)) % 2]
            names.append(f"emb,off={off},il={il},rd={rd},inplace={inplace}")
    for off in ("int", "tensor"):
        for inplace in ("0", "1"):
            names.append(f"emb,varlen=1,off={off},il={inplace},rd=half,inplace={inplace}")
    names.append("func,off=tensor,il=1,rd=full")
    for off in ("zero", "int", "tensor"):
        names.append(f"ops,off={off},il={int(off == 'int')},rd=half,inplace={int(off == 'tensor')}")
    names.append("ops,varlen=1,off=tensor,il=0,rd=full")
    for i, off in enumerate(("zero", "int", "tensor")):
        for gqa in ("0", "1"):
            il, rd = forms[(i + int(gqa)) % 2]
            names.append(f"qkv,gqa={gqa},off={off},il={il},rd={rd}")
    names.append("qkv,sepk=1,off=tensor,il=1,rd=full")
    names.append("qkv,gqa=1,sepk=1,off=int,il=0,rd=half")
    for i, off in enumerate(("zero", "int", "tensor")):
        il, rd = forms[i % 2]
        names.append(f"kv,off={off},il={il},rd={rd}")
    names.append("module,off=int,il=0,rd=half")
    names.append("module,off=tensor,il=1,rd=full,xpos=1")
    names.append("module_kv,off=int,il=1,rd=full,xpos=1")
    names.append("module_kv,off=tensor,il=0,rd=half")
    return names


#: every case name: every public function x offsets 0 / int / (batch,) tensor x interleaved or not x full or
#: partial rotary dim x in place or not, GQA packing, separate K tables (XPos), varlen, conjugate.
NAMES = _grid()


@dataclasses.dataclass
class Result:
    out: Tensor
    grad: Tensor | None  # gradient of x, or None without a backward
    after: Tensor  # the input tensor after the call (rotated for in-place forms)


def run(case: Case, fn: Callable[..., Any], grad_out: Tensor | None) -> Result:
    """``fn`` on a fresh copy of the case's ``x``; with ``grad_out``, x is a leaf that requires grad (in-place
    forms accept one, as in flash-attn) and the output is back-propagated."""
    x = case.inputs["x"].clone()
    if grad_out is not None:
        x.requires_grad_(True)
    out = fn(*case.args(x=x))
    if grad_out is not None:
        out.backward(grad_out)
    return Result(out.detach().clone(), None if x.grad is None else x.grad.clone(), x.detach().clone())


def reference(case: Case, grad_out: Tensor | None) -> tuple[Result, Result]:
    """(truth in float64, the same plain-PyTorch computation in the test dtype)."""
    results = []
    for dtype in (torch.float64, None):
        x = case.inputs["x"].clone().to(dtype or case.inputs["x"].dtype).requires_grad_(grad_out is not None)
        out = case.ref(*case.args(x=x, dtype=dtype))
        grad = None
        if grad_out is not None:
            (grad,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
        results.append(Result(out.detach(), grad, x.detach()))
    return results[0], results[1]


def check(case: Case, fn: Callable[..., Any], grad: bool, eager: Result | None = None) -> Result:
    """Run ``fn`` (fwd, and bwd when ``grad``), check it against the reference (2x rule) and the in-place
    contract, and, given the eager run's result, require the same bits."""
    from fa_core.testing import assert_close_2x

    torch.manual_seed(1)
    g = torch.randn_like(case.inputs["x"]) if grad else None
    res = run(case, fn, g)
    truth, lowp = reference(case, g)
    assert_close_2x(res.out, truth.out, lowp.out, f"{case.name}: out")
    if grad:
        assert res.grad is not None and truth.grad is not None and lowp.grad is not None
        assert_close_2x(res.grad, truth.grad, lowp.grad, f"{case.name}: grad")
    if case.inplace:
        if not grad or case.inplace_on_leaf:
            assert torch.equal(res.after, res.out), f"{case.name}: the input was not rotated in place"
    else:
        assert torch.equal(res.after, case.inputs["x"]), f"{case.name}: the input was modified"
    if eager is not None and case.exact:
        assert torch.equal(res.out, eager.out), f"{case.name}: compiled output differs from eager"
        if grad:
            assert eager.grad is not None and res.grad is not None
            assert torch.equal(res.grad, eager.grad), f"{case.name}: compiled gradient differs from eager"
    return res
