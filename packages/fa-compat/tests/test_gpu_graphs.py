"""GPU: CUDA graphs. Forward, forward + backward (``loss.backward()`` inside the capture, static inputs and
grads) and decode steps (``flash_attn_with_kvcache`` appending k/v in place, contiguous and paged) are captured
once and replayed with new inputs copied into the static tensors; every replay is compared with an eager call
on the same inputs.

Expected: BITWISE equal. Same kernels, same tile configs, no atomics anywhere (the backward is deterministic:
dK/dV reduce the GQA group inside one program, dQ has its own pass), so a replay does exactly the eager work.
Value checks that need a host sync (cu_seqlens, cache bounds) are skipped while a stream is capturing
(``fa_core.validation.value_checks_enabled``); everything else the API does is capturable.
"""

from __future__ import annotations

import pytest
import torch
from fa_compat_testutils import HAS_BACKWARD, HAS_KVCACHE, cu_seqlens

from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DTYPE = torch.bfloat16
REPLAYS = 3


def _warm_and_capture(fn):
    """Warm up on a side stream (compiles, autotune, allocator pools), then capture ``fn`` into a graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = fn()
    torch.cuda.synchronize()
    return g, static


def _fill_(*tensors: torch.Tensor, seed: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=gen, device="cuda", dtype=torch.float32))


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if not torch.equal(a, b):
        diff = (a.float() - b.float()).abs()
        raise AssertionError(
            f"{what}: replay differs from eager (max |diff| {diff.nan_to_num(1e9).max():.3e})"
        )


@pytest.mark.parametrize(
    "kw",
    [dict(causal=True), dict(window_size=(64, 0), causal=True), dict(softcap=20.0)],
    ids=["causal", "swa", "softcap"],
)
def test_graph_forward(kw):
    b, s, h, hk, d = 2, 384, 8, 2, 128
    q = torch.empty(b, s, h, d, device="cuda", dtype=DTYPE)
    k, v = (torch.empty(b, s, hk, d, device="cuda", dtype=DTYPE) for _ in range(2))
    _fill_(q, k, v, seed=0)
    g, out = _warm_and_capture(lambda: flash_attn_func(q, k, v, **kw))
    for r in range(REPLAYS):
        _fill_(q, k, v, seed=100 + r)
        g.replay()
        torch.cuda.synchronize()
        _equal(out, flash_attn_func(q, k, v, **kw), f"out (replay {r})")


def _fwd_bwd_capture(inputs, call, dout):
    """Capture forward + ``out.backward(dout)``; the leaves' ``.grad`` are allocated inside the capture and
    rewritten by every replay."""

    def step():
        for t in inputs:
            t.grad = None
        out = call(*inputs)
        out.backward(dout)
        return out

    g, out = _warm_and_capture(step)
    return g, out


def _eager_grads(inputs, call, dout):
    clones = [t.detach().clone().requires_grad_() for t in inputs]
    out = call(*clones)
    out.backward(dout)
    return out.detach(), [c.grad for c in clones]


@pytest.mark.skipif(not HAS_BACKWARD, reason="fa-backward not installed")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_graph_forward_backward(causal):
    b, s, h, hk, d = 2, 320, 8, 4, 64
    q = torch.empty(b, s, h, d, device="cuda", dtype=DTYPE, requires_grad=True)
    k, v = (torch.empty(b, s, hk, d, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(2))
    dout = torch.empty(b, s, h, d, device="cuda", dtype=DTYPE)
    _fill_(q, k, v, dout, seed=1)

    def call(q_, k_, v_):
        return flash_attn_func(q_, k_, v_, causal=causal, deterministic=True)

    g, out = _fwd_bwd_capture((q, k, v), call, dout)
    grads = (q.grad, k.grad, v.grad)
    for r in range(REPLAYS):
        _fill_(q, k, v, dout, seed=200 + r)
        g.replay()
        torch.cuda.synchronize()
        ref_out, ref_grads = _eager_grads((q, k, v), call, dout)
        _equal(out, ref_out, f"out (replay {r})")
        for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
            _equal(got, ref, f"{name} (replay {r})")


@pytest.mark.skipif(not HAS_BACKWARD, reason="fa-backward not installed")
def test_graph_varlen_forward_backward():
    lens, h, d = [113, 1, 257, 64], 4, 96
    cu = cu_seqlens(lens)
    total, mx = sum(lens), max(lens)
    q, k, v = (torch.empty(total, h, d, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
    dout = torch.empty(total, h, d, device="cuda", dtype=DTYPE)
    _fill_(q, k, v, dout, seed=2)

    def call(q_, k_, v_):
        return flash_attn_varlen_func(q_, k_, v_, cu, cu, mx, mx, causal=True)

    g, out = _fwd_bwd_capture((q, k, v), call, dout)
    grads = (q.grad, k.grad, v.grad)
    for r in range(REPLAYS):
        _fill_(q, k, v, dout, seed=300 + r)
        g.replay()
        torch.cuda.synchronize()
        ref_out, ref_grads = _eager_grads((q, k, v), call, dout)
        _equal(out, ref_out, f"out (replay {r})")
        for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
            _equal(got, ref, f"{name} (replay {r})")


@pytest.mark.skipif(not HAS_KVCACHE, reason="fa-kvcache not installed")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("num_splits", [1, 0], ids=["nosplit", "auto-split"])
def test_graph_decode_step(paged, num_splits):
    """A decode loop: each replay appends one k/v row per sequence at ``cache_seqlens`` (advanced in place
    between replays) and attends over the cache. An eager twin with its own caches runs the same steps; outputs
    and both caches must stay bitwise equal."""
    b, cap, h, hk, d, page = 4, 1024, 16, 2, 128, 256
    q = torch.empty(b, 1, h, d, device="cuda", dtype=DTYPE)
    k_new, v_new = (torch.empty(b, 1, hk, d, device="cuda", dtype=DTYPE) for _ in range(2))
    if paged:
        nblocks = b * cap // page + 3
        k_cache, v_cache = (torch.zeros(nblocks, page, hk, d, device="cuda", dtype=DTYPE) for _ in range(2))
        perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(0))[: b * cap // page]
        block_table = perm.reshape(b, cap // page).to(torch.int32).cuda()
    else:
        k_cache, v_cache = (torch.zeros(b, cap, hk, d, device="cuda", dtype=DTYPE) for _ in range(2))
        block_table = None
    _fill_(k_cache, v_cache, seed=3)
    seqlens = torch.tensor([5, 300, 511, 700], dtype=torch.int32, device="cuda")
    _fill_(q, k_new, v_new, seed=4)

    def step(kc, vc, lens):
        return flash_attn_with_kvcache(
            q, kc, vc, k_new, v_new, cache_seqlens=lens, block_table=block_table, causal=True,
            num_splits=num_splits,
        )  # fmt: skip

    # eager twin: its own caches and lengths, same inputs
    k_twin, v_twin, lens_twin = k_cache.clone(), v_cache.clone(), seqlens.clone()
    g, out = _warm_and_capture(lambda: step(k_cache, v_cache, seqlens))
    # the warm-up and the capture appended nothing persistent that the twin lacks? warm-up ran 2 real steps
    # (capture does not execute): replay them on the twin so both start equal
    for _ in range(2):
        step(k_twin, v_twin, lens_twin)
    _equal(k_cache, k_twin, "k_cache after warm-up")
    for r in range(REPLAYS + 2):
        _fill_(q, k_new, v_new, seed=400 + r)
        g.replay()
        ref = step(k_twin, v_twin, lens_twin)
        torch.cuda.synchronize()
        _equal(out, ref, f"decode out (step {r})")
        _equal(k_cache, k_twin, f"k_cache (step {r})")
        _equal(v_cache, v_twin, f"v_cache (step {r})")
        with torch.no_grad():
            seqlens.add_(1)
            lens_twin.add_(1)
