"""HF transformers 5.x picks Flash Attention Plus up as `attn_implementation="flash_attention_3"` with no
patching: a small Llama built from a config (random weights, nothing downloaded) runs a forward and a training
step, with and without a padding mask (varlen path), and matches "sdpa" within bf16 tolerance.

Needs the `flash-attn-3` metadata distribution (packages/fa-compat3/flash-attn-3-shim) installed, because
transformers maps `flash_attn_interface` to a distribution named `flash-attn-3`; skipped with a message otherwise.
Tolerance (2x rule): ``err(fa3 bf16 vs sdpa fp32) <= 2 * err(sdpa bf16 vs sdpa fp32) + slack``.
"""

from __future__ import annotations

import copy
import importlib.metadata

import pytest
import torch

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

import flash_attn_3  # noqa: E402
import flash_attn_interface  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def detected():
    try:
        dist = importlib.metadata.distribution("flash-attn-3")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `flash-attn-3` metadata shim is not installed (see packages/fa-compat3/README.md)")
    assert flash_attn_3.SHIM_LOCAL_LABEL in dist.version, f"flash-attn-3 {dist.version} is not the shim"
    from transformers.utils import is_flash_attn_3_available

    assert is_flash_attn_3_available(), (
        "transformers does not see FlashAttention-3 although the shim is installed"
    )


def _models():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation="sdpa", dtype=torch.float32
    )
    ref = ref.cuda()
    models = {"ref": ref}
    for impl in ("sdpa", "flash_attention_3"):
        m = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=impl, dtype=torch.bfloat16
        )
        m = m.cuda()
        m.load_state_dict(ref.state_dict())
        assert m.config._attn_implementation == impl
        models[impl] = m
    return models


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding-mask-varlen"])
def test_llama_forward_and_training_step(padded):
    import transformers.modeling_flash_attention_utils as fa_utils

    torch.manual_seed(1)
    b, s = 3, 96
    ids = torch.randint(0, 256, (b, s), device="cuda")
    mask = torch.ones(b, s, dtype=torch.long, device="cuda")
    if padded:
        for i, n in enumerate([s, s - 17, s - 50]):
            mask[i, n:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    models = _models()
    outs = {}
    for name, model in models.items():
        model.train()
        out = model(input_ids=ids, attention_mask=mask if padded else None, labels=labels)
        out.loss.backward()
        grads = {
            n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None
        }
        outs[name] = (out.logits.detach(), grads)
    used = fa_utils._flash_varlen_fn if padded else fa_utils._flash_fn
    assert used is (
        flash_attn_interface.flash_attn_varlen_func if padded else flash_attn_interface.flash_attn_func
    )
    valid = mask.bool()
    (ref_logits, ref_grads), (fa_logits, fa_grads) = outs["ref"], outs["flash_attention_3"]
    sd_logits, sd_grads = outs["sdpa"]
    err_fa, err_sd = _rel(fa_logits[valid], ref_logits[valid]), _rel(sd_logits[valid], ref_logits[valid])
    assert err_fa <= 2 * err_sd + 1e-3, (
        f"logits: flash_attention_3 rel err {err_fa:.2e} vs sdpa bf16 {err_sd:.2e}"
    )
    for name, g_ref in ref_grads.items():
        e_fa, e_sd = _rel(fa_grads[name], g_ref), _rel(sd_grads[name], g_ref)
        assert e_fa <= 2 * e_sd + 2e-2, f"grad of {name}: rel err {e_fa:.2e} vs sdpa bf16 {e_sd:.2e}"
