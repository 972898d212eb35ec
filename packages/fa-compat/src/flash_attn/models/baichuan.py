"""``flash_attn.models.baichuan``: flash-attn 2.8.x's Baichuan (v1 and v2, 7B and 13B) support, a Baichuan being
a :class:`flash_attn.models.gpt.GPTLMHeadModel` (Llama-like: RMSNorm, SwiGLU, no biases; rotary embeddings for
7B, ALiBi for 13B; Baichuan 2's normalized head).

* :func:`baichuan_config_to_gpt2_config`: the remote-code Baichuan config -> the ``GPT2Config`` that builds it;
* :func:`remap_state_dict_hf_baichuan`: Baichuan weights (``BaichuanForCausalLM``) -> the GPT model's names.

Baichuan is a remote-code model (``trust_remote_code``): nothing here imports its code. Its config says
neither the position encoding nor the head's kind, so (as in flash-attn) ``hidden_size < 5000`` means rotary
embeddings (7B; else ALiBi, which runs only with ``use_flash_attn=True``) and ``vocab_size > 70000`` means
Baichuan 2's normalized head (``norm_head``). Its rotary embeddings rotate halves (not interleaved), so its
``W_pack`` rows are used as they are.

HF transformers is imported only by :func:`baichuan_config_to_gpt2_config`; the state-dict conversion needs it
not. Difference from flash-attn 2.8.3, a superset: the config sets ``mlp_multiple_of=1`` so that any
``intermediate_size`` is built as is (flash-attn rounds it up to a multiple of 128, which the released
checkpoints' 11008 and 13696 already are).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_attn.models.llama import _rename
from flash_attn.utils.pretrained import _import_optional

__all__ = ["baichuan_config_to_gpt2_config", "remap_state_dict_hf_baichuan"]

_RULES = [
    (r"^model\.embed_tokens\.", "transformer.embeddings.word_embeddings."),
    (r"^model\.norm\.", "transformer.ln_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.layers.\1.norm1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.layers.\1.norm2."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"transformer.layers.\1.mlp.fc2."),
    (r"^model\.layers\.(\d+)\.self_attn\.W_pack\.", r"transformer.layers.\1.mixer.Wqkv."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.layers.\1.mixer.out_proj."),
    (r"^model\.", "transformer."),
]


def _pad_rows(weight: Tensor, multiple: int) -> Tensor:
    """``weight`` zero-padded along dim 0 to a multiple of ``multiple`` rows."""
    rows = math.ceil(weight.shape[0] / multiple) * multiple
    return F.pad(weight, (0, 0, 0, rows - weight.shape[0]))


def remap_state_dict_hf_baichuan(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """Baichuan weights -> the GPT model's names.

    ``model.embed_tokens`` -> word embeddings, ``lm_head`` -> ``lm_head`` (each zero-padded from its own row
    count to a multiple of ``pad_vocab_size_multiple``; with ``config.tie_word_embeddings`` the head is the word
    embeddings); ``self_attn.W_pack`` -> ``mixer.Wqkv``, ``self_attn.o_proj`` -> ``mixer.out_proj``;
    ``[mlp.up_proj; mlp.gate_proj]`` -> ``mlp.fc1``, ``mlp.down_proj`` -> ``mlp.fc2``; ``input_layernorm`` /
    ``post_attention_layernorm`` / ``model.norm`` -> ``norm1`` / ``norm2`` / ``ln_f``; the
    ``rotary_emb.inv_freq`` buffers are dropped. Returns a new dict.

    Arguments:
        state_dict: Baichuan's names (``model.layers.{i}.self_attn.W_pack.weight``, ...).
        config: the ``GPT2Config`` (``n_layer``, ``tie_word_embeddings``, ``pad_vocab_size_multiple``).
    """
    sd = _rename(state_dict, _RULES)
    multiple = getattr(config, "pad_vocab_size_multiple", 1)
    word_embeddings = _pad_rows(sd.pop("transformer.embeddings.word_embeddings.weight"), multiple)
    sd["transformer.embeddings.word_embeddings.weight"] = word_embeddings
    if getattr(config, "tie_word_embeddings", False):
        sd["lm_head.weight"] = word_embeddings
    else:
        sd["lm_head.weight"] = _pad_rows(sd.pop("lm_head.weight"), multiple)
    for layer in range(config.n_layer):
        prefix = f"transformer.layers.{layer}"
        gate, up = sd.pop(f"{prefix}.mlp.gate_proj.weight"), sd.pop(f"{prefix}.mlp.up_proj.weight")
        sd[f"{prefix}.mlp.fc1.weight"] = torch.cat([up, gate], dim=0)
        sd.pop(f"{prefix}.self_attn.rotary_emb.inv_freq", None)
    return sd


def baichuan_config_to_gpt2_config(baichuan_config: Any) -> Any:
    """The ``transformers.GPT2Config`` of :class:`flash_attn.models.gpt.GPTLMHeadModel` for a Baichuan config:
    RMSNorm of eps ``rms_norm_eps``, SwiGLU MLP of width ``intermediate_size``, no biases, no dropout, an untied
    head; rotary embeddings (whole head, not interleaved) or ALiBi and ``norm_head`` as the module docstring
    says."""
    transformers = _import_optional("transformers", "baichuan_config_to_gpt2_config")
    use_rotary = baichuan_config.hidden_size < 5000
    return transformers.GPT2Config(
        vocab_size=baichuan_config.vocab_size,
        n_positions=0,  # no position table
        n_embd=baichuan_config.hidden_size,
        n_layer=baichuan_config.num_hidden_layers,
        n_head=baichuan_config.num_attention_heads,
        n_inner=baichuan_config.intermediate_size,
        activation_function="swiglu",  # Baichuan's "silu" of a gated MLP
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=baichuan_config.rms_norm_eps,
        initializer_range=baichuan_config.initializer_range,
        bos_token_id=baichuan_config.bos_token_id,
        eos_token_id=baichuan_config.eos_token_id,
        pad_token_id=baichuan_config.pad_token_id,
        # flash-attn's attributes
        rms_norm=True,
        rotary_emb_fraction=1.0 if use_rotary else 0.0,
        rotary_emb_interleaved=False,
        use_alibi=not use_rotary,
        use_flash_attn=not use_rotary,  # ALiBi needs the flash attention path
        tie_word_embeddings=False,
        norm_head=baichuan_config.vocab_size > 70000,
        qkv_proj_bias=False,
        out_proj_bias=False,
        mlp_fc1_bias=False,
        mlp_fc2_bias=False,
        mlp_multiple_of=1,
    )
