"""``flash_attn.models.falcon``: flash-attn 2.8.x's Falcon support, a Falcon being a
:class:`flash_attn.models.gpt.GPTLMHeadModel` (parallel attention + MLP, multi-query or grouped-query
attention through ``n_head_kv``, rotary embeddings on the whole head, not interleaved, a tied head).

* :func:`falcon_config_to_gpt2_config`: ``transformers.FalconConfig`` (or the original ``RWConfig`` of the
  remote-code checkpoints, with ``n_head_kv``) -> the ``GPT2Config`` that builds it;
* :func:`remap_state_dict_hf_falcon`: Falcon weights (``FalconForCausalLM`` / ``RWForCausalLM``) -> the GPT
  model's names.

Falcon stores ``query_key_value`` grouped by key / value head: per group, the group's query heads, then its key
head, then its value head (multi-query: one group; the old multi-head layout: one group per head). The remap
regroups the rows into ``[all q; all k; all v]``.

HF transformers is imported only by :func:`falcon_config_to_gpt2_config`; the state-dict conversion needs it
not. Differences from flash-attn 2.8.3, all supersets:

* the config conversion understands transformers' ``FalconConfig`` names: ``num_attention_heads`` /
  ``num_hidden_layers``, ``new_decoder_architecture`` with ``num_kv_heads`` and ``num_ln_in_parallel_attn``
  (one norm per block -> ``parallel_block_tied_norm``); flash-attn reads only the remote-code ``n_head`` /
  ``n_layer`` / ``n_head_kv`` and infers the tied norm from ``n_head_kv == 1``, which also gets the tied norm
  of the old multi-head parallel layout wrong. It takes the MLP width from ``ffn_hidden_size``, the activation
  from ``activation``, the rotary base from ``rope_theta`` / ``rope_parameters``, and the head's tying from
  ``tie_word_embeddings`` where present (flash-attn: ``4 * hidden_size``, ``"gelu"``, 10000, tied);
  ``alibi=True`` raises ``ValueError`` (flash-attn builds rotary embeddings for it);
* the remap also regroups a ``query_key_value.bias`` (flash-attn leaves it in Falcon's order).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flash_attn.models.llama import _pad_embeddings_and_head, _rename, _rope_theta
from flash_attn.utils.pretrained import _import_optional

__all__ = ["falcon_config_to_gpt2_config", "remap_state_dict_hf_falcon"]

_RULES = [
    (r"^transformer\.word_embeddings\.", "transformer.embeddings.word_embeddings."),
    (r"^transformer\.h\.(\d+)\.(input_layernorm|ln_attn)\.", r"transformer.layers.\1.norm1."),
    (r"^transformer\.h\.(\d+)\.(post_attention_layernorm|ln_mlp)\.", r"transformer.layers.\1.norm2."),
    (r"^transformer\.h\.(\d+)\.mlp\.dense_h_to_4h\.", r"transformer.layers.\1.mlp.fc1."),
    (r"^transformer\.h\.(\d+)\.mlp\.dense_4h_to_h\.", r"transformer.layers.\1.mlp.fc2."),
    (r"^transformer\.h\.(\d+)\.self_attention\.query_key_value\.", r"transformer.layers.\1.mixer.Wqkv."),
    (r"^transformer\.h\.(\d+)\.self_attention\.dense\.", r"transformer.layers.\1.mixer.out_proj."),
    (r"^transformer\.h\.(\d+)\.", r"transformer.layers.\1."),
]


def _regroup_qkv(w: Tensor, n_head: int, n_head_kv: int, head_dim: int) -> Tensor:
    """Rows ``(group, [q_1 .. q_r; k; v], head_dim)`` (``r = n_head // n_head_kv``) -> ``[all q; all k; all
    v]``."""
    grouped = w.unflatten(0, (n_head_kv, n_head // n_head_kv + 2, head_dim))
    q, k, v = grouped[:, :-2], grouped[:, -2], grouped[:, -1]
    return torch.cat([q.flatten(0, 2), k.flatten(0, 1), v.flatten(0, 1)], dim=0)


def remap_state_dict_hf_falcon(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """Falcon weights -> the GPT model's names.

    ``transformer.word_embeddings`` -> word embeddings, ``lm_head`` -> ``lm_head`` (each zero-padded to a
    multiple of ``pad_vocab_size_multiple``; with ``config.tie_word_embeddings`` the head is the word
    embeddings); ``input_layernorm`` or ``ln_attn`` / ``post_attention_layernorm`` or ``ln_mlp`` -> ``norm1`` /
    ``norm2``, ``ln_f`` stays; ``self_attention.query_key_value`` (regrouped, see the module docstring) ->
    ``mixer.Wqkv``, ``self_attention.dense`` -> ``mixer.out_proj``; ``mlp.dense_h_to_4h`` / ``dense_4h_to_h`` ->
    ``mlp.fc1`` / ``fc2``. Returns a new dict.

    Arguments:
        state_dict: Falcon's names (``transformer.h.{i}.self_attention.query_key_value.weight``, ...).
        config: the ``GPT2Config`` (``n_layer``, ``n_embd``, ``n_head``, ``n_head_kv`` (default 1),
            ``tie_word_embeddings``, ``pad_vocab_size_multiple``).
    """
    sd = _rename(state_dict, _RULES)
    _pad_embeddings_and_head(sd, config)
    n_head = config.n_head
    n_head_kv = getattr(config, "n_head_kv", None) or 1
    head_dim = config.n_embd // n_head
    for layer in range(config.n_layer):
        for kind in ("weight", "bias"):
            key = f"transformer.layers.{layer}.mixer.Wqkv.{kind}"
            if key in sd:
                sd[key] = _regroup_qkv(sd[key], n_head, n_head_kv, head_dim)
    return sd


def _layout(falcon_config: Any) -> tuple[int, int]:
    """``(n_head, n_head_kv)`` of a ``FalconConfig`` or a remote-code ``RWConfig``."""
    n_head = getattr(falcon_config, "num_attention_heads", None) or falcon_config.n_head
    if getattr(falcon_config, "new_decoder_architecture", False):
        n_head_kv = getattr(falcon_config, "num_kv_heads", None) or getattr(
            falcon_config, "n_head_kv", n_head
        )
    elif getattr(falcon_config, "n_head_kv", None) is not None:  # remote-code RWConfig of Falcon-40B
        n_head_kv = falcon_config.n_head_kv
    else:
        n_head_kv = 1 if getattr(falcon_config, "multi_query", False) else n_head
    return n_head, n_head_kv


def falcon_config_to_gpt2_config(falcon_config: Any) -> Any:
    """The ``transformers.GPT2Config`` of :class:`flash_attn.models.gpt.GPTLMHeadModel` for a Falcon config:
    parallel blocks (``parallel_attn``, or the new decoder architecture) with one tied norm or two (Falcon-40B's
    ``ln_attn`` / ``ln_mlp``), ``n_head_kv`` key / value heads, rotary embeddings on the whole head (not
    interleaved), no position embeddings, biases as ``bias``, a tied head without bias."""
    transformers = _import_optional("transformers", "falcon_config_to_gpt2_config")
    if getattr(falcon_config, "alibi", False):
        raise ValueError("Falcon with alibi=True is not supported (only rotary embeddings)")
    n_head, n_head_kv = _layout(falcon_config)
    hidden = falcon_config.hidden_size
    new_architecture = bool(getattr(falcon_config, "new_decoder_architecture", False))
    if new_architecture:
        parallel_block = True
        tied_norm = getattr(falcon_config, "num_ln_in_parallel_attn", None) == 1
    elif getattr(falcon_config, "n_head_kv", None) is not None:  # RWConfig: Falcon-40B has 2 norms
        parallel_block = bool(falcon_config.parallel_attn)
        tied_norm = n_head_kv == 1
    else:
        parallel_block = bool(falcon_config.parallel_attn)
        tied_norm = True
    n_layer = getattr(falcon_config, "num_hidden_layers", None) or falcon_config.n_layer
    return transformers.GPT2Config(
        vocab_size=falcon_config.vocab_size,
        n_positions=0,  # rotary embeddings only
        n_embd=hidden,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=getattr(falcon_config, "ffn_hidden_size", None) or 4 * hidden,
        activation_function=getattr(falcon_config, "activation", None) or "gelu",
        resid_pdrop=falcon_config.hidden_dropout,
        embd_pdrop=0.0,  # Falcon has no embedding dropout
        attn_pdrop=falcon_config.attention_dropout,
        layer_norm_epsilon=falcon_config.layer_norm_epsilon,
        initializer_range=falcon_config.initializer_range,
        bos_token_id=falcon_config.bos_token_id,
        eos_token_id=falcon_config.eos_token_id,
        # flash-attn's attributes
        parallel_block=parallel_block,
        n_head_kv=n_head_kv,
        parallel_block_tied_norm=tied_norm,
        rotary_emb_fraction=1.0,
        rotary_emb_interleaved=False,
        rotary_emb_base=_rope_theta(falcon_config),
        tie_word_embeddings=bool(getattr(falcon_config, "tie_word_embeddings", True)),
        qkv_proj_bias=falcon_config.bias,
        out_proj_bias=falcon_config.bias,
        mlp_fc1_bias=falcon_config.bias,
        mlp_fc2_bias=falcon_config.bias,
        lm_head_bias=False,
    )
