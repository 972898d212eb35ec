"""``flash_attn.models.bigcode``: flash-attn 2.8.x's BigCode (StarCoder / SantaCoder, ``GPTBigCode``) support, a
BigCode model being a :class:`flash_attn.models.gpt.GPTLMHeadModel` (GPT-2 blocks with ``nn.Linear`` weights,
learned position embeddings, multi-query attention whose single key / value head is repeated for every query
head, a tied head).

* :func:`bigcode_config_to_gpt2_config`: ``transformers.GPTBigCodeConfig`` -> the ``GPT2Config`` that builds it;
* :func:`remap_state_dict_hf_bigcode`: Hugging Face ``GPTBigCodeForCausalLM`` weights -> the GPT model's names;
* :func:`inv_remap_state_dict_hf_bigcode`: the inverse, the GPT model's names -> Hugging Face's.

As in flash-attn, the GPT model is built with ``n_head`` key / value heads (``n_head_kv`` unset): the remap
tiles the multi-query key / value rows to every head, the inverse keeps the first head's.

HF transformers is imported only by :func:`bigcode_config_to_gpt2_config`; the state-dict conversions need it
not. Differences from flash-attn 2.8.3, all supersets:

* the remaps also convert multi-head checkpoints (``multi_query=False``, ``c_attn`` rows per head ``[q; k;
  v]``), where flash-attn asserts ``multi_query``;
* :func:`inv_remap_state_dict_hf_bigcode` truncates the padded word embeddings to ``vocab_size`` rows
  (flash-attn slices the hidden dimension by mistake, a no-op unless ``vocab_size < n_embd``);
* :func:`bigcode_config_to_gpt2_config` copies the attributes that transformers 5's ``GPTBigCodeConfig`` no
  longer has (``max_batch_size``, ``max_sequence_length``, ``summary_*``) only where present, and takes the
  head's tying from ``tie_word_embeddings`` (default True as in flash-attn).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flash_attn.models.llama import _pad_to_multiple, _rename
from flash_attn.utils.pretrained import _import_optional

__all__ = ["bigcode_config_to_gpt2_config", "inv_remap_state_dict_hf_bigcode", "remap_state_dict_hf_bigcode"]

_RULES = [
    (r"^transformer\.wpe\.", "transformer.embeddings.position_embeddings."),
    (r"^transformer\.h\.(\d+)\.ln_(1|2)\.", r"transformer.layers.\1.norm\2."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_fc\.", r"transformer.layers.\1.mlp.fc1."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"transformer.layers.\1.mlp.fc2."),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj\.", r"transformer.layers.\1.mixer.out_proj."),
]


_INVERSE_RULES = [
    (r"^transformer\.embeddings\.position_embeddings\.", "transformer.wpe."),
    (r"^transformer\.layers\.(\d+)\.norm(1|2)\.", r"transformer.h.\1.ln_\2."),
    (r"^transformer\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.h.\1.mlp.c_fc."),
    (r"^transformer\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.h.\1.mlp.c_proj."),
    (r"^transformer\.layers\.(\d+)\.mixer\.out_proj\.", r"transformer.h.\1.attn.c_proj."),
]


def _check_layout(config: Any) -> tuple[int, int, int, bool]:
    """``(n_embd, n_head, head_dim, multi_query)`` of the ``GPT2Config``."""
    n_embd, n_head = config.n_embd, config.n_head
    return n_embd, n_head, n_embd // n_head, bool(getattr(config, "multi_query", True))


def remap_state_dict_hf_bigcode(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """Hugging Face BigCode weights -> the GPT model's names.

    ``transformer.wte`` -> word embeddings (zero-padded to a multiple of ``pad_vocab_size_multiple``), also
    ``lm_head``; ``transformer.wpe`` -> position embeddings; ``ln_1`` / ``ln_2`` -> ``norm1`` / ``norm2``,
    ``ln_f`` stays; ``attn.c_attn`` (multi-query: ``[q; k; v]`` with one key / value head, tiled to ``n_head``
    heads; else per head ``[q; k; v]``) -> ``mixer.Wqkv``, ``attn.c_proj`` -> ``mixer.out_proj``;
    ``mlp.c_fc`` / ``c_proj`` -> ``mlp.fc1`` / ``fc2``. Returns a new dict.

    Arguments:
        state_dict: Hugging Face's names (``transformer.h.{i}.attn.c_attn.weight``, ...).
        config: the ``GPT2Config`` (``n_layer``, ``n_embd``, ``n_head``, ``multi_query`` (default True),
            ``pad_vocab_size_multiple``).
    """
    sd = _rename(state_dict, _RULES)
    word_embeddings = _pad_to_multiple(sd.pop("transformer.wte.weight"), config)
    sd["transformer.embeddings.word_embeddings.weight"] = word_embeddings
    sd.pop("lm_head.weight", None)
    sd["lm_head.weight"] = word_embeddings
    n_embd, n_head, head_dim, multi_query = _check_layout(config)
    for layer in range(config.n_layer):
        for kind in ("weight", "bias"):
            c_attn = sd.pop(f"transformer.h.{layer}.attn.c_attn.{kind}")
            if multi_query:
                q, k, v = torch.split(c_attn, [n_embd, head_dim, head_dim], dim=0)
                repeat = (n_head,) + (1,) * (c_attn.dim() - 1)
                wqkv = torch.cat([q, k.repeat(repeat), v.repeat(repeat)], dim=0)
            else:
                wqkv = c_attn.unflatten(0, (n_head, 3, head_dim)).transpose(0, 1).flatten(0, 2)
            sd[f"transformer.layers.{layer}.mixer.Wqkv.{kind}"] = wqkv
    return sd


def inv_remap_state_dict_hf_bigcode(
    state_dict: Mapping[str, Tensor], config: Any
) -> OrderedDict[str, Tensor]:
    """The GPT model's names -> Hugging Face BigCode's, the inverse of :func:`remap_state_dict_hf_bigcode`.

    The word embeddings (their first ``vocab_size`` rows) become ``transformer.wte`` and ``lm_head``; a
    multi-query ``mixer.Wqkv`` keeps the first head's key / value rows. Returns a new dict.

    Arguments:
        state_dict: the GPT model's names.
        config: the ``GPT2Config`` (``n_layer``, ``n_embd``, ``n_head``, ``vocab_size``, ``multi_query``).
    """
    sd = _rename(state_dict, _INVERSE_RULES)
    word_embeddings = sd.pop("transformer.embeddings.word_embeddings.weight")[: config.vocab_size]
    sd["transformer.wte.weight"] = word_embeddings
    sd["lm_head.weight"] = word_embeddings
    n_embd, n_head, head_dim, multi_query = _check_layout(config)
    for layer in range(config.n_layer):
        for kind in ("weight", "bias"):
            wqkv = sd.pop(f"transformer.layers.{layer}.mixer.Wqkv.{kind}")
            if multi_query:
                q, k, v = torch.split(wqkv, [n_embd, n_embd, n_embd], dim=0)
                c_attn = torch.cat([q, k[:head_dim], v[:head_dim]], dim=0)
            else:
                c_attn = wqkv.unflatten(0, (3, n_head, head_dim)).transpose(0, 1).flatten(0, 2)
            sd[f"transformer.h.{layer}.attn.c_attn.{kind}"] = c_attn
    return sd


_OPTIONAL_ATTRIBUTES = (
    "max_batch_size",
    "max_sequence_length",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
)


def bigcode_config_to_gpt2_config(bigcode_config: Any) -> Any:
    """The ``transformers.GPT2Config`` of :class:`flash_attn.models.gpt.GPTLMHeadModel` for a
    ``transformers.GPTBigCodeConfig``: its widths, activation, dropouts, ``scale_attn_weights``, position
    table, ``multi_query`` and ``model_type`` carried over; the GPT model's defaults otherwise (a tied head,
    ``n_head`` key / value heads)."""
    transformers = _import_optional("transformers", "bigcode_config_to_gpt2_config")
    optional = {
        name: getattr(bigcode_config, name) for name in _OPTIONAL_ATTRIBUTES if hasattr(bigcode_config, name)
    }
    return transformers.GPT2Config(
        activation_function=bigcode_config.activation_function,
        attn_pdrop=bigcode_config.attn_pdrop,
        bos_token_id=bigcode_config.bos_token_id,
        embd_pdrop=bigcode_config.embd_pdrop,
        eos_token_id=bigcode_config.eos_token_id,
        initializer_range=bigcode_config.initializer_range,
        layer_norm_epsilon=bigcode_config.layer_norm_epsilon,
        model_type=bigcode_config.model_type,
        multi_query=bigcode_config.multi_query,
        n_embd=bigcode_config.n_embd,
        n_head=bigcode_config.n_head,
        n_inner=bigcode_config.n_inner,
        n_layer=bigcode_config.n_layer,
        n_positions=bigcode_config.n_positions,
        resid_pdrop=bigcode_config.resid_pdrop,
        scale_attn_weights=bigcode_config.scale_attn_weights,
        use_cache=bigcode_config.use_cache,
        vocab_size=bigcode_config.vocab_size,
        tie_word_embeddings=bool(getattr(bigcode_config, "tie_word_embeddings", True)),
        **optional,
    )
