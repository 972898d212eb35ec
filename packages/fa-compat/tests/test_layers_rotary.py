"""Tests for flash_attn.layers.rotary and flash_attn.ops.triton.rotary (Triton; interpreter on CPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flash_attn.layers.rotary import (  # noqa: E402
    ApplyRotaryEmb,
    RotaryEmbedding,
    apply_rotary_emb,
    apply_rotary_emb_func,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
    apply_rotary_emb_torch,
    rotate_half,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-5


def _cos_sin(seqlen_ro: int, rotary_dim: int, dtype: torch.dtype = torch.float32):
    angle = torch.rand(seqlen_ro, rotary_dim // 2, device=DEVICE) * 2 * torch.pi
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def _ref(x, cos, sin, interleaved=False, offsets=0):
    """Pure-torch reference with per-batch offsets, built on apply_rotary_emb_torch."""
    seqlen = x.shape[1]
    offs = offsets.tolist() if isinstance(offsets, torch.Tensor) else [offsets] * x.shape[0]
    outs = [
        apply_rotary_emb_torch(x[b : b + 1], cos[o : o + seqlen], sin[o : o + seqlen], interleaved)
        for b, o in enumerate(offs)
    ]
    return torch.cat(outs, dim=0)


def test_ops_triton_reexport():
    from fa_core.rotary import apply_rotary, rotary_kernel
    from flash_attn.ops.triton.rotary import apply_rotary as reexported
    from flash_attn.ops.triton.rotary import rotary_kernel as kernel

    assert reexported is apply_rotary
    assert kernel is rotary_kernel
    assert apply_rotary_emb_func is apply_rotary_emb


@pytest.mark.parametrize("offsets_kind", ["int", "tensor"])
def test_in_place_forms_accept_a_leaf_that_requires_grad(offsets_kind):
    # flash-attn's in-place Functions rotate a leaf's data and return an alias carrying the rotation's gradient
    torch.manual_seed(7)
    cos, sin = _cos_sin(9, 8)
    offs = 2 if offsets_kind == "int" else torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    qkv0 = torch.randn(2, 4, 3, 2, 16, device=DEVICE)
    qkv = qkv0.clone().requires_grad_()
    out = apply_rotary_emb_qkv_(qkv, cos, sin, seqlen_offsets=offs)
    assert out.data_ptr() == qkv.data_ptr() and out.grad_fn is not None
    leaf = qkv0.clone().requires_grad_()
    ref = torch.stack(
        [_ref(leaf[:, :, 0], cos, sin, False, offs), _ref(leaf[:, :, 1], cos, sin, False, offs)], 2
    )
    ref = torch.cat([ref, leaf[:, :, 2:]], dim=2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(qkv.grad, leaf.grad, atol=ATOL, rtol=ATOL)
    kv = qkv0[:, :, 1:].clone().requires_grad_()
    out_kv = apply_rotary_emb_kv_(kv, cos, sin, seqlen_offsets=offs)
    assert out_kv.data_ptr() == kv.data_ptr()
    torch.testing.assert_close(out_kv, ref[:, :, 1:].detach(), atol=ATOL, rtol=ATOL)


def test_in_place_forms_without_grad_return_the_input():
    torch.manual_seed(8)
    cos, sin = _cos_sin(6, 8)
    offs = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
    orig = torch.randn(2, 4, 3, 2, 16, device=DEVICE)
    want = torch.stack([_ref(orig[:, :, i], cos, sin, False, offs) for i in (0, 1)] + [orig[:, :, 2]], dim=2)
    with torch.no_grad():
        qkv = orig.clone()
        assert apply_rotary_emb_qkv_(qkv, cos, sin, seqlen_offsets=offs) is qkv
        x = orig[:, :, 0].clone()
        assert apply_rotary_emb(x, cos, sin, inplace=True, seqlen_offsets=offs) is x
        kv = orig[:, :, 1:].clone()
        assert apply_rotary_emb_kv_(kv, cos, sin, seqlen_offsets=offs) is kv
        # a tensor that requires grad, under no_grad: rotated in place, no history
        qkv_rg = orig.clone().requires_grad_()
        assert apply_rotary_emb_qkv_(qkv_rg, cos, sin, seqlen_offsets=offs) is qkv_rg
    for got in (qkv, qkv_rg.detach()):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(x, want[:, :, 0], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(kv, want[:, :, 1:], atol=ATOL, rtol=ATOL)


def test_rotate_half():
    x = torch.arange(8.0)
    assert rotate_half(x).tolist() == [-4.0, -5.0, -6.0, -7.0, 0.0, 1.0, 2.0, 3.0]
    assert rotate_half(x, interleaved=True).tolist() == [-1.0, 0.0, -3.0, 2.0, -5.0, 4.0, -7.0, 6.0]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("offsets_kind", ["int", "tensor"])
def test_apply_rotary_emb_fwd_bwd(interleaved, inplace, offsets_kind):
    torch.manual_seed(0)
    batch, seqlen, nheads, headdim, rotary_dim = 2, 5, 2, 16, 12
    cos, sin = _cos_sin(9, rotary_dim)
    offsets = 2 if offsets_kind == "int" else torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    x = torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    # inplace on a leaf is not allowed: feed a non-leaf copy
    inp = x * 1.0 if inplace else x
    out = apply_rotary_emb(inp, cos, sin, interleaved=interleaved, inplace=inplace, seqlen_offsets=offsets)
    out_ref = _ref(x_ref, cos, sin, interleaved, offsets)
    torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=ATOL)
    g_copy = g.clone()
    out.backward(g)
    assert torch.equal(g, g_copy), "backward must not write into the caller's gradient"
    out_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=ATOL, rtol=ATOL)


def test_apply_rotary_emb_varlen_grad():
    torch.manual_seed(1)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    x = torch.randn(8, 2, 8, device=DEVICE, requires_grad=True)
    cos, sin = _cos_sin(6, 8)
    out = apply_rotary_emb(x, cos, sin, cu_seqlens=cu, max_seqlen=5)
    ref = torch.cat([_ref(x[None, 0:3], cos, sin)[0], _ref(x[None, 3:8], cos, sin)[0]])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    # Rotation is orthogonal: the VJP of sum(out * g) is the inverse rotation of g.
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gref, atol=ATOL, rtol=ATOL)


def test_apply_rotary_emb_expanded_grad():
    # .sum() backward gives an expanded (stride-0) grad; the in-place backward must not write into it.
    x = torch.randn(1, 4, 2, 8, device=DEVICE, requires_grad=True)
    cos, sin = _cos_sin(4, 8)
    apply_rotary_emb(x * 1.0, cos, sin, inplace=True).sum().backward()
    ref = x.detach().clone().requires_grad_()
    _ref(ref, cos, sin).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=ATOL, rtol=ATOL)


def test_apply_rotary_emb_fp16():
    torch.manual_seed(2)
    x = torch.randn(2, 6, 2, 16, device=DEVICE, dtype=torch.float16)
    cos, sin = _cos_sin(6, 16, torch.float16)
    out = apply_rotary_emb(x, cos, sin)
    truth = _ref(x.double(), cos.double(), sin.double())
    lowp = _ref(x, cos, sin)
    err = (out.double() - truth).abs().max().item()
    assert err <= 2 * (lowp.double() - truth).abs().max().item() + 1e-3


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("separate_k", [False, True])
def test_apply_rotary_emb_qkv_(interleaved, separate_k):
    torch.manual_seed(3)
    b, s, h, d, rd = 2, 4, 2, 16, 8
    cos, sin = _cos_sin(6, rd)
    cos_k, sin_k = _cos_sin(6, rd) if separate_k else (None, None)
    qkv0 = torch.randn(b, s, 3, h, d, device=DEVICE, requires_grad=True)
    qkv = qkv0 * 1.0
    out = apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, interleaved=interleaved, seqlen_offsets=1)
    assert out.data_ptr() == qkv.data_ptr()
    ck, sk = (cos, sin) if cos_k is None else (cos_k, sin_k)
    q_ref = _ref(qkv0[:, :, 0], cos, sin, interleaved, 1)
    k_ref = _ref(qkv0[:, :, 1], ck, sk, interleaved, 1)
    ref = torch.stack([q_ref, k_ref, qkv0[:, :, 2]], dim=2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, qkv0, g)
    (gref,) = torch.autograd.grad(ref, qkv0, g)
    torch.testing.assert_close(gx, gref, atol=ATOL, rtol=ATOL)


def test_apply_rotary_emb_qkv_gqa_layout():
    torch.manual_seed(4)
    b, s, hq, hk, d = 1, 3, 4, 2, 8
    cos, sin = _cos_sin(3, 8)
    qkv0 = torch.randn(b, s, hq + 2 * hk, d, device=DEVICE)
    out = apply_rotary_emb_qkv_(qkv0.clone(), cos, sin, num_heads_q=hq)
    ref = torch.cat([_ref(qkv0[:, :, : hq + hk], cos, sin), qkv0[:, :, hq + hk :]], dim=2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


def test_apply_rotary_emb_kv_():
    torch.manual_seed(5)
    cos, sin = _cos_sin(8, 8)
    kv0 = torch.randn(2, 4, 2, 2, 8, device=DEVICE, requires_grad=True)
    offs = torch.tensor([1, 3], device=DEVICE)
    out = apply_rotary_emb_kv_(kv0 * 1.0, cos, sin, interleaved=True, seqlen_offsets=offs)
    ref = torch.stack([_ref(kv0[:, :, 0], cos, sin, True, offs), kv0[:, :, 1]], dim=2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    g = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, kv0, g)[0], torch.autograd.grad(ref, kv0, g)[0], atol=ATOL, rtol=ATOL
    )


def test_autograd_function_returns_input_when_inplace():
    x = torch.randn(1, 2, 1, 4, device=DEVICE)
    cos, sin = _cos_sin(2, 4)
    assert ApplyRotaryEmb.apply(x, cos, sin, False, True, 0, None, None).data_ptr() == x.data_ptr()


def _rotary_module_ref(mod: RotaryEmbedding, seqlen: int, dtype: torch.dtype):
    t = torch.arange(seqlen, dtype=torch.float32, device=DEVICE)
    inv_freq = 1.0 / (mod.base ** (torch.arange(0, mod.dim, 2, device=DEVICE, dtype=torch.float32) / mod.dim))
    freqs = torch.outer(t, inv_freq)
    if mod.scale_base is None:
        return freqs.cos().to(dtype), freqs.sin().to(dtype), None, None
    scale = (torch.arange(0, mod.dim, 2, device=DEVICE, dtype=torch.float32) + 0.4 * mod.dim) / (
        1.4 * mod.dim
    )
    power = (torch.arange(seqlen, dtype=torch.float32, device=DEVICE) - seqlen // 2) / mod.scale_base
    sc = scale ** power[:, None]
    return (
        (freqs.cos() * sc).to(dtype),
        (freqs.sin() * sc).to(dtype),
        (freqs.cos() / sc).to(dtype),
        (freqs.sin() / sc).to(dtype),
    )


@pytest.mark.parametrize("scale_base", [None, 512.0])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding_module(scale_base, interleaved):
    torch.manual_seed(6)
    b, s, h, d, rd = 2, 5, 2, 16, 8
    mod = RotaryEmbedding(rd, base=10000.0, interleaved=interleaved, scale_base=scale_base, device=DEVICE)
    assert "inv_freq" not in mod.state_dict()  # non-persistent buffers
    qkv = torch.randn(b, s, 3, h, d, device=DEVICE)
    out = mod(qkv.clone(), seqlen_offset=2)
    cos, sin, cos_k, sin_k = _rotary_module_ref(mod, s + 2, torch.float32)
    ck, sk = (cos, sin) if cos_k is None else (cos_k, sin_k)
    ref = torch.stack(
        [
            _ref(qkv[:, :, 0], cos, sin, interleaved, 2),
            _ref(qkv[:, :, 1], ck, sk, interleaved, 2),
            qkv[:, :, 2],
        ],
        dim=2,
    )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # q + kv form
    q, kv = mod(qkv[:, :, 0].clone(), qkv[:, :, 1:].clone(), seqlen_offset=2)
    torch.testing.assert_close(q, ref[:, :, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kv, ref[:, :, 1:], atol=1e-4, rtol=1e-4)


def test_rotary_embedding_tensor_offsets_with_max_seqlen():
    mod = RotaryEmbedding(8, device=DEVICE)
    qkv = torch.randn(2, 3, 3, 1, 8, device=DEVICE)
    offs = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    out = mod(qkv.clone(), seqlen_offset=offs, max_seqlen=7)
    cos, sin, _, _ = _rotary_module_ref(mod, 7, torch.float32)
    torch.testing.assert_close(out[:, :, 0], _ref(qkv[:, :, 0], cos, sin, False, offs), atol=1e-4, rtol=1e-4)
    assert mod._seq_len_cached == 7
