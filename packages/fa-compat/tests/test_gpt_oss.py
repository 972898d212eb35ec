"""HF transformers' gpt-oss with Flash Attention Plus as its attention: the eager implementation's loss and gradients.

A small gpt-oss model built from a config (random weights, nothing downloaded; one sliding-window layer and one
full layer, GQA, learnable sinks) computes a language-model loss twice: with transformers' eager attention (the
reference formula of the sinks: softmax over ``[scores, sink]``, the sink's column dropped) and with an attention
function registered through ``transformers.AttentionInterface`` that calls ``flash_attn.flash_attn_func(...,
learnable_sink=module.sinks)``. The same model in float64 eager is the truth; the 2x rule: ``|ours - truth| <= 2 *
|eager - truth| + slack`` for the loss and for the gradient of every parameter, the sinks' included.

CPU: float32 through Triton's interpreter; GPU: bfloat16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fa_compat_testutils import DEVICE, needs_backward

transformers = pytest.importorskip("transformers")
gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")

from flash_attn import flash_attn_func  # noqa: E402

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
#: absolute slack of the 2x rule, relative to the largest true value
SLACK = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[DTYPE]
NAME = "fa_plus_sinks"
CALLS: list[int | None] = []  # the sliding window of every call of ours


def _fa_plus_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' attention-function signature: ``query (batch, nheads, seqlen, d)``, ``key`` / ``value``
    ``(batch, nheads_k, seqlen, d)``; returns ``((batch, seqlen, nheads, d), None)``. gpt-oss passes its sinks as
    ``s_aux`` and its window as ``sliding_window`` (a query sees the ``sliding_window`` latest keys, itself
    included)."""
    assert attention_mask is None or bool(torch.all(attention_mask.bool())) or attention_mask.dim() == 4
    window = kwargs.get("sliding_window")
    CALLS.append(window)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = flash_attn_func(
        q,
        k,
        v,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
        window_size=(window - 1, 0) if window else (-1, -1),
        learnable_sink=kwargs.get("s_aux"),
    )
    return out, None


def _model(seed: int):
    cfg = transformers.GptOssConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        attention_dropout=0.0,
        initializer_range=0.2,  # scores far from uniform attention
        experts_implementation="eager",  # the per-expert loop: grouped matmuls take no float64 (the truth)
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = gpt_oss.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn_like(layer.self_attn.sinks))  # sinks that matter
    return model


def _loss_and_grads(model, ids, impl: str):
    model.config._attn_implementation = impl
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = impl
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@needs_backward
def test_gpt_oss_loss_and_gradients_match_eager():
    transformers.AttentionInterface.register(NAME, _fa_plus_attention)
    if hasattr(transformers, "AttentionMaskInterface"):  # the causal mask of eager / sdpa (ours ignores it)
        transformers.AttentionMaskInterface.register(NAME, transformers.masking_utils.sdpa_mask)
    base = _model(0)
    torch.manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (2, 24), device=DEVICE)  # longer than the window (8)
    truth_model = copy.deepcopy(base).to(device=DEVICE, dtype=torch.float64)
    low = copy.deepcopy(base).to(device=DEVICE, dtype=DTYPE)
    ours = copy.deepcopy(low)
    t_loss, t_grads = _loss_and_grads(truth_model, ids, "eager")
    e_loss, e_grads = _loss_and_grads(low, ids, "eager")
    CALLS.clear()
    o_loss, o_grads = _loss_and_grads(ours, ids, NAME)
    assert sorted(CALLS, key=str) == [8, None], f"our attention ran {CALLS}: one sliding, one full layer"

    def check(name, o, e, t):
        o, e = o.double(), e.double()
        err, base_err = (o - t).abs().max().item(), (e - t).abs().max().item()
        bound = 2 * base_err + SLACK * max(1.0, t.abs().max().item())
        assert err <= bound, f"{name}: |ours - truth| {err:.3g} > {bound:.3g} (eager {base_err:.3g})"

    check("loss", o_loss, e_loss, t_loss)
    assert set(o_grads) == set(t_grads)
    sinks = [n for n in t_grads if n.endswith("self_attn.sinks")]
    assert len(sinks) == 2 and all(t_grads[n].abs().max() > 0 for n in sinks)
    for name in t_grads:
        check(name, o_grads[name], e_grads[name], t_grads[name])
