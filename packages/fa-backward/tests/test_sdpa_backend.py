"""fa_backward.sdpa on the CPU: registration, refusal without CUDA, argument / layout adaptation.

The adaptation logic runs through Triton's interpreter (the conftest sets TRITON_INTERPRET=1 without CUDA):
our kernels are called directly, and through the dispatcher by registering them for the CPU dispatch key
(test-only) and calling the aten ops, whose autograd formulas then call our backward, as SDPA does on GPU.

    PYTHONPATH=packages/fa-core/src:packages/fa-backward/src python -m pytest \
        packages/fa-backward/tests/test_sdpa_backend.py -q
"""

from __future__ import annotations

import pytest
import torch

import fa_backward.sdpa as S
from fa_backward import flash_attn_func, flash_attn_varlen_func
from fa_core.reference import attention_ref, attention_varlen_ref
from fa_core.testing import assert_close_2x

HAS_REGISTRY = S._registry() is not None
CPU_ONLY = not torch.cuda.is_available()
DTYPE = torch.float32  # the interpreter's dtype (fp16 also works, but is slower to check)


def _bhsd(batch: int, nheads: int, seqlen: int, d: int, transposed_view: bool) -> torch.Tensor:
    """A ``(b, h, s, d)`` leaf; ``transposed_view``: memory ``(b, s, h, d)``, as attention layers make it."""
    if transposed_view:
        return torch.randn(batch, seqlen, nheads, d, dtype=DTYPE).transpose(1, 2).requires_grad_()
    return torch.randn(batch, nheads, seqlen, d, dtype=DTYPE).requires_grad_()


def _ref_bhsd(q, k, v, dout=None, **kw):
    """float64 reference (and its float32 twin for the 2x rule) on ``(b, h, s, d)`` inputs."""
    outs = []
    for dtype, upcast in ((torch.float64, True), (DTYPE, False)):
        leaves = [t.detach().transpose(1, 2).to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attention_ref(*leaves, upcast=upcast, dtype=torch.float64, **kw)
        grads = None
        if dout is not None:
            out.backward(dout.transpose(1, 2).to(dtype))
            grads = [t.grad.transpose(1, 2) for t in leaves]
        outs.append((out.detach().transpose(1, 2), lse, grads))
    return outs


@pytest.fixture
def cpu_kernels():
    """Our kernels registered for the CPU dispatch key for one test (removed afterwards)."""
    lib = S._register_kernels("CPU")
    S.reset_call_counts()
    try:
        yield lib
    finally:
        lib._destroy()


# ---------------------------------------------------------------------------------------- registry


@pytest.mark.skipif(not HAS_REGISTRY, reason="torch without the flash-attention registry (< 2.11)")
def test_registered_on_import_but_not_active() -> None:
    import torch.nn.attention as A

    assert S.IMPL_NAME in A.list_flash_attention_impls()
    assert not S.is_active()
    if hasattr(A, "current_flash_attention_impl"):
        assert A.current_flash_attention_impl() != S.IMPL_NAME
    assert S.register() is True  # idempotent


@pytest.mark.skipif(not HAS_REGISTRY, reason="torch without the flash-attention registry (< 2.11)")
@pytest.mark.skipif(not CPU_ONLY, reason="checks the refusal without a CUDA GPU")
def test_activation_refused_without_cuda() -> None:
    import torch.nn.attention as A

    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        S.activate()
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        A.activate_flash_attention_impl(S.IMPL_NAME)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"), S.enabled():
        pass
    assert not S.is_active()
    assert not S.is_supported()
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before
    if hasattr(A, "current_flash_attention_impl"):
        assert A.current_flash_attention_impl() is None
    S.restore()  # a no-op when nothing is active


def test_activation_without_registry_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "_registry", lambda: None)
    with pytest.raises(RuntimeError, match="no flash-attention registry"):
        S.activate()
    assert S.register() is False


# --------------------------------------------------------------------------- direct calls (layouts)


def test_transposes_are_views() -> None:
    q = torch.randn(2, 5, 3, 8).transpose(1, 2)  # (b, h, s, d) view of (b, s, h, d) memory
    assert S._bshd(q).data_ptr() == q.data_ptr() and S._bshd(q).is_contiguous()
    qc = torch.randn(2, 3, 5, 8)  # contiguous (b, h, s, d): still a view, strided over heads
    assert S._bshd(qc).data_ptr() == qc.data_ptr()
    strided_last = torch.randn(2, 3, 8, 5).transpose(-1, -2)
    assert S._bshd(strided_last).stride(-1) == 1  # the one case that copies
    out = S._new_bhsd(2, 3, 5, 8, qc)
    assert out.shape == (2, 3, 5, 8) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize(
    "nheads_k,causal,scale,transposed_view",
    [(4, False, None, False), (2, True, 0.3, True), (1, True, None, False)],
    ids=["mha", "gqa_causal_scale_views", "mqa_causal"],
)
def test_sdpa_forward_backward_direct(nheads_k: int, causal: bool, scale, transposed_view: bool) -> None:
    torch.manual_seed(0)
    b, h, s, d = 2, 4, 48, 32
    q = _bhsd(b, h, s, d, transposed_view)
    k, v = (_bhsd(b, nheads_k, s, d, transposed_view) for _ in range(2))
    res = S.sdpa_flash_forward(q.detach(), k.detach(), v.detach(), 0.0, causal, False, scale=scale)
    out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, debug = res
    # the aten schema's return values
    assert out.shape == (b, h, s, d) and out.dtype == DTYPE and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (b, h, s) and lse.dtype == torch.float32
    assert cum_q is None and cum_k is None and (max_q, max_k) == (s, s)
    assert rng_state.shape == (2,) and rng_state.dtype == torch.uint64
    assert unused.shape == () and unused.dtype == torch.uint64
    assert debug.numel() == 0 and debug.dtype == DTYPE

    dout = torch.randn(b, h, s, d, dtype=DTYPE)
    (ref_out, ref_lse, ref_g), (low_out, _, low_g) = _ref_bhsd(
        q, k, v, dout, softmax_scale=scale, causal=causal
    )
    assert_close_2x(out, ref_out, low_out, "out")
    assert_close_2x(lse, ref_lse, ref_lse.float(), "lse", slack=1e-4)

    grads = S.sdpa_flash_backward(
        dout,
        q.detach(),
        k.detach(),
        v.detach(),
        out,
        lse,
        None,
        None,
        s,
        s,
        0.0,
        causal,
        rng_state,
        unused,
        scale=scale,
    )
    for name, g, like, ref, low in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_g, low_g):
        assert g.shape == like.shape and g.stride() == like.stride(), name  # laid out like the input
        assert_close_2x(g, ref, low, name, slack=5e-5)


def test_sdpa_debug_mask() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    res = S.sdpa_flash_forward(q, k, v, 0.0, True, True)
    probs = res[8]
    assert probs.shape == (1, 2, 24, 24)
    ref = torch.softmax(
        (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(24, 24).triu(1).bool(), -1e9), -1
    )
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- through the dispatcher


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_aten_sdpa_op_matches_flash_attn_func_bitwise(cpu_kernels, dropout_p: float) -> None:
    """aten op -> our kernel -> derivatives.yaml -> our backward: bit-equal to flash_attn_func (same kernels,
    same dropout seed drawn from torch's CPU generator)."""
    torch.manual_seed(0)
    b, h, hk, s, d = 2, 4, 2, 40, 32
    base = [torch.randn(b, s, n, d, dtype=DTYPE) for n in (h, hk, hk)]
    dout = torch.randn(b, s, h, d, dtype=DTYPE)

    leaves = [t.clone().requires_grad_() for t in base]
    torch.manual_seed(123)
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        *(t.transpose(1, 2) for t in leaves), dropout_p, True, scale=0.25
    )
    res[0].backward(dout.transpose(1, 2))
    assert S.call_counts() == {"forward": 1, "backward": 1}

    mine = [t.clone().requires_grad_() for t in base]
    torch.manual_seed(123)
    ref = flash_attn_func(*mine, dropout_p=dropout_p, softmax_scale=0.25, causal=True)
    ref.backward(dout)
    assert torch.equal(res[0].transpose(1, 2), ref)
    for a, r in zip(leaves, mine):
        assert torch.equal(a.grad, r.grad)
    if dropout_p:
        assert res[6].device.type == "cpu" and res[6].dtype == torch.uint64  # our [seed, offset]


def test_aten_flash_attention_forward_dense_and_varlen(cpu_kernels) -> None:
    torch.manual_seed(0)
    h, hk, d = 4, 2, 32
    # dense (batch, seqlen, nheads, d): the op's own layout, with a window
    q, k, v = (torch.randn(2, 33, n, d, dtype=DTYPE, requires_grad=True) for n in (h, hk, hk))
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, 33, 33, 0.0, False, False, scale=None, window_size_left=8, window_size_right=2
    )
    assert lse.shape == (2, h, 33)
    ref = flash_attn_func(*(t.detach() for t in (q, k, v)), window_size=(8, 2))
    assert torch.equal(out, ref)
    out.sum().backward()
    assert q.grad is not None and S.call_counts() == {"forward": 1, "backward": 1}

    # varlen (total, nheads, d) with cum_seq_q / cum_seq_k
    lens = [17, 40, 5]
    cu = torch.tensor([0, 17, 57, 62], dtype=torch.int32)
    base = [torch.randn(62, n, d, dtype=DTYPE) for n in (h, hk, hk)]
    dout = torch.randn(62, h, d, dtype=DTYPE)
    leaves = [t.clone().requires_grad_() for t in base]
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        *leaves, cu, cu, max(lens), max(lens), 0.0, True, False
    )
    assert lse.shape == (h, 62)
    out.backward(dout)
    mine = [t.clone().requires_grad_() for t in base]
    ref = flash_attn_varlen_func(*mine, cu, cu, max(lens), max(lens), causal=True)
    ref.backward(dout)
    assert torch.equal(out, ref)
    for a, r in zip(leaves, mine):
        assert torch.equal(a.grad, r.grad)
    ref64, _ = attention_varlen_ref(*(t.double() for t in base), cu, cu, causal=True)
    torch.testing.assert_close(out.double(), ref64, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(
    S._schema("_flash_attention_forward_no_dropout_inplace") is None,
    reason="this torch has no _flash_attention_forward_no_dropout_inplace",
)
def test_aten_no_dropout_inplace(cpu_kernels) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 16, dtype=DTYPE) for _ in range(3))
    out = torch.full_like(q, float("nan"))
    lse = torch.ops.aten._flash_attention_forward_no_dropout_inplace(
        out, q, k, v, None, None, 20, 20, 0.0, True, False
    )
    assert lse.shape == (1, 2, 20)
    assert torch.equal(out, flash_attn_func(q, k, v, causal=True))


def test_unsupported_arguments_are_refused(cpu_kernels) -> None:
    q = torch.randn(1, 8, 2, 16, dtype=DTYPE)
    with pytest.raises(RuntimeError, match="block_table"):
        S.flash_attention_forward(q, q, q, None, None, 8, 8, 0.0, False, False, block_table=torch.zeros(1, 1))
    # a newer torch's argument that we do not know: accepted at its default, refused otherwise
    schema = S._schema("_scaled_dot_product_flash_attention")

    def narrow(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False):
        return S.sdpa_flash_forward(query, key, value, dropout_p, is_causal, return_debug_mask)

    kernel = S._make_kernel("_scaled_dot_product_flash_attention", narrow, schema)
    qb = q.transpose(1, 2)
    assert kernel(qb, qb, qb)[0].shape == qb.shape
    with pytest.raises(RuntimeError, match="scale=0.5 is not supported"):
        kernel(qb, qb, qb, scale=0.5)
    # fa_core's input checks come back as RuntimeError naming the backend
    with pytest.raises(RuntimeError, match="FA_PLUS flash backend"):
        torch.ops.aten._scaled_dot_product_flash_attention(qb, qb.double(), qb)


@pytest.mark.skipif(not HAS_REGISTRY, reason="torch without the flash-attention registry (< 2.11)")
@pytest.mark.skipif(not CPU_ONLY, reason="fakes CUDA availability; the GPU tests cover the real thing")
def test_activation_lifecycle_with_faked_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """activate / restore bookkeeping (registry handle, cuDNN flag) without a GPU: the CUDA kernels are
    registered (a CPU-only torch accepts that) but nothing runs them."""
    import torch.nn.attention as A

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        S.activate()
        assert S.is_active() and not torch.backends.cuda.cudnn_sdp_enabled()
        if hasattr(A, "current_flash_attention_impl"):
            assert A.current_flash_attention_impl() == S.IMPL_NAME
        S.activate()  # re-activation replaces the previous registration
        assert S.is_active()
        S.restore()
        assert not S.is_active() and torch.backends.cuda.cudnn_sdp_enabled()
        A.activate_flash_attention_impl(S.IMPL_NAME)  # torch's own API: cuDNN untouched
        assert S.is_active() and torch.backends.cuda.cudnn_sdp_enabled()
        A.restore_flash_attention_impl()
        assert not S.is_active()
        with S.enabled(disable_cudnn=False):
            assert S.is_active() and torch.backends.cuda.cudnn_sdp_enabled()
        assert not S.is_active()
    finally:
        S.restore()
        torch.backends.cuda.enable_cudnn_sdp(cudnn_before)
