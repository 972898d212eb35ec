"""GPU: bf16/fp16 through the flash_attn API at realistic sizes (2x rule vs the fp32 reference), gradients,
and torch.compile with the default inductor backend (fullgraph) over the dense, varlen and kvcache calls."""

from __future__ import annotations

import pytest
import torch
from fa_compat_testutils import (
    HAS_BACKWARD,
    HAS_KVCACHE,
    cu_seqlens,
    needs_backward,
    rand,
    ref_grads,
    ref_out_lse,
)

from fa_core.testing import assert_close_2x
from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


def _check_out(out, q, k, v, varlen=None, **kw):
    ref, _ = ref_out_lse(q, k, v, varlen=varlen, **kw)
    low, _ = ref_out_lse(q, k, v, varlen=varlen, upcast=False, **kw)
    assert_close_2x(out, ref, low, "out")


def _check_grads(grads, q, k, v, dout, varlen=None, **kw):
    true = ref_grads(q, k, v, dout, varlen=varlen, **kw)
    low = ref_grads(q, k, v, dout, varlen=varlen, upcast=False, **kw)
    for name, g, t, lo in zip(("dq", "dk", "dv"), grads, true, low):
        assert_close_2x(g, t, lo, name, slack=8e-3 * float(t.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kw",
    [dict(causal=True), dict(window_size=(128, 0), causal=True), dict(softcap=30.0)],
    ids=["causal", "swa", "softcap"],
)
def test_dense_forward_backward(dtype, kw):
    torch.manual_seed(0)
    b, s, h, hk, d = 2, 512, 8, 2, 128
    q = rand(b, s, h, d, dtype=dtype, requires_grad=HAS_BACKWARD)
    k, v = (rand(b, s, hk, d, dtype=dtype, requires_grad=HAS_BACKWARD) for _ in range(2))
    out = flash_attn_func(q, k, v, **kw)
    _check_out(out, q, k, v, **kw)
    if HAS_BACKWARD:
        dout = torch.randn_like(out)
        out.backward(dout)
        _check_grads((q.grad, k.grad, v.grad), q, k, v, dout, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_forward_backward(dtype):
    torch.manual_seed(1)
    lens, h, d = [300, 17, 511, 128], 8, 64
    cu = cu_seqlens(lens)
    q = rand(sum(lens), h, d, dtype=dtype, requires_grad=HAS_BACKWARD)
    k, v = (rand(sum(lens), h, d, dtype=dtype, requires_grad=HAS_BACKWARD) for _ in range(2))
    out = flash_attn_varlen_func(q, k, v, cu, cu, torch.tensor(max(lens)), max(lens), causal=True)
    _check_out(out, q, k, v, varlen=(cu, cu), causal=True)
    if HAS_BACKWARD:
        dout = torch.randn_like(out)
        out.backward(dout)
        _check_grads((q.grad, k.grad, v.grad), q, k, v, dout, varlen=(cu, cu), causal=True)


class _Block(torch.nn.Module):
    """One attention block calling the flash_attn API the way model code does."""

    def __init__(self, dim: int = 256, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.d, bias=False)
        self.o = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, cu, max_len, k_cache, v_cache, cache_seqlens):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.h * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        q, k, v = q.view(b, s, self.h, self.d), k.view(b, s, self.hk, self.d), v.view(b, s, self.hk, self.d)
        y = flash_attn_func(q, k, v, causal=True)
        y2 = flash_attn_varlen_func(
            q.reshape(b * s, self.h, self.d),
            k.reshape(b * s, self.hk, self.d),
            v.reshape(b * s, self.hk, self.d),
            cu,
            cu,
            max_len,
            max_len,
            causal=True,
        )
        y = y + y2.view(b, s, self.h, self.d)
        if k_cache is not None:
            with torch.no_grad():
                y3 = flash_attn_with_kvcache(
                    q[:, -1:],
                    k_cache,
                    v_cache,
                    k[:, -1:],
                    v[:, -1:],
                    cache_seqlens=cache_seqlens,
                    causal=True,
                )
            y = y + y3  # broadcast over the sequence
        return self.o(y.reshape(b, s, -1))


def test_compile_inductor_fullgraph():
    torch.manual_seed(2)
    torch._dynamo.reset()
    block = _Block().cuda().to(torch.bfloat16)
    b, s = 2, 256
    x = torch.randn(b, s, 256, device="cuda", dtype=torch.bfloat16, requires_grad=HAS_BACKWARD)
    cu = cu_seqlens([s] * b)
    cache = torch.zeros(b, 512, 2, 64, device="cuda", dtype=torch.bfloat16) if HAS_KVCACHE else None
    seqlens = torch.tensor([100, 300], dtype=torch.int32, device="cuda")

    def run(fn):
        kc, vc = (cache.clone(), cache.clone()) if HAS_KVCACHE else (None, None)
        y = fn(x, cu, s, kc, vc, seqlens)
        grads = (
            torch.autograd.grad(y.float().square().sum(), [x, *block.parameters()]) if HAS_BACKWARD else ()
        )
        return y, grads, kc

    y_ref, g_ref, kc_ref = run(block)
    compiled = torch.compile(block, fullgraph=True)  # inductor; a graph break raises
    y, grads, kc = run(compiled)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    for g, gr in zip(grads, g_ref):
        torch.testing.assert_close(g, gr, atol=5e-2, rtol=5e-2)
    if HAS_KVCACHE:
        assert torch.equal(kc, kc_ref)


@needs_backward
def test_deterministic_backward_is_bitwise_reproducible():
    torch.manual_seed(3)
    q, k, v = (rand(2, 384, 8, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 384, 8, 64, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
