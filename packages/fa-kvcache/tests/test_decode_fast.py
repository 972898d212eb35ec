"""The eager decode call's signature cache (``fa_kvcache.decode_fast._decode_fast``): the same results as the
general path, the same errors (shape errors on the first call of a signature, value errors on every call,
before anything is written), one host copy of ``cache_seqlens`` as its value check, and on a GPU the recorded
launches replayed bit for bit."""

from __future__ import annotations

import pytest
import torch

import fa_kvcache.checks as kc
import fa_kvcache.decode_configs as dc
import fa_kvcache.interface as ki
from fa_core import settings
from fa_core.errors import FlashAttnValueError
from fa_kvcache import flash_attn_with_kvcache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16


def _inputs(batch=2, seqlen_q=1, nheads=4, nheads_k=2, d=32, capacity=48, page=0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DTYPE).to(DEVICE)

    q = rnd(batch, seqlen_q, nheads, d)
    lens = torch.randint(1, capacity + 1, (batch,), generator=g).to(torch.int32).to(DEVICE)
    if page:
        nb = -(-capacity // page)
        num_blocks = nb * batch + 2
        bt = (
            torch.randperm(num_blocks, generator=g)[: nb * batch]
            .reshape(batch, nb)
            .to(torch.int32)
            .to(DEVICE)
        )
        return q, rnd(num_blocks, page, nheads_k, d), rnd(num_blocks, page, nheads_k, d), lens, bt
    return q, rnd(batch, capacity, nheads_k, d), rnd(batch, capacity, nheads_k, d), lens, None


def _general(q, k_cache, v_cache, **kw):
    """The general path for the same call: a window given as a list is not a signature the cache takes."""
    w = kw.pop("window_size", (-1, -1))
    return flash_attn_with_kvcache(q, k_cache, v_cache, window_size=list(w), return_softmax_lse=True, **kw)


@pytest.mark.parametrize("page", [0, 16])
@pytest.mark.parametrize("seqlens", ["tensor", "int", "none"])
@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_same_as_general_path(page, seqlens, num_splits):
    q, k_cache, v_cache, lens, bt = _inputs(page=page, seqlen_q=2)
    cs = {"tensor": lens, "int": 17, "none": None}[seqlens]
    kw = dict(cache_seqlens=cs, block_table=bt, causal=True, num_splits=num_splits, window_size=(9, 0))
    ki._FAST.clear()
    for _ in range(2):  # the first call builds the signature's entry, the second reads it back
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True, **kw)
    assert len(ki._FAST) == 1 and next(iter(ki._FAST.values())) is not None
    ref_out, ref_lse = _general(q, k_cache, v_cache, **kw)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert out.is_contiguous() and lse.shape == (2, 4, 2)


def test_signature_changes_make_new_entries():
    q, k_cache, v_cache, lens, _ = _inputs()
    ki._FAST.clear()
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    assert len(ki._FAST) == 1
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)
    flash_attn_with_kvcache(q[:1], k_cache, v_cache, cache_seqlens=lens[:1])
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, softmax_scale=0.5)
    assert len(ki._FAST) == 4
    # a strided last dim of q: the general path copies it (recorded as not taken here)
    qs = torch.randn(2, 1, 4, 64, dtype=DTYPE, device=DEVICE)[..., ::2]
    out = flash_attn_with_kvcache(qs, k_cache, v_cache, cache_seqlens=lens)
    ref = flash_attn_with_kvcache(qs.contiguous(), k_cache, v_cache, cache_seqlens=lens)
    assert torch.equal(out, ref)
    assert ki._FAST[next(reversed(ki._FAST))] is None


def test_shape_errors_on_every_call():
    """Shape errors are raised on the first call of a signature and never cached: the next call raises too."""
    q, k_cache, v_cache, lens, _ = _inputs()
    ki._FAST.clear()
    for _ in range(2):
        with pytest.raises(FlashAttnValueError, match="cache_seqlens must have shape"):
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens[:1])
        with pytest.raises(TypeError, match="cache_seqlens must be int32"):
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens.long())
        with pytest.raises(FlashAttnValueError, match="attention_chunk"):
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, attention_chunk=-1)
    assert not ki._FAST


def test_value_errors_on_cached_signature():
    """Bad cache_seqlens / block_table values raise on a signature already cached, naming the argument."""
    q, k_cache, v_cache, lens, _ = _inputs(capacity=48)
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    with pytest.raises(FlashAttnValueError, match="cache too small: max\\(cache_seqlens\\) = 49"):
        flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=torch.tensor([3, 49], dtype=torch.int32, device=DEVICE)
        )
    with pytest.raises(FlashAttnValueError, match="cache_seqlens must be >= 0"):
        flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=torch.tensor([-1, 4], dtype=torch.int32, device=DEVICE)
        )
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=5)
    with pytest.raises(FlashAttnValueError, match="cache too small"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=49)
    qp, kp, vp, lp, bt = _inputs(capacity=48, page=16)
    flash_attn_with_kvcache(qp, kp, vp, cache_seqlens=lp, block_table=bt)
    bad = bt.clone()
    bad[1, 0] = kp.shape[0]
    with pytest.raises(FlashAttnValueError, match="block_table\\[1, 0\\]"):
        flash_attn_with_kvcache(qp, kp, vp, cache_seqlens=lp, block_table=bad)
    with settings.override(value_checks=False):  # off: no host read, the kernels clamp
        out = flash_attn_with_kvcache(qp, kp, vp, cache_seqlens=lp, block_table=bad)
    assert torch.isfinite(out).all()


def test_seqlens_check_reads_the_tensor(monkeypatch):
    """cache_seqlens alone is checked through one host copy of it, not the check kernel; the paged call keeps
    the kernel (one launch, one read)."""
    launches = []
    real = kc.value_check_launch
    monkeypatch.setattr(kc, "value_check_launch", lambda *a, **k: (launches.append(1), real(*a, **k)))
    q, k_cache, v_cache, lens, _ = _inputs()
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    assert not launches
    qp, kp, vp, lp, bt = _inputs(page=16)
    flash_attn_with_kvcache(qp, kp, vp, cache_seqlens=lp, block_table=bt)
    assert len(launches) == 1
    # a batch above HOST_READ_MAX reduces on the device
    monkeypatch.setattr(kc, "HOST_READ_MAX", 1)
    with pytest.raises(FlashAttnValueError, match="cache too small"):
        kc.value_checks(
            2, torch.tensor([3, 60], dtype=torch.int32, device=DEVICE), None, None, None, 0, 48, 2, 48, 2
        )
    assert len(launches) == 2


def test_grad_guard():
    q, k_cache, v_cache, lens, _ = _inputs()
    q = q.float().requires_grad_() if DEVICE == "cpu" else q.requires_grad_()
    with pytest.raises(RuntimeError, match="require grad"):
        flash_attn_with_kvcache(q, k_cache.to(q.dtype), v_cache.to(q.dtype), cache_seqlens=lens)
    with torch.no_grad():
        flash_attn_with_kvcache(q, k_cache.to(q.dtype), v_cache.to(q.dtype), cache_seqlens=lens)


def test_split_workspace_layout():
    ws_out, ws_lse = ki._split_workspace(5, 3, torch.empty(0, device=DEVICE))
    assert ws_lse.dtype == torch.float32 and ws_out.numel() == 15
    assert ws_out.data_ptr() - ws_lse.data_ptr() == 32 * 4  # lse rows first, out from the next 128 bytes


@pytest.mark.gpu
@pytest.mark.parametrize("page", [0, 16])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_replay_bitwise_gpu(page, num_splits):
    """On a GPU the signature's launches are recorded once and replayed with each call's tensors: bit for bit
    the launch path's results, for new tensors of the signature too; a 16-byte misaligned q takes the launch
    path."""
    from fa_core import fast_launch

    q, k_cache, v_cache, lens, bt = _inputs(batch=3, nheads=8, nheads_k=2, d=64, capacity=300, page=page)
    q, k_cache, v_cache = q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16()
    kw = dict(cache_seqlens=lens, block_table=bt, causal=True, num_splits=num_splits)
    ki._FAST.clear()
    for _ in range(5):
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True, **kw)
    fast = next(iter(ki._FAST.values()))
    assert fast is not None and fast.replay is not None
    ref_out, ref_lse = _general(q, k_cache, v_cache, **kw)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    q2 = torch.randn_like(q)
    lens2 = torch.randint(0, 301, lens.shape, device=DEVICE, dtype=torch.int32)
    out2, lse2 = flash_attn_with_kvcache(
        q2, k_cache, v_cache, return_softmax_lse=True, **{**kw, "cache_seqlens": lens2}
    )
    ref2 = _general(q2, k_cache, v_cache, **{**kw, "cache_seqlens": lens2})
    assert torch.equal(out2, ref2[0]) and torch.equal(lse2, ref2[1])
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)
    qm = buf[1:].view(q.shape).copy_(q)  # 2-byte offset: misaligned
    assert torch.equal(flash_attn_with_kvcache(qm, k_cache, v_cache, **kw), ref_out)
    previous = fast_launch.set_fast_launch(False)  # shortcut off: the replay declines, Triton's path runs
    try:
        assert torch.equal(flash_attn_with_kvcache(q, k_cache, v_cache, **kw), ref_out)
    finally:
        fast_launch.set_fast_launch(previous)


@pytest.mark.gpu
def test_replay_in_cuda_graph_gpu():
    """A decode call captured in a CUDA graph (value checks off during capture) replays with the graph's
    inputs updated in place."""
    q, k_cache, v_cache, lens, _ = _inputs(batch=2, nheads=8, nheads_k=8, d=64, capacity=256)
    q, k_cache, v_cache = q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16()
    for _ in range(4):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    lens.copy_(torch.tensor([200, 7], dtype=torch.int32))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, _general(q, k_cache, v_cache, cache_seqlens=lens)[0])


def test_plan_cache_clear_drops_signatures():
    """Clearing plan_decode's cache (after a planning constant changed) re-plans the cached signatures too."""
    qp, kp, vp, lp, bt = _inputs(page=16)
    flash_attn_with_kvcache(qp, kp, vp, cache_seqlens=lp, block_table=bt, num_splits=2)
    fast = next(reversed(ki._FAST.values()))
    assert fast is not None and fast.split_meta["BT_PRELOAD"] > 0
    saved = dc.MAX_BT_PRELOAD
    dc.MAX_BT_PRELOAD = 0
    ki.plan_decode.cache_clear()
    try:
        assert not ki._FAST
        flash_attn_with_kvcache(qp, kp, vp, cache_seqlens=lp, block_table=bt, num_splits=2)
        fast = next(reversed(ki._FAST.values()))
        assert fast is not None and fast.split_meta["BT_PRELOAD"] == 0
    finally:
        dc.MAX_BT_PRELOAD = saved
        ki.plan_decode.cache_clear()
