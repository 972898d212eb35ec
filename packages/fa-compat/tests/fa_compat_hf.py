"""Helpers shared by fa-compat's model tests against tiny random Hugging Face models (transformers optional).

flash-attn's 2x rule: our model, converted from the HF model, is as close to the HF model computed in float64
(the truth) as twice the HF model in the comparison's dtype, plus a small slack.
"""

from __future__ import annotations

import pytest
import torch
from fa_compat_testutils import DEVICE

try:
    import transformers
except ModuleNotFoundError:
    transformers = None

needs_hf = pytest.mark.skipif(transformers is None, reason="HF transformers not installed")

#: the dtype of the HF model and ours in the 2x comparisons on this device
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
#: absolute slack of the 2x rule, relative to the largest true value
SLACK = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
#: two computations by our model (e.g. with a KV cache or on a subset, against the full forward): summation
#: order only
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[DTYPE]
#: the flash-attn switches that the BERT and GPT models share: flash attention, the fused bias + matmul, the
#: fused dropout + add + norm, and a padded vocabulary
OPTIMIZED = {
    "use_flash_attn": True,
    "fused_bias_fc": True,
    "fused_dropout_add_ln": True,
    "pad_vocab_size_multiple": 8,
}


def randomize(model, seed=0, norm_names=("ln", "norm")):
    """Non-trivial weights everywhere, drawn after ``torch.manual_seed(seed)``: the weights of norms (names that
    hold one of ``norm_names``) ~ 1 + N(0, 0.2), everything else (biases included) ~ N(0, 0.1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in norm_names) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


def eager(config):
    """``config`` set to HF's plain PyTorch attention."""
    config._attn_implementation = "eager"
    return config


def tiny_hf(model_cls, config, seed=0, norm_names=("ln", "norm")):
    """The HF model ``model_cls(config)`` (eager attention) built after ``torch.manual_seed(seed)``, randomized."""
    torch.manual_seed(seed)
    return randomize(model_cls(eager(config)), seed, norm_names)


def check_2x(ours, hf, truth, what="logits", dtype=DTYPE):
    """``|ours - truth| <= 2 * |HF - truth| + slack`` (largest differences; the slack of ``dtype`` scaled by the
    largest true value)."""
    err = (ours.double() - truth).abs().max().item()
    hf_err = (hf.double() - truth).abs().max().item()
    slack = SLACK[dtype] * max(1.0, truth.abs().max().item())
    assert err <= 2 * hf_err + slack, (
        f"{what}: |ours - truth| {err:.3g} > 2 * |HF - truth| {hf_err:.3g} + {slack:.3g}"
    )
