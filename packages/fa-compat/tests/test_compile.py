"""torch.compile / torch.library: the ops behind the API pass opcheck, and a model calling flash_attn_func,
the packed and varlen functions and flash_attn_with_kvcache (which mutates the cache) compiles with
``fullgraph=True`` (no graph break), forward and backward, with the same results as eager.

On CPU the backends are "eager" and "aot_eager" (the whole dynamo + AOTAutograd + functionalization path, the
kernels through the interpreter); test_gpu.py compiles with inductor on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from fa_compat_testutils import (
    DEVICE,
    HAS_BACKWARD,
    HAS_KVCACHE,
    HI,
    cu_seqlens,
    needs_backward,
    needs_kvcache,
    rand,
)

import flash_attn  # noqa: F401  (registers the ops)
from flash_attn import (
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)

OPS = torch.ops.flash_attn_plus
# test_aot_dispatch_dynamic re-traces with dynamic shapes: slow in the interpreter and covered by the
# compile tests below; the schema, fake-tensor and autograd-registration checks are the ones that matter.
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _dense_args(requires_grad: bool, dropout_p: float = 0.0, return_softmax: bool = False):
    q = rand(1, 12, 2, 16, requires_grad=requires_grad)
    k, v = (rand(1, 20, 1, 16, requires_grad=requires_grad) for _ in range(2))
    return (q, k, v, dropout_p, 0.25, True, -1, -1, 0.0, None, return_softmax, False)


@pytest.mark.parametrize("return_softmax", [False, True])
def test_opcheck_fwd(return_softmax):
    args = _dense_args(False, 0.2 if return_softmax else 0.0, return_softmax)
    torch.library.opcheck(OPS.fwd.default, args, test_utils=OPCHECK_TESTS)


def test_opcheck_varlen_fwd():
    q, k, v = rand(13, 2, 16), rand(9, 1, 16), rand(9, 1, 16)
    args = (
        q,
        k,
        v,
        cu_seqlens([5, 8]),
        cu_seqlens([4, 5]),
        8,
        5,
        0.0,
        0.25,
        True,
        -1,
        -1,
        0.0,
        None,
        False,
        None,
        False,
    )
    torch.library.opcheck(OPS.varlen_fwd.default, args, test_utils=OPCHECK_TESTS)


@needs_backward
def test_opcheck_fwd_with_grad():
    torch.library.opcheck(OPS.fwd.default, _dense_args(True), test_utils=OPCHECK_TESTS)


@needs_backward
def test_opcheck_bwd():
    q, k, v = rand(1, 12, 2, 16), rand(1, 20, 1, 16), rand(1, 20, 1, 16)
    out, lse, _, rng = OPS.fwd(q, k, v, 0.0, 0.25, True, -1, -1, 0.0, None, False, False)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (rand(1, 12, 2, 16), q, k, v, out, lse, dq, dk, dv, 0.0, 0.25, True, -1, -1, 0.0, None, False, rng)
    torch.library.opcheck(OPS.bwd.default, args, test_utils=OPCHECK_TESTS)


@needs_kvcache
def test_opcheck_kvcache():
    q, kc, vc = rand(2, 1, 2, 16), rand(2, 16, 1, 16), rand(2, 16, 1, 16)
    kn, vn = rand(2, 1, 1, 16), rand(2, 1, 1, 16)
    seqlens = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    args = (
        q,
        kc,
        vc,
        kn,
        vn,
        None,
        None,
        seqlens,
        None,
        None,
        None,
        None,
        None,
        True,
        -1,
        -1,
        0.0,
        True,
        None,
        0,
    )
    torch.library.opcheck(OPS.kvcache.default, args, test_utils=OPCHECK_TESTS)


def _model(q, k, v, cu, k_cache, v_cache, k_new, v_new, cache_seqlens):
    b, s, h, d = q.shape
    total = flash_attn_func(q, k, v, causal=True, window_size=(6, 0)).float().sum()
    out_v = flash_attn_varlen_func(
        q.reshape(b * s, h, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d), cu, cu, s, s, causal=True
    )
    total = total + (out_v.float() ** 2).sum()
    qkv = torch.stack(
        [q, k.repeat_interleave(h // k.shape[2], 2), v.repeat_interleave(h // k.shape[2], 2)], 2
    )
    total = total + flash_attn_qkvpacked_func(qkv, softcap=5.0).float().sum()
    if k_cache is not None:
        out_kv = flash_attn_with_kvcache(
            q[:, -1:].detach(), k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, causal=True
        )
        total = total + out_kv.float().sum()
        # the rotary inside flash_attn_with_kvcache (q and the new keys rotated at the cache's positions)
        angle = torch.arange(k_cache.shape[1], device=q.device, dtype=torch.float32)[:, None] * 0.1
        # rotary_dim = d / 2
        angle = angle * torch.arange(1, d // 4 + 1, device=q.device, dtype=torch.float32)
        out_rot = flash_attn_with_kvcache(
            q[:, -1:].detach(), k_cache, v_cache, k_new, v_new, rotary_cos=angle.cos().to(q.dtype),
            rotary_sin=angle.sin().to(q.dtype), cache_seqlens=cache_seqlens + 1, causal=True,
            rotary_interleaved=True,
        )  # fmt: skip
        total = total + out_rot.float().sum()
    return total


def _inputs():
    torch.manual_seed(0)
    b, s, h, hk, d = 2, 10, 2, 1, 16
    grad = HAS_BACKWARD
    q = rand(b, s, h, d, requires_grad=grad)
    k, v = (rand(b, s, hk, d, requires_grad=grad) for _ in range(2))
    cu = cu_seqlens([s] * b)
    if not HAS_KVCACHE:
        return (q, k, v, cu, None, None, None, None, None)
    cache = rand(b, 16, hk, d)
    k_new, v_new = rand(b, 1, hk, d), rand(b, 1, hk, d)
    seqlens = torch.tensor([3, 7], dtype=torch.int32, device=DEVICE)
    return (q, k, v, cu, cache, cache.clone(), k_new, v_new, seqlens)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    args = _inputs()
    q, k, v, cu, k_cache, v_cache, k_new, v_new, seqlens = args

    def fresh_caches():
        return (None, None) if k_cache is None else (k_cache.clone(), v_cache.clone())

    kc_eager, vc_eager = fresh_caches()
    ref = _model(q, k, v, cu, kc_eager, vc_eager, k_new, v_new, seqlens)
    grads_ref = torch.autograd.grad(ref, (q, k, v)) if HAS_BACKWARD else None

    compiled = torch.compile(_model, fullgraph=True, backend=backend)  # fullgraph: a graph break is an error
    kc, vc = fresh_caches()
    out = compiled(q, k, v, cu, kc, vc, k_new, v_new, seqlens)
    torch.testing.assert_close(out, ref, atol=1e-5 if torch.float32 == HI else 1e-2, rtol=1e-5)
    if k_cache is not None:  # the mutation of the cache happened (functionalized and written back)
        assert torch.equal(kc, kc_eager) and torch.equal(vc, vc_eager)
        assert torch.equal(kc[0, 3], k_new[0, 0]) and torch.equal(kc[1, 7], k_new[1, 0])
    if HAS_BACKWARD:
        grads = torch.autograd.grad(out, (q, k, v))
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-5 if torch.float32 == HI else 1e-2, rtol=1e-4)


def test_compile_dropout_draws_a_new_mask_each_call():
    torch._dynamo.reset()
    q, k, v = rand(1, 16, 2, 16), rand(1, 16, 2, 16), rand(1, 16, 2, 16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return flash_attn_func(q, k, v, dropout_p=0.5)

    assert not torch.equal(f(q, k, v), f(q, k, v))


@needs_backward
def test_compiled_backward_never_launches_on_traced_tensors(monkeypatch):
    """AOT autograd traces the backward under fake / functional tensors after dynamo is done
    (``torch.compiler.is_compiling()`` is False there): the eager shortcut must not launch kernels on them
    (on the GPU, Triton raised "Cannot access data pointer"); the custom op is what gets traced."""
    import fa_backward.autograd as fab_autograd

    real = fab_autograd.backward_from_autograd
    seen: list[type] = []

    def spy(dout, q, *args, **kwargs):
        seen.extend({type(dout), type(q)})
        return real(dout, q, *args, **kwargs)

    monkeypatch.setattr(fab_autograd, "backward_from_autograd", spy)
    torch._dynamo.reset()
    q = rand(1, 12, 2, 16, requires_grad=True)
    k, v = (rand(1, 12, 2, 16, requires_grad=True) for _ in range(2))
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(t is torch.Tensor for t in seen), seen
    # and eager calls do take the shortcut
    seen.clear()
    grads_eager = torch.autograd.grad(flash_attn_func(q, k, v, causal=True).float().sum(), (q, k, v))
    assert seen and all(t is torch.Tensor for t in seen)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)


def test_tracing_predicate():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fa_core.ops import tracing

    assert not tracing(torch.ones(2)) and not tracing(torch.nn.Parameter(torch.ones(2)))
    with FakeTensorMode():
        assert tracing(torch.ones(2))


def _sink_chunk_model(q, k, v, sink):
    return flash_attn_func(q, k, v, causal=True, attention_chunk=4, learnable_sink=sink).float().sum()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_sink_and_chunk(backend):
    """The extras go through the same ops: a learnable sink and chunks compile with fullgraph=True, and the
    sink's gradient matches eager."""
    torch._dynamo.reset()
    q = rand(1, 12, 2, 16, requires_grad=HAS_BACKWARD)
    k, v = (rand(1, 12, 1, 16, requires_grad=HAS_BACKWARD) for _ in range(2))
    sink = torch.randn(2, device=DEVICE, requires_grad=HAS_BACKWARD)
    ref = _sink_chunk_model(q, k, v, sink)
    out = torch.compile(_sink_chunk_model, fullgraph=True, backend=backend)(q, k, v, sink)
    torch.testing.assert_close(out, ref, atol=1e-5 if torch.float32 == HI else 1e-2, rtol=1e-5)
    if HAS_BACKWARD:
        grads = torch.autograd.grad(out, (q, k, v, sink))
        grads_ref = torch.autograd.grad(ref, (q, k, v, sink))
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-5 if torch.float32 == HI else 1e-2, rtol=1e-4)
