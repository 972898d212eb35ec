"""merge_attention_states against a float64 PyTorch merge, and cascade_decode against the plain
flash_attn_with_kvcache over the full context and against fa_core.reference.attention_ref.

CPU: kernels through Triton's interpreter (fp32 / fp16, small shapes). GPU-only cases live in
test_merge_cascade_gpu.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fa_core import settings
from fa_core.errors import FlashAttnValueError
from fa_core.reference import attention_ref
from fa_core.testing import assert_close_2x
from fa_kvcache import PagedKVCache, flash_attn_with_kvcache
from fa_kvcache.cascade import CascadePlan, cascade_decode, cascade_plan_from_cache
from fa_kvcache.merge import merge_attention_states

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]
#: the dtype of the single-dtype cases: float32 in the interpreter, float16 on a GPU (no float32 attention there)
FDT = torch.float32 if DEVICE == "cpu" else torch.float16
#: cascade vs the plain call: a few ulps of the output dtype
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
INF = float("inf")

if DEVICE == "cuda":
    pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter + CUDA")


# ------------------------------------------------------------------------------------------------ merge


def merge_ref(oa, la, ob, lb):
    """float64 merge; lse layout (*lead, h, s) -> moved to (*lead, s, h) to weight out's rows."""
    oa, ob = oa.double(), ob.double()
    la, lb = la.double().transpose(-1, -2), lb.double().transpose(-1, -2)
    a_ok, b_ok = torch.isfinite(la), torch.isfinite(lb)
    la = torch.where(a_ok, la, -INF)
    lb = torch.where(b_ok, lb, -INF)
    lse = torch.logaddexp(la, lb)
    any_ok = a_ok | b_ok
    lse_s = torch.where(any_ok, lse, 0.0)
    wa = torch.where(a_ok, torch.exp(la - lse_s), 0.0)[..., None]
    wb = torch.where(b_ok, torch.exp(lb - lse_s), 0.0)[..., None]
    out = torch.where(a_ok[..., None], oa, 0.0) * wa + torch.where(b_ok[..., None], ob, 0.0) * wb
    return out, torch.where(any_ok, lse, INF).transpose(-1, -2)


def _states(lead, s, h, d, dtype, p_empty=0.2, gen=None):
    oa = torch.randn(*lead, s, h, d, generator=gen).to(dtype)
    ob = torch.randn(*lead, s, h, d, generator=gen).to(dtype)
    la = torch.randn(*lead, h, s, generator=gen) * 3
    lb = torch.randn(*lead, h, s, generator=gen) * 3 + 1
    for lse in (la, lb):
        empty = torch.rand(lse.shape, generator=gen) < p_empty
        sign = torch.rand(lse.shape, generator=gen) < 0.5
        lse[empty & sign] = INF  # flash-attn >= 2.1: out 0, lse +inf
        lse[empty & ~sign] = -INF
    # the empty side's out is never read: poison it
    oa.transpose(-2, -3)[torch.isinf(la)] = float("nan")
    ob.transpose(-2, -3)[torch.isinf(lb)] = float("nan")
    return oa.to(DEVICE), la.to(DEVICE), ob.to(DEVICE), lb.to(DEVICE)


def _check_merge(out, lse, oa, la, ob, lb):
    ro, rl = merge_ref(oa, la, ob, lb)
    assert lse.dtype == torch.float32 and lse.shape == la.shape and out.shape == oa.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)) and (lse[torch.isinf(lse)] > 0).all()
    fin = ~torch.isinf(rl)
    torch.testing.assert_close(
        lse[fin].double(), rl[fin].cpu() if DEVICE == "cpu" else rl[fin], atol=2e-6, rtol=2e-6
    )
    tol = 1e-5 if out.dtype == torch.float32 else (1e-3 if out.dtype == torch.float16 else 8e-3)
    torch.testing.assert_close(out.double(), ro, atol=tol, rtol=tol)
    # exact where one side is empty: the other side's out and lse, bit for bit
    a_only = torch.isfinite(la) & ~torch.isfinite(lb)
    b_only = torch.isfinite(lb) & ~torch.isfinite(la)
    assert torch.equal(lse[a_only], la[a_only]) and torch.equal(lse[b_only], lb[b_only])
    a_rows, b_rows = a_only.transpose(-1, -2), b_only.transpose(-1, -2)
    assert torch.equal(out[a_rows], oa[a_rows].to(out.dtype))
    assert torch.equal(out[b_rows], ob[b_rows].to(out.dtype))
    both = ~torch.isfinite(la) & ~torch.isfinite(lb)
    assert (out[both.transpose(-1, -2)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,s,h,d",
    [
        ((2,), 3, 4, 32),  # (batch, seqlen_q, nheads, headdim) / lse (batch, nheads, seqlen_q)
        ((), 37, 8, 64),  # varlen: (total_q, nheads, headdim) / lse (nheads, total_q)
        ((3,), 1, 32, 128),  # decode, GQA-like head count
        ((2, 3), 2, 6, 40),  # two leading dims, headdim not a power of two
        ((2, 2, 2), 3, 3, 16),  # three leading dims (merged by a view)
    ],
)
def test_merge_matches_float64(dtype, lead, s, h, d):
    gen = torch.Generator().manual_seed(hash((lead, s, h, d)) % 2**31)
    oa, la, ob, lb = _states(lead, s, h, d, dtype, gen=gen)
    out, lse = merge_attention_states(oa, la, ob, lb)
    assert out.dtype == dtype
    _check_merge(out, lse, oa, la, ob, lb)


def test_merge_all_empty_patterns():
    """Every (a, b) pair of {finite, +inf, -inf} lse, with NaN-poisoned out on the empty side."""
    vals = [0.7, INF, -INF]
    pairs = [(x, y) for x in vals for y in vals]
    n = len(pairs)
    la = torch.tensor([p[0] for p in pairs]).reshape(1, n, 1).to(DEVICE)  # (batch 1, heads n, seqlen 1)
    lb = torch.tensor([p[1] for p in pairs]).reshape(1, n, 1).to(DEVICE)
    oa = torch.randn(1, 1, n, 16, device=DEVICE)
    ob = torch.randn(1, 1, n, 16, device=DEVICE)
    oa[0, 0, torch.isinf(la[0, :, 0])] = float("nan")
    ob[0, 0, torch.isinf(lb[0, :, 0])] = float("nan")
    out, lse = merge_attention_states(oa, la, ob, lb)
    _check_merge(out, lse, oa, la, ob, lb)
    # finite + finite: equal lse -> log 2 above, the mean of the outs
    assert abs(lse[0, 0, 0].item() - (0.7 + math.log(2))) < 1e-6
    torch.testing.assert_close(out[0, 0, 0], (oa[0, 0, 0] + ob[0, 0, 0]) / 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_strided_inputs_and_outputs(dtype):
    """Non-contiguous views everywhere (transposed lse, sliced heads / batch, a strided last dim copied),
    out written into a slice of a larger buffer, in-place into out_a, mixed input dtypes."""
    gen = torch.Generator().manual_seed(3)
    b, s, h, d = 3, 5, 6, 32
    big_a = torch.randn(b * 2, s, h + 2, d + 8, generator=gen).to(dtype).to(DEVICE)
    oa = big_a[::2, :, 1 : h + 1, :d]
    ob = torch.randn(b, h, s, d, generator=gen).to(DEVICE).transpose(1, 2)  # float32, strided
    la = torch.randn(b, s, h, generator=gen).to(DEVICE).transpose(1, 2)  # (b, h, s) non-contiguous
    lb = (torch.randn(h, b, s, generator=gen) + 1).to(DEVICE).permute(1, 0, 2)
    la[0, 2, 1] = INF
    lb[2, 0, 4] = -INF
    buf = torch.full((b, s, h, 2 * d), float("nan"), dtype=dtype, device=DEVICE)
    lse_buf = torch.full((b, s, h), float("nan"), device=DEVICE)
    out, lse = merge_attention_states(oa, la, ob, lb, out=buf[..., d:], out_lse=lse_buf.transpose(1, 2))
    assert out.data_ptr() == buf[..., d:].data_ptr() and torch.isnan(buf[..., :d]).all()
    assert out.dtype == dtype
    _check_merge(out, lse, oa, la, ob, lb)
    torch.testing.assert_close(lse_buf.transpose(1, 2), lse)

    # default dtype: promoted (fp16/bf16 + fp32 -> fp32)
    out2, _ = merge_attention_states(oa, la, ob, lb)
    assert out2.dtype == torch.promote_types(dtype, torch.float32)

    # a strided last dim is copied (inputs)
    oc = torch.randn(b, s, h, 2 * d, generator=gen).to(dtype).to(DEVICE)[..., ::2]
    out3, lse3 = merge_attention_states(oc, la, ob, lb)
    _check_merge(out3, lse3, oc, la, ob, lb)

    # in place: out = out_a, out_lse = lse_a
    oa_c, la_c = oa.clone(), la.clone()
    ref_o, ref_l = merge_attention_states(oa_c, la_c, ob, lb)
    out4, lse4 = merge_attention_states(oa_c, la_c, ob, lb, out=oa_c, out_lse=la_c)
    assert out4.data_ptr() == oa_c.data_ptr()
    assert torch.equal(oa_c, ref_o.to(dtype)) and torch.equal(la_c, ref_l)


def test_merge_bad_arguments():
    oa = torch.randn(2, 3, 4, 16, device=DEVICE)
    la = torch.randn(2, 4, 3, device=DEVICE)
    with pytest.raises(FlashAttnValueError, match="lse_a"):
        merge_attention_states(oa, la.transpose(1, 2), oa, la)  # (b, s, h): not flash-attn's layout
    with pytest.raises(FlashAttnValueError, match="out_b"):
        merge_attention_states(oa, la, oa[:1], la)
    with pytest.raises(TypeError, match="lse_b"):
        merge_attention_states(oa, la, oa, la.double())
    with pytest.raises(FlashAttnValueError, match="out must"):
        merge_attention_states(oa, la, oa, la, out=oa[:, :2])
    with pytest.raises(FlashAttnValueError, match="out must have a contiguous last"):
        merge_attention_states(oa, la, oa, la, out=torch.empty(2, 3, 4, 32, device=DEVICE)[..., ::2])
    with pytest.raises(FlashAttnValueError, match="at least 3"):
        merge_attention_states(oa[0, 0], la[0, :, 0], oa[0, 0], la[0, :, 0])
    # nothing written on a refused call
    dst = torch.full_like(oa, 7.0)
    with pytest.raises(TypeError):
        merge_attention_states(oa, la, oa, la, out=dst, out_lse=torch.empty(2, 4, 3, device=DEVICE).half())
    assert (dst == 7).all()
    # empty tensors
    e = torch.empty(0, 3, 4, 16, device=DEVICE)
    out, lse = merge_attention_states(
        e, torch.empty(0, 4, 3, device=DEVICE), e, torch.empty(0, 4, 3, device=DEVICE)
    )
    assert out.shape == e.shape and lse.shape == (0, 4, 3)


# ---------------------------------------------------------------------------------------------- cascade


def _cascade_case(
    *,
    page,
    prefix_pages,
    request_group,
    suffix_lens,
    seqlen_q=1,
    seqlen_new=0,
    nheads=4,
    nheads_k=2,
    d=32,
    dtype=FDT,
    seed=0,
):
    """A shared page pool: group g's prefix is ``prefix_pages[g]`` full pages, request b owns pages for
    ``suffix_lens[b] + seqlen_new`` tokens. Returns the tensors and the full-context block table."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(request_group)
    own = [max(1, -(-(n + seqlen_new) // page)) for n in suffix_lens]
    num_blocks = sum(prefix_pages) + sum(own) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    prefix_rows = [[perm.pop() for _ in range(n)] for n in prefix_pages]
    own_rows = [[perm.pop() for _ in range(n)] for n in own]

    def table(rows):
        w = max(1, max(len(r) for r in rows))
        return torch.tensor([r + [0] * (w - len(r)) for r in rows], dtype=torch.int32, device=DEVICE)

    full_rows = [prefix_rows[g] + own_rows[b] for b, g in enumerate(request_group)]
    kc = torch.randn(num_blocks, page, nheads_k, d, generator=gen).to(dtype).to(DEVICE)
    vc = torch.randn(num_blocks, page, nheads_k, d, generator=gen).to(dtype).to(DEVICE)
    q = torch.randn(batch, seqlen_q, nheads, d, generator=gen).to(dtype).to(DEVICE)
    kn = vn = None
    if seqlen_new:
        kn = torch.randn(batch, seqlen_new, nheads_k, d, generator=gen).to(dtype).to(DEVICE)
        vn = torch.randn(batch, seqlen_new, nheads_k, d, generator=gen).to(dtype).to(DEVICE)
    prefix_lens = torch.tensor([n * page for n in prefix_pages], dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor(suffix_lens, dtype=torch.int32, device=DEVICE)
    plan = CascadePlan.build(request_group, table(prefix_rows), prefix_lens, table(own_rows), seqlens)
    full_lens = torch.tensor(
        [prefix_pages[g] * page + suffix_lens[b] for b, g in enumerate(request_group)],
        dtype=torch.int32,
        device=DEVICE,
    )
    return dict(q=q, kc=kc, vc=vc, k=kn, v=vn, plan=plan, full_bt=table(full_rows), full_lens=full_lens)


def _gathered(kc, bt_row, n):
    page = kc.shape[1]
    idx = torch.arange(n, device=kc.device)
    return kc[bt_row.long()[idx // page], idx % page]


def _check_cascade(
    case, dtype, causal=False, softcap=0.0, softmax_scale=None, sink=None, window_size=(-1, -1)
):
    q, kc, vc, plan = case["q"], case["kc"], case["vc"], case["plan"]
    k, v = case["k"], case["v"]
    kc0, vc0 = kc.clone(), vc.clone()  # the plain call appends into its own copy
    kw = dict(causal=causal, softcap=softcap, softmax_scale=softmax_scale, window_size=window_size)
    out, lse = cascade_decode(q, kc, vc, plan, k, v, return_softmax_lse=True, learnable_sink=sink, **kw)
    ref_o, ref_l = flash_attn_with_kvcache(
        q,
        kc0,
        vc0,
        k,
        v,
        cache_seqlens=case["full_lens"],
        block_table=case["full_bt"],
        return_softmax_lse=True,
        learnable_sink=sink,
        **kw,
    )
    assert out.shape == ref_o.shape and lse.shape == ref_l.shape
    # the same cache after the append
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref_o.float(), atol=tol, rtol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l))
    fin = torch.isfinite(ref_l)
    torch.testing.assert_close(lse[fin], ref_l[fin], atol=1e-4, rtol=1e-5)
    # and against the float64 reference on each request's gathered context
    seqlen_new = 0 if k is None else k.shape[1]
    for b in range(q.shape[0]):
        n = int(case["full_lens"][b]) + seqlen_new
        kb = _gathered(kc, case["full_bt"][b], n)[None]
        vb = _gathered(vc, case["full_bt"][b], n)[None]
        ro, rl = attention_ref(q[b : b + 1], kb, vb, dtype=torch.float64, learnable_sink=sink, **kw)
        lo, _ = attention_ref(q[b : b + 1], kb, vb, upcast=False, learnable_sink=sink, **kw)
        assert_close_2x(out[b : b + 1], ro, lo, name=f"out[{b}]")
        assert_close_2x(lse[b : b + 1], rl, rl, name=f"lse[{b}]", slack=1e-4)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [16, 64])
def test_cascade_groups_of_different_sizes(dtype, page):
    """Groups of 3, 1 and 2 requests interleaved in the batch (gathered layout); group 1 has no prefix; one
    request has an empty suffix (decode, seqlen_q 1); with page 64 a learnable sink (its prefix-less group
    then gets the sink alone from the prefix call)."""
    case = _cascade_case(
        page=page,
        prefix_pages=[2, 0, 1],
        request_group=[0, 1, 0, 2, 0, 2],
        suffix_lens=[5, 40, 0, 17, page + 3, 1],
        dtype=dtype,
        seed=page,
    )
    assert case["plan"].request_group is not None and case["plan"].group_size == 3
    sink = torch.randn(4).to(DEVICE) if page == 64 else None
    _check_cascade(case, dtype, sink=sink)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cascade_contiguous_groups_causal_chunk(dtype):
    """Two groups of two contiguous requests (no-copy layout), seqlen_q 3 causal, GQA 3, softcap + scale."""
    case = _cascade_case(
        page=16,
        prefix_pages=[3, 1],
        request_group=[0, 0, 1, 1],
        suffix_lens=[2, 20, 9, 33],
        seqlen_q=3,
        nheads=6,
        nheads_k=2,
        dtype=dtype,
        seed=5,
    )
    assert case["plan"].request_group is None and case["plan"].slot_request is None
    _check_cascade(case, dtype, causal=True, softcap=4.0, softmax_scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cascade_append_and_sink(dtype):
    """New k/v appended into the suffix pages (one with an empty suffix before the append), causal decode of
    2 tokens, a learnable sink counted once."""
    case = _cascade_case(
        page=16,
        prefix_pages=[2],
        request_group=[0, 0, 0],
        suffix_lens=[0, 15, 30],
        seqlen_q=2,
        seqlen_new=2,
        dtype=dtype,
        seed=7,
    )
    sink = torch.randn(4).to(DEVICE)
    _check_cascade(case, dtype, causal=True, sink=sink)


def test_cascade_right_window():
    """Non-causal with a right window (-1, 1), 3 query rows: suffixes of >= 1 token keep the prefix whole."""
    case = _cascade_case(
        page=16, prefix_pages=[1, 2], request_group=[1, 0, 1], suffix_lens=[1, 7, 30], seqlen_q=3, seed=21
    )
    _check_cascade(case, FDT, window_size=(-1, 1))


def test_cascade_all_empty_rows():
    """No prefix and no suffix: out 0 and lse +inf, as the plain call; prefix only: equal to it."""
    case = _cascade_case(page=16, prefix_pages=[0, 1], request_group=[0, 1], suffix_lens=[0, 0], seed=9)
    out, lse = _check_cascade(case, FDT)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all() and (lse[0] > 0).all()


def test_cascade_from_cache_manager():
    """Two prompts, forked into 3 and 2 samples (one fork still sharing a partial last page), each sample
    with its own tokens; a lone sequence; the plan read from the manager; a decode step appending one token."""
    page, hk, d = 16, 2, 32
    cache = PagedKVCache(64, page, hk, d, dtype=FDT, device=DEVICE)
    gen = torch.Generator().manual_seed(11)

    def put(sid, n):
        cache.append(
            sid,
            torch.randn(n, hk, d, generator=gen).to(DEVICE),
            torch.randn(n, hk, d, generator=gen).to(DEVICE),
        )

    cache.add_sequence("p0")
    put("p0", 3 * page + 5)  # partial last page, shared by the forks until they write
    cache.add_sequence("p1")
    put("p1", 2 * page)
    cache.add_sequence("solo")
    put("solo", 21)
    for i in range(3):
        cache.fork("p0", f"a{i}")
    for i in range(2):
        cache.fork("p1", f"b{i}")
    put("a0", 7)  # copy-on-write of the shared partial page
    put("a1", 30)
    put("b0", 1)
    put("b1", page)
    # a2 writes nothing: its suffix is the still-shared partial page
    seq_ids = ["b0", "a0", "solo", "a1", "b1", "a2"]
    block_table, seqlens = cache.prepare_append(seq_ids, 1)
    plan = cascade_plan_from_cache(cache, seq_ids, num_new=1)
    assert plan.num_groups == 3 and plan.group_size == 3
    assert plan.prefix_lens.tolist() == [2 * page, 3 * page, 0]
    assert plan.cache_seqlens.tolist() == [1, 5 + 7, 21, 5 + 30, page, 5]
    q = torch.randn(len(seq_ids), 1, 4, d, generator=gen).to(FDT).to(DEVICE)
    kn = torch.randn(len(seq_ids), 1, hk, d, generator=gen).to(FDT).to(DEVICE)
    vn = torch.randn(len(seq_ids), 1, hk, d, generator=gen).to(FDT).to(DEVICE)
    kc0, vc0 = cache.k_cache.clone(), cache.v_cache.clone()
    out, lse = cascade_decode(
        q, cache.k_cache, cache.v_cache, plan, kn, vn, causal=True, return_softmax_lse=True
    )
    ref_o, ref_l = flash_attn_with_kvcache(
        q,
        kc0,
        vc0,
        kn,
        vn,
        cache_seqlens=seqlens,
        block_table=block_table,
        causal=True,
        return_softmax_lse=True,
    )
    assert torch.equal(cache.k_cache, kc0) and torch.equal(cache.v_cache, vc0)
    torch.testing.assert_close(out, ref_o, atol=TOL[FDT], rtol=TOL[FDT])
    torch.testing.assert_close(lse, ref_l, atol=1e-4, rtol=1e-5)
    for b, sid in enumerate(seq_ids):
        kb, vb = cache.gather(sid)
        ro, _ = attention_ref(q[b : b + 1], kb[None], vb[None], causal=True, dtype=torch.float64)
        lo, _ = attention_ref(q[b : b + 1], kb[None], vb[None], causal=True, upcast=False)
        assert_close_2x(out[b : b + 1], ro, lo, name=f"out[{b}]")
    # explicit groups: "solo" joins the p1 samples (no common page: that group's prefix is empty)
    plan2 = cascade_plan_from_cache(cache, seq_ids, groups=[1, 0, 1, 0, 1, 0])
    assert plan2.prefix_lens.tolist() == [0, 3 * page]


def test_cascade_refusals():
    case = _cascade_case(page=16, prefix_pages=[1], request_group=[0, 0], suffix_lens=[0, 3], seqlen_q=3)
    q, kc, vc, plan = case["q"], case["kc"], case["vc"], case["plan"]
    with pytest.raises(FlashAttnValueError, match="alibi_slopes"):
        cascade_decode(q, kc, vc, plan, alibi_slopes=torch.ones(4, device=DEVICE))
    with pytest.raises(FlashAttnValueError, match="window_size"):
        cascade_decode(q, kc, vc, plan, window_size=(8, 0))
    # causal, 3 query rows, a suffix of 0 tokens: the first rows would not see the whole prefix
    with pytest.raises(FlashAttnValueError, match="cache_seqlens"):
        cascade_decode(q, kc, vc, plan, causal=True)
    with pytest.raises(FlashAttnValueError, match="cache_seqlens"):
        cascade_decode(q, kc, vc, plan, window_size=(-1, 0))  # a right window does the same
    with pytest.raises(FlashAttnValueError, match="batch"):
        cascade_decode(q[:1], kc, vc, plan)
    with pytest.raises(FlashAttnValueError, match="request_group"):
        CascadePlan.build([0, 1], None, plan.prefix_lens, None, plan.cache_seqlens)
    with settings.override(value_checks=False):
        cascade_decode(q, kc, vc, plan, causal=False)  # non-causal: every row sees every key


def test_cascade_prefix_errors_write_nothing():
    """A prefix longer than its pages is refused (naming the prefix call) before the suffix append writes."""
    case = _cascade_case(page=16, prefix_pages=[1], request_group=[0, 0], suffix_lens=[3, 4], seqlen_new=1)
    plan = case["plan"]
    bad = CascadePlan.build(
        [0, 0], plan.prefix_block_table, plan.prefix_lens + 1, plan.block_table, plan.cache_seqlens
    )
    kc, vc = case["kc"], case["vc"]
    kc0, vc0 = kc.clone(), vc.clone()
    with pytest.raises(FlashAttnValueError, match="prefix attention"):
        cascade_decode(case["q"], kc, vc, bad, case["k"], case["v"])
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cascade_contiguous_prefix_cache(dtype):
    """Prefixes in their own contiguous cache (num_groups, seqlen, nheads_k, d), suffixes contiguous too
    (batch, seqlen, ...): vs the reference on the concatenated context, non-causal seqlen_q 2."""
    gen = torch.Generator().manual_seed(13)
    groups, hk, h, d, lp, ls = 2, 1, 3, 16, 40, 24
    request_group = [1, 0, 1]
    prefix_lens = [40, 17]
    suffix_lens = [5, 0, 24]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    pk, pv = rnd(groups, lp, hk, d), rnd(groups, lp, hk, d)
    sk, sv = rnd(3, ls, hk, d), rnd(3, ls, hk, d)
    q = rnd(3, 2, h, d)
    plan = CascadePlan.build(
        request_group,
        None,
        torch.tensor(prefix_lens, dtype=torch.int32, device=DEVICE),
        None,
        torch.tensor(suffix_lens, dtype=torch.int32, device=DEVICE),
    )
    out, lse = cascade_decode(q, sk, sv, plan, prefix_k_cache=pk, prefix_v_cache=pv, return_softmax_lse=True)
    for b, g in enumerate(request_group):
        kb = torch.cat([pk[g, : prefix_lens[g]], sk[b, : suffix_lens[b]]])[None]
        vb = torch.cat([pv[g, : prefix_lens[g]], sv[b, : suffix_lens[b]]])[None]
        ro, rl = attention_ref(q[b : b + 1], kb, vb, dtype=torch.float64)
        lo, _ = attention_ref(q[b : b + 1], kb, vb, upcast=False)
        assert_close_2x(out[b : b + 1], ro, lo, name=f"out[{b}]")
        assert_close_2x(lse[b : b + 1], rl, rl, name=f"lse[{b}]", slack=1e-4)
