"""HF transformers 5.x picks Flash Attention Plus up as `attn_implementation="flash_attention_2"` with no
patching: a small Llama built from a config (random weights, nothing downloaded) runs a forward and a
training step, with and without a padding mask (varlen path), and matches "sdpa" within bf16 tolerance.

Needs the `flash-attn` metadata distribution (packages/fa-compat/flash-attn-shim) installed, because
transformers looks the `flash_attn` package up by distribution name; skipped with a message otherwise.
Tolerance (2x rule): ``err(fa2 bf16 vs sdpa fp32) <= 2 * err(sdpa bf16 vs sdpa fp32) + slack``.
"""

from __future__ import annotations

import copy
import importlib.metadata

import pytest
import torch

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

import flash_attn  # noqa: E402
from flash_attn import _extras  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def detected():
    try:
        dist = importlib.metadata.distribution("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `flash-attn` metadata shim is not installed (see packages/fa-compat/README.md)")
    assert flash_attn.SHIM_LOCAL_LABEL in dist.version, (
        f"flash-attn {dist.version} is not Flash Attention Plus's shim"
    )
    from transformers.utils import is_flash_attn_2_available

    assert is_flash_attn_2_available(), (
        "transformers does not see flash_attn 2 although the shim is installed"
    )
    return dist.version


def _models():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    # a copy of the config per model: from_config records the attention implementation in the config object
    ref = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation="sdpa", dtype=torch.float32
    )
    ref = ref.cuda()
    models = {"ref": ref}
    for impl in ("sdpa", "flash_attention_2"):
        m = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=impl, dtype=torch.bfloat16
        )
        m = m.cuda()
        m.load_state_dict(ref.state_dict())
        assert m.config._attn_implementation == impl
        models[impl] = m
    assert ref.config._attn_implementation == "sdpa"
    return models


def _batch(padded: bool):
    torch.manual_seed(1)
    b, s = 3, 96
    ids = torch.randint(0, 256, (b, s), device="cuda")
    mask = torch.ones(b, s, dtype=torch.long, device="cuda")
    if padded:
        for i, n in enumerate([s, s - 17, s - 50]):
            mask[i, n:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, (mask if padded else None), labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding-mask-varlen"])
def test_llama_forward_and_training_step(padded):
    if not _extras.BACKWARD:
        pytest.skip("the training step needs fa-backward")
    import transformers.modeling_flash_attention_utils as fa_utils

    models = _models()
    ids, mask, labels = _batch(padded)
    outs = {}
    for name, model in models.items():
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {
            n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None
        }
        outs[name] = (out.logits.detach(), out.loss.detach(), grads)
    # transformers loaded *our* functions, through its normal lazy import
    used = fa_utils._flash_varlen_fn if padded else fa_utils._flash_fn
    assert used is (flash_attn.flash_attn_varlen_func if padded else flash_attn.flash_attn_func)

    valid = (mask if mask is not None else torch.ones_like(ids)).bool()
    ref_logits, ref_loss, ref_grads = outs["ref"]
    fa_logits, fa_loss, fa_grads = outs["flash_attention_2"]
    sd_logits, sd_loss, sd_grads = outs["sdpa"]
    err_fa, err_sd = _rel(fa_logits[valid], ref_logits[valid]), _rel(sd_logits[valid], ref_logits[valid])
    assert err_fa <= 2 * err_sd + 1e-3, (
        f"logits: flash_attention_2 rel err {err_fa:.2e} vs sdpa bf16 {err_sd:.2e}"
    )
    assert abs(float(fa_loss) - float(ref_loss)) <= 2 * abs(float(sd_loss) - float(ref_loss)) + 2e-2
    for name, g_ref in ref_grads.items():
        e_fa, e_sd = _rel(fa_grads[name], g_ref), _rel(sd_grads[name], g_ref)
        assert e_fa <= 2 * e_sd + 2e-2, f"grad of {name}: rel err {e_fa:.2e} vs sdpa bf16 {e_sd:.2e}"

    # one optimizer step runs and changes the weights
    model = models["flash_attention_2"]
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(loss)


def test_llama_generate_with_flash_attention_2():
    """Inference (no grad, KV cache of transformers): generation runs through flash_attention_2."""
    models = _models()
    ids = _batch(False)[0][:, :32]
    with torch.no_grad():
        gen = models["flash_attention_2"].eval().generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (ids.shape[0], 36) and torch.equal(gen[:, :32], ids)
