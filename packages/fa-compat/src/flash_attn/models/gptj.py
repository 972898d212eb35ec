"""``flash_attn.models.gptj``: flash-attn 2.8.x's GPT-J support, a GPT-J being a
:class:`flash_attn.models.gpt.GPTLMHeadModel` (parallel attention + MLP sharing one LayerNorm, interleaved
rotary embeddings on the first ``rotary_dim`` channels of each head, no attention biases, a head with a bias).

* :func:`gptj_config_to_gpt2_config`: ``transformers.GPTJConfig`` -> the ``GPT2Config`` that builds it;
* :func:`remap_state_dict_hf_gptj`: Hugging Face GPT-J weights (``GPTJForCausalLM``) -> the GPT model's names.

HF transformers is imported only by :func:`gptj_config_to_gpt2_config`; the state-dict conversion needs it not.
Differences from flash-attn 2.8.3, all supersets: ``rotary_dim=None`` (Hugging Face: rotary on the whole head)
gives ``rotary_emb_fraction=1.0`` (flash-attn fails on the division); the remap drops the ``attn.bias`` /
``attn.masked_bias`` buffers only where present (transformers 5 does not save them; flash-attn requires them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flash_attn.models.llama import _pad_embeddings_and_head, _rename
from flash_attn.utils.pretrained import _import_optional

__all__ = ["gptj_config_to_gpt2_config", "remap_state_dict_hf_gptj"]

_RULES = [
    (r"^transformer\.wte\.", "transformer.embeddings.word_embeddings."),
    (r"^transformer\.h\.(\d+)\.ln_1\.", r"transformer.layers.\1.norm1."),
    (r"^transformer\.h\.(\d+)\.mlp\.fc_in\.", r"transformer.layers.\1.mlp.fc1."),
    (r"^transformer\.h\.(\d+)\.mlp\.fc_out\.", r"transformer.layers.\1.mlp.fc2."),
    (r"^transformer\.h\.(\d+)\.attn\.out_proj\.", r"transformer.layers.\1.mixer.out_proj."),
    (r"^transformer\.h\.(\d+)\.", r"transformer.layers.\1."),
]


def remap_state_dict_hf_gptj(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """Hugging Face GPT-J weights -> the GPT model's names.

    ``transformer.wte`` -> word embeddings, ``lm_head`` (weight and bias) -> ``lm_head`` (each zero-padded to a
    multiple of ``pad_vocab_size_multiple``; with ``config.tie_word_embeddings`` the head's weight is the word
    embeddings); ``ln_1`` -> ``norm1`` (the one norm of a tied parallel block), ``ln_f`` stays;
    ``attn.q_proj / k_proj / v_proj`` -> ``mixer.Wqkv`` (concatenated), ``attn.out_proj`` -> ``mixer.out_proj``;
    ``mlp.fc_in`` / ``fc_out`` -> ``mlp.fc1`` / ``fc2``; the attention buffers are dropped. Returns a new dict.

    Arguments:
        state_dict: Hugging Face's names (``transformer.h.{i}.attn.q_proj.weight``, ...).
        config: the ``GPT2Config`` (``n_layer``, ``tie_word_embeddings``, ``pad_vocab_size_multiple``).
    """
    sd = _rename(state_dict, _RULES)
    _pad_embeddings_and_head(sd, config)
    for layer in range(config.n_layer):
        prefix = f"transformer.layers.{layer}"
        q, k, v = (sd.pop(f"{prefix}.attn.{name}_proj.weight") for name in ("q", "k", "v"))
        sd[f"{prefix}.mixer.Wqkv.weight"] = torch.cat([q, k, v], dim=0)
        for buffer in ("bias", "masked_bias"):
            sd.pop(f"{prefix}.attn.{buffer}", None)
    return sd


def gptj_config_to_gpt2_config(gptj_config: Any) -> Any:
    """The ``transformers.GPT2Config`` of :class:`flash_attn.models.gpt.GPTLMHeadModel` for a
    ``transformers.GPTJConfig``: parallel blocks with one (tied) LayerNorm, interleaved rotary embeddings on
    ``rotary_dim`` channels of each head, no position embeddings, no attention biases, MLP biases, untied head
    with a bias; the config's dropouts."""
    transformers = _import_optional("transformers", "gptj_config_to_gpt2_config")
    head_dim = gptj_config.n_embd // gptj_config.n_head
    rotary_dim = gptj_config.rotary_dim
    return transformers.GPT2Config(
        vocab_size=gptj_config.vocab_size,
        n_positions=0,  # rotary embeddings only
        n_embd=gptj_config.n_embd,
        n_layer=gptj_config.n_layer,
        n_head=gptj_config.n_head,
        n_inner=gptj_config.n_inner,
        activation_function=gptj_config.activation_function,
        resid_pdrop=gptj_config.resid_pdrop,
        embd_pdrop=gptj_config.embd_pdrop,
        attn_pdrop=gptj_config.attn_pdrop,
        layer_norm_epsilon=gptj_config.layer_norm_epsilon,
        initializer_range=gptj_config.initializer_range,
        bos_token_id=gptj_config.bos_token_id,
        eos_token_id=gptj_config.eos_token_id,
        # flash-attn's attributes
        prenorm=True,
        parallel_block=True,
        parallel_block_tied_norm=True,
        rotary_emb_fraction=1.0 if rotary_dim is None else rotary_dim / head_dim,
        rotary_emb_interleaved=True,
        tie_word_embeddings=False,
        qkv_proj_bias=False,
        out_proj_bias=False,
        lm_head_bias=True,
    )
