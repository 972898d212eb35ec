"""FP8 (float8_e4m3fn) forward: refused clearly where it cannot run; on the GPU, accurate against the
reference run on the dequantised inputs."""

from __future__ import annotations

import pytest
import torch

from fa_core import (
    attention_ref,
    attention_varlen_ref,
    flash_attn_forward,
    flash_attn_varlen_forward,
    forward_launch,
)
from fa_core.testing import DEVICE, assert_close_2x, poisoned

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, head) scaling of ``x (batch, seqlen, nheads, d)`` into fp8; returns (x8, descale)."""
    amax = x.abs().amax(dim=(1, 3)).clamp_min(1e-6).float()  # (batch, nheads)
    scale = FP8_MAX / amax
    x8 = (x.float() * scale[:, None, :, None]).to(FP8)
    return x8, (1.0 / scale).contiguous()


def dequantize(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    return x8.float() * descale[:, None, :, None]


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU refusal")
def test_fp8_refused_on_cpu():
    q = torch.randn(1, 8, 2, 32).to(FP8)
    with pytest.raises(ValueError, match="FP8 attention needs a CUDA GPU"):
        flash_attn_forward(q, q, q)


def test_descale_without_fp8_refused():
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q = torch.randn(1, 8, 2, 32, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match="only valid with float8_e4m3fn"):
        flash_attn_forward(q, q, q, q_descale=torch.ones(1, 2, device=DEVICE))


def _emulated_ref(q, k, v, causal):
    """Plain PyTorch with the kernel's rounding points: P rounded to fp8 before the P @ V product."""
    d = q.shape[-1]
    group = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) / d**0.5
    if causal:
        sq, sk = s.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq)
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    p8 = p.to(FP8).float()
    return torch.einsum("bhts,bshd->bthd", p8, vv) / l.transpose(1, 2)


needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs an FP8 GPU (sm_89+)",
)


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape", [(2, 1024, 1024, 16, 4, 128), (1, 777, 2049, 8, 8, 64), (2, 512, 512, 4, 1, 256)]
)
def test_fp8_dense_gpu(shape, causal):
    torch.manual_seed(0)
    b, sq, sk, h, hk, d = shape
    q, qd = quantize(torch.randn(b, sq, h, d, device="cuda"))
    k, kd = quantize(torch.randn(b, sk, hk, d, device="cuda"))
    v, vd = quantize(torch.randn(b, sk, hk, d, device="cuda"))
    # q's descale is per (batch, kv-head) as in FlashAttention-3: use the max over each group's heads
    qd_kv = qd.view(b, hk, h // hk).amax(-1)
    q = (dequantize(q, qd) / qd_kv.repeat_interleave(h // hk, 1)[:, None, :, None]).to(FP8)
    res = flash_attn_forward(q, k, v, causal=causal, q_descale=qd_kv, k_descale=kd, v_descale=vd)
    assert res.out.dtype == torch.bfloat16
    qf = q.float() * qd_kv.repeat_interleave(h // hk, 1)[:, None, :, None]
    kf, vf = dequantize(k, kd), dequantize(v, vd)
    ref, _ = attention_ref(qf, kf, vf, causal=causal)
    emu = _emulated_ref(qf, kf, vf, causal)
    err = (res.out.float() - ref).norm() / ref.norm()
    emu_err = (emu - ref).norm() / ref.norm()
    print(f"fp8 {shape} causal={causal}: rel err {err:.2e}, emulated fp8-P rel err {emu_err:.2e}")
    # the kernel rounds P to e4m3 (3 mantissa bits) for the tensor-core P @ V product, like FA3; plus bf16 out
    assert err <= 2 * emu_err + 1e-2


@pytest.mark.gpu
@needs_fp8_gpu
def test_fp8_varlen_gpu():
    torch.manual_seed(1)
    lens = [100, 1000, 37]
    cu = torch.tensor([0, 100, 1100, 1137], dtype=torch.int32, device="cuda")
    h, d = 8, 128
    x = [torch.randn(sum(lens), h, d, device="cuda") for _ in range(3)]
    q8, k8, v8 = (t.to(FP8) for t in x)
    ones = torch.ones(3, h, device="cuda")
    res = flash_attn_varlen_forward(
        q8, k8, v8, cu, cu, 1000, 1000, causal=True, q_descale=ones, k_descale=ones, v_descale=ones
    )
    ref, _ = attention_varlen_ref(q8.float(), k8.float(), v8.float(), cu, cu, causal=True)
    err = (res.out.float() - ref).norm() / ref.norm()
    assert err < 5e-2, err


@pytest.mark.gpu
@needs_fp8_gpu
def test_fp8_negative_descale_gpu():
    """A negative q descale (a negated q) must flip the scores, not break the row max: the plain-score path
    takes the max on raw q @ k^T and flips q's sign bits when the combined scale is negative."""
    torch.manual_seed(2)
    b, s, h, d = 2, 300, 4, 128
    q, qd = quantize(torch.randn(b, s, h, d, device="cuda"))
    k, kd = quantize(torch.randn(b, s, h, d, device="cuda"))
    v, vd = quantize(torch.randn(b, s, h, d, device="cuda"))
    qd_neg = qd.clone()
    qd_neg[:, ::2] *= -1.0
    for causal in (False, True):
        res = flash_attn_forward(q, k, v, causal=causal, q_descale=qd_neg, k_descale=kd, v_descale=vd)
        qf, kf, vf = dequantize(q, qd_neg), dequantize(k, kd), dequantize(v, vd)
        ref, _ = attention_ref(qf, kf, vf, causal=causal)
        emu = _emulated_ref(qf, kf, vf, causal)
        err = (res.out.float() - ref).norm() / ref.norm()
        emu_err = (emu - ref).norm() / ref.norm()
        assert err <= 2 * emu_err + 1e-2, (causal, float(err), float(emu_err))


# ----------------------------------------------------------------------------- the FP8 path's layout, 16-bit
# forward_launch.FP8_LAYOUT_FOR_16BIT runs 16-bit inputs through the FP8 path's data layout (V transposed on
# the host and read as (headdim, keys) tiles, probabilities scaled by 2^8): checks its indexing and masks where
# FP8 dots cannot run (the CPU interpreter), and its TMA descriptors on a GPU.
LAYOUT_DTYPE = torch.float16 if DEVICE == "cpu" else torch.bfloat16


@pytest.mark.parametrize(
    "case",
    [
        {"causal": True, "sink": True},
        {"window_size": (9, 4), "softcap": 3.0},
        # keys in whole tiles, no band rule: the kernel without its right-edge loop
        {"sink": True, "sk": 128},
    ],
    ids=["causal_sink", "window_softcap", "whole_tiles_sink"],
)
def test_fp8_layout_dense(monkeypatch, case):
    monkeypatch.setattr(forward_launch, "FP8_LAYOUT_FOR_16BIT", True)
    torch.manual_seed(11)
    kw = dict(case)
    b, sq, sk, h, hk, d, dv = 2, 45, kw.pop("sk", 71), 4, 2, 40, 24  # ragged keys, odd head dims, GQA
    q = torch.randn(b, sq, h, d, device=DEVICE, dtype=LAYOUT_DTYPE)
    k = torch.randn(b, sk, hk, d, device=DEVICE, dtype=LAYOUT_DTYPE)
    v = torch.randn(b, sk, hk, dv, device=DEVICE, dtype=LAYOUT_DTYPE)
    if kw.pop("sink", False):
        kw["learnable_sink"] = torch.randn(h, device=DEVICE)
    res = flash_attn_forward(q, k, v, out=poisoned((b, sq, h, dv), LAYOUT_DTYPE, DEVICE), **kw)
    ref, ref_lse = attention_ref(q, k, v, dtype=torch.float32, **kw)
    low, low_lse = attention_ref(q, k, v, upcast=False, **kw)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=2e-3)


def test_fp8_layout_varlen(monkeypatch):
    monkeypatch.setattr(forward_launch, "FP8_LAYOUT_FOR_16BIT", True)
    torch.manual_seed(12)
    lens_q, lens_k = [3, 40, 0, 17], [9, 33, 5, 50]
    cq = torch.tensor([0, 3, 43, 43, 60], dtype=torch.int32, device=DEVICE)
    ck = torch.tensor([0, 9, 42, 47, 97], dtype=torch.int32, device=DEVICE)
    seqused = torch.tensor([9, 30, 0, 41], dtype=torch.int32, device=DEVICE)
    h, hk, d = 4, 1, 32
    q = torch.randn(sum(lens_q), h, d, device=DEVICE, dtype=LAYOUT_DTYPE)
    k = torch.randn(sum(lens_k), hk, d, device=DEVICE, dtype=LAYOUT_DTYPE)
    v = torch.randn(sum(lens_k), hk, d, device=DEVICE, dtype=LAYOUT_DTYPE)
    kw = {"causal": True, "seqused_k": seqused}
    res = flash_attn_varlen_forward(
        q, k, v, cq, ck, max(lens_q), max(lens_k), out=poisoned(q.shape, LAYOUT_DTYPE, DEVICE), **kw
    )
    ref, ref_lse = attention_varlen_ref(q, k, v, cq, ck, dtype=torch.float32, **kw)
    low, low_lse = attention_varlen_ref(q, k, v, cq, ck, upcast=False, **kw)
    assert_close_2x(res.out, ref, low, "out")
    assert_close_2x(res.lse, ref_lse, low_lse, "lse", slack=2e-3)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_transposed_v_copy(varlen):
    """The keys-last copy of V (a tiled Triton kernel) equals the permuted tensor, from a strided V (a slice of
    a packed kv tensor) across several key and dim tiles, ragged at both ends; the padding stays unread."""
    from fa_core.fp8 import transposed_v

    torch.manual_seed(13)
    n, hk, d = 150, 3, 80  # two 128-key tiles, two 64-dim tiles, both ragged
    kv = torch.randn(2, n, 2, hk, d, device=DEVICE, dtype=LAYOUT_DTYPE)
    v = kv[0, :, 1] if varlen else kv[:, :, 1]
    vt = transposed_v(v, varlen)
    assert vt.shape[-1] == 160 and vt.shape[-1] % 16 == 0
    want = v.permute(1, 2, 0) if varlen else v.permute(0, 2, 3, 1)
    assert torch.equal(vt[..., :n], want)
