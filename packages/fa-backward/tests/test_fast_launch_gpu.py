"""GPU: the direct launches of ``fa_core.fast_launch`` give bit-for-bit the results of Triton's own launch path,
forward and backward, over the kernels' feature flags, and later calls really skip Triton's path.

The backward has no atomics (deterministic), so two runs of the same step are bitwise equal."""

from __future__ import annotations

import pytest
import torch
from fa_backward_testutils import cu_seqlens, rand

import fa_backward.launch as bl
import fa_core.forward_launch as fl
from fa_backward import flash_attn_func, flash_attn_varlen_func
from fa_core import flash_attn_forward
from fa_core.fast_launch import set_fast_launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LAUNCHERS = (fl.fwd_launch, bl.dkdv_launch, bl.dq_launch)

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, kwargs)
CASES = {
    "d64_causal": (2, 512, 512, 4, 4, 64, {"causal": True}),
    "d128_gqa": (2, 300, 700, 8, 2, 128, {}),
    "d96_window_softcap_alibi": (
        1,
        257,
        513,
        4,
        2,
        96,
        {"window_size": (64, 16), "softcap": 20.0, "alibi": True},
    ),
    "d256_causal": (1, 384, 384, 2, 1, 256, {"causal": True}),
    "d64_fp16": (2, 128, 128, 2, 2, 64, {"dtype": torch.float16}),
}


def _step(q, k, v, dout, kw):
    out = flash_attn_func(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _inputs(name):
    b, sq, sk, h, hk, d, kw = CASES[name]
    kw = dict(kw)
    dtype = kw.pop("dtype", torch.bfloat16)
    torch.manual_seed(0)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(b, h, device="cuda") * 0.1
    q = rand(b, sq, h, d, dtype=dtype).requires_grad_()
    k, v = (rand(b, sk, hk, d, dtype=dtype).requires_grad_() for _ in range(2))
    return q, k, v, rand(b, sq, h, d, dtype=dtype), kw


def _count_slow(monkeypatch):
    calls = []
    for launcher in LAUNCHERS:
        real = launcher._slow
        monkeypatch.setattr(
            launcher, "_slow", lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))[1]
        )
    return calls


@pytest.mark.parametrize("name", list(CASES))
def test_fast_launch_bitwise_equal_to_triton_path(name, monkeypatch):
    q, k, v, dout, kw = _inputs(name)
    previous = set_fast_launch(False)
    try:
        ref = _step(q, k, v, dout, kw)
    finally:
        set_fast_launch(previous)
    set_fast_launch(True)
    first = _step(q, k, v, dout, kw)  # may compile / fill the cache
    slow = _count_slow(monkeypatch)
    again = _step(q, k, v, dout, kw)
    torch.cuda.synchronize()
    assert not slow, "a repeated step went through Triton's launch path"
    assert all(len(launcher._cache) for launcher in LAUNCHERS)
    assert fl.fwd_launch.last_config is not None and bl.dq_launch.last_config is not None
    for got in (first, again):
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_fast_launch_varlen_and_dropout_bitwise():
    torch.manual_seed(1)
    lens = [17, 256, 1, 300]
    cu = cu_seqlens(lens)
    total, h, d = sum(lens), 4, 64
    q, k, v = (rand(total, h, d, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    dout = rand(total, h, d, dtype=torch.bfloat16)

    def step():
        out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    def fwd_dropout():
        rs = torch.tensor([1234, 8], dtype=torch.int64)
        r = flash_attn_forward(q.detach()[None, :300], k.detach()[None, :300], v.detach()[None, :300],
                               dropout_p=0.2, rng_state=rs)  # fmt: skip
        return r.out, r.lse

    previous = set_fast_launch(False)
    try:
        ref = (*step(), *fwd_dropout())
    finally:
        set_fast_launch(previous)
    set_fast_launch(True)
    for _ in range(2):
        got = (*step(), *fwd_dropout())
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_fast_launch_keys_on_sequence_bucket_and_alignment():
    """Another autotune bucket or a misaligned pointer is another cache entry, never a reuse."""
    fl.fwd_launch.clear()
    outs = {}
    for s in (128, 1024):
        q, k, v = (rand(1, s, 2, 64, dtype=torch.bfloat16) for _ in range(3))
        outs[s] = flash_attn_forward(q, k, v).out
        set_fast_launch(False)
        ref = flash_attn_forward(q, k, v).out
        set_fast_launch(True)
        assert torch.equal(outs[s], ref)
    n = len(fl.fwd_launch._cache)
    assert n >= 2
    # a view whose base is not 16-byte aligned (last dim still contiguous)
    base = rand(1, 129, 2, 64, dtype=torch.bfloat16)
    q = base.view(-1)[64 * 2 + 1 :].view(-1)[: 128 * 2 * 63].view(1, 128, 2, 63)
    k = v = q
    out = flash_attn_forward(q, k, v).out
    set_fast_launch(False)
    ref = flash_attn_forward(q, k, v).out
    set_fast_launch(True)
    assert torch.equal(out, ref)
    assert len(fl.fwd_launch._cache) > n


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_inputs_on_a_device_other_than_the_current_one():
    """Triton launches on the current device; like flash-attn's CUDA guard, we run on the inputs' device."""
    if torch.cuda.current_device() == 1:
        pytest.skip("the current device is already cuda:1")
    torch.manual_seed(4)
    q, k, v = (
        torch.randn(2, 256, 4, 64, device="cuda:1", dtype=torch.bfloat16).requires_grad_() for _ in range(3)
    )
    dout = torch.randn_like(q)
    got = _step(q, k, v, dout, {"causal": True})  # current device: not 1
    with torch.cuda.device(1):
        ref = _step(q, k, v, dout, {"causal": True})
    torch.cuda.synchronize(1)
    for a, b in zip(got, ref):
        assert a.device == torch.device("cuda:1") and torch.equal(a, b)


def _fresh(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


def _no_launcher_calls(monkeypatch):
    calls = []
    for launcher in LAUNCHERS:
        monkeypatch.setattr(launcher, "_launch", lambda *a, **k: calls.append(1))
    return calls


@pytest.mark.parametrize("name", list(CASES))
def test_replayed_calls_bitwise_with_new_tensors(name, monkeypatch):
    """A signature's later calls replay the recorded launches (fa_core.fast_launch.Replay: no launcher runs)
    with the new call's tensors: forward, fwd+bwd, and the forward without grad, bitwise equal to Triton's
    launch path on fresh copies (new data pointers)."""
    q, k, v, dout, kw = _inputs(name)
    previous = set_fast_launch(False)
    try:
        ref = _step(q, k, v, dout, kw)
    finally:
        set_fast_launch(previous)
    set_fast_launch(True)
    _step(q, k, v, dout, kw)  # compiles, fills the launcher cache
    _step(*map(_fresh, (q, k, v, dout)), kw)  # records
    for _ in range(2):
        kw2 = {n: _fresh(x) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
        q2, k2, v2, dout2 = map(_fresh, (q, k, v, dout))
        calls = _no_launcher_calls(monkeypatch)
        got = _step(q2, k2, v2, dout2, kw2)
        with torch.no_grad():
            out_ng = flash_attn_func(q2, k2, v2, **kw2)
        torch.cuda.synchronize()
        monkeypatch.undo()
        assert not calls, "a repeated signature went through the launcher"
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
        assert torch.equal(out_ng, ref[0])


def test_replayed_varlen_calls_bitwise(monkeypatch):
    torch.manual_seed(2)
    lens = [17, 256, 1, 300]
    total, h, d = sum(lens), 4, 64
    q, k, v = (rand(total, h, d, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    dout = rand(total, h, d, dtype=torch.bfloat16)

    def step(q, k, v, dout, cu_q, cu_k):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens), max(lens), causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    cu = cu_seqlens(lens)
    previous = set_fast_launch(False)
    try:
        ref = step(q, k, v, dout, cu, cu)
    finally:
        set_fast_launch(previous)
    set_fast_launch(True)
    for same in (True, False):  # one cu_seqlens tensor for both, then two
        step(q, k, v, dout, cu, cu if same else cu.clone())
        step(q, k, v, dout, cu, cu if same else cu.clone())
        cu2 = cu.clone()
        calls = _no_launcher_calls(monkeypatch)
        got = step(*map(_fresh, (q, k, v, dout)), cu2, cu2 if same else cu.clone())
        torch.cuda.synchronize()
        monkeypatch.undo()
        assert not calls
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
