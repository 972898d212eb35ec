"""``flash_attn.models.gpt_neox``: flash-attn 2.8.x's GPT-NeoX (Pythia, GPT-NeoX-20B) support, a GPT-NeoX being
a :class:`flash_attn.models.gpt.GPTLMHeadModel` (LayerNorm, rotary embeddings on a fraction of each head in the
GPT-NeoX "rotated halves" layout, parallel or sequential residual, no position embeddings).

* :func:`gpt_neox_config_to_gpt2_config`: ``transformers.GPTNeoXConfig`` -> the ``GPT2Config`` that builds it;
* :func:`remap_state_dict_hf_gpt_neox`: Hugging Face GPT-NeoX weights (``GPTNeoXForCausalLM``) -> the GPT
  model's names.

HF transformers is imported only by :func:`gpt_neox_config_to_gpt2_config`; the state-dict conversion needs it
not. Differences from flash-attn 2.8.3, all supersets:

* the config conversion reads transformers 5's ``rope_parameters`` (``partial_rotary_factor``, ``rope_theta``)
  as well as transformers 4's ``rotary_pct`` / ``rotary_emb_base``, and passes the rotary base on as
  ``rotary_emb_base`` (flash-attn asserts it is 10000); ``attention_bias=False`` builds the attention without
  biases (flash-attn always has them);
* the remap takes the output embeddings as ``embed_out`` (transformers 4) or ``lm_head`` (transformers 5), and
  drops the ``attention.bias`` / ``masked_bias`` / ``rotary_emb.inv_freq`` buffers only where present
  (flash-attn requires the first two), and converts a checkpoint without attention biases.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from flash_attn.models.llama import _pad_to_multiple, _rename, _rope_theta
from flash_attn.utils.pretrained import _import_optional

__all__ = ["gpt_neox_config_to_gpt2_config", "remap_state_dict_hf_gpt_neox"]

_RULES = [
    (r"^gpt_neox\.embed_in\.", "transformer.embeddings.word_embeddings."),
    (r"^gpt_neox\.final_layer_norm\.", "transformer.ln_f."),
    (r"^gpt_neox\.layers\.(\d+)\.input_layernorm\.", r"transformer.layers.\1.norm1."),
    (r"^gpt_neox\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.layers.\1.norm2."),
    (r"^gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"transformer.layers.\1.mlp.fc1."),
    (r"^gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"transformer.layers.\1.mlp.fc2."),
    (r"^gpt_neox\.layers\.(\d+)\.attention\.dense\.", r"transformer.layers.\1.mixer.out_proj."),
    (r"^gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.", r"transformer.layers.\1.mixer.Wqkv."),
    (r"^gpt_neox\.layers\.(\d+)\.attention\.", r"transformer.layers.\1.attention."),
    (r"^embed_out\.", "lm_head."),
]


def _per_head_to_blocked(w: Tensor, head_dim: int) -> Tensor:
    """Rows ``(nheads, [q; k; v], head_dim)`` -> ``([q; k; v], nheads, head_dim)``, the layout of ``Wqkv``."""
    return w.unflatten(0, (-1, 3, head_dim)).transpose(0, 1).flatten(0, 2)


def remap_state_dict_hf_gpt_neox(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """Hugging Face GPT-NeoX weights -> the GPT model's names.

    ``gpt_neox.embed_in`` -> word embeddings, ``embed_out`` (or ``lm_head``) -> ``lm_head`` (each zero-padded to a
    multiple of ``pad_vocab_size_multiple``; with ``config.tie_word_embeddings`` the head is the word
    embeddings); ``input_layernorm`` / ``post_attention_layernorm`` / ``final_layer_norm`` -> ``norm1`` /
    ``norm2`` / ``ln_f``; ``attention.query_key_value`` (per head ``[q; k; v]``) -> ``mixer.Wqkv`` (``[q; k;
    v]`` over all heads), ``attention.dense`` -> ``mixer.out_proj``; ``mlp.dense_h_to_4h`` / ``dense_4h_to_h``
    -> ``mlp.fc1`` / ``fc2``; the attention buffers are dropped. Returns a new dict.

    Arguments:
        state_dict: Hugging Face's names (``gpt_neox.layers.{i}.attention.query_key_value.weight``, ...).
        config: the ``GPT2Config`` (``n_layer``, ``n_embd``, ``n_head``, ``tie_word_embeddings``,
            ``pad_vocab_size_multiple``).
    """
    sd = _rename(state_dict, _RULES)
    sd["transformer.embeddings.word_embeddings.weight"] = _pad_to_multiple(
        sd.pop("transformer.embeddings.word_embeddings.weight"), config
    )
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["transformer.embeddings.word_embeddings.weight"]
    else:
        sd["lm_head.weight"] = _pad_to_multiple(sd.pop("lm_head.weight"), config)
    head_dim = config.n_embd // config.n_head
    for layer in range(config.n_layer):
        prefix = f"transformer.layers.{layer}"
        for buffer in ("bias", "masked_bias", "rotary_emb.inv_freq"):
            sd.pop(f"{prefix}.attention.{buffer}", None)
        for kind in ("weight", "bias"):
            key = f"{prefix}.mixer.Wqkv.{kind}"
            if key in sd:
                sd[key] = _per_head_to_blocked(sd[key], head_dim)
    return sd


def _partial_rotary_factor(gpt_neox_config: Any) -> float:
    """``rotary_pct`` (transformers 4), else ``rope_parameters["partial_rotary_factor"]`` (transformers 5),
    else 1.0."""
    fraction = getattr(gpt_neox_config, "rotary_pct", None)
    if fraction is None:
        parameters = getattr(gpt_neox_config, "rope_parameters", None)
        if isinstance(parameters, Mapping):
            fraction = parameters.get("partial_rotary_factor")
    return float(fraction) if fraction is not None else 1.0


def gpt_neox_config_to_gpt2_config(gpt_neox_config: Any) -> Any:
    """The ``transformers.GPT2Config`` of :class:`flash_attn.models.gpt.GPTLMHeadModel` for a
    ``transformers.GPTNeoXConfig``: pre-norm LayerNorm blocks, parallel residual with untied norms when
    ``use_parallel_residual``, rotary embeddings (not interleaved) on ``rotary_pct`` of each head with the
    config's base, no position embeddings, no dropout, the config's word-embedding tying."""
    transformers = _import_optional("transformers", "gpt_neox_config_to_gpt2_config")
    attention_bias = bool(getattr(gpt_neox_config, "attention_bias", True))
    return transformers.GPT2Config(
        vocab_size=gpt_neox_config.vocab_size,
        n_positions=0,  # rotary embeddings only
        n_embd=gpt_neox_config.hidden_size,
        n_layer=gpt_neox_config.num_hidden_layers,
        n_head=gpt_neox_config.num_attention_heads,
        n_inner=gpt_neox_config.intermediate_size,
        activation_function=gpt_neox_config.hidden_act,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=gpt_neox_config.layer_norm_eps,
        initializer_range=gpt_neox_config.initializer_range,
        bos_token_id=gpt_neox_config.bos_token_id,
        eos_token_id=gpt_neox_config.eos_token_id,
        # flash-attn's attributes
        prenorm=True,
        parallel_block=gpt_neox_config.use_parallel_residual,
        parallel_block_tied_norm=False,
        rotary_emb_fraction=_partial_rotary_factor(gpt_neox_config),
        rotary_emb_base=_rope_theta(gpt_neox_config),
        tie_word_embeddings=bool(getattr(gpt_neox_config, "tie_word_embeddings", False)),
        qkv_proj_bias=attention_bias,
        out_proj_bias=attention_bias,
    )
