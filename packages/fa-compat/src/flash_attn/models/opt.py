"""``flash_attn.models.opt``: flash-attn 2.8.x's OPT support, an OPT being a
:class:`flash_attn.models.gpt.GPTLMHeadModel` (learned position embeddings, ReLU MLP, pre-norm or, for OPT-350m,
post-norm blocks, the ``project_in`` / ``project_out`` of a narrower word embedding, a head tied to the word
embeddings).

* :func:`opt_config_to_gpt2_config`: ``transformers.OPTConfig`` -> the ``GPT2Config`` that builds it;
* :func:`remap_state_dict_hf_opt`: Hugging Face OPT weights (``OPTForCausalLM``, ``OPTModel`` or metaseq's
  ``decoder.`` names) -> the GPT model's names.

OPT's position table starts with two padding rows (positions are offset by 2); the remap drops them, so the
GPT model's positions ``0 .. S - 1`` give Hugging Face's logits for unpadded inputs.

HF transformers is imported only by :func:`opt_config_to_gpt2_config`; the state-dict conversion needs it not.
Differences from flash-attn 2.8.3, all supersets: ``enable_bias=False`` builds the linear layers without biases
(flash-attn requires the attention biases); the unsupported configurations ``layerdrop != 0``,
``layer_norm_elementwise_affine=False`` and ``_remove_final_layer_norm=True`` with pre-norm raise
``ValueError`` (flash-attn asserts the first two and ignores the third).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flash_attn.models.llama import _pad_to_multiple, _rename
from flash_attn.utils.pretrained import _import_optional

__all__ = ["opt_config_to_gpt2_config", "remap_state_dict_hf_opt"]

_RULES = [
    (r"^(model\.)?decoder\.embed_tokens\.", "transformer.embeddings.word_embeddings."),
    (r"^(model\.)?decoder\.embed_positions\.", "transformer.embeddings.position_embeddings."),
    (r"^(model\.)?decoder\.project_in\.", "transformer.embeddings.project_in."),
    (r"^(model\.)?decoder\.project_out\.", "project_out."),
    # metaseq's OPT-175B names the final norm ``layer_norm``
    (r"^(model\.)?decoder\.(final_layer_norm|layer_norm)\.", "transformer.ln_f."),
    (r"^(model\.)?decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.layers.\2.norm1."),
    (r"^(model\.)?decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.layers.\2.norm2."),
    (r"^(model\.)?decoder\.layers\.(\d+)\.fc(1|2)\.", r"transformer.layers.\2.mlp.fc\3."),
    (r"^(model\.)?decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.layers.\2.mixer.out_proj."),
    (r"^(model\.)?decoder\.layers\.(\d+)\.", r"transformer.layers.\2."),
]

#: OPT's position table has this many leading (padding) rows
_POSITION_OFFSET = 2


def remap_state_dict_hf_opt(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """Hugging Face OPT weights -> the GPT model's names.

    ``embed_tokens`` -> word embeddings (zero-padded to a multiple of ``pad_vocab_size_multiple``), which are
    also ``lm_head`` (OPT ties them; a ``lm_head.weight`` in the dict is replaced); ``embed_positions`` ->
    position embeddings without their first two rows; ``project_in`` -> ``transformer.embeddings.project_in``,
    ``project_out`` -> ``project_out``; ``self_attn_layer_norm`` / ``final_layer_norm`` (of a layer) /
    ``final_layer_norm`` (or ``layer_norm``, of the decoder) -> ``norm1`` / ``norm2`` / ``ln_f``;
    ``self_attn.q_proj / k_proj / v_proj`` -> ``mixer.Wqkv`` (concatenated, biases alike),
    ``self_attn.out_proj`` -> ``mixer.out_proj``; ``fc1`` / ``fc2`` -> ``mlp.fc1`` / ``fc2``. Returns a new dict.

    Arguments:
        state_dict: Hugging Face's names (``model.decoder.layers.{i}.self_attn.q_proj.weight``, ...; also
            ``decoder.`` without ``model.``).
        config: the ``GPT2Config`` (``n_layer``, ``pad_vocab_size_multiple``).
    """
    sd = _rename(state_dict, _RULES)
    positions = sd.pop("transformer.embeddings.position_embeddings.weight")
    sd["transformer.embeddings.position_embeddings.weight"] = positions[_POSITION_OFFSET:]
    word_embeddings = _pad_to_multiple(sd.pop("transformer.embeddings.word_embeddings.weight"), config)
    sd["transformer.embeddings.word_embeddings.weight"] = word_embeddings
    sd.pop("lm_head.weight", None)
    sd["lm_head.weight"] = word_embeddings
    for layer in range(config.n_layer):
        prefix = f"transformer.layers.{layer}"
        for kind in ("weight", "bias"):
            keys = [f"{prefix}.self_attn.{name}_proj.{kind}" for name in ("q", "k", "v")]
            if all(key in sd for key in keys):
                sd[f"{prefix}.mixer.Wqkv.{kind}"] = torch.cat([sd.pop(key) for key in keys], dim=0)
    return sd


def opt_config_to_gpt2_config(opt_config: Any) -> Any:
    """The ``transformers.GPT2Config`` of :class:`flash_attn.models.gpt.GPTLMHeadModel` for a
    ``transformers.OPTConfig``: learned position embeddings of ``max_position_embeddings`` rows, pre-norm
    (``do_layer_norm_before``) or post-norm blocks, ``word_embed_proj_dim`` when it differs from the width, the
    config's activation, dropouts and MLP width, biases as ``enable_bias``."""
    transformers = _import_optional("transformers", "opt_config_to_gpt2_config")
    if opt_config.layerdrop != 0.0:
        raise ValueError(f"layerdrop {opt_config.layerdrop} is not supported (only 0.0)")
    if not opt_config.layer_norm_elementwise_affine:
        raise ValueError("layer_norm_elementwise_affine=False is not supported")
    if opt_config.do_layer_norm_before and getattr(opt_config, "_remove_final_layer_norm", False):
        raise ValueError(
            "_remove_final_layer_norm=True is not supported: the pre-norm GPT model has a final norm"
        )
    word_embed_proj_dim = opt_config.word_embed_proj_dim
    bias = bool(getattr(opt_config, "enable_bias", True))
    return transformers.GPT2Config(
        vocab_size=opt_config.vocab_size,
        n_positions=opt_config.max_position_embeddings,
        n_embd=opt_config.hidden_size,
        n_layer=opt_config.num_hidden_layers,
        n_head=opt_config.num_attention_heads,
        n_inner=opt_config.ffn_dim,
        activation_function=opt_config.activation_function,
        resid_pdrop=opt_config.dropout,
        embd_pdrop=opt_config.dropout,  # as flash-attn; Hugging Face's OPT has no embedding dropout
        attn_pdrop=opt_config.attention_dropout,
        initializer_range=opt_config.init_std,
        bos_token_id=opt_config.bos_token_id,
        eos_token_id=opt_config.eos_token_id,
        # flash-attn's attributes
        prenorm=opt_config.do_layer_norm_before,
        word_embed_proj_dim=None if word_embed_proj_dim == opt_config.hidden_size else word_embed_proj_dim,
        qkv_proj_bias=bias,
        out_proj_bias=bias,
        mlp_fc1_bias=bias,
        mlp_fc2_bias=bias,
    )
