"""Kernel launches of the backward (dense and varlen): the dQ pass (which also computes delta), then dK/dV.

:func:`_launch` takes checked inputs (see :mod:`fa_backward.backward`), computes the strides, constexprs and
block-sparse arguments of the kernels of :mod:`fa_backward.backward_kernel`, launches them and returns
``delta`` (``softmax_d``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from fa_backward.backward_kernel import dkdv_kernel, dq_kernel
from fa_backward.sparse_args import _sparse_args
from fa_core import settings
from fa_core import validation as V
from fa_core.fast_launch import FastLaunch, Replay, empty_arg, record
from fa_core.forward_configs import cdiv, next_pow2, seq_bucket
from fa_core.forward_launch import _ensure_allocator, tma_ok
from fa_core.masking import has_right_edge, has_window_left, normalize_window
from fa_core.scheduling import lpt_section
from fa_core.score_mods import additive_grad

# launches skip Triton's per-call Python once a specialization is compiled (fa_core.fast_launch)
dkdv_launch = FastLaunch(dkdv_kernel)
dq_launch = FastLaunch(dq_kernel)

#: Smallest dense backward pass (FLOPs of one pass: 8 * batch * nheads * seqlen_q * seqlen_k * headdim, halved
#: when causal) sent to the Hopper Gluon kernels instead of the Triton ones, per head dim: the dQ pass
#: (:mod:`fa_backward.gluon_dq`) and the dK/dV pass (:mod:`fa_backward.gluon_dkdv`). A head dim that is absent
#: (or None) never takes the pass; a plain number (tests) applies to every head dim. From the public fwd+bwd
#: with Triton passes, the Gluon dK/dV pass, and both Gluon passes, in one process
#: (`bench/results/h100-80gb-hbm3-gluon-thresholds.md`): at d128 both Gluon passes are the fastest from 512 x 32
#: non-causal (1.10-1.22x the Triton passes) and the Gluon dK/dV pass alone at 512 x 32 causal (1.12x); at d64
#: the Gluon dQ pass gains nothing (`bench/results/h200-gluon-backward.md`) and the Gluon dK/dV pass is taken
#: from the smallest size measured faster there. Below, a call keeps the Triton passes and their replayed
#: launches.
ThresholdMap = dict[int, float | None]
GLUON_DQ_MIN_FLOPS: ThresholdMap | float | None = {128: 1e11}
GLUON_DKDV_MIN_FLOPS: ThresholdMap | float | None = {64: 5e11, 128: 6e10}


def _min_flops(setting: ThresholdMap | float | None, head_dim: int) -> float | None:
    return setting.get(head_dim) if isinstance(setting, dict) else setting


def _gluon_passes(
    q, k, v, out, dout, lse, lse2, delta, dq, dk, dv, dlse, *, varlen, dropout_p, alibi_slopes, softcap, window,
    attention_chunk, seqused_k, score_mod, mask_mod, block_mask, causal,
) -> tuple[bool, bool]:  # fmt: skip
    """``(gluon_dq, gluon_dkdv)``: which passes of this call run on the Gluon kernels (see
    :data:`GLUON_DKDV_MIN_FLOPS`): dense, no dropout / ALiBi / softcap / window / chunk / seqused_k / mods /
    block mask, a pass large enough, an sm_90 device with Triton 3.6's Gluon and tensors the kernel takes
    (its ``unsupported_reason``, which also checks the dtypes, head dims 64 / 128 and TMA strides)."""
    if (
        varlen
        or not q.is_cuda
        or dropout_p > 0
        or alibi_slopes is not None
        or softcap > 0
        or tuple(window) != (-1, -1)
        or attention_chunk
        or seqused_k is not None
        or score_mod is not None
        or mask_mod is not None
        or block_mask is not None
        or not settings.get().gluon
    ):
        return False, False
    batch, seqlen_q, nheads, d = q.shape
    work = 8 * batch * nheads * seqlen_q * k.shape[1] * d / (2 if causal else 1)
    dq_min, dkdv_min = _min_flops(GLUON_DQ_MIN_FLOPS, d), _min_flops(GLUON_DKDV_MIN_FLOPS, d)
    want_dq = dq_min is not None and work >= dq_min
    want_dkdv = dkdv_min is not None and work >= dkdv_min
    if not (want_dq or want_dkdv):
        return False, False
    from fa_backward import gluon_dkdv, gluon_dq

    if not gluon_dkdv.available(q.device):
        return False, False
    use_dq = want_dq and gluon_dq.unsupported_reason(
        q, k, v, out, dout, lse, dq, delta, lse2, causal=causal, dlse=dlse
    ) is None  # fmt: skip
    use_dkdv = (
        want_dkdv and gluon_dkdv.unsupported_reason(q, k, v, dout, lse2, delta, dk, dv, causal=causal) is None
    )
    return use_dq, use_dkdv


def bwd_tma(*tensors: torch.Tensor) -> bool:
    """Load the streamed tiles (q / dout in the dK/dV pass, k / v in the dQ pass) through tensor descriptors
    (TMA) where :func:`fa_core.forward_launch.tma_ok` allows (``fa_core.settings.get().tma``, ``FA_PLUS_TMA=0``,
    turns off the forward's and the backward's)."""
    return tma_ok(*tensors)


#: the launch constants of a call signature (see :func:`_static`), bounded
_STATIC: dict[tuple, tuple[dict[str, Any], dict[str, Any], dict[str, Any], tuple[bool, bool]]] = {}
_STATIC_MAX = 1024


def _static(
    varlen: bool,
    batch: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    nheads: int,
    nheads_k: int,
    d: int,
    d_v: int,
    softmax_scale: float,
    causal: bool,
    window: tuple[int, int],
    softcap: float,
    has_alibi: bool,
    alibi_2d: bool,
    dropout_p: float,
    attention_chunk: int,
    has_seqused: bool,
    fp64: bool,
    has_dlse: bool,
    score_mod: Any,
    score_mod_grad: Any,
    mask_mod: Any,
    sparse: bool,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], tuple[bool, bool]]:
    """What a launch derives from scalars only, planned once per signature and cached: the keyword
    arguments shared by both kernels (scalars and constexprs), those of the dQ and of the dK/dV launch, and
    ``(is_local, has_window_left)`` (the LPT width is read per call: fa_core.scheduling's constants)."""
    key = (
        varlen, batch, max_seqlen_q, max_seqlen_k, nheads, nheads_k, d, d_v, softmax_scale, causal, window,
        softcap, has_alibi, alibi_2d, dropout_p, attention_chunk, has_seqused, fp64, has_dlse, score_mod,
        score_mod_grad, mask_mod, sparse,
    )  # fmt: skip
    plan = _STATIC.get(key)
    if plan is not None:
        return plan
    left, right, is_local = normalize_window(causal, window)
    has_left = has_window_left(is_local, left)
    common = dict(
        nheads=nheads,
        group=nheads // nheads_k,
        sm_scale=softmax_scale,
        softcap=float(softcap),
        window_left=left,
        window_right=right,
        chunk=int(attention_chunk),
        dropout_p=float(dropout_p),
        SEQ_BUCKET_Q=seq_bucket(max_seqlen_q),
        SEQ_BUCKET_K=seq_bucket(max_seqlen_k),
        HEADDIM=d,
        HEADDIM_V=d_v,
        BLOCK_D=max(next_pow2(d), 16),
        BLOCK_DV=max(next_pow2(d_v), 16),
        IS_VARLEN=varlen,
        HAS_SEQUSED=has_seqused,
        IS_LOCAL=is_local,
        HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=has_alibi,
        HAS_DROPOUT=dropout_p > 0,
        # float32 accumulation; float64 (CPU interpreter only, for gradcheck) accumulates in float64
        ACC_FP64=fp64,
        HAS_CHUNK=attention_chunk > 0,
        score_mod_fn=score_mod,
        score_grad_fn=score_mod_grad,
        mask_mod_fn=mask_mod,
        # 0: none; 1: score_mod with its derivative; 2: derivative 1 (additive bias): no dmod tile
        HAS_SCORE_MOD=0 if score_mod is None else (2 if score_mod_grad is additive_grad else 1),
        HAS_MASK_MOD=mask_mod is not None,
        IS_SPARSE=sparse,
    )
    dq_kw = dict(
        HAS_DLSE=has_dlse,
        HAS_WINDOW_LEFT=has_left,
        HAS_RIGHT_EDGE=has_right_edge(
            varlen, is_local, attention_chunk, mask_mod, True if has_seqused else None, max_seqlen_k
        ),
    )
    # transposed problem: the masked query edge past the band is the left window's (see backward_kernel)
    dkdv_kw = dict(
        HAS_RIGHT_EDGE=has_right_edge(varlen, has_left, attention_chunk, mask_mod, None, max_seqlen_q)
    )
    plan = (common, dq_kw, dkdv_kw, (is_local, has_left))
    if len(_STATIC) >= _STATIC_MAX:
        _STATIC.clear()
    _STATIC[key] = plan
    return plan


def _launch(
    dout,
    q,
    k,
    v,
    out,
    lse,
    dq,
    dk,
    dv,
    *,
    varlen,
    batch,
    max_seqlen_q,
    max_seqlen_k,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    softmax_scale,
    causal,
    window,
    softcap,
    alibi_slopes,
    dropout_p,
    rng_state,
    attention_chunk=0,
    score_mod=None,
    score_mod_grad=None,
    mask_mod=None,
    block_mask=None,
    dsoftmax_lse=None,
):
    lse = V.contig_last(lse)
    dlse = None if dsoftmax_lse is None else V.contig_last(dsoftmax_lse)
    # delta and the lse in log2 units (both written by the dQ pass, read by the dK/dV pass), one allocation
    delta, lse2 = torch.empty((2, *lse.shape), dtype=torch.float32, device=q.device).unbind(0)
    key = None
    gluon = (False, False)
    if GLUON_DQ_MIN_FLOPS is not None or GLUON_DKDV_MIN_FLOPS is not None:
        gluon = _gluon_passes(
            q, k, v, out, dout, lse, lse2, delta, dq, dk, dv, dlse, varlen=varlen, dropout_p=dropout_p,
            alibi_slopes=alibi_slopes, softcap=softcap, window=window, attention_chunk=attention_chunk,
            seqused_k=seqused_k, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask, causal=causal,
        )  # fmt: skip
    # a Gluon launch is no FastLaunch: such a call is never recorded (its replay would miss that pass)
    if not (
        any(gluon) or dropout_p > 0 or block_mask is not None or score_mod is not None or mask_mod is not None
    ):
        key = _replay_key(
            (dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, dlse),
            varlen, batch, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window, softcap, attention_chunk,
        )  # fmt: skip
    slots = (dout, q, k, v, out, lse, dq, dk, dv, delta, lse2, cu_seqlens_q,
             None if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k, seqused_k, alibi_slopes, dlse)  # fmt: skip
    if key is not None:
        replay = _REPLAYS.get(key)
        if replay is not None:
            _ensure_allocator()  # the descriptor kernels' scratch allocator, per thread
            if replay(slots):
                return delta
    with record() if key is not None else contextlib.nullcontext() as rec:
        _launches(dout, q, k, v, out, lse, dq, dk, dv, delta, lse2, dlse, varlen=varlen, batch=batch,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, softmax_scale=softmax_scale, causal=causal,
                  window=window, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                  rng_state=rng_state, attention_chunk=attention_chunk, score_mod=score_mod,
                  score_mod_grad=score_mod_grad, mask_mod=mask_mod, block_mask=block_mask,
                  gluon=gluon)  # fmt: skip
    if rec is not None and key is not None:
        replay = Replay.build(rec, slots)
        if replay is not None:
            if len(_REPLAYS) >= _REPLAYS_MAX:
                _REPLAYS.clear()
            _REPLAYS[key] = replay
    return delta


#: replays of the backward's two launches per call signature (see :func:`_replay_key`), bounded
_REPLAYS: dict[tuple, Replay] = {}
_REPLAYS_MAX = 1024


def _replay_key(tensors: tuple, *scalars: Any) -> tuple | None:
    """Everything the two launches derive from besides the options that are never replayed (dropout, block
    masks, score / mask mods): shapes, strides and dtypes of ``tensors`` (None where absent), the scalars, the
    settings, which of cu_seqlens_q / cu_seqlens_k is one tensor, the device. None (no replay) for CPU
    tensors or a pointer that is not 16-byte aligned (the launcher specializes on that alignment)."""
    q = tensors[1]
    if not q.is_cuda:
        return None
    ptrs = 0
    metas: list[tuple | None] = []
    for t in tensors:
        if t is None:
            metas.append(None)
        else:
            ptrs |= t.data_ptr()
            metas.append((t.shape, t.stride(), t.dtype))
    if ptrs & 15:
        return None
    return (*metas, *scalars, tensors[9] is tensors[10], q.device, settings.get())


def _launches(
    dout,
    q,
    k,
    v,
    out,
    lse,
    dq,
    dk,
    dv,
    delta,
    lse2,
    dlse,
    *,
    varlen,
    batch,
    max_seqlen_q,
    max_seqlen_k,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    softmax_scale,
    causal,
    window,
    softcap,
    alibi_slopes,
    dropout_p,
    rng_state,
    attention_chunk,
    score_mod,
    score_mod_grad,
    mask_mod,
    block_mask,
    gluon=(False, False),
):
    """The dQ launch (which writes ``delta`` and ``lse2``), then the dK/dV launch, on prepared buffers; ``gluon``
    = (dQ, dK/dV): which of them run on the Gluon kernels (see :func:`_gluon_passes`)."""
    dsoftmax_lse = dlse
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    static, dq_static, dkdv_static, (is_local, has_left) = _static(
        varlen, batch, max_seqlen_q, max_seqlen_k, nheads, nheads_k, q.shape[-1], v.shape[-1], softmax_scale,
        causal, tuple(window), softcap, alibi_slopes is not None,
        alibi_slopes is not None and alibi_slopes.dim() == 2, dropout_p, attention_chunk, seqused_k is not None,
        q.dtype == torch.float64, dsoftmax_lse is not None, score_mod, score_mod_grad, mask_mod,
        block_mask is not None,
    )  # fmt: skip
    # stride tuples once per tensor: each .stride(i) call costs ~0.5 us on the launch path
    sq, sk, sv, so, sdo = q.stride(), k.stride(), v.stride(), out.stride(), dout.stride()
    sdq, sdk, sdv, sl, sdelta = dq.stride(), dk.stride(), dv.stride(), lse.stride(), delta.stride()
    if varlen:
        stride_ob = stride_dob = stride_lb = stride_deltab = 0
        stride_qb = stride_kb = stride_vb = stride_dqb = stride_dkb = stride_dvb = 0
        stride_lh, stride_deltah = sl[0], sdelta[0]
        # the total rows: the kernels clamp the values they read from cu_seqlens to [0, total]
        sq_b, sk_b = q.shape[0], k.shape[0]
    else:
        stride_ob, stride_dob = so[0], sdo[0]
        stride_lb, stride_lh = sl[0], sl[1]
        stride_deltab, stride_deltah = sdelta[0], sdelta[1]
        stride_qb, stride_kb, stride_vb = sq[0], sk[0], sv[0]
        stride_dqb, stride_dkb, stride_dvb = sdq[0], sdk[0], sdv[0]
        sq_b, sk_b = q.shape[1], k.shape[1]

    if dsoftmax_lse is not None:
        stride_dlb, stride_dlh = (0, dlse.stride(0)) if varlen else (dlse.stride(0), dlse.stride(1))
    else:
        dlse, stride_dlb, stride_dlh = delta, 0, 0

    dummy_i32 = empty_arg(q, torch.int32)
    seed, offset = (int(x) for x in rng_state.tolist()) if dropout_p > 0 else (0, 0)
    if block_mask is None:
        sparse_dq = sparse_dkdv = _no_sparse(dummy_i32)
        sparse_q = sparse_kv = 128
        has_full = False
    else:
        sparse_dq, sparse_dkdv, has_full, (sparse_q, sparse_kv) = _sparse_args(
            block_mask, max_seqlen_k, dummy_i32
        )
    common = dict(
        static,
        cu_seqlens_q=cu_seqlens_q if varlen else dummy_i32,
        cu_seqlens_k=cu_seqlens_k if varlen else dummy_i32,
        seqused_k=seqused_k if seqused_k is not None else dummy_i32,
        seqlen_q_dense=sq_b,
        seqlen_k_dense=sk_b,
        Alibi=alibi_slopes if alibi_slopes is not None else empty_arg(q, torch.float32),
        stride_alb=alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        seed=seed,
        rng_offset=offset,
        HAS_FULL=has_full,
        SPARSE_Q=sparse_q,
        SPARSE_KV=sparse_kv,
        USE_TMA=bwd_tma(q, k, v, dout),
        LPT=lpt_section(is_local, has_left, backward=True, sparse=block_mask is not None),
    )
    qkv_strides = (
        stride_qb,
        sq[-3],
        sq[-2],
        stride_kb,
        sk[-3],
        sk[-2],
        stride_vb,
        sv[-3],
        sv[-2],
        stride_dob,
        sdo[-3],
        sdo[-2],
        stride_lb,
        stride_lh,
        stride_deltab,
        stride_deltah,
    )
    # dQ first: it writes delta and lse2 (every row of every sequence), which the dK/dV pass reads
    if max_seqlen_q > 0 and gluon[0]:
        from fa_backward import gluon_dq as gq

        gq.dq_pass(
            q,
            k,
            v,
            out,
            dout,
            lse,
            dq,
            delta,
            lse2,
            causal=causal,
            softmax_scale=softmax_scale,
            dlse=dsoftmax_lse,  # (dlse stands for delta above when there is none)
        )
    elif max_seqlen_q > 0:
        dq_launch(
            lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), nheads, batch),
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dq,
            out,
            dlse,
            lse2,
            *qkv_strides,
            stride_dqb,
            sdq[-3],
            sdq[-2],
            stride_ob,
            so[-3],
            so[-2],
            stride_dlb,
            stride_dlh,
            **dq_static,
            **sparse_dq,
            **common,
        )
    if max_seqlen_k > 0 and gluon[1]:
        from fa_backward import gluon_dkdv as gd

        gd.dkdv(q, k, v, dout, lse2, delta, dk, dv, causal=causal, softmax_scale=softmax_scale)
    elif max_seqlen_k > 0:
        dkdv_launch(
            lambda meta: (cdiv(max_seqlen_k, meta["BLOCK_N"]), nheads_k, batch),
            q,
            k,
            v,
            dout,
            lse2,  # in the Lse slot, with delta's strides (see backward_kernel._bwd_dkdv_kernel)
            delta,
            dk,
            dv,
            *qkv_strides,
            stride_dkb,
            sdk[-3],
            sdk[-2],
            stride_dvb,
            sdv[-3],
            sdv[-2],
            **dkdv_static,
            **sparse_dkdv,
            **common,
        )


_NO_SPARSE: dict[torch.Tensor, dict[str, Any]] = {}


def _no_sparse(dummy: torch.Tensor) -> dict[str, Any]:
    """The block-list arguments of a launch without a block mask (placeholders), cached per placeholder."""
    args = _NO_SPARSE.get(dummy)
    if args is None:
        args = _NO_SPARSE[dummy] = _sparse_args(None, 0, dummy)[0]
    return args
