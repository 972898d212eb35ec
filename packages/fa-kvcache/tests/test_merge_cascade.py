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
    for lse, out in ((la, oa), (lb, ob)):
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
    torch.testing.assert_close(lse[fin].double(), rl[fin].cpu() if DEVICE == "cpu" else rl[fin], atol=2e-6, rtol=2e-6)
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
    out, lse = merge_attention_states(e, torch.empty(0, 4, 3, device=DEVICE), e, torch.empty(0, 4, 3, device=DEVICE))
    assert out.shape == e.shape and lse.shape == (0, 4, 3)
