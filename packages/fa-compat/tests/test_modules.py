"""Tests for flash_attn.modules (mha, mlp) and flash_attn.ops.activations (Triton; interpreter on CPU).

The flash cores of ``MHA`` are held against its plain-PyTorch cores with the same weights (forward and every
gradient), and generation with ``inference_params`` against the full forward of the same module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fa_compat_testutils import DEVICE, HAS_KVCACHE, HI, needs_backward  # noqa: E402

from fa_core.reference import attention_ref  # noqa: E402
from flash_attn.bert_padding import pad_input, unpad_input  # noqa: E402
from flash_attn.modules import mha as mha_module  # noqa: E402
from flash_attn.modules.mha import (  # noqa: E402
    MHA,
    CrossAttention,
    FlashCrossAttention,
    FlashSelfAttention,
    LinearResidual,
    SelfAttention,
    get_alibi_slopes,
)
from flash_attn.modules.mlp import GatedMlp, Mlp  # noqa: E402
from flash_attn.ops import activations as act  # noqa: E402

#: tolerance of flash core vs PyTorch core (different summation order; fp16 on GPU)
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[HI]
EMBED, HEADS = 64, 4  # head dim 16


@dataclass
class InferenceParams:
    """The fields of flash-attn's ``flash_attn.utils.generation.InferenceParams`` that MHA uses."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: torch.Tensor | None = None


def _close(a, b, tol=TOL, msg=""):
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=msg or None)


def _close_scaled(a, b, tol=TOL, msg=""):
    """Like _close, the absolute tolerance scaled by b's largest magnitude (gradients summed over tokens)."""
    scale = max(1.0, b.float().abs().max().item())
    torch.testing.assert_close(a.float(), b.float(), atol=tol * scale, rtol=tol, msg=msg or None)


def _pair(**kw):
    """MHA with the flash cores and MHA with the PyTorch cores, same weights."""
    torch.manual_seed(0)
    flash = MHA(EMBED, HEADS, use_flash_attn=True, device=DEVICE, dtype=HI, **kw)
    plain = MHA(EMBED, HEADS, use_flash_attn=False, device=DEVICE, dtype=HI, **kw)
    plain.load_state_dict(flash.state_dict())
    return flash, plain


def _run(module, inputs, dout, **kw):
    """Forward + backward; returns (out, grads of the inputs, grads of the parameters by name)."""
    for t in inputs:
        t.grad = None
    module.zero_grad()
    out = module(*inputs, **kw)
    out.backward(dout)
    return (
        out.detach(),
        [t.grad.clone() for t in inputs],
        {n: p.grad.clone() for n, p in module.named_parameters()},
    )


def _assert_same(res_a, res_b, tol=TOL):
    out_a, gin_a, gp_a = res_a
    out_b, gin_b, gp_b = res_b
    _close(out_a, out_b, tol, "output")
    for a, b in zip(gin_a, gin_b):
        _close_scaled(a, b, tol, "input gradient")
    assert gp_a.keys() == gp_b.keys()
    for name in gp_a:
        _close_scaled(gp_a[name], gp_b[name], tol, f"gradient of {name}")


def _x(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(HI).requires_grad_()


# ------------------------------------------------------------------------------------------- activations
def test_gelu_helpers_match_tanh_gelu():
    torch.manual_seed(1)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ref = F.gelu(x, approximate="tanh")
    _close(act.gelu_fwd(x), ref, 1e-6)
    g = torch.randn_like(x)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    _close(act.gelu_bwd(g, x.detach()), ref_grad, 1e-6)
    out = act.fast_gelu_impl(x)
    (fast_grad,) = torch.autograd.grad(out, x, g)
    _close(fast_grad, ref_grad, 1e-6)

    ref_b = F.gelu(x + bias, approximate="tanh")
    _close(act.bias_gelu(x, bias), ref_b, 1e-6)
    gx, gb = torch.autograd.grad(ref_b, (x, bias), g)
    dx, db = act.bias_gelu_back(g, x.detach(), bias.detach())
    _close(dx, gx, 1e-6)
    _close(db, gb, 1e-6)
    out = act.bias_gelu_impl(x, bias)
    ax, ab = torch.autograd.grad(out, (x, bias), g)
    _close(ax, gx, 1e-6)
    _close(ab, gb, 1e-6)
    # dtype is kept, math runs in float32
    xh = x.detach().half()
    assert act.gelu_fwd(xh).dtype == torch.float16
    _close(act.gelu_fwd(xh), F.gelu(xh.float(), approximate="tanh"), 2e-3)


def test_relu_sqrelu_swiglu():
    torch.manual_seed(2)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, dtype=torch.float64)
    xd = x.detach()
    _close(act.relu_bwd(g, xd), torch.where(xd >= 0, g, 0.0), 0)
    sq = F.relu(x) ** 2
    _close(act.sqrelu_fwd(xd), sq, 1e-6)
    _close(act.sqrelu_bwd(g, xd), torch.autograd.grad(sq, x, g)[0], 1e-6)

    ref = F.silu(x) * y
    _close(act.swiglu_fwd(xd, y.detach()), ref, 1e-6)
    rx, ry = torch.autograd.grad(ref, (x, y), g)
    dx, dy = act.swiglu_bwd(xd, y.detach(), g)
    _close(dx, rx, 1e-6)
    _close(dy, ry, 1e-6)
    ax, ay = torch.autograd.grad(act.swiglu(x, y), (x, y), g)
    _close(ax, rx, 1e-6)
    _close(ay, ry, 1e-6)
    assert act.SwiGLUFunction.apply(xd, y.detach()).shape == (4, 6)


# --------------------------------------------------------------------------------------------------- mlp
def test_mlp():
    torch.manual_seed(3)
    mlp = Mlp(8, activation=F.relu, return_residual=True)
    assert mlp.fc1.out_features == 32 and mlp.fc2.out_features == 8
    x = torch.randn(2, 3, 8)
    out, res = mlp(x)
    assert res is x
    _close(out, mlp.fc2(F.relu(mlp.fc1(x))), 1e-6)
    mlp2 = Mlp(8, hidden_features=5, out_features=3, bias1=False, bias2=False)
    assert mlp2.fc1.bias is None and mlp2.fc2.bias is None and mlp2(x).shape == (2, 3, 3)


@pytest.mark.parametrize("activation", ["sigmoid", "silu", "relu"])
def test_gated_mlp(activation):
    torch.manual_seed(4)
    fn = {"sigmoid": F.sigmoid, "silu": F.silu, "relu": F.relu}[activation]
    mlp = GatedMlp(12, activation=fn, multiple_of=16)
    assert mlp.fc1.out_features == 2 * 32 and mlp.fc2.in_features == 32  # int(8 * 12 / 3) = 32
    assert GatedMlp(12, hidden_features=20, multiple_of=16).fc2.in_features == 32
    x = torch.randn(2, 5, 12, requires_grad=True)
    value, gate = mlp.fc1(x).chunk(2, dim=-1)
    ref = mlp.fc2(value * fn(gate))
    out = mlp(x)
    _close(out, ref, 1e-5)
    g = torch.randn_like(out)
    _close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], 1e-5)
    out2, res = GatedMlp(12, activation=fn, return_residual=True)(x)
    assert res is x and out2.shape == x.shape


# ------------------------------------------------------------------------------------------- small parts
def test_alibi_slopes():
    assert get_alibi_slopes(8) == pytest.approx([2.0 ** -(i + 1) for i in range(8)])
    assert get_alibi_slopes(4) == pytest.approx([2.0 ** -(2 * (i + 1)) for i in range(4)])
    six = get_alibi_slopes(6)  # the 4 slopes of 4 heads, then every other slope of 8 heads
    assert six == pytest.approx(get_alibi_slopes(4) + get_alibi_slopes(8)[0::2][:2])


def test_linear_residual():
    lin = LinearResidual(4, 3)
    x = torch.randn(2, 4)
    out, res = lin(x)
    assert res is x
    _close(out, F.linear(x, lin.weight, lin.bias), 1e-6)


def test_torch_cores_match_reference():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 6, 4, 16, dtype=torch.float64) for _ in range(3))
    out = SelfAttention(causal=True)(torch.stack([q, k, v], dim=2))
    _close(out, attention_ref(q, k, v, causal=True, dtype=torch.float64)[0], 1e-9)
    # GQA cross-attention, bottom-right aligned causal mask
    kv = torch.randn(2, 9, 2, 2, 16, dtype=torch.float64)
    out = CrossAttention(causal=True, softmax_scale=0.3)(q, kv)
    ref = attention_ref(q, kv[:, :, 0], kv[:, :, 1], softmax_scale=0.3, causal=True, dtype=torch.float64)[0]
    _close(out, ref, 1e-9)


def test_constructor_and_forward_errors():
    with pytest.raises(ValueError, match="use_alibi"):
        MHA(EMBED, HEADS, use_alibi=True)
    with pytest.raises(ValueError, match="window_size"):
        MHA(EMBED, HEADS, window_size=(4, 0))
    with pytest.raises(ValueError, match="num_heads_kv"):
        MHA(EMBED, HEADS, num_heads_kv=3)
    with pytest.raises(ValueError, match="cross_attn"):
        MHA(EMBED, HEADS, cross_attn=True, rotary_emb_dim=8)
    m = MHA(EMBED, HEADS, use_flash_attn=True, fused_bias_fc=True)  # accepted, plain nn.Linear
    assert type(m.Wqkv) is torch.nn.Linear
    x = torch.randn(1, 4, EMBED, device=DEVICE)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.ones(1, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        MHA(EMBED, HEADS)(x[0], cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), max_seqlen=4)


# ------------------------------------------------------------------------------- MHA: flash vs PyTorch
@needs_backward
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "config",
    ["mha", "gqa", "mqa", "rotary", "rotary_gqa", "cross", "dwconv", "dwconv_gqa"],
)
def test_mha_flash_matches_torch(config, causal):
    kw = {
        "mha": {},
        "gqa": {"num_heads_kv": 2},
        "mqa": {"num_heads_kv": 1, "qkv_proj_bias": False, "out_proj_bias": False},
        "rotary": {"rotary_emb_dim": 16},
        "rotary_gqa": {"rotary_emb_dim": 8, "num_heads_kv": 2, "rotary_emb_interleaved": True},
        "cross": {"cross_attn": True, "num_heads_kv": 2},
        "dwconv": {"dwconv": True},
        "dwconv_gqa": {"dwconv": True, "num_heads_kv": 2},
    }[config]
    flash, plain = _pair(causal=causal, softmax_scale=0.2 if config == "mqa" else None, **kw)
    torch.manual_seed(6)
    x = _x(2, 12, EMBED)
    inputs = [x]
    if config == "cross":
        inputs.append(_x(2, 17, EMBED))  # x_kv: a longer key sequence
    dout = torch.randn(2, 12, EMBED, device=DEVICE, dtype=HI)
    _assert_same(_run(flash, inputs, dout), _run(plain, inputs, dout))


@needs_backward
def test_mha_cross_mixer_subset_and_residual():
    flash, plain = _pair(cross_attn=True, return_residual=True)
    x, x_kv = _x(2, 10, EMBED), _x(2, 7, EMBED)
    res = []
    for m in (flash, plain):
        out, residual = m(x, x_kv, mixer_subset=slice(0, 1))
        assert residual is x and out.shape == (2, 1, EMBED)
        res.append(out)
    _close(res[0], res[1])


@needs_backward
def test_mha_checkpointing_same_gradients():
    flash, _ = _pair(causal=True, num_heads_kv=2)
    ckpt = MHA(EMBED, HEADS, num_heads_kv=2, causal=True, use_flash_attn=True, checkpointing=True)
    ckpt = ckpt.to(device=DEVICE, dtype=HI)
    ckpt.load_state_dict(flash.state_dict())
    x = _x(2, 9, EMBED)
    dout = torch.randn(2, 9, EMBED, device=DEVICE, dtype=HI)
    exact = {torch.float32: 1e-6}.get(HI, TOL)  # same kernels, recomputed
    _assert_same(_run(ckpt, [x], dout), _run(flash, [x], dout), tol=exact)


@needs_backward
# not GQA + causal: CrossAttention aligns its causal mask to the bottom right of the kept keys against the
# padded query length (flash-attn's semantics), which differs from per-sequence causal attention there
@pytest.mark.parametrize(("num_heads_kv", "causal"), [(None, False), (None, True), (2, False)])
def test_mha_padding_mask_vs_varlen(num_heads_kv, causal):
    """PyTorch cores with key_padding_mask on the padded batch == flash cores on the unpadded varlen batch."""
    flash, plain = _pair(num_heads_kv=num_heads_kv, causal=causal)
    torch.manual_seed(7)
    batch, seqlen = 2, 13
    lengths = torch.tensor([13, 6], device=DEVICE)
    mask = torch.arange(seqlen, device=DEVICE)[None, :] < lengths[:, None]  # right padding
    x = _x(batch, seqlen, EMBED)
    dout = torch.randn(batch, seqlen, EMBED, device=DEVICE, dtype=HI) * mask[..., None]

    plain.zero_grad()
    out_plain = plain(x, key_padding_mask=mask)
    out_plain.backward(dout)
    grad_plain = x.grad.clone()
    x.grad = None

    flash.zero_grad()
    x_unpad, indices, cu_seqlens, max_seqlen, _ = unpad_input(x, mask)
    out_unpad = flash(x_unpad, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    assert out_unpad.shape == (int(lengths.sum()), EMBED)
    out_flash = pad_input(out_unpad, indices, batch, seqlen)
    out_flash.backward(dout)

    _close(out_flash[mask], out_plain[mask], msg="output")
    assert not out_flash[~mask].any()
    _close_scaled(x.grad, grad_plain, msg="input gradient")
    for (name, p_flash), p_plain in zip(flash.named_parameters(), plain.parameters()):
        _close_scaled(p_flash.grad, p_plain.grad, msg=f"gradient of {name}")


def test_flash_cores_window_and_alibi_match_reference():
    torch.manual_seed(8)
    qkv = torch.randn(2, 11, 3, 4, 16, device=DEVICE, dtype=torch.float32).to(HI)
    slopes = torch.tensor(get_alibi_slopes(4), device=DEVICE)
    core = FlashSelfAttention(causal=True, window_size=(3, 0), alibi_slopes=slopes.half())
    with torch.no_grad():
        out = core(qkv)
    q, k, v = qkv.unbind(2)
    ref = attention_ref(q, k, v, causal=True, window_size=(3, 0), alibi_slopes=slopes)[0]
    _close(out, ref)
    kv = torch.randn(2, 7, 2, 2, 16, device=DEVICE, dtype=torch.float32).to(HI)
    cross = FlashCrossAttention(window_size=(2, 2), softmax_scale=0.5)
    with torch.no_grad():
        out = cross(q, kv)
    ref = attention_ref(q, kv[:, :, 0], kv[:, :, 1], softmax_scale=0.5, window_size=(2, 2))[0]
    _close(out, ref)


# ----------------------------------------------------------------------------------- MHA: generation
def _generate(module, x, prompt, *, lengths_per_sample=False):
    """Prefill ``prompt`` tokens, then decode the rest one token at a time; the outputs concatenated."""
    batch, seqlen, _ = x.shape
    params = InferenceParams(max_seqlen=seqlen + 3, max_batch_size=batch)
    if lengths_per_sample:
        params.lengths_per_sample = torch.zeros(batch, dtype=torch.int32, device=x.device)
    outs = [module(x[:, :prompt], inference_params=params)]
    params.seqlen_offset = prompt
    if params.lengths_per_sample is not None:
        params.lengths_per_sample += prompt
    for i in range(prompt, seqlen):
        outs.append(module(x[:, i : i + 1], inference_params=params))
        params.seqlen_offset += 1
        if params.lengths_per_sample is not None:
            params.lengths_per_sample += 1
    assert params.key_value_memory_dict[0].shape == (
        batch,
        seqlen + 3,
        2,
        module.num_heads_kv,
        module.head_dim,
    )
    return torch.cat(outs, dim=1)


class _CountCalls:
    def __init__(self, fn):
        self.fn, self.calls, self.rotary_calls = fn, 0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.rotary_calls += kwargs.get("rotary_cos") is not None
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("use_flash_attn", [True, False])
@pytest.mark.parametrize(
    "config",
    ["mha", "gqa", "rotary16", "rotary8_mqa", "rotary16_gqa_lengths", "window", "alibi"],
)
def test_mha_generation_matches_full_forward(config, use_flash_attn, monkeypatch):
    kw = {
        "mha": {},
        "gqa": {"num_heads_kv": 2},
        "rotary16": {"rotary_emb_dim": 16},  # fused path: rotary inside flash_attn_with_kvcache
        "rotary8_mqa": {"rotary_emb_dim": 8, "num_heads_kv": 1},  # rotary by RotaryEmbedding, then the cache
        "rotary16_gqa_lengths": {"rotary_emb_dim": 16, "num_heads_kv": 2, "rotary_emb_interleaved": True},
        "window": {"window_size": (3, 0)},
        "alibi": {"use_alibi": True},
    }[config]
    if not use_flash_attn and config in ("window", "alibi"):
        pytest.skip("flash cores only")
    torch.manual_seed(9)
    module = MHA(EMBED, HEADS, causal=True, layer_idx=0, use_flash_attn=use_flash_attn, device=DEVICE, **kw)
    module = module.to(HI).eval()
    x = torch.randn(2, 11, EMBED, device=DEVICE, dtype=torch.float32).to(HI)
    spy = _CountCalls(mha_module.flash_attn_with_kvcache)
    monkeypatch.setattr(mha_module, "flash_attn_with_kvcache", spy)
    with torch.no_grad():
        full = module(x)
        steps = _generate(module, x, prompt=7, lengths_per_sample=config.endswith("lengths"))
    _close(steps, full)
    kvcache_path = use_flash_attn and HAS_KVCACHE
    assert spy.calls == (4 if kvcache_path else 0)
    # rotary dims that are multiples of 16 rotate inside the kvcache kernel
    assert spy.rotary_calls == (4 if kvcache_path and config.startswith("rotary16") else 0)


@pytest.mark.skipif(not HAS_KVCACHE, reason="needs fa-kvcache (flash_attn_with_kvcache)")
def test_mha_decoding_step_methods_match_forward():
    """flash-attn's private decoding-step methods (``_update_kv_cache``, ``_update_kvcache_attention``,
    ``_apply_rotary_update_kvcache_attention``) give what ``forward`` gives for the same step."""
    import copy

    torch.manual_seed(12)
    module = MHA(
        EMBED, HEADS, causal=True, layer_idx=0, use_flash_attn=True, rotary_emb_dim=16, device=DEVICE
    )
    module = module.to(HI).eval()
    x = torch.randn(2, 6, EMBED, device=DEVICE, dtype=torch.float32).to(HI)
    prompt = 5
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    with torch.no_grad():
        module(x[:, :prompt], inference_params=params)
        params.seqlen_offset = prompt
        token = x[:, prompt : prompt + 1]
        fused_params, plain_params, cache_params = (copy.deepcopy(params) for _ in range(3))
        want = module(token, inference_params=params)
        qkv = module._project_qkv(token)
        fused = module._apply_rotary_update_kvcache_attention(qkv[:, :, 0], qkv[:, :, 1:], fused_params)
        rotated = module.rotary_emb(qkv, seqlen_offset=prompt, max_seqlen=8)
        plain = module._update_kvcache_attention(rotated[:, :, 0], rotated[:, :, 1:], plain_params)
        cache = module._update_kv_cache(rotated[:, :, 1:], cache_params)
    for context in (fused, plain):
        _close(module.out_proj(context.flatten(-2)), want)
    assert cache.shape == (2, prompt + 1, 2, module.num_heads_kv, module.head_dim)
    torch.testing.assert_close(cache[:, prompt:], rotated[:, :, 1:], rtol=0, atol=0)
    torch.testing.assert_close(cache, params.key_value_memory_dict[0][:, : prompt + 1], rtol=1e-6, atol=1e-6)


def test_mha_generation_cross_attention():
    """Cross-attention decoding: each step's queries attend over the cached keys of every x_kv so far."""
    torch.manual_seed(10)
    module = MHA(EMBED, HEADS, cross_attn=True, num_heads_kv=2, causal=True, layer_idx=0, use_flash_attn=True)
    module = module.to(device=DEVICE, dtype=HI).eval()
    x = torch.randn(1, 6, EMBED, device=DEVICE, dtype=torch.float32).to(HI)
    with torch.no_grad():
        full = module(x)
        steps = _generate(module, x, prompt=3)
    _close(steps, full)


def test_allocate_inference_cache():
    module = MHA(EMBED, HEADS, num_heads_kv=2, device=DEVICE)
    cache = module.allocate_inference_cache(3, 20)
    assert cache.shape == (3, 20, 2, 2, 16) and cache.dtype == module.out_proj.weight.dtype
    assert module.allocate_inference_cache(1, 4, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="layer_idx"):
        module(torch.randn(1, 2, EMBED, device=DEVICE), inference_params=InferenceParams(4, 1))


def test_import_flash_attn_does_not_import_modules():
    code = (
        "import sys, flash_attn; "
        "assert not any(m.startswith(('flash_attn.modules', 'flash_attn.ops.activations')) for m in sys.modules)"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "FA_PLUS_SILENCE_CONFLICT": "1"}
    )
