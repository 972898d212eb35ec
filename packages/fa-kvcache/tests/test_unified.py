"""unified_attention (mixed decode + prefill rows over a paged cache, one launch) and append_paged_kv against
the float32 reference (fa_core.reference.attention_ref per request, on the cache's pages gathered back), on
CPU through Triton's interpreter (float32 / float16) or on a GPU (float16).

The FP8 cache runs here too: the kernel converts each e4m3 K / V tile to q's dtype before the dot, which the
interpreter executes, or (the GPU path, forced here on float32 q) to fp16 with q rescaled and rounded to fp16;
the reference is computed on the dequantised cache (``k_cache.float() * k_descale``).
"""

from __future__ import annotations

import math

import pytest
import torch

from fa_core import settings
from fa_core.errors import FlashAttnValueError
from fa_core.reference import attention_ref
from fa_core.rotary_ref import apply_rotary_ref
from fa_kvcache.decode_configs import _sm_count, force_tile
from fa_kvcache.unified import append_paged_kv, plan_unified, unified_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: the interpreter runs float32 exactly; a GPU float32 dot rounds to TF32, so GPUs test float16
DTYPES = [torch.float16] if DEVICE == "cuda" else [torch.float32, torch.float16]
FP8 = torch.float8_e4m3fn


def _tol(dtype: torch.dtype) -> float:
    return 2e-3 if dtype == torch.float32 else 1.5e-2


def make_batch(
    qlens: list[int],
    klens: list[int],
    *,
    page: int,
    nheads: int = 4,
    nheads_k: int = 2,
    d: int = 32,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_blocks: int = 3,
) -> dict:
    """A paged cache holding every request's keys in shuffled pages, its block table (unused entries point at
    page 0), cu_seqlens_q and packed q."""
    g = torch.Generator().manual_seed(seed)
    need = [max(1, math.ceil(k / page)) for k in klens]
    nb = sum(need) + spare_blocks
    kc = torch.randn(nb, page, nheads_k, d, generator=g).to(dtype)
    vc = torch.randn(nb, page, nheads_k, d, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)
    cols = max(need) + 1
    bt = torch.zeros(len(klens), cols, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), nheads, d, generator=g).to(dtype)
    return dict(
        q=q.to(DEVICE),
        k_cache=kc.to(DEVICE),
        v_cache=vc.to(DEVICE),
        cu_seqlens_q=cu.to(DEVICE),
        seqused_k=torch.tensor(klens, dtype=torch.int32, device=DEVICE),
        max_seqlen_q=max(qlens),
        max_seqlen_k=max(klens),
        block_table=bt.to(DEVICE),
    )


def gather_keys(cache: torch.Tensor, bt_row: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``[0, n)`` of one request's keys, ``(n, nheads_k, d)``, read back through its block table."""
    return cache[bt_row.long()].reshape(-1, *cache.shape[2:])[:n]


def reference(a: dict, k_scale=None, v_scale=None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (total_q, nheads, dv), lse (nheads, total_q))`` of the float32 reference per request."""
    q, kc, vc, bt = a["q"], a["k_cache"], a["v_cache"], a["block_table"]
    cu = a["cu_seqlens_q"].tolist()
    lens = a["seqused_k"].tolist()
    alibi = kw.pop("alibi_slopes", None)
    out = torch.zeros(q.shape[0], q.shape[1], vc.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for b in range(len(lens)):
        k = gather_keys(kc, bt[b], lens[b]).float()
        v = gather_keys(vc, bt[b], lens[b]).float()
        if k_scale is not None:
            k = k * k_scale[b][None, :, None]
            v = v * v_scale[b][None, :, None]
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        o, l = attention_ref(q[None, cu[b] : cu[b + 1]].float(), k[None], v[None], alibi_slopes=slopes, **kw)
        out[cu[b] : cu[b + 1]] = o[0]
        lse[:, cu[b] : cu[b + 1]] = l[0]
    return out, lse


def check(a: dict, out: torch.Tensor, lse: torch.Tensor, tol: float, **ref_kw) -> None:
    ro, rl = reference(a, **ref_kw)
    assert out.shape == ro.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ro, atol=tol, rtol=tol)
    finite = torch.isfinite(rl)
    assert torch.equal(finite, torch.isfinite(lse)), "rows without visible keys must have lse = +inf"
    torch.testing.assert_close(lse[finite], rl[finite], atol=tol, rtol=tol)


# decode rows (1 query) and short runs (the small tile, split), a run of one full tile and a prefill chunk of
# several tiles (unsplit)
MIXED = ([1, 7, 1, 40, 1, 12], [70, 25, 1, 90, 130, 30])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("splits", [0, 1, 3, 8])
def test_mixed_batch(dtype, page, splits):
    a = make_batch(*MIXED, page=page, dtype=dtype, seed=page + splits)
    out, lse = unified_attention(**a, num_splits=splits, return_softmax_lse=True)
    check(a, out, lse, _tol(dtype), causal=True)


@pytest.mark.parametrize("block_n", [32, 64])
@pytest.mark.parametrize("preload", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_key_tiles_past_a_page(block_n, preload, splits, monkeypatch):
    """Key tiles larger than the page (16): one block-table entry per key, from the preloaded entries
    (``tl.gather``) or read in the key loop when they do not fit the preload."""
    import fa_kvcache.decode_configs as dc
    import fa_kvcache.unified as U

    if not preload:
        monkeypatch.setattr(dc, "MAX_BT_PRELOAD", 0)
    U.plan_unified.cache_clear()
    a = make_batch(*MIXED, page=16, seed=block_n + splits)
    with force_tile((block_n, 4, 2)):
        out, lse = unified_attention(**a, num_splits=splits, return_softmax_lse=True)
    U.plan_unified.cache_clear()
    check(a, out, lse, _tol(a["q"].dtype), causal=True, window_size=(-1, 0))


@pytest.mark.parametrize(
    "opts",
    [
        dict(window_size=(8, 0)),
        dict(window_size=(5, 3), causal=False),
        dict(causal=False),
        dict(softcap=7.0),
        dict(alibi=1),
        dict(alibi=2),
        dict(sink=True),
        dict(softmax_scale=0.3, window_size=(20, 0)),
    ],
    ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()),
)
@pytest.mark.parametrize("splits", [1, 3])
def test_options(opts, splits):
    opts = dict(opts)
    a = make_batch(*MIXED, page=16, seed=7)
    nheads = a["q"].shape[1]
    kw = {k: opts[k] for k in ("window_size", "causal", "softcap", "softmax_scale") if k in opts}
    kw.setdefault("causal", True)
    g = torch.Generator().manual_seed(3)
    alibi = opts.get("alibi")
    if alibi == 1:
        kw["alibi_slopes"] = (torch.rand(nheads, generator=g) * 0.3).to(DEVICE)
    elif alibi == 2:
        kw["alibi_slopes"] = (torch.rand(len(MIXED[0]), nheads, generator=g) * 0.3).to(DEVICE)
    ref_kw = dict(kw)
    if opts.get("sink"):
        kw["learnable_sink"] = ref_kw["learnable_sink"] = torch.randn(nheads, generator=g).to(DEVICE) * 2
    out, lse = unified_attention(**a, **kw, num_splits=splits, return_softmax_lse=True)
    check(a, out, lse, _tol(a["q"].dtype), **ref_kw)


@pytest.mark.parametrize("nheads,nheads_k", [(8, 1), (6, 2), (4, 4)])
def test_gqa_groups(nheads, nheads_k):
    """MQA, a group (3) that is not a power of two (padded rows), and no grouping."""
    a = make_batch([1, 12, 1], [50, 30, 17], page=16, nheads=nheads, nheads_k=nheads_k, seed=nheads)
    out, lse = unified_attention(**a, num_splits=3, return_softmax_lse=True)
    check(a, out, lse, _tol(a["q"].dtype), causal=True)


@pytest.mark.parametrize("d", [40, 64])
def test_head_dims(d):
    """A head dim that is not a power of two (masked channels) and a wider one."""
    a = make_batch([1, 9, 1], [33, 40, 64], page=16, d=d, seed=d)
    out, lse = unified_attention(**a, num_splits=3, return_softmax_lse=True)
    check(a, out, lse, _tol(a["q"].dtype), causal=True)


def test_more_queries_than_keys_and_empty_requests():
    """Rows above the causal diagonal (seqlen_q > seqlen_k) see no key: out 0, lse +inf; requests with no
    query rows or no keys."""
    a = make_batch([0, 6, 1, 2, 0], [10, 3, 0, 40, 0], page=16, seed=5)
    out, lse = unified_attention(**a, num_splits=3, return_softmax_lse=True)
    check(a, out, lse, _tol(a["q"].dtype), causal=True)
    assert (lse == float("inf")).any()


def test_out_buffer_and_plan_reuse():
    a = make_batch(*MIXED, page=16, seed=11)
    args = (
        6,
        a["q"].shape[0],
        40,
        130,
        4,
        2,
        32,
        32,
        16,
        a["block_table"].shape[1],
        3,
        _sm_count(a["q"].device),
    )
    flags = dict(is_local=True, interpret=settings.interpreting())
    plan = plan_unified(*args, **flags)
    assert plan is plan_unified(*args, **flags)
    assert plan.splits == 3 and plan.grid[2] == 3
    buf = torch.full_like(a["q"], float("nan"))
    out, lse = unified_attention(**a, out=buf, plan=plan, return_softmax_lse=True)
    assert out is buf
    check(a, out, lse, _tol(a["q"].dtype), causal=True)


def _fp8_batch(seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """MIXED with an FP8 e4m3 cache (values up to about +-17) and per-(request, kv head) descales."""
    a = make_batch(*MIXED, page=16, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(2)
    batch, nheads_k = len(MIXED[0]), a["k_cache"].shape[2]
    k_scale = (torch.rand(batch, nheads_k, generator=g) + 0.5).to(DEVICE)
    v_scale = (torch.rand(batch, nheads_k, generator=g) + 0.5).to(DEVICE)
    a["k_cache"] = (a["k_cache"] * 4).to(FP8)
    a["v_cache"] = (a["v_cache"] * 4).to(FP8)
    return a, k_scale, v_scale


def test_fp8_cache():
    """FP8 e4m3 cache with per-(request, kv head) descales: equal to attention on the dequantised cache."""
    if DEVICE == "cpu":
        qdt = torch.float32
    else:
        qdt = torch.float16
    a, k_scale, v_scale = _fp8_batch(21)
    a["q"] = a["q"].to(qdt)
    for splits in (1, 3):
        out, lse = unified_attention(
            **a, k_descale=k_scale, v_descale=v_scale, num_splits=splits, return_softmax_lse=True
        )
        check(a, out, lse, _tol(qdt), k_scale=k_scale, v_scale=v_scale, causal=True)


@pytest.mark.skipif(
    DEVICE == "cuda", reason="float32 q is CPU-only; test_unified_gpu.py runs this path on bf16 q"
)
@pytest.mark.parametrize("q_mul", [1.0, 1e6, 1e-6])
def test_fp8_cache_f16_dots(q_mul):
    """The GPU's FP8 path (``F16_DOTS``: q rescaled by a power of two and rounded to fp16 once per program,
    the e4m3 tiles converted to fp16, fp16 dots with fp32 accumulators), forced in the interpreter on float32
    q: equal to attention on the dequantised cache within the float16 tolerance, also for q far outside
    fp16's range (1e6: |q| up to ~5e6 > 65504) or below its normal range (1e-6), which the rescale brings
    back."""
    a, k_scale, v_scale = _fp8_batch(21)
    a["q"] = a["q"].to(torch.float32) * q_mul
    d = a["q"].shape[-1]
    scale = d**-0.5 / q_mul
    nheads, nheads_k = a["q"].shape[1], a["k_cache"].shape[2]
    for splits in (1, 3):
        plan = plan_unified(
            len(MIXED[0]), a["q"].shape[0], a["max_seqlen_q"], a["max_seqlen_k"], nheads, nheads_k, d, d, 16,
            a["block_table"].shape[1], splits, _sm_count(a["q"].device), is_local=True, fp8=True,
            interpret=settings.interpreting(),
        )  # fmt: skip
        plan = plan._replace(meta={**plan.meta, "F16_DOTS": True})
        out, lse = unified_attention(
            **a, k_descale=k_scale, v_descale=v_scale, softmax_scale=scale, return_softmax_lse=True, plan=plan
        )
        tol = _tol(torch.float16)
        check(a, out, lse, tol, k_scale=k_scale, v_scale=v_scale, causal=True, softmax_scale=scale)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("rotary", [None, "neox", "gptj"])
def test_append_then_attend(page, rotary):
    """append_paged_kv writes a mixed step's new rows (rotated k; q rotated alike) into the pages; attention
    over the appended cache matches the reference on the pages read back and on rotated inputs."""
    dtype = DTYPES[0]
    qlens = [1, 9, 1, 20]
    old = [30, 0, 17, 5]
    klens = [o + n for o, n in zip(old, qlens, strict=True)]
    a = make_batch(qlens, klens, page=page, dtype=dtype, seed=page)
    g = torch.Generator().manual_seed(9)
    total, hk, d = a["q"].shape[0], a["k_cache"].shape[2], a["k_cache"].shape[3]
    k_new = torch.randn(total, hk, d, generator=g).to(dtype).to(DEVICE)
    v_new = torch.randn(total, hk, d, generator=g).to(dtype).to(DEVICE)
    kw = {}
    if rotary:
        rd = 16
        cap = a["block_table"].shape[1] * page
        ang = torch.rand(cap, rd // 2, generator=g) * 6.28
        kw = dict(
            rotary_cos=ang.cos().to(dtype).to(DEVICE),
            rotary_sin=ang.sin().to(dtype).to(DEVICE),
            rotary_interleaved=rotary == "gptj",
        )
    before_k = a["k_cache"].clone()
    seqlens_old = torch.tensor(old, dtype=torch.int32, device=DEVICE)
    q0 = a["q"].clone()
    q_rot = append_paged_kv(
        k_new, v_new, a["k_cache"], a["v_cache"], a["block_table"], seqlens_old, a["cu_seqlens_q"],
        max(qlens), q=a["q"], **kw,
    )  # fmt: skip
    assert q_rot is not None
    cu = a["cu_seqlens_q"].tolist()
    for b in range(len(qlens)):
        got_k = gather_keys(a["k_cache"], a["block_table"][b], klens[b])
        got_v = gather_keys(a["v_cache"], a["block_table"][b], klens[b])
        exp_k = k_new[cu[b] : cu[b + 1]]
        exp_q = q0[cu[b] : cu[b + 1]]
        if rotary:
            exp_k = apply_rotary_ref(
                exp_k[None].float(), kw["rotary_cos"].float(), kw["rotary_sin"].float(), seqlen_offsets=old[b],
                interleaved=kw["rotary_interleaved"],
            )[0]  # fmt: skip
            exp_q = apply_rotary_ref(
                exp_q[None].float(), kw["rotary_cos"].float(), kw["rotary_sin"].float(), seqlen_offsets=old[b],
                interleaved=kw["rotary_interleaved"],
            )[0]  # fmt: skip
        tol = _tol(dtype)
        torch.testing.assert_close(got_k[old[b] :].float(), exp_k.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(got_v[old[b] :], v_new[cu[b] : cu[b + 1]])
        # rows before the append are untouched
        torch.testing.assert_close(got_k[: old[b]], gather_keys(before_k, a["block_table"][b], old[b]))
        torch.testing.assert_close(q_rot[cu[b] : cu[b + 1]].float(), exp_q.float(), atol=tol, rtol=tol)
    a["q"] = q_rot
    out, lse = unified_attention(**a, num_splits=3, return_softmax_lse=True)
    check(a, out, lse, _tol(dtype), causal=True)


def test_append_fp8_quantizes_with_scales():
    """Into an FP8 cache, append_paged_kv stores k / k_scale rounded to e4m3 (saturated at 448); attention
    over it with k_descale = k_scale equals the reference on the dequantised cache."""
    dtype = DTYPES[0]
    qlens, old = [1, 6, 1], [20, 3, 40]
    klens = [o + n for o, n in zip(old, qlens, strict=True)]
    a = make_batch(qlens, klens, page=16, dtype=torch.float32, seed=4)
    a["q"] = a["q"].to(dtype)
    a["k_cache"] = a["k_cache"].to(FP8)
    a["v_cache"] = a["v_cache"].to(FP8)
    g = torch.Generator().manual_seed(1)
    total, hk, d = a["q"].shape[0], 2, a["k_cache"].shape[3]
    k_new = (torch.randn(total, hk, d, generator=g) * 3).to(dtype).to(DEVICE)
    v_new = (torch.randn(total, hk, d, generator=g) * 3).to(dtype).to(DEVICE)
    k_new[0, 0, 0] = 5000.0  # saturates
    k_scale = (torch.rand(3, hk, generator=g) * 0.02 + 0.01).to(DEVICE)
    v_scale = (torch.rand(3, hk, generator=g) * 0.02 + 0.01).to(DEVICE)
    seq_old = torch.tensor(old, dtype=torch.int32, device=DEVICE)
    append_paged_kv(
        k_new, v_new, a["k_cache"], a["v_cache"], a["block_table"], seq_old, a["cu_seqlens_q"], 6,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    cu = a["cu_seqlens_q"].tolist()
    for b in range(3):
        got = gather_keys(a["k_cache"], a["block_table"][b], klens[b])[old[b] :].float()
        exp = (k_new[cu[b] : cu[b + 1]].float() / k_scale[b][None, :, None]).clamp(-448, 448)
        # round to nearest even at e4m3's precision, as torch's cast; below the normal range (2^-6) within
        # the subnormal step 2^-9
        normal = exp.abs() >= 2**-6
        assert torch.equal(got[normal], exp.to(FP8).float()[normal])
        assert ((got - exp).abs()[~normal] <= 2**-9).all()
        assert got.abs().max() <= 448
    assert float(gather_keys(a["k_cache"], a["block_table"][0], klens[0])[old[0], 0, 0].float()) == 448.0
    out, lse = unified_attention(**a, k_descale=k_scale, v_descale=v_scale, return_softmax_lse=True)
    check(a, out, lse, _tol(dtype), k_scale=k_scale, v_scale=v_scale, causal=True)


# ------------------------------------------------------------------------------------------ bad inputs


def _args():
    return make_batch([1, 3], [10, 20], page=16, seed=1)


@pytest.mark.parametrize(
    "name,change,exc",
    [
        ("cu_seqlens_q", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError),
        ("seqused_k", lambda a: a.update(seqused_k=a["seqused_k"][:1]), FlashAttnValueError),
        ("block_table", lambda a: a.update(block_table=a["block_table"].long()), TypeError),
        ("block_table", lambda a: a.update(block_table=a["block_table"][:1]), FlashAttnValueError),
        ("k_cache", lambda a: a.update(k_cache=a["k_cache"][:, :8]), FlashAttnValueError),
        ("k_cache", lambda a: a.update(k_cache=a["k_cache"].half()), TypeError),
        ("max_seqlen_q", lambda a: a.update(max_seqlen_q=-1), FlashAttnValueError),
        ("k_descale", lambda a: a.update(k_descale=torch.ones(2, 2, device=DEVICE)), FlashAttnValueError),
    ],
)
def test_argument_errors_name_the_argument(name, change, exc):
    a = _args()
    if name == "k_cache" and a["q"].dtype == torch.float16:
        a["q"], a["k_cache"], a["v_cache"] = a["q"].float(), a["k_cache"].float(), a["v_cache"].float()
    change(a)
    with pytest.raises(exc, match=name):
        unified_attention(**a)


def test_fp8_needs_descales():
    a = _args()
    a["k_cache"], a["v_cache"] = a["k_cache"].to(FP8), a["v_cache"].to(FP8)
    with pytest.raises(FlashAttnValueError, match="k_descale"):
        unified_attention(**a)


@pytest.mark.parametrize(
    "name,change",
    [
        ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].copy_(torch.tensor([0, 3, 5]))),
        ("max_seqlen_q", lambda a: a.update(max_seqlen_q=2)),
        ("seqused_k", lambda a: a["seqused_k"].copy_(torch.tensor([10, 99]))),
        ("max_seqlen_k", lambda a: a.update(max_seqlen_k=15)),
        ("block_table", lambda a: a["block_table"].__setitem__((0, 0), 1000)),
    ],
)
def test_value_errors(name, change):
    a = _args()
    change(a)
    with pytest.raises(FlashAttnValueError, match=name):
        unified_attention(**a)
    with settings.override(value_checks=False):
        unified_attention(**a)  # no check, no fault


# ------------------------------------------------------------------------------------------ memory safety

GUARD = 2


def _guarded(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pool, view)``: ``t`` copied into a pool with GUARD NaN rows on each side, viewed back."""
    pool = torch.full((t.shape[0] + 2 * GUARD, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    view = pool[GUARD : GUARD + t.shape[0]]
    view.copy_(t)
    return pool, view


def _guards(pool: torch.Tensor) -> torch.Tensor:
    return torch.cat([pool[:GUARD], pool[-GUARD:]]).clone()


I32_MAX, I32_MIN = 2**31 - 1, -(2**31)


@pytest.mark.parametrize(
    "field,values",
    [
        ("cu_seqlens_q", [0, 500, 4, 5]),
        ("cu_seqlens_q", [0, -7, 4, 5]),
        ("cu_seqlens_q", [I32_MAX, 0, I32_MIN, 5]),
        ("seqused_k", [I32_MAX, -5, 3]),
        ("seqused_k", [1000, 1000, 1000]),
        ("block_table", None),
    ],
)
@pytest.mark.parametrize("splits", [1, 3])
def test_garbage_indices_stay_inside(field, values, splits):
    """Value checks off: bad index values give some output but never touch memory outside the tensors (the
    caches and out are views into NaN-guarded pools: a stray read would put NaN into out, a stray write
    would change a guard)."""
    a = make_batch([1, 3, 1], [10, 20, 40], page=16, seed=2)
    kpool, a["k_cache"] = _guarded(a["k_cache"])
    vpool, a["v_cache"] = _guarded(a["v_cache"])
    opool, out = _guarded(torch.zeros(a["q"].shape[0], 4, 32, dtype=a["q"].dtype, device=DEVICE))
    guards = [_guards(p) for p in (kpool, vpool, opool)]
    if field == "block_table":
        bt = a["block_table"]
        bt.copy_(
            torch.tensor([[I32_MAX, -1, 7, I32_MIN][: bt.shape[1]]] * 3, dtype=torch.int64).to(torch.int32)
        )
    else:
        a[field] = torch.tensor(values, dtype=torch.int64).to(torch.int32).to(DEVICE)
    with settings.override(value_checks=False):
        res = unified_attention(**a, out=out, num_splits=splits)
    assert isinstance(res, torch.Tensor) and torch.isfinite(res).all()
    for p, gd in zip((kpool, vpool, opool), guards, strict=True):
        assert torch.equal(_guards(p).isnan(), gd.isnan())


def test_append_garbage_indices_stay_inside():
    a = make_batch([1, 3], [10, 20], page=16, seed=3)
    kpool, a["k_cache"] = _guarded(a["k_cache"])
    vpool, a["v_cache"] = _guarded(a["v_cache"])
    k_new = torch.randn(4, 2, 32).to(a["q"].dtype).to(DEVICE)
    bt = a["block_table"]
    bt.copy_(torch.tensor([[I32_MAX, -1, 5][: bt.shape[1]]] * 2, dtype=torch.int64).to(torch.int32))
    seq = torch.tensor([I32_MAX, -9], dtype=torch.int64).to(torch.int32).to(DEVICE)
    cu = torch.tensor([0, 900, -4], dtype=torch.int32, device=DEVICE)
    with settings.override(value_checks=False):
        append_paged_kv(k_new, k_new.clone(), a["k_cache"], a["v_cache"], bt, seq, cu, 8)
    for p in (kpool, vpool):
        g = _guards(p)
        assert g.isnan().all()
        assert torch.isfinite(p[GUARD:-GUARD]).all()
