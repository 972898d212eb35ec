"""``flash_attn.models.btlm``: flash-attn 2.8.x's BTLM (Cerebras ``btlm-3b-8k``) support, a BTLM being a
:class:`flash_attn.models.gpt.GPTLMHeadModel` (GPT-2 blocks with a SwiGLU MLP, ALiBi or learned position
embeddings, muP scales, a tied head).

* :func:`btlm_config_to_gpt2_config`: the remote-code ``BTLMConfig`` -> the ``GPT2Config`` that builds it;
* :func:`remap_state_dict_hf_btlm`: BTLM weights (``BTLMLMHeadModel``, GPT-2's ``Conv1D`` layout of
  (in, out) weights) -> the GPT model's names.

BTLM is a remote-code model (``trust_remote_code``): nothing here imports its code. ALiBi runs only in the
flash attention path, so an ALiBi config sets ``use_flash_attn=True`` (as in flash-attn).

HF transformers is imported only by :func:`btlm_config_to_gpt2_config`; the state-dict conversion needs it not.
Difference from flash-attn 2.8.3, a superset: the remap drops ``transformer.relative_pe.slopes`` only where
present (a learned-position checkpoint has none; flash-attn requires it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flash_attn.models.llama import _pad_to_multiple, _rename
from flash_attn.utils.pretrained import _import_optional

__all__ = ["btlm_config_to_gpt2_config", "remap_state_dict_hf_btlm"]

_RULES = [
    (r"^transformer\.wpe\.", "transformer.embeddings.position_embeddings."),
    (r"^transformer\.h\.(\d+)\.ln_(1|2)\.", r"transformer.layers.\1.norm\2."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.bias$", r"transformer.layers.\1.mlp.fc2.bias"),
    (r"^transformer\.h\.(\d+)\.attn\.c_attn\.bias$", r"transformer.layers.\1.mixer.Wqkv.bias"),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj\.bias$", r"transformer.layers.\1.mixer.out_proj.bias"),
]


def remap_state_dict_hf_btlm(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """BTLM weights -> the GPT model's names.

    ``transformer.wte`` -> word embeddings (zero-padded to a multiple of ``pad_vocab_size_multiple``), also
    ``lm_head``; ``transformer.wpe`` (if any) -> position embeddings; ``ln_1`` / ``ln_2`` -> ``norm1`` /
    ``norm2``, ``ln_f`` stays; the ``Conv1D`` weights are transposed: ``attn.c_attn`` -> ``mixer.Wqkv``,
    ``attn.c_proj`` -> ``mixer.out_proj``, ``[mlp.c_fc; mlp.c_fc2]`` (value; gate) -> ``mlp.fc1`` (biases
    concatenated alike), ``mlp.c_proj`` -> ``mlp.fc2``; the ALiBi slopes are dropped. Returns a new dict.

    Arguments:
        state_dict: BTLM's names (``transformer.h.{i}.mlp.c_fc2.weight``, ...).
        config: the ``GPT2Config`` (``n_layer``, ``pad_vocab_size_multiple``).
    """
    sd = _rename(state_dict, _RULES)
    word_embeddings = _pad_to_multiple(sd.pop("transformer.wte.weight"), config)
    sd["transformer.embeddings.word_embeddings.weight"] = word_embeddings
    sd.pop("lm_head.weight", None)
    sd["lm_head.weight"] = word_embeddings
    sd.pop("transformer.relative_pe.slopes", None)
    for layer in range(config.n_layer):
        old, new = f"transformer.h.{layer}", f"transformer.layers.{layer}"
        w1, w3 = sd.pop(f"{old}.mlp.c_fc.weight"), sd.pop(f"{old}.mlp.c_fc2.weight")
        sd[f"{new}.mlp.fc1.weight"] = torch.cat([w1.t(), w3.t()], dim=0)
        b1, b3 = sd.pop(f"{old}.mlp.c_fc.bias"), sd.pop(f"{old}.mlp.c_fc2.bias")
        sd[f"{new}.mlp.fc1.bias"] = torch.cat([b1, b3], dim=0)
        sd[f"{new}.mlp.fc2.weight"] = sd.pop(f"{old}.mlp.c_proj.weight").t()
        sd[f"{new}.mixer.Wqkv.weight"] = sd.pop(f"{old}.attn.c_attn.weight").t()
        sd[f"{new}.mixer.out_proj.weight"] = sd.pop(f"{old}.attn.c_proj.weight").t()
    return sd


def btlm_config_to_gpt2_config(btlm_config: Any) -> Any:
    """The ``transformers.GPT2Config`` of :class:`flash_attn.models.gpt.GPTLMHeadModel` for a ``BTLMConfig``:
    ALiBi (``position_embedding_type == "alibi"``, then no position table and ``use_flash_attn=True``) or
    learned positions, the config's activation (``"swiglu"``), MLP width (built as is: ``mlp_multiple_of=1``),
    dropouts and muP scales (``mup_width_scale``, ``mup_embeddings_scale``, ``mup_output_alpha``,
    ``mup_scale_qk_dot_by_d``)."""
    transformers = _import_optional("transformers", "btlm_config_to_gpt2_config")
    alibi = btlm_config.position_embedding_type == "alibi"
    return transformers.GPT2Config(
        vocab_size=btlm_config.vocab_size,
        n_positions=0 if alibi else btlm_config.n_positions,
        n_embd=btlm_config.hidden_size,
        n_layer=btlm_config.num_hidden_layers,
        n_head=btlm_config.num_attention_heads,
        n_inner=btlm_config.n_inner,
        activation_function=btlm_config.activation_function,
        resid_pdrop=btlm_config.resid_pdrop,
        embd_pdrop=btlm_config.embd_pdrop,
        attn_pdrop=btlm_config.attn_pdrop,
        layer_norm_epsilon=btlm_config.layer_norm_epsilon,
        initializer_range=btlm_config.initializer_range,
        bos_token_id=btlm_config.bos_token_id,
        eos_token_id=btlm_config.eos_token_id,
        # flash-attn's attributes
        use_alibi=alibi,
        use_flash_attn=alibi,  # ALiBi needs the flash attention path
        mup_width_scale=btlm_config.mup_width_scale,
        mup_embeddings_multiplier=btlm_config.mup_embeddings_scale,
        mup_output_multiplier=btlm_config.mup_output_alpha,
        mup_scale_qk_dot_by_d=btlm_config.mup_scale_qk_dot_by_d,
        mlp_multiple_of=1,
    )
