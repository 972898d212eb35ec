"""Bad arguments to every public function of ``flash_attn``: a ValueError / TypeError naming the argument,
raised before anything is written into a caller's tensor.

Table-driven: each case builds ``(function, args, kwargs)`` from small valid inputs with ONE argument made
invalid (wrong dtype, device ('meta' as the other device), rank, shape, strides, values). The test snapshots
every tensor passed in (q/k/v, caches, cu_seqlens, ...) and compares them bitwise after the call. Where the
package lacks the check (the call succeeds, or raises something that does not name the argument), the case
is ``xfail(strict=True)`` with the bug described, so the test flips to XPASS (a failure) once it is fixed.

Value checks (cu_seqlens monotone, cache overflow, block_table range) always run on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from fa_compat_testutils import DEVICE, HAS_KVCACHE, cu_seqlens, rand

from flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from flash_attn.bert_padding import pad_input, unpad_input
from flash_attn.layers.rotary import apply_rotary_emb

OTHER_DEVICE = "meta"
B, S, H, HK, D = 2, 8, 4, 2, 16
BAD = (ValueError, TypeError)


@dataclass
class Case:
    id: str
    build: Callable[[], tuple[Callable, tuple, dict]]
    name: str  # must appear in the error message
    exc: tuple[type[BaseException], ...] = BAD
    bug: str | None = None  # set: xfail(strict=True) with this reason
    kvcache: bool = False
    marks: list = field(default_factory=list)


def _q(b=B, s=S, h=H, d=D, dtype=None, **kw):
    return rand(b, s, h, d, dtype=dtype, **kw)


def _kv(b=B, s=S, h=HK, d=D, dtype=None, **kw):
    return rand(b, s, h, d, dtype=dtype, **kw)


def _noncontig_last(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t, t], dim=-1)[..., 0]


# ------------------------------------------------------------------------------------------------ dense
def dense(**over):
    def build():
        args = dict(q=_q(), k=_kv(), v=_kv())
        kw = {}
        for key, val in over.items():
            val = val() if callable(val) else val
            (args if key in args else kw)[key] = val
        return flash_attn_func, (args["q"], args["k"], args["v"]), kw

    return build


DENSE = [
    Case("func-q-float64", dense(q=lambda: _q(dtype=torch.float64)), "q", (TypeError,)),
    Case("func-q-int", dense(q=lambda: torch.ones(B, S, H, D, dtype=torch.int32)), "q", (TypeError,)),
    Case("func-q-not-tensor", dense(q=lambda: _q().tolist()), "q", (TypeError,)),
    Case("func-k-dtype-mismatch", dense(k=lambda: _kv(dtype=torch.float16)), "k", (TypeError,)),
    Case("func-v-dtype-mismatch", dense(v=lambda: _kv(dtype=torch.float16)), "v", (TypeError,)),
    Case("func-k-other-device", dense(k=lambda: _kv(device=OTHER_DEVICE)), "k"),
    Case("func-v-other-device", dense(v=lambda: _kv(device=OTHER_DEVICE)), "v"),
    Case("func-q-rank3", dense(q=lambda: _q()[0]), "q"),
    Case("func-k-rank5", dense(k=lambda: _kv()[None]), "k"),
    Case("func-k-headdim", dense(k=lambda: _kv(d=D + 8)), "k"),
    Case("func-v-seqlen", dense(v=lambda: _kv(s=S + 1)), "v"),
    Case("func-k-batch", dense(k=lambda: _kv(b=B + 1), v=lambda: _kv(b=B + 1)), "batch"),
    Case(
        "func-headdim-over-256",
        dense(q=lambda: _q(d=264), k=lambda: _kv(d=264), v=lambda: _kv(d=264)),
        "head dim",
    ),
    Case("func-nheads-not-multiple", dense(q=lambda: _q(h=3)), "nheads"),
    Case("func-window-left-lt-minus1", dense(window_size=(-2, -1)), "window_size"),
    Case("func-window-right-lt-minus1", dense(window_size=(0, -5)), "window_size"),
    Case("func-window-len3", dense(window_size=(1, 1, 1)), "window_size"),
    Case(
        "func-window-int",
        dense(window_size=4),
        "window_size",
    ),
    Case("func-dropout-1", dense(dropout_p=1.0), "dropout_p"),
    Case("func-dropout-negative", dense(dropout_p=-0.1), "dropout_p"),
    Case("func-softcap-negative", dense(softcap=-1.0), "softcap"),
    Case("func-softmax-scale-nan", dense(softmax_scale=float("nan")), "softmax_scale"),
    Case("func-alibi-fp16", dense(alibi_slopes=lambda: torch.rand(H, dtype=torch.float16)), "alibi_slopes"),
    Case("func-alibi-shape", dense(alibi_slopes=lambda: torch.rand(H + 1)), "alibi_slopes"),
    Case("func-alibi-rank3", dense(alibi_slopes=lambda: torch.rand(1, B, H)), "alibi_slopes"),
    Case(
        "func-alibi-other-device",
        dense(alibi_slopes=lambda: torch.rand(H, device=OTHER_DEVICE)),
        "alibi_slopes",
    ),
    Case(
        "func-alibi-noncontig", dense(alibi_slopes=lambda: _noncontig_last(torch.rand(B, H))), "alibi_slopes"
    ),
]


def qkvpacked(**over):
    def build():
        kw = {k: (v() if callable(v) else v) for k, v in over.items() if k != "qkv"}
        qkv = over["qkv"]() if "qkv" in over else rand(B, S, 3, H, D)
        return flash_attn_qkvpacked_func, (qkv,), kw

    return build


def kvpacked(**over):
    def build():
        q = over["q"]() if "q" in over else _q()
        kv = over["kv"]() if "kv" in over else rand(B, S, 2, HK, D)
        kw = {k: (v() if callable(v) else v) for k, v in over.items() if k not in ("q", "kv")}
        return flash_attn_kvpacked_func, (q, kv), kw

    return build


PACKED = [
    Case(
        "qkvpacked-float64", qkvpacked(qkv=lambda: rand(B, S, 3, H, D, dtype=torch.float64)), "", (TypeError,)
    ),
    Case(
        "qkvpacked-rank4",
        qkvpacked(qkv=lambda: rand(S, 3, H, D)),
        "qkv",
    ),
    Case(
        "qkvpacked-dim2-is-2",
        qkvpacked(qkv=lambda: rand(B, S, 2, H, D)),
        "qkv",
    ),
    Case(
        "qkvpacked-dim2-is-4",
        qkvpacked(qkv=lambda: rand(B, S, 4, H, D)),
        "qkv",
    ),
    Case("qkvpacked-dropout-1", qkvpacked(dropout_p=1.0), "dropout_p"),
    Case("qkvpacked-window", qkvpacked(window_size=(-3, 0)), "window_size"),
    Case("kvpacked-q-other-device", kvpacked(q=lambda: _q(device=OTHER_DEVICE)), ""),
    Case(
        "kvpacked-kv-dtype", kvpacked(kv=lambda: rand(B, S, 2, HK, D, dtype=torch.float16)), "k", (TypeError,)
    ),
    Case("kvpacked-kv-batch", kvpacked(kv=lambda: rand(B + 1, S, 2, HK, D)), "batch"),
    Case(
        "kvpacked-kv-dim2-is-3",
        kvpacked(kv=lambda: rand(B, S, 3, HK, D)),
        "kv",
    ),
    Case(
        "kvpacked-kv-rank4",
        kvpacked(kv=lambda: rand(B, S, 2, D)),
        "kv",
    ),
    Case("kvpacked-nheads-not-multiple", kvpacked(kv=lambda: rand(B, S, 2, 3, D)), "nheads"),
    Case(
        "kvpacked-headdim-over-256",
        kvpacked(q=lambda: _q(d=300), kv=lambda: rand(B, S, 2, HK, 300)),
        "head dim",
    ),
]


# ----------------------------------------------------------------------------------------------- varlen
LENS = [3, 5]
TOTAL = sum(LENS)


def varlen(**over):
    def build():
        a = dict(
            q=rand(TOTAL, H, D),
            k=rand(TOTAL, HK, D),
            v=rand(TOTAL, HK, D),
            cu_seqlens_q=cu_seqlens(LENS),
            cu_seqlens_k=cu_seqlens(LENS),
            max_seqlen_q=max(LENS),
            max_seqlen_k=max(LENS),
        )
        kw = {}
        for key, val in over.items():
            val = val() if callable(val) else val
            (a if key in a else kw)[key] = val
        return flash_attn_varlen_func, tuple(a.values()), kw

    return build


def _cu(vals, dtype=torch.int32, device=DEVICE):
    return torch.tensor(vals, dtype=dtype, device=device)


def _paged_varlen(block_table, num_blocks=4, page=16):
    def build():
        k = rand(num_blocks, page, HK, D)
        v = rand(num_blocks, page, HK, D)
        bt = block_table() if callable(block_table) else block_table
        return (
            flash_attn_varlen_func,
            (rand(TOTAL, H, D), k, v, cu_seqlens(LENS), cu_seqlens(LENS), max(LENS), max(LENS)),
            dict(block_table=bt),
        )

    return build


VARLEN = [
    Case("varlen-q-float64", varlen(q=lambda: rand(TOTAL, H, D, dtype=torch.float64)), "q", (TypeError,)),
    Case("varlen-q-rank4", varlen(q=lambda: rand(1, TOTAL, H, D)), "q"),
    Case("varlen-k-other-device", varlen(k=lambda: rand(TOTAL, HK, D, device=OTHER_DEVICE)), "k"),
    Case(
        "varlen-cu-q-int64",
        varlen(cu_seqlens_q=lambda: _cu([0, 3, 8], torch.int64)),
        "cu_seqlens_q",
        (TypeError,),
    ),
    Case(
        "varlen-cu-k-int64",
        varlen(cu_seqlens_k=lambda: _cu([0, 3, 8], torch.int64)),
        "cu_seqlens_k",
        (TypeError,),
    ),
    Case(
        "varlen-cu-q-float",
        varlen(cu_seqlens_q=lambda: _cu([0, 3, 8], torch.float32)),
        "cu_seqlens_q",
        (TypeError,),
    ),
    Case("varlen-cu-q-negative", varlen(cu_seqlens_q=lambda: _cu([-1, 3, 8])), "cu_seqlens_q"),
    Case("varlen-cu-q-decreasing", varlen(cu_seqlens_q=lambda: _cu([0, 6, 3, 8])), "cu_seqlens_q"),
    Case("varlen-cu-k-decreasing", varlen(cu_seqlens_k=lambda: _cu([0, 5, 2])), "cu_seqlens_k"),
    Case("varlen-cu-q-wrong-total", varlen(cu_seqlens_q=lambda: _cu([0, 3, 7])), "cu_seqlens_q"),
    Case("varlen-cu-k-wrong-total", varlen(cu_seqlens_k=lambda: _cu([0, 3, 9])), "cu_seqlens_k"),
    Case("varlen-cu-q-rank2", varlen(cu_seqlens_q=lambda: _cu([[0, 3, 8]])), "cu_seqlens_q"),
    Case("varlen-cu-q-empty", varlen(cu_seqlens_q=lambda: _cu([])), "cu_seqlens_q"),
    Case(
        "varlen-cu-q-other-device",
        varlen(cu_seqlens_q=lambda: _cu([0, 3, 8], device=OTHER_DEVICE)),
        "cu_seqlens_q",
    ),
    Case("varlen-cu-batch-mismatch", varlen(cu_seqlens_k=lambda: _cu([0, 3, 4, 8])), "cu_seqlens_k"),
    Case("varlen-max-q-too-small", varlen(max_seqlen_q=2), "max_seqlen_q"),
    Case("varlen-max-k-too-small", varlen(max_seqlen_k=4), "max_seqlen_k"),
    Case("varlen-max-q-negative", varlen(max_seqlen_q=-1), "max_seqlen"),
    Case(
        "varlen-headdim-over-256",
        varlen(q=lambda: rand(TOTAL, H, 257), k=lambda: rand(TOTAL, HK, 257), v=lambda: rand(TOTAL, HK, 257)),
        "head dim",
    ),
    Case("varlen-nheads-not-multiple", varlen(q=lambda: rand(TOTAL, 3, D)), "nheads"),
    Case("varlen-window", varlen(window_size=(-1, -7)), "window_size"),
    Case("varlen-dropout-1", varlen(dropout_p=1.5), "dropout_p"),
    Case("varlen-softcap-negative", varlen(softcap=-0.5), "softcap"),
    Case("varlen-alibi-shape", varlen(alibi_slopes=lambda: torch.rand(3, H)), "alibi_slopes"),
    Case(
        "varlen-alibi-int",
        varlen(alibi_slopes=lambda: torch.ones(H, dtype=torch.int32)),
        "alibi_slopes",
        (TypeError,),
    ),
    Case(
        "varlen-block-table-out-of-range",
        _paged_varlen(lambda: _cu([[0], [7]])),
        "block_table",
    ),
    Case(
        "varlen-block-table-int64",
        _paged_varlen(lambda: _cu([[0], [1]], torch.int64)),
        "block_table",
        (TypeError,),
    ),
    Case(
        "varlen-block-table-rank1",
        _paged_varlen(lambda: _cu([0, 1])),
        "block_table",
    ),
    Case(
        "varlen-block-table-negative",
        _paged_varlen(lambda: _cu([[0], [-1]])),
        "block_table",
    ),
]


def varlen_qkvpacked(**over):
    def build():
        qkv = over["qkv"]() if "qkv" in over else rand(TOTAL, 3, H, D)
        cu = over["cu_seqlens"]() if "cu_seqlens" in over else cu_seqlens(LENS)
        mx = over.get("max_seqlen", max(LENS))
        kw = {
            k: (v() if callable(v) else v)
            for k, v in over.items()
            if k not in ("qkv", "cu_seqlens", "max_seqlen")
        }
        return flash_attn_varlen_qkvpacked_func, (qkv, cu, mx), kw

    return build


def varlen_kvpacked(**over):
    def build():
        q = over["q"]() if "q" in over else rand(TOTAL, H, D)
        kv = over["kv"]() if "kv" in over else rand(TOTAL, 2, HK, D)
        cq = over["cu_seqlens_q"]() if "cu_seqlens_q" in over else cu_seqlens(LENS)
        ck = over["cu_seqlens_k"]() if "cu_seqlens_k" in over else cu_seqlens(LENS)
        mq, mk = over.get("max_seqlen_q", max(LENS)), over.get("max_seqlen_k", max(LENS))
        skip = ("q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
        kw = {k: (v() if callable(v) else v) for k, v in over.items() if k not in skip}
        return flash_attn_varlen_kvpacked_func, (q, kv, cq, ck, mq, mk), kw

    return build


VARLEN_PACKED = [
    Case(
        "varlen-qkvpacked-cu-int64",
        varlen_qkvpacked(cu_seqlens=lambda: _cu([0, 3, 8], torch.int64)),
        "cu_seqlens",
        (TypeError,),
    ),
    Case(
        "varlen-qkvpacked-cu-decreasing", varlen_qkvpacked(cu_seqlens=lambda: _cu([0, 5, 3, 8])), "cu_seqlens"
    ),
    Case("varlen-qkvpacked-cu-negative", varlen_qkvpacked(cu_seqlens=lambda: _cu([0, -2, 8])), "cu_seqlens"),
    Case("varlen-qkvpacked-max-too-small", varlen_qkvpacked(max_seqlen=1), "max_seqlen"),
    Case(
        "varlen-qkvpacked-float64",
        varlen_qkvpacked(qkv=lambda: rand(TOTAL, 3, H, D, dtype=torch.float64)),
        "",
        (TypeError,),
    ),
    Case(
        "varlen-qkvpacked-dim1-is-2",
        varlen_qkvpacked(qkv=lambda: rand(TOTAL, 2, H, D)),
        "qkv",
    ),
    Case("varlen-qkvpacked-dropout", varlen_qkvpacked(dropout_p=1.0), "dropout_p"),
    Case(
        "varlen-kvpacked-cu-k-int64",
        varlen_kvpacked(cu_seqlens_k=lambda: _cu([0, 3, 8], torch.int64)),
        "cu_seqlens_k",
        (TypeError,),
    ),
    Case(
        "varlen-kvpacked-cu-k-decreasing",
        varlen_kvpacked(cu_seqlens_k=lambda: _cu([0, 6, 5, 8])),
        "cu_seqlens_k",
    ),
    Case(
        "varlen-kvpacked-kv-other-device",
        varlen_kvpacked(kv=lambda: rand(TOTAL, 2, HK, D, device=OTHER_DEVICE)),
        "k",
    ),
    Case("varlen-kvpacked-nheads", varlen_kvpacked(kv=lambda: rand(TOTAL, 2, 3, D)), "nheads"),
    Case(
        "varlen-kvpacked-kv-dim1-is-3",
        varlen_kvpacked(kv=lambda: rand(TOTAL, 3, HK, D)),
        "kv",
    ),
    Case("varlen-kvpacked-window", varlen_kvpacked(window_size=(-2, -2)), "window_size"),
]


# ---------------------------------------------------------------------------------------------- kvcache
CAP = 16


def kvcache(**over):
    def build():
        a = dict(
            q=rand(B, 1, H, D),
            k_cache=rand(B, CAP, HK, D),
            v_cache=rand(B, CAP, HK, D),
        )
        kw = dict(k=rand(B, 1, HK, D), v=rand(B, 1, HK, D), cache_seqlens=_cu([3, 5]))
        for key, val in over.items():
            val = val() if callable(val) else val
            (a if key in a else kw)[key] = val
        return flash_attn_with_kvcache, tuple(a.values()), kw

    return build


def paged(**over):
    def build():
        page, nblocks = 16, 4
        a = dict(q=rand(B, 1, H, D), k_cache=rand(nblocks, page, HK, D), v_cache=rand(nblocks, page, HK, D))
        kw = dict(
            k=rand(B, 1, HK, D),
            v=rand(B, 1, HK, D),
            cache_seqlens=_cu([3, 20]),
            block_table=_cu([[2, 0], [1, 3]]),
        )
        for key, val in over.items():
            val = val() if callable(val) else val
            (a if key in a else kw)[key] = val
        return flash_attn_with_kvcache, tuple(a.values()), kw

    return build


KVCACHE = [
    Case("kvcache-q-float64", kvcache(q=lambda: rand(B, 1, H, D, dtype=torch.float64)), "q", (TypeError,)),
    Case("kvcache-q-rank3", kvcache(q=lambda: rand(B, H, D)), "q"),
    Case(
        "kvcache-kcache-dtype",
        kvcache(k_cache=lambda: rand(B, CAP, HK, D, dtype=torch.float16)),
        "k_cache",
        (TypeError,),
    ),
    Case(
        "kvcache-vcache-other-device",
        kvcache(v_cache=lambda: rand(B, CAP, HK, D, device=OTHER_DEVICE)),
        "v_cache",
    ),
    Case("kvcache-kcache-rank3", kvcache(k_cache=lambda: rand(B, CAP, D)), "k_cache"),
    Case(
        "kvcache-kcache-noncontig-last",
        kvcache(k_cache=lambda: _noncontig_last(rand(B, CAP, HK, D))),
        "k_cache",
    ),
    Case(
        "kvcache-vcache-noncontig-last",
        kvcache(v_cache=lambda: _noncontig_last(rand(B, CAP, HK, D))),
        "v_cache",
    ),
    Case("kvcache-kcache-headdim", kvcache(k_cache=lambda: rand(B, CAP, HK, D + 8)), "k_cache"),
    Case("kvcache-vcache-shape", kvcache(v_cache=lambda: rand(B, CAP + 1, HK, D)), "v_cache"),
    Case(
        "kvcache-kcache-batch-small",
        kvcache(k_cache=lambda: rand(1, CAP, HK, D), v_cache=lambda: rand(1, CAP, HK, D)),
        "k_cache",
    ),
    Case(
        "kvcache-headdim-over-256",
        kvcache(
            q=lambda: rand(B, 1, H, 272),
            k_cache=lambda: rand(B, CAP, HK, 272),
            v_cache=lambda: rand(B, CAP, HK, 272),
            k=None,
            v=None,
            cache_seqlens=None,
        ),
        "head dim",
    ),
    Case("kvcache-nheads-not-multiple", kvcache(q=lambda: rand(B, 1, 3, D)), "nheads"),
    Case("kvcache-k-without-v", kvcache(v=None), "k and v"),
    Case("kvcache-k-dtype", kvcache(k=lambda: rand(B, 1, HK, D, dtype=torch.float16)), "k", (TypeError,)),
    Case("kvcache-k-shape", kvcache(k=lambda: rand(B, 1, HK + 1, D)), "k"),
    Case("kvcache-v-seqlen", kvcache(v=lambda: rand(B, 2, HK, D)), "seqlen_new"),
    Case("kvcache-k-other-device", kvcache(k=lambda: rand(B, 1, HK, D, device=OTHER_DEVICE)), "k"),
    Case("kvcache-k-without-seqlens", kvcache(cache_seqlens=None), "cache_seqlens"),
    Case(
        "kvcache-seqlens-int64",
        kvcache(cache_seqlens=lambda: _cu([3, 5], torch.int64)),
        "cache_seqlens",
        (TypeError,),
    ),
    Case("kvcache-seqlens-float", kvcache(cache_seqlens=2.5), "cache_seqlens", (TypeError,)),
    Case("kvcache-seqlens-shape", kvcache(cache_seqlens=lambda: _cu([3, 5, 1])), "cache_seqlens"),
    Case("kvcache-seqlens-negative", kvcache(cache_seqlens=lambda: _cu([-1, 5])), "cache_seqlens"),
    Case("kvcache-seqlens-int-negative", kvcache(cache_seqlens=-2), "cache_seqlens"),
    Case("kvcache-overflow", kvcache(cache_seqlens=lambda: _cu([3, CAP])), "cache"),
    Case(
        "kvcache-overflow-int",
        kvcache(cache_seqlens=CAP - 1, k=lambda: rand(B, 2, HK, D), v=lambda: rand(B, 2, HK, D)),
        "cache",
    ),
    Case(
        "kvcache-overflow-no-new", kvcache(cache_seqlens=lambda: _cu([3, CAP + 1]), k=None, v=None), "cache"
    ),
    Case("kvcache-batch-idx-range", kvcache(cache_batch_idx=lambda: _cu([0, 2])), "cache_batch_idx"),
    Case(
        "kvcache-batch-idx-int64",
        kvcache(cache_batch_idx=lambda: _cu([0, 1], torch.int64)),
        "cache_batch_idx",
        (TypeError,),
    ),
    Case("kvcache-leftpad-gt-seqlens", kvcache(cache_leftpad=lambda: _cu([4, 0])), "cache_leftpad"),
    Case("kvcache-leftpad-negative", kvcache(cache_leftpad=lambda: _cu([0, -1])), "cache_leftpad"),
    Case(
        "kvcache-rotary-without-new-k",
        kvcache(k=None, v=None, rotary_cos=lambda: torch.rand(CAP, 4), rotary_sin=lambda: torch.rand(CAP, 4)),
        "rotary",
    ),
    Case("kvcache-rotary-cos-only", kvcache(rotary_cos=lambda: torch.rand(CAP, 4)), "rotary"),
    Case(
        "kvcache-rotary-dim-too-big",
        kvcache(rotary_cos=lambda: torch.rand(CAP, D), rotary_sin=lambda: torch.rand(CAP, D)),
        "rotary",
    ),
    Case(
        "kvcache-rotary-shape-mismatch",
        kvcache(rotary_cos=lambda: torch.rand(CAP, 4), rotary_sin=lambda: torch.rand(CAP, 2)),
        "rotary_sin",
    ),
    Case(
        "kvcache-rotary-table-too-short",
        kvcache(
            cache_seqlens=10,
            causal=True,
            rotary_cos=lambda: torch.rand(4, 4),
            rotary_sin=lambda: torch.rand(4, 4),
        ),
        "rotary",
    ),
    Case("kvcache-window", kvcache(window_size=(-2, 0)), "window_size"),
    Case("kvcache-softcap-negative", kvcache(softcap=-1.0), "softcap"),
    Case("kvcache-softmax-scale-nan", kvcache(softmax_scale=float("nan")), "softmax_scale"),
    Case("kvcache-alibi-shape", kvcache(alibi_slopes=lambda: torch.rand(H - 1)), "alibi_slopes"),
    Case(
        "kvcache-alibi-fp16",
        kvcache(alibi_slopes=lambda: torch.rand(H, dtype=torch.float16)),
        "alibi_slopes",
        (TypeError,),
    ),
    Case("paged-block-table-out-of-range", paged(block_table=lambda: _cu([[2, 0], [1, 4]])), "block_table"),
    Case("paged-block-table-negative", paged(block_table=lambda: _cu([[-1, 0], [1, 3]])), "block_table"),
    Case(
        "paged-block-table-int64",
        paged(block_table=lambda: _cu([[2, 0], [1, 3]], torch.int64)),
        "block_table",
        (TypeError,),
    ),
    Case("paged-block-table-rank1", paged(block_table=lambda: _cu([2, 0])), "block_table"),
    Case("paged-block-table-rows", paged(block_table=lambda: _cu([[2, 0]])), "block_table"),
    Case(
        "paged-block-table-other-device",
        paged(block_table=lambda: _cu([[2, 0], [1, 3]], device=OTHER_DEVICE)),
        "block_table",
    ),
    Case("paged-overflow", paged(cache_seqlens=lambda: _cu([3, 32])), "cache"),
    Case("paged-with-batch-idx", paged(cache_batch_idx=lambda: _cu([0, 1])), "cache_batch_idx"),
]
for _c in KVCACHE:
    _c.kvcache = True


# --------------------------------------------------------------------------------------- bert_padding
def unpad(hidden=None, mask=None, unused=None):
    def build():
        h = hidden() if hidden else rand(B, S, H, D)
        m = mask() if mask else torch.tensor([[1] * 5 + [0] * 3, [1] * 8], dtype=torch.bool)
        return unpad_input, (h, m), {} if unused is None else dict(unused_mask=unused())

    return build


def pad(hidden=None, indices=None, batch=B, seqlen=S):
    def build():
        h = hidden() if hidden else rand(6, H, D)
        idx = indices() if indices else torch.tensor([0, 1, 2, 8, 9, 10])
        return pad_input, (h, idx, batch, seqlen), {}

    return build


_NO_CHECK = "flash_attn.bert_padding.{fn} has no input validation: {what}"
BERT = [
    Case(
        "unpad-mask-shape",
        unpad(mask=lambda: torch.ones(B, S - 1, dtype=torch.bool)),
        "attention_mask",
    ),
    Case(
        "unpad-hidden-rank1",
        unpad(hidden=lambda: rand(B * S)),
        "hidden_states",
    ),
    Case(
        "unpad-mask-other-device",
        unpad(mask=lambda: torch.ones(B, S, dtype=torch.bool, device=OTHER_DEVICE)),
        "attention_mask",
    ),
    Case(
        "unpad-unused-mask-shape",
        unpad(unused=lambda: torch.zeros(B, S + 2, dtype=torch.bool)),
        "unused_mask",
    ),
    Case(
        "pad-indices-out-of-range",
        pad(indices=lambda: torch.tensor([0, 1, 2, 8, 9, B * S])),
        "indices",
    ),
    Case(
        "pad-indices-float",
        pad(indices=lambda: torch.tensor([0.0, 1, 2, 8, 9, 10])),
        "indices",
    ),
    Case(
        "pad-indices-length",
        pad(indices=lambda: torch.tensor([0, 1, 2])),
        "indices",
    ),
    Case(
        "pad-hidden-rank1",
        pad(hidden=lambda: rand(6)),
        "hidden_states",
    ),
]


# --------------------------------------------------------------------------------------------- rotary
RD = 8  # rotary dim


def rotary(x=None, cos=None, sin=None, **kw):
    def build():
        xx = x() if x else rand(B, S, H, D)
        c = cos() if cos else torch.rand(S, RD // 2)
        s = sin() if sin else torch.rand(S, RD // 2)
        return apply_rotary_emb, (xx, c, s), {k: (v() if callable(v) else v) for k, v in kw.items()}

    return build


ROTARY = [
    Case("rotary-x-int", rotary(x=lambda: torch.ones(B, S, H, D, dtype=torch.int32)), "x", (TypeError,)),
    Case("rotary-x-rank3", rotary(x=lambda: rand(S, H, D)), "x"),
    Case("rotary-cos-rank1", rotary(cos=lambda: torch.rand(S)), "cos"),
    Case(
        "rotary-cos-int", rotary(cos=lambda: torch.ones(S, RD // 2, dtype=torch.int32)), "cos", (TypeError,)
    ),
    Case("rotary-cos-other-device", rotary(cos=lambda: torch.rand(S, RD // 2, device=OTHER_DEVICE)), "cos"),
    Case("rotary-sin-shape", rotary(sin=lambda: torch.rand(S, RD // 2 + 1)), "sin"),
    Case(
        "rotary-dim-too-big", rotary(cos=lambda: torch.rand(S, D), sin=lambda: torch.rand(S, D)), "rotary_dim"
    ),
    Case(
        "rotary-table-too-short",
        rotary(cos=lambda: torch.rand(S - 1, RD // 2), sin=lambda: torch.rand(S - 1, RD // 2)),
        "seqlen_ro",
    ),
    Case("rotary-offset-overflow", rotary(seqlen_offsets=1), "seqlen_offsets"),
    Case("rotary-offset-negative", rotary(seqlen_offsets=-1), "seqlen_offsets"),
    Case("rotary-offset-float", rotary(seqlen_offsets=1.5), "seqlen_offsets", (TypeError,)),
    Case("rotary-offset-tensor-shape", rotary(seqlen_offsets=lambda: _cu([0, 0, 0])), "seqlen_offsets"),
    Case(
        "rotary-offset-tensor-float",
        rotary(seqlen_offsets=lambda: torch.zeros(B)),
        "seqlen_offsets",
        (TypeError,),
    ),
    Case(
        "rotary-inplace-bad-cos",
        rotary(inplace=True, cos=lambda: torch.rand(S, D), sin=lambda: torch.rand(S, D)),
        "rotary_dim",
    ),
    Case(
        "rotary-varlen-no-max",
        rotary(x=lambda: rand(TOTAL, H, D), cu_seqlens=lambda: cu_seqlens(LENS)),
        "max_seqlen",
    ),
    Case(
        "rotary-varlen-cu-float",
        rotary(x=lambda: rand(TOTAL, H, D), cu_seqlens=lambda: _cu([0, 3, 8], torch.float32), max_seqlen=5),
        "cu_seqlens",
        (TypeError,),
    ),
    Case("rotary-varlen-x-rank4", rotary(cu_seqlens=lambda: cu_seqlens(LENS), max_seqlen=5), "x"),
    Case(
        "rotary-varlen-cu-decreasing",
        rotary(x=lambda: rand(TOTAL, H, D), cu_seqlens=lambda: _cu([0, 6, 3, 8]), max_seqlen=6),
        "cu_seqlens",
    ),
]

#: bugs shared by several cases (case id -> reason), applied like ``Case.bug``
KNOWN_BUGS: dict[str, str] = {}
for _c in DENSE + PACKED + VARLEN + VARLEN_PACKED + KVCACHE:
    _c.bug = _c.bug or KNOWN_BUGS.get(_c.id)

ALL = DENSE + PACKED + VARLEN + VARLEN_PACKED + KVCACHE + BERT + ROTARY


def _params():
    out = []
    for c in ALL:
        marks = list(c.marks)
        if c.kvcache and not HAS_KVCACHE:
            marks.append(pytest.mark.skip(reason="fa-kvcache not installed (FA_COMPAT_SUBSET)"))
        if c.bug is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=c.bug))
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


@pytest.mark.parametrize("case", _params())
def test_invalid_input(case: Case):
    fn, args, kwargs = case.build()
    tensors = [t for t in _tensors((args, kwargs)) if t.device.type != "meta"]
    snapshots = [_bits(t) for t in tensors]
    with pytest.raises(case.exc) as exc:
        fn(*args, **kwargs)
    for i, (t, snap) in enumerate(zip(tensors, snapshots)):
        assert torch.equal(_bits(t), snap), f"{case.id}: argument tensor #{i} {tuple(t.shape)} was written"
    assert case.name in str(exc.value), f"{case.id}: message does not name {case.name!r}: {exc.value}"


def test_table_covers_every_public_function():
    covered = set()
    for c in ALL:
        fn = c.build()[0]
        covered.add(fn.__name__)
    expected = {
        "flash_attn_func",
        "flash_attn_qkvpacked_func",
        "flash_attn_kvpacked_func",
        "flash_attn_varlen_func",
        "flash_attn_varlen_qkvpacked_func",
        "flash_attn_varlen_kvpacked_func",
        "flash_attn_with_kvcache",
        "unpad_input",
        "pad_input",
        "apply_rotary_emb",
    }
    assert expected <= covered, expected - covered


def test_valid_baselines_run():
    """The unmodified inputs the cases start from are valid (each case changes exactly one thing)."""
    for build in (
        dense(),
        qkvpacked(),
        kvpacked(),
        varlen(),
        varlen_qkvpacked(),
        varlen_kvpacked(),
        rotary(),
    ):
        fn, args, kwargs = build()
        fn(*args, **kwargs)
    fn, args, kwargs = unpad()()
    fn(*args, **kwargs)
    fn, args, kwargs = pad()()
    fn(*args, **kwargs)
    fn, args, kwargs = _paged_varlen(lambda: _cu([[0], [1]]))()
    fn(*args, **kwargs)
    if HAS_KVCACHE:
        for build in (kvcache(), paged()):
            fn, args, kwargs = build()
            fn(*args, **kwargs)


# ------------------------------------------------------------------------------------ NaN ALiBi slopes
@pytest.mark.parametrize("where", ["all", "one-head"])
def test_nan_alibi_slopes_propagate_like_the_reference(where):
    """NaN ``alibi_slopes`` are NOT rejected, by decision: a value check would need a device sync on every call
    (slopes live on the GPU), flash-attn does not check them either, and a NaN slope does not hide anything:
    it propagates. The heads whose slope is NaN come out all-NaN, exactly where the reference has NaN, and the
    other heads are unaffected (the lse too). Documented in docs/design.md (NaN / Inf inputs)."""
    from fa_core.reference import attention_ref

    torch.manual_seed(0)
    q, k, v = _q(), _kv(), _kv()
    slopes = torch.rand(H, device=DEVICE, dtype=torch.float32)
    if where == "all":
        slopes.fill_(float("nan"))
    else:
        slopes[1] = float("nan")
    out, lse, _ = flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True)
    ref, ref_lse = attention_ref(q, k, v, alibi_slopes=slopes)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN pattern of out differs from the reference"
    nan_heads = torch.isnan(slopes)
    assert torch.isnan(out[:, :, nan_heads]).all(), "a NaN slope must give NaN outputs for its head"
    assert torch.isnan(lse[:, nan_heads]).all(), "a NaN slope must give a NaN lse for its head"
    ok = ~nan_heads
    if ok.any():
        torch.testing.assert_close(out[:, :, ok].float(), ref[:, :, ok].float(), atol=2e-3, rtol=0)
        assert not torch.isnan(lse[:, ok]).any()
