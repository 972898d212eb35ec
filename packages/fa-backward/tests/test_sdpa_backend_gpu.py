"""fa_backward.sdpa on a CUDA GPU: SDPA's flash backend really runs our kernels once activated.

Run (repository root, CUDA machine, torch >= 2.11):
    PYTHONPATH=packages/fa-core/src:packages/fa-backward/src \
        python -m pytest packages/fa-backward/tests/test_sdpa_backend_gpu.py -m gpu -q -s

Kept quick: one shape (GQA, d 64, bf16), autotuning reduced to one config per kernel for this module (the
comparisons are bitwise between two paths that share the autotune key, so the config does not matter).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fa_backward.sdpa as S
from fa_backward import flash_attn_func
from fa_core import settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(S._registry() is None, reason="torch without the flash-attention registry (< 2.11)"),
]

B, S_LEN, H, HK, D = 2, 512, 8, 2, 64
DTYPE = torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def _one_config():
    """One tile config per kernel (compile time only); the settings are restored afterwards."""
    with settings.override(autotune=False):
        yield


@pytest.fixture
def fa_plus():
    """Ours active for one test; restored (cuDNN flag included) even when the test fails."""
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    S.activate()
    S.reset_call_counts()
    try:
        yield
    finally:
        S.restore()
        assert not S.is_active()
        assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before


def _inputs(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """q, k, v in OUR layout ``(b, s, h, d)`` and dout; SDPA gets their transposed views."""
    torch.manual_seed(seed)
    base = [torch.randn(B, S_LEN, n, D, device="cuda", dtype=DTYPE) for n in (H, HK, HK)]
    return base, torch.randn(B, S_LEN, H, D, device="cuda", dtype=DTYPE)


def _sdpa_step(base, dout, causal: bool, dropout_p: float, backend=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [t.clone().requires_grad_() for t in base]
    torch.manual_seed(1234)  # our dropout seed comes from torch's CPU generator
    with sdpa_kernel(backend or SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in leaves),
            dropout_p=dropout_p,
            is_causal=causal,
            scale=0.1,
            enable_gqa=True,
        )
    out.backward(dout.transpose(1, 2))
    return out.transpose(1, 2), [t.grad for t in leaves]


def _ours_step(base, dout, causal: bool, dropout_p: float):
    leaves = [t.clone().requires_grad_() for t in base]
    torch.manual_seed(1234)
    out = flash_attn_func(*leaves, dropout_p=dropout_p, softmax_scale=0.1, causal=causal)
    out.backward(dout)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize(
    "causal,dropout_p", [(False, 0.0), (True, 0.0), (True, 0.1)], ids=["full", "causal", "causal_dropout"]
)
def test_sdpa_equals_flash_attn_func_bitwise(fa_plus, causal: bool, dropout_p: float) -> None:
    base, dout = _inputs()
    out, grads = _sdpa_step(base, dout, causal, dropout_p)
    torch.cuda.synchronize()
    assert S.call_counts() == {"forward": 1, "backward": 1}, "SDPA did not route to FA_PLUS"
    ref, ref_grads = _ours_step(base, dout, causal, dropout_p)
    assert torch.equal(out, ref), f"out differs: max {(out.float() - ref.float()).abs().max().item():.3e}"
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == r.shape, name
        assert torch.equal(g, r), f"{name} differs: max {(g.float() - r.float()).abs().max().item():.3e}"


def test_restore_gives_torch_kernels_back() -> None:
    import torch.nn.attention as A

    base, dout = _inputs(1)
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    # through torch's own API (the one line a user may write instead of fa_backward.sdpa.activate())
    A.activate_flash_attention_impl(S.IMPL_NAME)
    try:
        assert S.is_active()
        S.reset_call_counts()
        ours, ours_g = _sdpa_step(base, dout, True, 0.0)
        assert S.call_counts() == {"forward": 1, "backward": 1}
    finally:
        A.restore_flash_attention_impl()
    assert not S.is_active()
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before  # torch's API never touches cuDNN
    theirs, theirs_g = _sdpa_step(base, dout, True, 0.0)
    torch.cuda.synchronize()
    assert S.call_counts() == {"forward": 1, "backward": 1}, "restored SDPA still calls FA_PLUS"
    # same math, different kernels: close, and (in practice) not bit-identical
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)
    for g, t in zip(ours_g, theirs_g):
        torch.testing.assert_close(g, t, atol=5e-2, rtol=5e-2)
    print(f"\n[sdpa] ours vs torch flash: out bit-identical = {torch.equal(ours, theirs)}")


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,  # 4 heads of 64
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: SDPA gets enable_gqa=True
        max_position_embeddings=S_LEN,
    )
    try:
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    except (AttributeError, TypeError):  # a transformers without _from_config(attn_implementation=)
        cfg._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(cfg)
    assert model.config._attn_implementation == "sdpa"
    return model.to(device="cuda", dtype=DTYPE)


def test_hf_llama_training_step_runs_on_fa_plus(fa_plus) -> None:
    torch.manual_seed(0)
    model = _tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 256), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss  # no attention_mask: HF lets SDPA use is_causal
    loss.backward()
    opt.step()
    torch.cuda.synchronize()
    counts = S.call_counts()
    assert counts["forward"] >= 2 and counts["backward"] >= 2, f"SDPA did not route to FA_PLUS: {counts}"
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    print(f"\n[sdpa] HF Llama step on FA_PLUS: loss {loss.item():.4f}, calls {counts}")


def test_enabled_context_manager() -> None:
    """With a GPU, activation succeeds and the context manager leaves nothing active behind."""
    assert S.is_supported()
    with S.enabled():
        assert S.is_active()
    assert not S.is_active()
