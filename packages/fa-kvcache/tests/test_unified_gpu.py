"""unified_attention on a GPU: bf16 serving-sized mixed batches, the FP8 cache, CUDA-graph capture and replay.

    PYTHONPATH=packages/fa-core/src:packages/fa-backward/src:packages/fa-kvcache/src:packages/fa-compat/src \
        python -m pytest -q packages/fa-kvcache/tests/test_unified_gpu.py

Accuracy asserted here: against the float32 reference on the cache the kernel reads (for FP8, the dequantised
cache ``k_cache.float() * k_descale``), bf16 outputs within 2e-2 absolute / relative (a bf16 output rounding
is 2^-8 relative; the P @ V dot takes P in bf16), lse within 1e-2.
"""

from __future__ import annotations

import math

import pytest
import torch

from fa_core import settings
from fa_core.reference import attention_ref
from fa_kvcache.unified import append_paged_kv, unified_attention

pytestmark = pytest.mark.gpu

DEV = "cuda"
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn


def _batch(qlens, klens, page, nheads=32, nheads_k=8, d=128, dtype=BF16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = [max(1, math.ceil(k / page)) for k in klens]
    nb = sum(need) + 2
    # unused cache rows hold NaN: a kernel reading past a request's keys would put NaN into the output
    kc = torch.full((nb, page, nheads_k, d), float("nan"), device=DEV, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(nb, device=DEV, generator=g)
    bt = torch.zeros(len(klens), max(need), dtype=torch.int32, device=DEV)
    used = 0
    for b, (n, k) in enumerate(zip(need, klens, strict=True)):
        pages = perm[used : used + n]
        bt[b, :n] = pages.to(torch.int32)
        rows = torch.arange(k, device=DEV)
        kc[pages[rows // page], rows % page] = torch.randn(k, nheads_k, d, device=DEV, generator=g).to(dtype)
        vc[pages[rows // page], rows % page] = torch.randn(k, nheads_k, d, device=DEV, generator=g).to(dtype)
        used += n
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = torch.randn(int(cu[-1]), nheads, d, device=DEV, generator=g).to(dtype)
    seq = torch.tensor(klens, dtype=torch.int32, device=DEV)
    return dict(
        q=q,
        k_cache=kc,
        v_cache=vc,
        cu_seqlens_q=cu,
        seqused_k=seq,
        max_seqlen_q=max(qlens),
        max_seqlen_k=max(klens),
        block_table=bt,
    )


def _ref(a, k_scale=None, v_scale=None, **kw):
    q, kc, vc, bt = a["q"], a["k_cache"], a["v_cache"], a["block_table"]
    cu, lens = a["cu_seqlens_q"].tolist(), a["seqused_k"].tolist()
    out = torch.zeros(q.shape[0], q.shape[1], vc.shape[-1], device=DEV)
    lse = torch.zeros(q.shape[1], q.shape[0], device=DEV)
    for b, n in enumerate(lens):
        k = kc[bt[b].long()].reshape(-1, *kc.shape[2:])[:n].float()
        v = vc[bt[b].long()].reshape(-1, *vc.shape[2:])[:n].float()
        if k_scale is not None:
            k, v = k * k_scale[b][None, :, None], v * v_scale[b][None, :, None]
        o, l = attention_ref(q[None, cu[b] : cu[b + 1]].float(), k[None], v[None], **kw)
        out[cu[b] : cu[b + 1]], lse[:, cu[b] : cu[b + 1]] = o[0], l[0]
    return out, lse


def _check(out, lse, ro, rl, tol=2e-2):
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ro, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, rl, atol=1e-2, rtol=1e-2)


MIXED_Q = [1] * 12 + [3, 200, 512, 1]
MIXED_K = [1000, 3000, 70, 5000, 1, 128, 2049, 9000, 640, 33, 4096, 1500, 700, 2600, 3000, 12000]


@pytest.mark.parametrize("page", [16, 64, 256])
@pytest.mark.parametrize("splits", [0, 1, 8])
def test_mixed_bf16(page, splits):
    a = _batch(MIXED_Q, MIXED_K, page, seed=page)
    out, lse = unified_attention(**a, num_splits=splits, return_softmax_lse=True)
    _check(out, lse, *_ref(a, causal=True))


@pytest.mark.parametrize(
    "kw",
    [dict(window_size=(256, 0)), dict(softcap=30.0), dict(alibi=True), dict(sink=True), dict(causal=False)],
    ids=lambda d: next(iter(d)),
)
def test_mixed_options_bf16(kw):
    a = _batch(MIXED_Q, MIXED_K, 64, seed=3)
    kw = dict(kw)
    kw.setdefault("causal", True)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(32, device=DEV) * 0.05
    if kw.pop("sink", False):
        kw["learnable_sink"] = torch.randn(32, device=DEV)
    out, lse = unified_attention(**a, **kw, return_softmax_lse=True)
    _check(out, lse, *_ref(a, **kw))


@pytest.mark.parametrize("page", [16, 64, 256])
def test_fp8_cache_through_append(page):
    """bf16 keys / values appended into an FP8 cache with per-(request, kv head) scales, then attended with
    the scales as descales: equal to the reference on the dequantised cache (2e-2), and close to bf16
    attention on the unquantised keys (e4m3 keeps 3 mantissa bits: 1e-1 here, inputs ~N(0, 1))."""
    qlens, klens = [1] * 6 + [64, 1], [3000, 17, 800, 5000, 1, 260, 1024, 2048]
    a = _batch(qlens, klens, page, seed=page)
    kc16, vc16 = a["k_cache"].nan_to_num(), a["v_cache"].nan_to_num()
    bf16_out = unified_attention(**{**a, "k_cache": kc16, "v_cache": vc16})
    assert isinstance(bf16_out, torch.Tensor)
    batch, hk = len(klens), 8
    # per-(request, kv head) scales mapping each request's largest |k| / |v| to 448
    k_scale = torch.empty(batch, hk, device=DEV)
    v_scale = torch.empty(batch, hk, device=DEV)
    k_new, v_new, cu_new = [], [], [0]
    for b, n in enumerate(klens):
        pages = a["block_table"][b].long()
        kb = kc16[pages].reshape(-1, hk, 128)[:n]
        vb = vc16[pages].reshape(-1, hk, 128)[:n]
        k_scale[b] = kb.float().abs().amax(dim=(0, 2)) / 448
        v_scale[b] = vb.float().abs().amax(dim=(0, 2)) / 448
        k_new.append(kb)
        v_new.append(vb)
        cu_new.append(cu_new[-1] + n)
    k8 = torch.zeros_like(a["k_cache"], dtype=FP8)
    v8 = torch.zeros_like(k8)
    append_paged_kv(
        torch.cat(k_new), torch.cat(v_new), k8, v8, a["block_table"], torch.zeros(batch, dtype=torch.int32,
        device=DEV), torch.tensor(cu_new, dtype=torch.int32, device=DEV), max(klens), k_scale=k_scale,
        v_scale=v_scale,
    )  # fmt: skip
    f8 = {**a, "k_cache": k8, "v_cache": v8}
    for splits in (0, 1, 8):
        out, lse = unified_attention(
            **f8, k_descale=k_scale, v_descale=v_scale, num_splits=splits, return_softmax_lse=True
        )
        _check(out, lse, *_ref(f8, k_scale=k_scale, v_scale=v_scale, causal=True))
        torch.testing.assert_close(out.float(), bf16_out.float(), atol=1e-1, rtol=1e-1)


@pytest.mark.parametrize("q_mul", [1.0, 1e6, 1e-6])
@pytest.mark.parametrize("splits", [0, 1])
def test_fp8_cache_q_magnitudes(q_mul, splits):
    """bf16 q over an FP8 cache runs fp16 dots (q rescaled by a power of two into fp16's range once per
    program): q far above fp16's range (1e6: |q| up to ~5e6 > 65504) or below its normal range (1e-6), with the
    softmax scale compensating, still equals the reference on the dequantised cache."""
    qlens, klens = [1] * 8 + [40], [8192, 300, 1, 4100, 64, 2000, 9000, 17, 700]
    a = _batch(qlens, klens, 64, seed=5)
    a["q"] = (a["q"].float() * q_mul).to(BF16)
    a["k_cache"] = (a["k_cache"] * 16).to(FP8)
    a["v_cache"] = (a["v_cache"] * 16).to(FP8)
    g = torch.Generator(device=DEV).manual_seed(1)
    k_scale = torch.rand(len(klens), 8, device=DEV, generator=g) / 8 + 1 / 32
    v_scale = torch.rand(len(klens), 8, device=DEV, generator=g) / 8 + 1 / 32
    scale = 128**-0.5 / q_mul
    out, lse = unified_attention(
        **a, k_descale=k_scale, v_descale=v_scale, softmax_scale=scale, num_splits=splits,
        return_softmax_lse=True,
    )  # fmt: skip
    _check(out, lse, *_ref(a, k_scale=k_scale, v_scale=v_scale, causal=True, softmax_scale=scale))


def test_cuda_graph_capture_and_replay():
    """One serving step (append with rotary, then attention) captured at a fixed maximum batch and replayed
    over steps whose mixes of decode and prefill rows (and their values) differ: each replay equals an
    eager call on the same inputs and the reference."""
    page, nheads, hk, d = 64, 32, 8, 128
    batch, total = 8, 256
    cap = 64 * page
    pool = 4 * batch * (cap // page)
    kc = torch.randn(pool, page, hk, d, device=DEV, dtype=BF16)
    vc = torch.randn_like(kc)
    bt = torch.randperm(pool, device=DEV)[: batch * (cap // page)].view(batch, -1).to(torch.int32)
    ang = torch.rand(cap, d // 2, device=DEV) * 6.28
    cos, sin = ang.cos().to(BF16), ang.sin().to(BF16)
    q_in = torch.empty(total, nheads, d, device=DEV, dtype=BF16)
    k_in = torch.empty(total, hk, d, device=DEV, dtype=BF16)
    v_in = torch.empty_like(k_in)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=DEV)
    old = torch.zeros(batch, dtype=torch.int32, device=DEV)
    used = torch.zeros(batch, dtype=torch.int32, device=DEV)
    out = torch.empty(total, nheads, d, device=DEV, dtype=BF16)

    def step():
        qr = append_paged_kv(k_in, v_in, kc, vc, bt, old, cu, total, rotary_cos=cos, rotary_sin=sin, q=q_in)
        assert qr is not None
        unified_attention(qr, kc, vc, cu, used, total, cap, bt, out=out)

    def load(qlens, olds, seed):
        g = torch.Generator(device=DEV).manual_seed(seed)
        qlens = qlens + [0] * (batch - len(qlens))
        qlens[-1] += total - sum(qlens)  # the last request takes the padding rows
        olds = olds + [0] * (batch - len(olds))
        cu.copy_(torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32))
        old.copy_(torch.tensor(olds, dtype=torch.int32))
        used.copy_(old + torch.tensor(qlens, dtype=torch.int32, device=DEV))
        q_in.copy_(torch.randn(total, nheads, d, device=DEV, generator=g))
        k_in.copy_(torch.randn(total, hk, d, device=DEV, generator=g))
        v_in.copy_(torch.randn(total, hk, d, device=DEV, generator=g))

    load([1, 1, 5, 100], [500, 1000, 20, 300], 0)
    step()  # compile and plan outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with settings.override(value_checks=False), torch.cuda.graph(graph):
        step()
    for i, (qlens, olds) in enumerate(
        [([1] * 7, [3000, 17, 1, 900, 2000, 64, 3500]), ([200, 1, 1], [0, 4000, 9])]
    ):
        load(qlens, olds, i + 1)
        k_snap, v_snap = kc.clone(), vc.clone()
        graph.replay()
        torch.cuda.synchronize()
        got = out.clone()
        kc.copy_(k_snap)
        vc.copy_(v_snap)
        step()  # eager, on the same inputs
        torch.testing.assert_close(got, out, atol=0, rtol=0)
        a = dict(
            q=append_paged_kv(k_in, v_in, kc, vc, bt, old, cu, total, rotary_cos=cos, rotary_sin=sin, q=q_in),
            k_cache=kc,
            v_cache=vc,
            cu_seqlens_q=cu,
            seqused_k=used,
            block_table=bt,
        )
        ro, _ = _ref(a, causal=True)
        torch.testing.assert_close(got.float(), ro, atol=2e-2, rtol=2e-2)
