"""The forward half of the one call path behind every public attention function.

Every public function (``flash_attn.flash_attn_func`` & co, ``fa_backward.flash_attn_func`` & co, the
programmable ``fa_backward.programmable.attention``) is a thin view of :func:`attention`:

1. :func:`prepare` normalises the arguments (window pair, default scale, packed ``qkv`` / ``kv`` sliced into
   views) and runs the ONE pass of argument checks. The checks read only shapes, strides, dtypes, devices and
   scalars, so a signature that passed once is remembered (:data:`_CHECKED`) and the next call with it skips
   them; checks of tensor *values* (cu_seqlens) are never cached.
2. No gradient wanted: :func:`run_forward` launches the forward kernel directly (eager), or, while
   ``torch.compile`` / a tensor subclass mode traces, calls the custom op ``flash_attn_plus::fwd`` /
   ``flash_attn_plus::varlen_fwd`` (opaque to the tracer, described by its fake implementation).
3. A gradient wanted: the one autograd Function of fa-backward (``fa_backward.autograd.Attention``), whose
   forward calls :func:`run_forward` too; without fa-backward the caller's ``missing`` callback raises.

The custom ops (schema: flash-attn 2.8's ``_flash_attn_forward`` outputs ``(out, softmax_lse, S_dmask,
rng_state)``) are registered here so that forward-only users have them; fa-backward registers their autograd
and the backward ops. ``rng_state`` is the CPU int64 ``[seed, offset]`` pair (the backward reads it without a
device sync); the fake implementations return a CPU tensor too.

This module does not use ``from __future__ import annotations``: ``custom_op`` infers the schema from the
evaluated annotations. Importing it imports no Triton (the launchers are imported at the first launch).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fa_core import settings
from fa_core import validation as V
from fa_core.block_sparse import as_block_mask
from fa_core.forward import new_rng_state

__all__ = [
    "DENSE",
    "KV",
    "QKV",
    "Spec",
    "attention",
    "default_scale",
    "dmask_shape",
    "prepare",
    "run_forward",
    "tracing",
    "unpack",
]

NS = "flash_attn_plus"
Tensor = torch.Tensor
_PLAIN = (torch.Tensor, torch.nn.Parameter)

#: packing of the inputs: separate q, k, v; ``kv`` packed (k, v one tensor); ``qkv`` packed
DENSE, KV, QKV = 0, 1, 2


class Spec(NamedTuple):
    """Everything of a call that is not a tensor (a tuple of constants: ``torch.compile`` traces it)."""

    varlen: bool
    pack: int  # DENSE / KV / QKV
    max_seqlen_q: int
    max_seqlen_k: int
    dropout_p: float
    softmax_scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    return_softmax: bool  # materialise S_dmask (the public functions ask only with dropout, as flash-attn)
    attention_chunk: int
    deterministic: bool
    #: ``(score_mod, score_mod_grad, mask_mod, block_mask)`` of programmable attention, or None
    mods: tuple | None


def default_scale(q: Tensor, softmax_scale: float | None) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def round_multiple(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def dmask_shape(batch: int, nheads: int, sq: int, sk: int) -> tuple[int, int, int, int]:
    """flash-attn's ``S_dmask`` shape: ``(b, h, round128(sq), round128(sk))``."""
    return (batch, nheads, round_multiple(sq, 128), round_multiple(sk, 128))


def tracing(t: Tensor) -> bool:
    """True under ``torch.compile`` (dynamo), under a tensor-subclass / dispatch mode (AOT autograd traces the
    backward afterwards under fake / functional tensors: a Triton launch cannot read their data pointers) or
    for a tensor subclass: there the custom op is what must run."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 or type(t) not in _PLAIN


def unpack(a: Tensor, b: Tensor | None, c: Tensor | None, pack: int, varlen: bool):
    """``(q, k, v)`` from the public arguments: ``qkv`` ``(..., 3, h, d)`` / ``q, kv`` ``(..., 2, hk, d)`` are
    sliced into views along dim 2 (dense) or 1 (varlen)."""
    if pack == DENSE:
        return a, b, c
    axis = 1 if varlen else 2
    if pack == QKV:
        q, k, v = a.unbind(axis)
        return q, k, v
    k, v = b.unbind(axis)  # type: ignore[union-attr]
    return a, k, v


# ------------------------------------------------------------------------------------------ the check pass
#: signatures (shapes, strides, dtypes, devices, scalars) whose checks passed; bounded
_CHECKED: set = set()
_CHECKED_MAX = 4096


def _meta(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _full_checks(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec: Spec, dropout_p, scale, softcap) -> None:
    varlen = spec.varlen
    V.check_qkv(q, k, v, varlen=varlen)
    V.check_scalars(dropout_p, softcap, scale)
    if varlen:
        if spec.max_seqlen_q < 0 or spec.max_seqlen_k < 0:
            raise V.FlashAttnValueError("max_seqlen_q and max_seqlen_k must be >= 0")
        batch = V.check_cu_seqlens("cu_seqlens_q", cu_q, q.shape[0], q, spec.max_seqlen_q, "max_seqlen_q")
        batch_k = V.check_cu_seqlens("cu_seqlens_k", cu_k, k.shape[0], q, spec.max_seqlen_k, "max_seqlen_k")
        if batch_k != batch:
            raise V.FlashAttnValueError(
                f"cu_seqlens_k has {batch_k + 1} entries but cu_seqlens_q has {batch + 1}"
            )
        V.check_seqused(seqused_k, batch, cu_k, q)
        nheads = q.shape[1]
    else:
        batch, nheads = q.shape[0], q.shape[2]
    V.check_alibi(alibi, batch, nheads, q)
    if sink is not None and not isinstance(sink, torch.Tensor):
        raise TypeError(f"learnable_sink must be a tensor of shape ({nheads},), got {type(sink).__name__}")
    V.check_chunk_and_sink(spec.attention_chunk, sink, nheads, q)
    if spec.mods is not None:
        score_mod, _, mask_mod, block_mask = spec.mods
        V.check_mods(score_mod, mask_mod)
        if block_mask is not None:
            if varlen:
                raise V.FlashAttnValueError("block_mask is supported for dense inputs only")
            V.check_block_mask(block_mask, batch, nheads, q.shape[1], k.shape[1], q, spec.return_softmax)


def check(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec: Spec, dropout_p, scale, softcap) -> None:
    """The one pass of argument checks of a call (each error names the argument). Cached per signature;
    value checks (cu_seqlens, seqused_k, block masks) run on every call while they are enabled."""
    if spec.mods is not None or (spec.varlen and V.value_checks_enabled(cu_q)):
        _full_checks(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec, dropout_p, scale, softcap)
        return
    try:
        key = (
            _meta(q), _meta(k), _meta(v), _meta(sink), _meta(alibi), _meta(cu_q), _meta(cu_k),
            _meta(seqused_k), spec, dropout_p, scale, softcap,
        )  # fmt: skip
        hash(key)
    except (AttributeError, TypeError):  # not a tensor / unhashable scalar: the full checks say what is wrong
        key = None
    if key is not None and key in _CHECKED:
        return
    _full_checks(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec, dropout_p, scale, softcap)
    if key is not None:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED.add(key)


def prepare(
    a: Tensor,
    b: Tensor | None,
    c: Tensor | None,
    *,
    pack: int = DENSE,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: Any = 0,
    max_seqlen_k: Any = 0,
    seqused_k: Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Any = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    return_softmax: bool = False,
    attention_chunk: int = 0,
    learnable_sink: Tensor | None = None,
    deterministic: bool = False,
    mods: tuple | None = None,
    varlen: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Spec]:
    """Normalise and check one call's arguments; returns ``(q, k, v, spec)`` (q, k, v views of a packed input,
    with a contiguous last dim). Errors name the caller's arguments."""
    if pack == QKV:
        V.check_packed("qkv", a, 4 if varlen else 5, 1 if varlen else 2, 3)
    elif pack == KV:
        V.check_packed("kv", b, 4 if varlen else 5, 1 if varlen else 2, 2)
    q, k, v = unpack(a, b, c, pack, varlen)
    q, k, v = V.contig_last(q), V.contig_last(k), V.contig_last(v)
    left, right = V.window_pair(window_size)
    given_mask = None if mods is None or varlen else mods[3]
    if mods is not None and given_mask is not None and isinstance(q, torch.Tensor) and q.dim() == 4:
        # PyTorch's FlexAttention BlockMask -> ours, once, before the checks (the autograd layer saves this
        # converted mask in the spec, so the backward reads the same one)
        block_mask = as_block_mask(
            given_mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1], causal=bool(causal),
            window_size=(left, right), attention_chunk=int(attention_chunk), mask_mod=mods[2],
        )  # fmt: skip
        if block_mask is not given_mask:
            mods = (*mods[:3], block_mask)
    if varlen:
        # HF transformers passes max_seqlen as a 0-dim tensor (cu_seqlens.diff().max()): one host sync, as in
        # flash-attn, where the C++ binding converts it too
        max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    scale: Any = softmax_scale  # checked below (a non-tensor q fails the checks first)
    if isinstance(q, torch.Tensor) and q.dim() > 0:
        scale = default_scale(q, softmax_scale)
    spec = Spec(
        varlen, pack, max_seqlen_q, max_seqlen_k, dropout_p, scale, bool(causal), left, right, softcap,
        bool(return_softmax), attention_chunk, bool(deterministic), mods,
    )  # fmt: skip
    if not isinstance(q, torch.Tensor) or not tracing(q):  # traced: the op checks when it runs
        check(q, k, v, learnable_sink, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, spec, dropout_p,
              softmax_scale, softcap)  # fmt: skip
    if type(dropout_p) is not float or type(softcap) is not float:  # e.g. ints: the kernels take floats
        spec = spec._replace(dropout_p=float(dropout_p), softcap=float(softcap))
    return q, k, v, spec


# ------------------------------------------------------------------------------------------ the forward
_LAUNCH: dict[str, Any] = {}


def _launchers() -> dict[str, Any]:
    if not _LAUNCH:
        from fa_core import fast_launch, forward_launch
        from fa_core.probs_kernel import flash_attn_s_dmask

        _LAUNCH.update(
            forward=forward_launch.launch_forward, probs=forward_launch.launch_probs, s_dmask=flash_attn_s_dmask,
            record=fast_launch.record, replay=fast_launch.Replay.build, module=forward_launch,
        )  # fmt: skip
    return _LAUNCH


#: replays of the forward launches per call signature (see :func:`_replay_key`): ``(replay, out_shape,
#: lse_shape)``; bounded
_REPLAYS: dict[tuple, tuple] = {}
_REPLAYS_MAX = 1024


def _replay_key(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec: Spec, leftpad_k) -> tuple | None:
    """Everything the forward's launches derive from, for a call whose launches can be replayed: a GPU call
    without dropout (its seed is per call), S_dmask, programmable mods or ``leftpad_k``, with 16-byte aligned
    inputs; else None. The launches of a signature are recorded once and replayed with the next call's
    tensors (:class:`fa_core.fast_launch.Replay`): the launcher's Python is skipped, not its decisions."""
    if (
        spec.mods is not None
        or spec.dropout_p > 0
        or spec.return_softmax
        or leftpad_k is not None
        or not q.is_cuda
    ):
        return None
    ptrs = q.data_ptr() | k.data_ptr() | v.data_ptr()
    for t in (sink, alibi, cu_q, cu_k, seqused_k):
        if t is not None:
            ptrs |= t.data_ptr()
    if ptrs & 15:  # the launcher specializes on 16-byte alignment: only the aligned signature is replayed
        return None
    return (
        spec, _meta(q), _meta(k), _meta(v), _meta(sink), _meta(alibi), _meta(cu_q), _meta(cu_k), cu_k is cu_q,
        _meta(seqused_k), settings.get(), _LAUNCH["module"].FP8_LAYOUT_FOR_16BIT,
    )  # fmt: skip


def _remember(key: tuple, rec: Any, slots: tuple, out_shape: Any, lse_shape: Any) -> None:
    """Keep the replay of a recorded forward (none when the recording cannot be replayed: a Gluon launch, a
    launch through Triton's own path, a tensor made inside the launcher)."""
    replay = _LAUNCH["replay"](rec, slots)
    if replay is None:
        return
    if len(_REPLAYS) >= _REPLAYS_MAX:
        _REPLAYS.clear()
    _REPLAYS[key] = (replay, tuple(out_shape), tuple(lse_shape))


def _dmask(
    want: bool, probs: Tensor | None, batch: int, nheads: int, sq: int, sk: int, like: Tensor
) -> Tensor:
    """The ``S_dmask`` of a call with a learnable sink or programmable mods (which flash-attn's form does not
    describe): flash-attn's layout ``(b, h, round128(sq), round128(sk))`` in q's dtype (or ``(0,)``) holding
    the normalized probabilities (the sink's share included), dropped entries negated."""
    if not want:
        return like.new_empty((0,))
    s = like.new_zeros(dmask_shape(batch, nheads, sq, sk))
    if probs is not None:  # None: empty problem, the kernel did not run
        s[:, :, : probs.shape[2], : probs.shape[3]] = probs.to(like.dtype)
    return s


def _flash_attn_dmask(launch, q, k, alibi, cu_q, cu_k, seqused_k, spec: Spec, rng_state: Tensor) -> Tensor:
    """flash-attn's ``S_dmask`` (:func:`fa_core.probs_kernel.flash_attn_s_dmask`): ``(b, h, round128(sq),
    round128(sk))`` in q's dtype, per key block of ``_get_block_size_n`` columns ``exp(s - running max)``
    (unnormalized), dropped entries negated, zero outside the sequences; the dropout mask regenerated from
    the forward's ``rng_state``."""
    varlen = spec.varlen
    return launch["s_dmask"](
        q, k, dropout_p=spec.dropout_p, rng_state=rng_state, softmax_scale=spec.softmax_scale,
        causal=spec.causal, window_size=(spec.window_left, spec.window_right), softcap=spec.softcap,
        alibi_slopes=alibi, cu_seqlens_q=cu_q if varlen else None, cu_seqlens_k=cu_k if varlen else None,
        max_seqlen_q=spec.max_seqlen_q if varlen else None, max_seqlen_k=spec.max_seqlen_k if varlen else None,
        seqused_k=seqused_k if varlen else None, attention_chunk=spec.attention_chunk,
    )  # fmt: skip


#: Smallest forward (FLOPs, 4 * rows_q * rows_k * nheads * headdim, not halved when causal; twice that for a
#: causal varlen call) sent to the Gluon kernels: ~0.4 ms of tensor-core work, above their host cost per call
#: (``bench/results/*-host.json``). Dense causal calls take the same threshold as non-causal ones: at 2k x 8
#: causal d128 the "ws" kernel runs 470 TFLOP/s against 323 for the Triton kernel
#: (``bench/results/h100-gluon-forward.md``), at 4k x 4 causal the public call 525 against 433
#: (``bench/results/h100-80gb-hbm3-gluon-thresholds.md``).
GLUON_MIN_FLOPS = 2e11


def gluon_forward_pays(work: float, causal: bool, varlen: bool) -> bool:
    """Whether a forward of ``work`` FLOPs (4 * rows_q * rows_k * nheads * headdim, not halved when causal)
    is large enough for the Gluon kernels (:data:`GLUON_MIN_FLOPS`, doubled for a causal varlen call)."""
    return work >= GLUON_MIN_FLOPS * (2 if causal and varlen else 1)


def _gluon_forward(q, k, v, out, cu_q, cu_k, seqused_k, leftpad_k, sink, alibi, spec: Spec) -> Tensor | None:
    """Run the Hopper (Gluon) forward into ``out`` when it covers the call and return its lse; else None.

    It covers bf16 / fp16, head dims 64 and 128, dense and varlen, causal, windows, softcap and GQA on sm_90
    with Triton 3.6 (:func:`fa_core.gluon.supports`); dropout, ALiBi, sinks, chunks, mods, ``seqused_k`` and
    ``leftpad_k`` stay on the Triton kernels. Measured against them and cuDNN:
    ``bench/results/h100-gluon-forward.json``."""
    if (
        not q.is_cuda
        or spec.dropout_p > 0
        or alibi is not None
        or sink is not None
        or spec.mods is not None
        or spec.attention_chunk
        or seqused_k is not None
        or leftpad_k is not None
        or not settings.get().gluon
    ):
        return None
    # Gluon launches build host-side tensor descriptors and go through Triton's own launch path (never
    # replayed): worth it only where the kernel runs longer than that host time, else the Triton kernels'
    # replayed launch wins
    rows_k = spec.max_seqlen_k if spec.varlen else k.shape[1]
    work = 4 * q.shape[-2] * q.shape[-1] * rows_k * (q.shape[0] if spec.varlen else q.shape[0] * q.shape[1])
    if not gluon_forward_pays(work, spec.causal, spec.varlen):
        return None
    from fa_core import gluon

    window = (spec.window_left, spec.window_right)
    kw: dict[str, Any] = dict(
        causal=spec.causal, window_size=window, softcap=spec.softcap, softmax_scale=spec.softmax_scale
    )
    if spec.varlen:
        max_q, max_k = spec.max_seqlen_q, spec.max_seqlen_k
        if not gluon.supports(
            q,
            k,
            v,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            out=out,
            **kw,
        ):
            return None
        return gluon.forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, out=out, **kw)[1]
    if not gluon.supports(q, k, v, out=out, **kw):
        return None
    return gluon.forward(q, k, v, out=out, **kw)[1]


def forward_eager(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sink: Tensor | None,
    alibi: Tensor | None,
    cu_q: Tensor | None,
    cu_k: Tensor | None,
    seqused_k: Tensor | None,
    spec: Spec,
    leftpad_k: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward on checked inputs: ``(out, lse, S_dmask, rng_state)`` (flash-attn's layouts).

    ``S_dmask`` (``spec.return_softmax``) is flash-attn's block-scaled unnormalized form
    (:func:`_flash_attn_dmask`, computed after the forward from its ``rng_state``); with a learnable sink or
    programmable mods, which that form does not describe, the normalized probabilities (:func:`_dmask`);
    with ``leftpad_k`` it raises."""
    if leftpad_k is not None and spec.return_softmax:
        raise V.FlashAttnValueError("return_softmax (S_dmask) is not supported with leftpad_k")
    launch = _launchers()
    key = _replay_key(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec, leftpad_k)
    if key is not None:
        replay = _REPLAYS.get(key)
        if replay is not None:
            out = q.new_empty(replay[1])
            lse = torch.empty(replay[2], dtype=torch.float32, device=q.device)
            launch["module"]._ensure_allocator()  # the descriptor kernels' scratch allocator, per thread
            if replay[0]((q, k, v, out, lse, cu_q, None if cu_k is cu_q else cu_k, seqused_k, alibi, sink)):
                return out, lse, q.new_empty((0,)), new_rng_state(0.0)
    varlen = spec.varlen
    flash_form = spec.return_softmax and sink is None and spec.mods is None
    want = spec.return_softmax and not flash_form  # the normalized probabilities, from the probs kernel
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if varlen:
        batch, nheads, max_q, max_k = cu_q.shape[0] - 1, q.shape[1], spec.max_seqlen_q, spec.max_seqlen_k  # type: ignore[union-attr]
        lse = torch.empty((nheads, q.shape[0]), dtype=torch.float32, device=q.device)
        empty = batch == 0 or q.shape[0] == 0 or max_q == 0
    else:
        batch, max_q, nheads = q.shape[:3]
        max_k = k.shape[1]
        lse = torch.empty((batch, nheads, max_q), dtype=torch.float32, device=q.device)
        empty = batch == 0 or max_q == 0
    rng_state = new_rng_state(spec.dropout_p)
    probs = None
    if not empty:
        mods = spec.mods or (None, None, None, None)
        kw: dict[str, Any] = dict(
            varlen=varlen, batch=batch, max_seqlen_q=max_q, max_seqlen_k=max_k, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k, seqused_k=seqused_k, softmax_scale=spec.softmax_scale, softcap=spec.softcap,
            alibi_slopes=alibi, dropout_p=spec.dropout_p, rng_state=rng_state,
            attention_chunk=spec.attention_chunk, learnable_sink=sink, score_mod=mods[0], mask_mod=mods[2],
        )  # fmt: skip
        extra = {} if leftpad_k is None else {"leftpad_k": leftpad_k}
        g_lse = (
            None
            if want
            else _gluon_forward(q, k, v, out, cu_q, cu_k, seqused_k, leftpad_k, sink, alibi, spec)
        )
        if g_lse is not None:
            return out, g_lse, _dmask(False, None, batch, nheads, max_q, max_k, q), rng_state
        with launch["record"]() as rec:
            window = launch["forward"](
                q, k, v, out, lse, causal=spec.causal, window_size=(spec.window_left, spec.window_right),
                block_mask=mods[3], **kw, **extra,
            )  # fmt: skip
        if key is not None:
            _remember(key, rec, (q, k, v, out, lse, cu_q, None if cu_k is cu_q else cu_k, seqused_k, alibi, sink),
                      out.shape, lse.shape)  # fmt: skip
        if want:
            probs = launch["probs"](q, k, lse, window=window, **kw)
    if flash_form:
        s_dmask = _flash_attn_dmask(launch, q, k, alibi, cu_q, cu_k, seqused_k, spec, rng_state)
        return out, lse, s_dmask, rng_state
    return out, lse, _dmask(want, probs, batch, nheads, max_q, max_k, q), rng_state


def run_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sink: Tensor | None,
    alibi: Tensor | None,
    cu_q: Tensor | None,
    cu_k: Tensor | None,
    seqused_k: Tensor | None,
    spec: Spec,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward of a prepared call: direct launches in eager mode, the custom op while tracing (the
    programmable features, whose Triton functions no op schema can carry, always run eagerly)."""
    if spec.mods is not None or not tracing(q):
        return forward_eager(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec)
    want = spec.return_softmax
    if spec.varlen:
        return torch.ops.flash_attn_plus.varlen_fwd(
            q, k, v, cu_q, cu_k, spec.max_seqlen_q, spec.max_seqlen_k, spec.dropout_p, spec.softmax_scale,
            spec.causal, spec.window_left, spec.window_right, spec.softcap, alibi, want, seqused_k,
            spec.deterministic, spec.attention_chunk, sink,
        )  # fmt: skip
    return torch.ops.flash_attn_plus.fwd(
        q, k, v, spec.dropout_p, spec.softmax_scale, spec.causal, spec.window_left, spec.window_right,
        spec.softcap, alibi, want, spec.deterministic, spec.attention_chunk, sink,
    )  # fmt: skip


def options(
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: Any,
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    return_attn_probs: bool,
) -> dict[str, Any]:
    """flash-attn's common options as :func:`prepare`'s keywords (``S_dmask`` is materialised only with
    dropout, as flash-attn's public functions do)."""
    return dict(
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_softmax=bool(return_attn_probs) and dropout_p > 0,
    )  # fmt: skip


def needs_grad(*tensors: object) -> bool:
    """Grad mode is on and one of ``tensors`` requires grad (None and non-tensors do not)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # noqa: SIM110 (a generator under any() costs more on this per-call path)
        if t is not None and getattr(t, "requires_grad", False):
            return True
    return False


def attention(
    a: Tensor,
    b: Tensor | None,
    c: Tensor | None,
    *,
    autograd: Callable[..., Any] | None,
    missing: Callable[[], Any] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """One public call: ``(out, softmax_lse, S_dmask)`` (flash-attn's layouts). ``a, b, c``: ``q, k, v``,
    ``qkv, None, None`` or ``q, kv, None`` (``pack=``); ``kwargs``: :func:`prepare`'s. ``autograd``: the
    autograd Function's ``apply`` (fa-backward), used when a gradient is wanted; None: ``missing()`` raises."""
    sink, alibi = kwargs.get("learnable_sink"), kwargs.get("alibi_slopes")
    q, k, v, spec = prepare(a, b, c, **kwargs)
    cu_q, cu_k, seqused_k = kwargs.get("cu_seqlens_q"), kwargs.get("cu_seqlens_k"), kwargs.get("seqused_k")
    if needs_grad(a, b, c, sink):
        if autograd is None:
            if missing is not None:
                missing()
            raise RuntimeError(
                "the inputs require grad but no backward is installed: install fa-backward, or run the "
                "forward under torch.no_grad()"
            )
        # cu_k None: the same tensor as cu_q (torch.compile cannot trace one tensor in two inputs of a Function)
        cu_k_arg = None if cu_k is cu_q else cu_k
        if spec.pack == DENSE:  # the checked tensors (a strided last dim already copied, differentiably)
            a, b, c = q, k, v
        out, lse, s_dmask, _ = autograd(a, b, c, sink, alibi, cu_q, cu_k_arg, seqused_k, spec)
        return out, lse, s_dmask
    out, lse, s_dmask, _ = run_forward(q, k, v, sink, alibi, cu_q, cu_k, seqused_k, spec)
    return out, lse, s_dmask


# ------------------------------------------------------------------------------------------ custom ops
def _spec_of_op(varlen, max_q, max_k, dropout_p, scale, causal, left, right, softcap, want, chunk, det):
    return Spec(
        varlen, DENSE, max_q, max_k, dropout_p, scale, causal, left, right, softcap, want, chunk, det, None
    )


@torch.library.custom_op(f"{NS}::fwd", mutates_args=())
def fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    return_softmax: bool,
    deterministic: bool,
    attention_chunk: int = 0,
    learnable_sink: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense forward. q ``(b, sq, h, d)``, k/v ``(b, sk, hk, d[v])`` -> out ``(b, sq, h, dv)``, lse
    ``(b, h, sq)`` fp32, S_dmask, rng_state ``(2,)`` int64 CPU. ``deterministic`` is only kept for the backward."""
    spec = _spec_of_op(False, 0, 0, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                       softcap, return_softmax, attention_chunk, deterministic)  # fmt: skip
    V.window_pair((window_size_left, window_size_right))
    check(q, k, v, learnable_sink, alibi_slopes, None, None, None, spec, dropout_p, softmax_scale, softcap)
    return forward_eager(q, k, v, learnable_sink, alibi_slopes, None, None, None, spec)


@fwd.register_fake
def _fwd_fake(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
              alibi_slopes, return_softmax, deterministic, attention_chunk=0, learnable_sink=None):  # fmt: skip
    b, sq, h = q.shape[:3]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((b, h, sq), dtype=torch.float32)
    s = q.new_empty(dmask_shape(b, h, sq, k.shape[1]) if return_softmax else (0,))
    return out, lse, s, torch.empty((2,), dtype=torch.int64, device="cpu")


@torch.library.custom_op(f"{NS}::varlen_fwd", mutates_args=())
def varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    return_softmax: bool,
    seqused_k: Tensor | None,
    deterministic: bool,
    attention_chunk: int = 0,
    learnable_sink: Tensor | None = None,
    leftpad_k: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Varlen forward. q ``(total_q, h, d)``, k/v ``(total_k, hk, d[v])`` -> out ``(total_q, h, dv)``, lse
    ``(h, total_q)`` fp32, S_dmask ``(b, h, round128(max_sq), round128(max_sk))`` or ``(0,)``, rng_state.
    ``leftpad_k`` ``(b,)`` int32 is passed on to fa-core's varlen forward kernel launcher."""
    spec = _spec_of_op(True, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left,
                       window_size_right, softcap, return_softmax, attention_chunk, deterministic)  # fmt: skip
    V.window_pair((window_size_left, window_size_right))
    check(q, k, v, learnable_sink, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, spec, dropout_p,
          softmax_scale, softcap)  # fmt: skip
    return forward_eager(
        q, k, v, learnable_sink, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, spec, leftpad_k
    )


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                     causal, window_size_left, window_size_right, softcap, alibi_slopes, return_softmax,
                     seqused_k, deterministic, attention_chunk=0, learnable_sink=None, leftpad_k=None):  # fmt: skip
    h = q.shape[1]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((h, q.shape[0]), dtype=torch.float32)
    if return_softmax:
        s = q.new_empty(dmask_shape(cu_seqlens_q.shape[0] - 1, h, max_seqlen_q, max_seqlen_k))
    else:
        s = q.new_empty((0,))
    return out, lse, s, torch.empty((2,), dtype=torch.int64, device="cpu")
