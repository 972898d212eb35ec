"""GPU tests: bf16 at realistic sizes, and a decode step (append + attend) captured in a CUDA graph."""

from __future__ import annotations

import math

import pytest
import torch

from fa_core.reference import attention_ref
from fa_kvcache import PagedKVCache, flash_attn_with_kvcache

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _paged_from_contiguous(kc, vc, page, extra_blocks=7):
    """Scatter a contiguous cache (batch, cap, h, d) into a shuffled paged pool + block table."""
    batch, cap = kc.shape[:2]
    nb = math.ceil(cap / page)
    num_blocks = nb * batch + extra_blocks
    perm = torch.randperm(num_blocks, device=kc.device)[: nb * batch].reshape(batch, nb)
    kp = torch.randn(num_blocks, page, *kc.shape[2:], device=kc.device, dtype=kc.dtype)
    vp = torch.randn(num_blocks, page, *vc.shape[2:], device=kc.device, dtype=kc.dtype)
    pad = nb * page - cap
    kpad = torch.nn.functional.pad(kc, (0, 0, 0, 0, 0, pad)).reshape(batch, nb, page, *kc.shape[2:])
    vpad = torch.nn.functional.pad(vc, (0, 0, 0, 0, 0, pad)).reshape(batch, nb, page, *vc.shape[2:])
    kp[perm] = kpad
    vp[perm] = vpad
    return kp, vp, perm.to(torch.int32)


def _check(out, q, kc, vc, lens, causal):
    err = low_err = 0.0
    for b in range(q.shape[0]):
        n = int(lens[b])
        ref, _ = attention_ref(q[b : b + 1], kc[b : b + 1, :n], vc[b : b + 1, :n], causal=causal, upcast=True)
        low, _ = attention_ref(
            q[b : b + 1], kc[b : b + 1, :n], vc[b : b + 1, :n], causal=causal, upcast=False
        )
        err = max(err, (out[b : b + 1].float() - ref.float()).abs().max().item())
        low_err = max(low_err, (low.float() - ref.float()).abs().max().item())
    assert err <= 2 * low_err + 1e-2, (err, low_err)


@pytest.mark.parametrize("page", [0, 16, 256])
@pytest.mark.parametrize("seqlen_q,context", [(1, 1000), (1, 8192), (4, 3000), (128, 2048)])
def test_bf16_realistic(page, seqlen_q, context):
    torch.manual_seed(0)
    batch, nheads, nheads_k, d = 3, 32, 8, 128
    dt = torch.bfloat16
    cap = context + seqlen_q
    q = torch.randn(batch, seqlen_q, nheads, d, device=DEVICE, dtype=dt)
    kc = torch.randn(batch, cap, nheads_k, d, device=DEVICE, dtype=dt)
    vc = torch.randn(batch, cap, nheads_k, d, device=DEVICE, dtype=dt)
    k_new = torch.randn(batch, seqlen_q, nheads_k, d, device=DEVICE, dtype=dt)
    v_new = torch.randn_like(k_new)
    lens = torch.tensor([context, context // 2, 1], dtype=torch.int32, device=DEVICE)
    if page:
        kp, vp, bt = _paged_from_contiguous(kc, vc, page)
        out = flash_attn_with_kvcache(
            q, kp, vp, k_new, v_new, cache_seqlens=lens, block_table=bt, causal=True
        )
    else:
        out = flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, causal=True)
    for b in range(batch):
        n = int(lens[b])
        kc[b, n : n + seqlen_q] = k_new[b]
        vc[b, n : n + seqlen_q] = v_new[b]
    if page:
        kg = kp[bt.long()].reshape(batch, -1, nheads_k, d)[:, :cap]
        assert torch.equal(kg, kc)
    _check(out, q, kc, vc, lens + seqlen_q, causal=True)


def test_splits_agree_bf16():
    torch.manual_seed(1)
    q = torch.randn(2, 1, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    kc = torch.randn(2, 16384, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.tensor([16000, 777], dtype=torch.int32, device=DEVICE)
    o1, l1 = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=1, return_softmax_lse=True)
    for s in (0, 7, 64):
        o, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=s, return_softmax_lse=True)
        torch.testing.assert_close(o, o1, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse, l1, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("page", [0, 16, 256])
def test_cuda_graph_decode_step(page):
    """Capture append + attend once; replay with new inputs and lengths; equal to eager on a copy."""
    torch.manual_seed(2)
    batch, nheads, nheads_k, d, cap, dt = 4, 32, 8, 128, 4096, torch.bfloat16
    seqlen_ro = cap + 1
    angle = torch.rand(seqlen_ro, d // 4, device=DEVICE) * 2 * math.pi
    cos, sin = angle.cos().to(dt), angle.sin().to(dt)
    if page:
        cache = PagedKVCache(
            batch * cap // page + 4,
            page,
            nheads_k,
            d,
            dtype=dt,
            device=DEVICE,
            max_blocks_per_seq=cap // page,
        )
        for i in range(batch):
            cache.add_sequence(i)
            n = 100 + 700 * i
            cache.append(
                i,
                torch.randn(n, nheads_k, d, device=DEVICE, dtype=dt),
                torch.randn(n, nheads_k, d, device=DEVICE, dtype=dt),
            )
        kc, vc = cache.k_cache, cache.v_cache
        bt_static, lens_static = cache.prepare_append(list(range(batch)), 1)
    else:
        kc = torch.randn(batch, cap, nheads_k, d, device=DEVICE, dtype=dt)
        vc = torch.randn_like(kc)
        bt_static = None
        lens_static = torch.tensor([100, 800, 1500, 2200], dtype=torch.int32, device=DEVICE)
    q_static = torch.randn(batch, 1, nheads, d, device=DEVICE, dtype=dt)
    k_static = torch.randn(batch, 1, nheads_k, d, device=DEVICE, dtype=dt)
    v_static = torch.randn_like(k_static)

    def step():
        return flash_attn_with_kvcache(
            q_static,
            kc,
            vc,
            k_static,
            v_static,
            rotary_cos=cos,
            rotary_sin=sin,
            cache_seqlens=lens_static,
            block_table=bt_static,
            causal=True,
            rotary_interleaved=False,
        )

    # warm up (compiles) on a side stream, then capture
    kc0, vc0 = kc.clone(), vc.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    kc.copy_(kc0)
    vc.copy_(vc0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_static = step()
    for it in range(3):
        q_static.normal_()
        k_static.normal_()
        v_static.normal_()
        if page == 0:
            lens_static.add_(it)  # new lengths, same tensor: the graph reads them on the device
        kc_e, vc_e = kc.clone(), vc.clone()
        g.replay()
        torch.cuda.synchronize()
        out_graph = out_static.clone()
        kc_g, vc_g = kc.clone(), vc.clone()
        kc.copy_(kc_e)
        vc.copy_(vc_e)
        out_eager = step()
        torch.cuda.synchronize()
        assert torch.equal(kc, kc_g) and torch.equal(vc, vc_g)
        torch.testing.assert_close(out_graph, out_eager, atol=0, rtol=0)


@pytest.mark.parametrize("page", [0, 16])
def test_fast_launch_bitwise_equal_to_triton_path(page):
    """fa_core.fast_launch's direct launches (append, split-KV, combine) give Triton's path's bits, and a
    repeated decode step hits their caches."""
    import fa_kvcache.interface as ki
    from fa_core.fast_launch import set_fast_launch

    torch.manual_seed(3)
    dt = torch.bfloat16
    q = torch.randn(2, 1, 32, 128, device=DEVICE, dtype=dt)
    kc = torch.randn(2, 4096, 8, 128, device=DEVICE, dtype=dt)
    vc = torch.randn_like(kc)
    k_new, v_new = (torch.randn(2, 1, 8, 128, device=DEVICE, dtype=dt) for _ in range(2))
    lens = torch.tensor([3000, 777], dtype=torch.int32, device=DEVICE)
    bt = None
    if page:
        kc, vc, bt = _paged_from_contiguous(kc, vc, page)

    def run():
        kcc, vcc = kc.clone(), vc.clone()
        out, lse = flash_attn_with_kvcache(
            q, kcc, vcc, k_new, v_new, cache_seqlens=lens, block_table=bt, causal=True, num_splits=4,
            return_softmax_lse=True,
        )  # fmt: skip
        return out, lse, kcc, vcc

    previous = set_fast_launch(False)
    try:
        ref = run()
    finally:
        set_fast_launch(previous)
    set_fast_launch(True)
    for _ in range(2):
        got = run()
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
    assert all(len(launch._cache) for launch in (ki.append_launch, ki.split_kv_launch, ki.combine_launch))


@pytest.mark.parametrize("page", [0, 16, 256])
@pytest.mark.parametrize("tile", [(32, 4, 3), (64, 4, 4), (128, 8, 2)])
def test_force_tile_gpu(page, tile):
    """Tiles imposed with force_tile (the tuner's path) give the heuristic tile's results, with splits (the
    combine kernel) and without, through contiguous and paged caches."""
    import fa_kvcache.decode_configs as dc

    torch.manual_seed(5)
    dt = torch.bfloat16
    q = torch.randn(4, 1, 32, 128, device=DEVICE, dtype=dt)
    kc = torch.randn(4, 8192, 8, 128, device=DEVICE, dtype=dt)
    vc = torch.randn_like(kc)
    bt = None
    if page:
        kc, vc, bt = _paged_from_contiguous(kc, vc, page)
    lens = torch.tensor([8000, 1, 4096, 777], dtype=torch.int32, device=DEVICE)
    for splits in (1, 16):

        def run(splits=splits):
            return flash_attn_with_kvcache(
                q, kc, vc, cache_seqlens=lens, block_table=bt, num_splits=splits, return_softmax_lse=True
            )

        ref = [t.clone() for t in run()]
        with dc.force_tile(tile):
            out, lse = run()
        torch.testing.assert_close(out, ref[0], atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(lse, ref[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [3, 40, 700])
def test_value_check_kernel_gpu(batch):
    """The fused value check on the GPU: a passing call and each failing argument (the first bad block-table
    entry named by row and column, also when it sits in another program's share of a large batch)."""
    from fa_core.errors import FlashAttnValueError

    page, cols = 16, 8
    q = torch.randn(batch, 1, 8, 64, device=DEVICE, dtype=torch.float16)
    kp = torch.randn(batch * cols, page, 2, 64, device=DEVICE, dtype=torch.float16)
    bt = torch.arange(batch * cols, dtype=torch.int32, device=DEVICE).reshape(batch, cols)
    lens = torch.full((batch,), 100, dtype=torch.int32, device=DEVICE)
    flash_attn_with_kvcache(q, kp, kp, cache_seqlens=lens, block_table=bt)
    bad = bt.clone()
    bad[batch - 1, 6] = -1  # used (rows 96..99 live in column 6)
    bad[batch - 1, 7] = -5  # unused: allowed
    with pytest.raises(FlashAttnValueError, match=rf"block_table\[{batch - 1}, 6\] = -1"):
        flash_attn_with_kvcache(q, kp, kp, cache_seqlens=lens, block_table=bad)
    long = lens.clone()
    long[batch // 2] = cols * page + 1
    with pytest.raises(FlashAttnValueError, match="cache too small"):
        flash_attn_with_kvcache(q, kp, kp, cache_seqlens=long, block_table=bt)
    neg = lens.clone()
    neg[-1] = -3
    with pytest.raises(FlashAttnValueError, match="cache_seqlens must be >= 0"):
        flash_attn_with_kvcache(q, kp, kp, cache_seqlens=neg, block_table=bt)


def test_paged_capacity_error_names_block_table_and_context_survives():
    """flash-attn's failure mode (cache_seqlens past block_table.shape[1] * page_size): an eager call raises
    before anything is written, naming block_table (value checks are on by default on the GPU too); the CUDA
    context stays usable."""
    from fa_core.errors import FlashAttnValueError

    q = torch.randn(2, 1, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    kc = torch.randn(8, 16, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k_new = torch.randn(2, 1, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    before = kc.clone()
    for lens in ([3, 32], [3, 31 + 2**20]):
        seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        with pytest.raises(FlashAttnValueError, match="block_table"):
            flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=bt)
    torch.cuda.synchronize()
    assert torch.equal(kc, before)
    ok = flash_attn_with_kvcache(
        q, kc, vc, k_new, v_new, cache_seqlens=torch.tensor([3, 5], dtype=torch.int32, device=DEVICE),
        block_table=bt,
    )  # fmt: skip
    torch.cuda.synchronize()
    assert torch.isfinite(ok).all()


@pytest.mark.parametrize("page", [0, 16])
def test_cuda_graph_replay_with_out_of_range_values(page):
    """Under CUDA-graph capture the value checks are off; replaying the captured decode step with
    cache_seqlens / block_table / cache_batch_idx / cache_leftpad values out of range must not fault (clamped in
    the kernels) nor touch the NaN guard blocks around the caches."""
    torch.manual_seed(0)
    batch, h, hk, d, cap, guard = 3, 8, 2, 64, 64, 2
    dt = torch.bfloat16
    rows = batch * (cap // 16) + 1 if page else batch + 1
    inner = (16, hk, d) if page else (cap, hk, d)
    kpool = torch.full((rows + 2 * guard, *inner), float("nan"), device=DEVICE, dtype=dt)
    vpool = torch.full_like(kpool, float("nan"))
    kc, vc = kpool[guard:-guard], vpool[guard:-guard]
    kc.copy_(torch.randn_like(kc))
    vc.copy_(torch.randn_like(vc))
    q = torch.randn(batch, 1, h, d, device=DEVICE, dtype=dt)
    k_new, v_new = torch.randn(batch, 1, hk, d, device=DEVICE, dtype=dt), torch.randn(batch, 1, hk, d, device=DEVICE, dtype=dt)  # fmt: skip
    seqlens = torch.tensor([5, 17, 40], dtype=torch.int32, device=DEVICE)
    kw: dict = {}
    if page:
        kw["block_table"] = torch.randperm(rows, device=DEVICE)[: batch * 4].reshape(batch, 4).to(torch.int32)
    else:
        kw["cache_batch_idx"] = torch.tensor([2, 0, 1], dtype=torch.int32, device=DEVICE)
        kw["cache_leftpad"] = torch.tensor([0, 3, 10], dtype=torch.int32, device=DEVICE)

    def step():
        return flash_attn_with_kvcache(
            q, kc, vc, k_new, v_new, cache_seqlens=seqlens, causal=True, num_splits=3, **kw
        )

    step()  # compile + warm
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    guards = [torch.cat([p[:guard], p[-guard:]]).view(torch.int16).clone() for p in (kpool, vpool)]
    bad = [2**31 - 1, -(2**31), cap + 9, -1]
    for i, x in enumerate(bad):
        seqlens.copy_(torch.tensor([x, bad[(i + 1) % 4], 3], dtype=torch.int32))
        if page:
            kw["block_table"].view(-1)[i] = [2**31 - 1, -1, rows, -(2**31)][i]
        else:
            kw["cache_batch_idx"].copy_(torch.tensor([x, 1, -1], dtype=torch.int32))
            kw["cache_leftpad"].copy_(torch.tensor([-5, x, 2**30], dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        for p, gd in zip((kpool, vpool), guards, strict=True):
            assert torch.equal(torch.cat([p[:guard], p[-guard:]]).view(torch.int16), gd)
