"""GPU tests of merge_attention_states and cascade_decode: bf16 / fp16 at realistic sizes, and a cascade
decode step (append + prefix + suffix + merge) captured in a CUDA graph and replayed with new inputs."""

from __future__ import annotations

import pytest
import torch

from fa_core.reference import attention_ref
from fa_kvcache import PagedKVCache, flash_attn_with_kvcache
from fa_kvcache.cascade import CascadePlan, cascade_decode, cascade_plan_from_cache
from fa_kvcache.merge import merge_attention_states

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
INF = float("inf")


def _merge_ref(oa, la, ob, lb):
    oa, ob = oa.double(), ob.double()
    la, lb = la.double().transpose(-1, -2), lb.double().transpose(-1, -2)
    a_ok, b_ok = torch.isfinite(la), torch.isfinite(lb)
    la, lb = torch.where(a_ok, la, -INF), torch.where(b_ok, lb, -INF)
    lse = torch.logaddexp(la, lb)
    ok = a_ok | b_ok
    ls = torch.where(ok, lse, 0.0)
    wa = torch.where(a_ok, torch.exp(la - ls), 0.0)[..., None]
    wb = torch.where(b_ok, torch.exp(lb - ls), 0.0)[..., None]
    out = torch.where(a_ok[..., None], oa, 0.0) * wa + torch.where(b_ok[..., None], ob, 0.0) * wb
    return out, torch.where(ok, lse, INF).transpose(-1, -2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 1, 32, 128), (2, 1000, 16, 64), (4096, 8, 256)])
def test_merge_realistic(dtype, shape):
    torch.manual_seed(0)
    *lead, s, h, d = shape
    oa = torch.randn(*shape, device=DEVICE).to(dtype)
    ob = torch.randn(*shape, device=DEVICE).to(dtype)
    la = torch.randn(*lead, h, s, device=DEVICE) * 4
    lb = torch.randn(*lead, h, s, device=DEVICE) * 4
    la[torch.rand_like(la) < 0.05] = INF
    lb[torch.rand_like(lb) < 0.05] = -INF
    out, lse = merge_attention_states(oa, la, ob, lb)
    ro, rl = _merge_ref(oa, la, ob, lb)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), ro, atol=tol, rtol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse[fin].double(), rl[fin], atol=2e-6, rtol=2e-6)


def _serving_cache(page, groups, prefix_len, suffix_lens, nheads_k, d, dtype):
    """A PagedKVCache with ``groups`` prompts of ``prefix_len`` tokens, each forked into
    ``len(suffix_lens) // groups`` requests that then append their own tokens."""
    per = len(suffix_lens) // groups
    need = groups * (prefix_len // page + 1) + sum(n // page + 2 for n in suffix_lens) + 8
    cache = PagedKVCache(need, page, nheads_k, d, dtype=dtype, device=DEVICE)
    ids = []
    for g in range(groups):
        cache.add_sequence(("p", g))
        n = prefix_len
        cache.append(
            ("p", g),
            torch.randn(n, nheads_k, d, device=DEVICE, dtype=dtype),
            torch.randn(n, nheads_k, d, device=DEVICE, dtype=dtype),
        )
        for r in range(per):
            sid = (g, r)
            cache.fork(("p", g), sid)
            n = suffix_lens[g * per + r]
            cache.append(
                sid,
                torch.randn(n, nheads_k, d, device=DEVICE, dtype=dtype),
                torch.randn(n, nheads_k, d, device=DEVICE, dtype=dtype),
            )
            ids.append(sid)
    return cache, ids


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_cascade_bf16_realistic(page, seqlen_q):
    """4 prompts of 3000 tokens, 8 samples each with 0..700 own tokens; vs the plain paged call and the
    reference (2x rule)."""
    torch.manual_seed(1)
    nheads, nheads_k, d, dt = 32, 8, 128, torch.bfloat16
    suffix = [int(x) for x in torch.randint(seqlen_q, 700, (32,))]
    suffix[3] = seqlen_q - 1  # the shortest suffix the causal rows allow
    cache, ids = _serving_cache(page, 4, 3000, suffix, nheads_k, d, dt)
    plan = cascade_plan_from_cache(cache, ids)
    assert plan.request_group is None and plan.group_size == 8
    q = torch.randn(len(ids), seqlen_q, nheads, d, device=DEVICE, dtype=dt)
    causal = seqlen_q > 1
    out, lse = cascade_decode(q, cache.k_cache, cache.v_cache, plan, causal=causal, return_softmax_lse=True)
    ref_o, ref_l = flash_attn_with_kvcache(
        q,
        cache.k_cache,
        cache.v_cache,
        cache_seqlens=cache.cache_seqlens(ids),
        block_table=cache.block_table(ids),
        causal=causal,
        return_softmax_lse=True,
    )
    assert (out.float() - ref_o.float()).abs().max().item() < 2e-2
    fin = torch.isfinite(ref_l)
    torch.testing.assert_close(lse[fin], ref_l[fin], atol=1e-3, rtol=1e-4)
    for b in (0, 3, 17, 31):
        kb, vb = cache.gather(ids[b])
        ro, _ = attention_ref(q[b : b + 1], kb[None], vb[None], causal=causal)
        lo, _ = attention_ref(q[b : b + 1], kb[None], vb[None], causal=causal, upcast=False)
        err = (out[b : b + 1].float() - ro.float()).abs().max().item()
        low = (lo.float() - ro.float()).abs().max().item()
        assert err <= 2 * low + 1e-2, (b, err, low)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("layout", ["contiguous", "gathered"])
def test_cascade_cuda_graph(page, layout):
    """Capture a cascade decode step (append one token + prefix + suffix + merge); replay with new q / k / v
    and advanced suffix lengths (updated in place); equal, bit for bit, to the eager call on a copy."""
    torch.manual_seed(2)
    nheads, nheads_k, d, dt = 32, 8, 128, torch.bfloat16
    suffix = [int(x) for x in torch.randint(0, 300, (12,))]
    cache, ids = _serving_cache(page, 3, 1000, suffix, nheads_k, d, dt)
    if layout == "gathered":  # groups of 4 interleaved in the batch, one request dropped: sizes 4, 4, 3
        ids = [ids[i] for i in (0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7)]
    steps = 3
    bt, _ = cache.prepare_append(ids, steps)  # room for every replay's token: block tables stay fixed
    plan = cascade_plan_from_cache(cache, ids, num_new=steps)
    assert isinstance(plan, CascadePlan) and (plan.request_group is None) == (layout == "contiguous")
    lens = plan.cache_seqlens  # suffix lengths before this step's token; advanced in place below
    q = torch.randn(len(ids), 1, nheads, d, device=DEVICE, dtype=dt)
    k = torch.randn(len(ids), 1, nheads_k, d, device=DEVICE, dtype=dt)
    v = torch.randn_like(k)

    def step():
        return cascade_decode(
            q, cache.k_cache, cache.v_cache, plan, k, v, causal=True, return_softmax_lse=True
        )

    kc0, vc0 = cache.k_cache.clone(), cache.v_cache.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    cache.k_cache.copy_(kc0)
    cache.v_cache.copy_(vc0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = step()
    for _ in range(steps):
        q.normal_()
        k.normal_()
        v.normal_()
        kc_e, vc_e = cache.k_cache.clone(), cache.v_cache.clone()
        graph.replay()
        torch.cuda.synchronize()
        og, lg = out_g.clone(), lse_g.clone()
        kc_g, vc_g = cache.k_cache.clone(), cache.v_cache.clone()
        cache.k_cache.copy_(kc_e)
        cache.v_cache.copy_(vc_e)
        oe, le = step()
        torch.cuda.synchronize()
        assert torch.equal(cache.k_cache, kc_g) and torch.equal(cache.v_cache, vc_g)
        torch.testing.assert_close(og, oe, atol=0, rtol=0)
        torch.testing.assert_close(lg, le, atol=0, rtol=0)
        # and the plain call over the full context (its own append into a copy)
        full_lens = lens + plan.prefix_lens[0]  # every group's prefix has the same length here
        ro = flash_attn_with_kvcache(
            q, kc_e.clone(), vc_e.clone(), k, v, cache_seqlens=full_lens, block_table=bt, causal=True
        )
        assert (og.float() - ro.float()).abs().max().item() < 2e-2
        lens.add_(1)  # the next token: same tensor, read by the graph on the device
