"""``flash_attn.models.llama``: flash-attn 2.8.x's Llama support, a Llama being a
:class:`flash_attn.models.gpt.GPTLMHeadModel` (RMSNorm, SwiGLU ``GatedMlp``, interleaved rotary embeddings on
the whole head, no biases, GQA through ``n_head_kv``).

* :func:`llama_config_to_gpt2_config`: ``transformers.LlamaConfig`` -> the ``GPT2Config`` that builds it;
* :func:`remap_state_dict_hf_llama` / :func:`inv_remap_state_dict_hf_llama`: Hugging Face Llama weights <->
  the GPT model's names;
* :func:`remap_state_dict_meta_llama`: one shard of Meta's original checkpoint -> the GPT model's names (merge
  the shards with :func:`flash_attn.models.gpt.combine_state_dicts_tp`);
* :func:`config_from_meta_checkpoint` (``params.json``), :func:`config_from_hf_checkpoint`,
  :func:`config_from_checkpoint`, :func:`state_dicts_from_checkpoint` (``consolidated.*.pth``): reading a
  checkpoint directory ``<checkpoint_path>/<model_name>`` (Meta) or ``<checkpoint_path>/<model_name>-hf``
  (Hugging Face).

The GPT model's ``fc1`` of a gated MLP is ``[up_proj; gate_proj]`` (Meta's ``[w3; w1]``) and its q / k
projections use the interleaved rotary layout of Meta's checkpoints: Hugging Face's q / k rows (rotated
halves) are permuted back. The ``remap`` functions return new dicts built from the given one (they may pop
keys from it, as flash-attn's do).

HF transformers is imported by the functions that build or read a config (and sentencepiece by
:func:`config_from_meta_checkpoint` when the checkpoint has a ``tokenizer.model``); the state-dict conversions
need neither. Differences from flash-attn 2.8.3, all supersets:

* :func:`llama_config_to_gpt2_config` takes the rotary base from the Llama config's ``rope_theta``
  (``rope_parameters`` in transformers 5) when there is no ``rotary_emb_base`` attribute (flash-attn then uses
  10000), keeps the config's ``tie_word_embeddings`` (flash-attn always unties), and sets
  ``mlp_multiple_of=1`` so that any ``intermediate_size`` is built as is (flash-attn rounds it up to a
  multiple of 128, which no longer matches the checkpoint's shapes); a ``head_dim`` other than
  ``hidden_size // num_attention_heads`` raises ``NotImplementedError``; a ``rope_scaling`` other than the
  default is logged as ignored (as it is ignored in flash-attn);
* :func:`config_from_meta_checkpoint` builds the ``LlamaConfig`` with its MLP width (transformers 5 refuses
  ``intermediate_size=None``), and :func:`config_from_hf_checkpoint` reads the directory holding
  ``config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_attn.utils.pretrained import _import_optional

__all__ = [
    "config_from_checkpoint",
    "config_from_hf_checkpoint",
    "config_from_meta_checkpoint",
    "inv_remap_state_dict_hf_llama",
    "llama_config_to_gpt2_config",
    "remap_state_dict_hf_llama",
    "remap_state_dict_meta_llama",
    "state_dicts_from_checkpoint",
]

logger = logging.getLogger(__name__)


def _pad_to_multiple(weight: Tensor, config: Any) -> Tensor:
    """``weight`` (vocab, ...) zero-padded along dim 0 to a multiple of ``config.pad_vocab_size_multiple``."""
    multiple = getattr(config, "pad_vocab_size_multiple", 1)
    rows = math.ceil(weight.shape[0] / multiple) * multiple
    return F.pad(weight, (0, 0, 0, rows - weight.shape[0]))


def _pad_embeddings_and_head(sd: dict[str, Tensor], config: Any) -> None:
    """In place, on a state dict in this model's names: pad the word embeddings (and an untied ``lm_head``'s
    weight and bias) to a multiple of ``config.pad_vocab_size_multiple``; a tied head gets the embeddings."""
    key = "transformer.embeddings.word_embeddings.weight"
    sd[key] = word_embeddings = _pad_to_multiple(sd.pop(key), config)
    if getattr(config, "tie_word_embeddings", False):
        sd["lm_head.weight"] = word_embeddings
    else:
        sd["lm_head.weight"] = _pad_to_multiple(sd.pop("lm_head.weight"), config)
    if "lm_head.bias" in sd:
        bias = sd.pop("lm_head.bias")
        sd["lm_head.bias"] = F.pad(bias, (0, sd["lm_head.weight"].shape[0] - bias.shape[0]))


def _rename(state_dict: Mapping[str, Tensor], rules: list[tuple[str, str]]) -> OrderedDict[str, Tensor]:
    """A new dict with every key rewritten by the first matching ``(pattern, replacement)`` rule
    (``re.sub`` anchored at the start of the key)."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            new_key, n = re.subn(pattern, replacement, key, count=1)
            if n:
                key = new_key
                break
        out[key] = value
    return out


def _interleave_rows(w: Tensor, head_dim: int) -> Tensor:
    """Hugging Face's q / k rows -> Meta's: per head, the rows ``[first half; second half]`` of the rotated
    pairs become interleaved pairs ``(h two d) -> (h d two)``."""
    half = head_dim // 2
    return w.unflatten(0, (-1, 2, half)).transpose(1, 2).flatten(0, 2)


def _halve_rows(w: Tensor, head_dim: int) -> Tensor:
    """The inverse of :func:`_interleave_rows`: ``(h d two) -> (h two d)``."""
    half = head_dim // 2
    return w.unflatten(0, (-1, half, 2)).transpose(1, 2).flatten(0, 2)


def _head_dim(config: Any) -> int:
    return config.n_embd // config.n_head


def remap_state_dict_meta_llama(state_dict: dict[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """One shard of Meta's Llama checkpoint (``consolidated.NN.pth``) -> the GPT model's names.

    ``tok_embeddings`` -> word embeddings (zero-padded to a multiple of ``pad_vocab_size_multiple``);
    ``output`` -> ``lm_head`` (padded alike; the word embeddings with ``config.tie_word_embeddings``);
    ``attention.wq / wk / wv`` -> ``mixer.Wqkv`` (concatenated), ``attention.wo`` -> ``mixer.out_proj``;
    ``feed_forward.w3 / w1`` -> ``mlp.fc1`` (``[w3; w1]``), ``w2`` -> ``mlp.fc2``; ``attention_norm`` /
    ``ffn_norm`` / ``norm`` -> ``norm1`` / ``norm2`` / ``ln_f``; the ``rope.freqs`` buffers are dropped.

    Arguments:
        state_dict: Meta's names (``tok_embeddings.weight``, ``layers.{i}.attention.wq.weight``, ...).
        config: the ``GPT2Config`` (``n_layer``, ``tie_word_embeddings``, ``pad_vocab_size_multiple``).
    """
    sd = OrderedDict((k if k.startswith("output.") else f"transformer.{k}", v) for k, v in state_dict.items())
    sd["transformer.embeddings.word_embeddings.weight"] = _pad_to_multiple(
        sd.pop("transformer.tok_embeddings.weight"), config
    )
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["transformer.embeddings.word_embeddings.weight"]
    else:
        # the output embeddings are sharded on another dim than the word embeddings: pad by their own size
        sd["lm_head.weight"] = _pad_to_multiple(sd.pop("output.weight"), config)
    for i in range(config.n_layer):
        layer = f"transformer.layers.{i}"
        w1 = sd.pop(f"{layer}.feed_forward.w1.weight")
        w3 = sd.pop(f"{layer}.feed_forward.w3.weight")
        sd[f"{layer}.mlp.fc1.weight"] = torch.cat([w3, w1], dim=0)
        wq, wk, wv = (sd.pop(f"{layer}.attention.{w}.weight") for w in ("wq", "wk", "wv"))
        sd[f"{layer}.mixer.Wqkv.weight"] = torch.cat([wq, wk, wv], dim=0)
        sd.pop(f"{layer}.attention.inner_attention.rope.freqs", None)
    sd.pop("transformer.rope.freqs", None)
    return _rename(
        sd,
        [
            (r"^transformer\.norm\.", "transformer.ln_f."),
            (r"^transformer\.layers\.(\d+)\.attention_norm\.", r"transformer.layers.\1.norm1."),
            (r"^transformer\.layers\.(\d+)\.ffn_norm\.", r"transformer.layers.\1.norm2."),
            (r"^transformer\.layers\.(\d+)\.feed_forward\.w2\.", r"transformer.layers.\1.mlp.fc2."),
            (r"^transformer\.layers\.(\d+)\.attention\.wo\.", r"transformer.layers.\1.mixer.out_proj."),
        ],
    )


def remap_state_dict_hf_llama(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """Hugging Face Llama weights (``LlamaForCausalLM``) -> the GPT model's names.

    ``model.embed_tokens`` -> word embeddings and ``lm_head`` -> ``lm_head`` (each zero-padded to a multiple of
    ``pad_vocab_size_multiple``; ``lm_head`` is the word embeddings with ``config.tie_word_embeddings``);
    ``q_proj`` / ``k_proj`` (rows permuted back to the interleaved rotary layout) and ``v_proj`` ->
    ``mixer.Wqkv``, ``o_proj`` -> ``mixer.out_proj``; ``[up_proj; gate_proj]`` -> ``mlp.fc1``,
    ``down_proj`` -> ``mlp.fc2``; ``input_layernorm`` / ``post_attention_layernorm`` / ``model.norm`` ->
    ``norm1`` / ``norm2`` / ``ln_f``; the ``rotary_emb.inv_freq`` buffers are dropped.

    Arguments:
        state_dict: Hugging Face's names (``model.layers.{i}.self_attn.q_proj.weight``, ...).
        config: the ``GPT2Config`` (``n_layer``, ``n_embd``, ``n_head``, ``tie_word_embeddings``,
            ``pad_vocab_size_multiple``).
    """
    sd = OrderedDict(state_dict)
    sd["transformer.embeddings.word_embeddings.weight"] = _pad_to_multiple(
        sd.pop("model.embed_tokens.weight"), config
    )
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["transformer.embeddings.word_embeddings.weight"]
    else:
        sd["lm_head.weight"] = _pad_to_multiple(sd.pop("lm_head.weight"), config)
    head_dim = _head_dim(config)
    for i in range(config.n_layer):
        layer = f"model.layers.{i}"
        gate = sd.pop(f"{layer}.mlp.gate_proj.weight")
        up = sd.pop(f"{layer}.mlp.up_proj.weight")
        sd[f"transformer.layers.{i}.mlp.fc1.weight"] = torch.cat([up, gate], dim=0)
        wq, wk, wv = (sd.pop(f"{layer}.self_attn.{p}_proj.weight") for p in ("q", "k", "v"))
        sd[f"transformer.layers.{i}.mixer.Wqkv.weight"] = torch.cat(
            [_interleave_rows(wq, head_dim), _interleave_rows(wk, head_dim), wv], dim=0
        )
        sd.pop(f"{layer}.self_attn.rotary_emb.inv_freq", None)
    return _rename(
        sd,
        [
            (r"^model\.norm\.", "transformer.ln_f."),
            (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.layers.\1.norm1."),
            (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.layers.\1.norm2."),
            (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"transformer.layers.\1.mlp.fc2."),
            (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.layers.\1.mixer.out_proj."),
        ],
    )


def inv_remap_state_dict_hf_llama(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """The GPT model's names -> Hugging Face Llama's: the inverse of :func:`remap_state_dict_hf_llama` (up to
    the vocabulary padding: an unpadded vocabulary comes back padded to ``pad_vocab_size_multiple``).

    ``Wqkv`` is split into ``q_proj`` (``n_head`` heads), ``k_proj`` / ``v_proj`` (``n_head_kv`` heads) with
    q / k rows permuted to Hugging Face's rotated-halves layout; ``fc1`` into ``up_proj`` / ``gate_proj``.
    """
    sd = OrderedDict(state_dict)
    sd["model.embed_tokens.weight"] = _pad_to_multiple(
        sd.pop("transformer.embeddings.word_embeddings.weight"), config
    )
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = _pad_to_multiple(sd.pop("lm_head.weight"), config)
    head_dim = _head_dim(config)
    n_head = config.n_head
    n_head_kv = getattr(config, "n_head_kv", None) or n_head
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    for i in range(config.n_layer):
        layer = f"transformer.layers.{i}"
        up, gate = sd.pop(f"{layer}.mlp.fc1.weight").chunk(2, dim=0)
        sd[f"model.layers.{i}.mlp.gate_proj.weight"] = gate
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = up
        wqkv = sd.pop(f"{layer}.mixer.Wqkv.weight")
        wq, wk, wv = wqkv[:q_dim], wqkv[q_dim : q_dim + kv_dim], wqkv[q_dim + kv_dim : q_dim + 2 * kv_dim]
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = _halve_rows(wq, head_dim)
        sd[f"model.layers.{i}.self_attn.k_proj.weight"] = _halve_rows(wk, head_dim)
        sd[f"model.layers.{i}.self_attn.v_proj.weight"] = wv
        sd.pop(f"{layer}.attention.inner_attention.rope.freqs", None)
    return _rename(
        sd,
        [
            (r"^transformer\.ln_f\.", "model.norm."),
            (r"^transformer\.layers\.(\d+)\.norm1\.", r"model.layers.\1.input_layernorm."),
            (r"^transformer\.layers\.(\d+)\.norm2\.", r"model.layers.\1.post_attention_layernorm."),
            (r"^transformer\.layers\.(\d+)\.mlp\.fc2\.", r"model.layers.\1.mlp.down_proj."),
            (r"^transformer\.layers\.(\d+)\.mixer\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
        ],
    )


def config_from_meta_checkpoint(checkpoint_path: str | os.PathLike[str], model_name: str) -> Any:
    """A ``transformers.LlamaConfig`` from Meta's ``<checkpoint_path>/<model_name>/params.json``.

    The MLP width follows Meta's code: ``int(2 * 4 * dim / 3)``, times ``ffn_dim_multiplier`` when given,
    rounded up to a multiple of ``multiple_of``. ``rope_theta`` becomes the attribute ``rotary_emb_base``. The
    vocabulary size is that of the checkpoint's ``tokenizer.model`` (read with sentencepiece) when there is
    one, else 32000 (``params.json`` does not say).
    """
    transformers = _import_optional("transformers", "config_from_meta_checkpoint")
    folder = Path(checkpoint_path) / model_name
    params = json.loads((folder / "params.json").read_text())
    dim = params["dim"]
    multiple_of = params.get("multiple_of", 1)
    intermediate_size = int(2 * (4 * dim) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        intermediate_size = int(params["ffn_dim_multiplier"] * intermediate_size)
    intermediate_size = multiple_of * ((intermediate_size + multiple_of - 1) // multiple_of)
    vocab_size = 32000  # some CodeLlama checkpoints have 32016: only the tokenizer knows
    tokenizer = folder / "tokenizer.model"
    if tokenizer.is_file():
        sentencepiece = _import_optional("sentencepiece", "config_from_meta_checkpoint (tokenizer.model)")
        vocab_size = sentencepiece.SentencePieceProcessor(str(tokenizer)).vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=intermediate_size,
        num_attention_heads=params["n_heads"],
        num_hidden_layers=params["n_layers"],
        rms_norm_eps=params["norm_eps"],
        num_key_value_heads=params.get("n_kv_heads", None),
    )
    if "rope_theta" in params:
        config.rotary_emb_base = params["rope_theta"]
    return config


def config_from_hf_checkpoint(checkpoint_path: str | os.PathLike[str], model_name: str) -> Any:
    """``transformers.LlamaConfig`` of ``<checkpoint_path>/<model_name>-hf/config.json``."""
    transformers = _import_optional("transformers", "config_from_hf_checkpoint")
    return transformers.LlamaConfig.from_pretrained(Path(checkpoint_path) / f"{model_name}-hf")


def config_from_checkpoint(
    checkpoint_path: str | os.PathLike[str], model_name: str, checkpoint_format: str = "meta"
) -> Any:
    """:func:`config_from_meta_checkpoint` for ``checkpoint_format="meta"``, else
    :func:`config_from_hf_checkpoint`."""
    if checkpoint_format == "meta":
        return config_from_meta_checkpoint(checkpoint_path, model_name)
    return config_from_hf_checkpoint(checkpoint_path, model_name)


def state_dicts_from_checkpoint(checkpoint_path: str | os.PathLike[str], model_name: str) -> list[dict]:
    """The shards ``<checkpoint_path>/<model_name>/consolidated.*.pth`` of a Meta checkpoint, loaded on the CPU
    in the order of their file names (the tensor-parallel rank order)."""
    paths = sorted((Path(checkpoint_path) / model_name).glob("consolidated.*.pth"))
    return [torch.load(path, map_location="cpu", weights_only=True) for path in paths]


def _rope_theta(llama_config: Any) -> float:
    """The rotary base: ``rotary_emb_base`` (set by :func:`config_from_meta_checkpoint`), else the config's
    ``rope_theta`` (transformers 4) / ``rope_parameters["rope_theta"]`` (transformers 5), else 10000."""
    base = getattr(llama_config, "rotary_emb_base", None)
    if base is None:
        base = getattr(llama_config, "rope_theta", None)
    if base is None:
        parameters = getattr(llama_config, "rope_parameters", None)
        if isinstance(parameters, Mapping):
            base = parameters.get("rope_theta")
    return float(base) if base is not None else 10000.0


def _warn_rope_scaling(llama_config: Any) -> None:
    for attr in ("rope_scaling", "rope_parameters"):
        spec = getattr(llama_config, attr, None)
        if isinstance(spec, Mapping):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind not in (None, "default"):
                logger.warning(
                    "llama_config_to_gpt2_config: rope scaling %r is ignored (plain rotary embeddings)", kind
                )
                return


def llama_config_to_gpt2_config(llama_config: Any) -> Any:
    """The ``transformers.GPT2Config`` of :class:`flash_attn.models.gpt.GPTLMHeadModel` for a
    ``transformers.LlamaConfig``: SwiGLU MLP of width ``intermediate_size``, RMSNorm of eps ``rms_norm_eps``,
    interleaved rotary embeddings on the whole head dim, no biases, no position embeddings, no dropout,
    ``n_head_kv = num_key_value_heads`` (see the module docstring for the rotary base and the word
    embeddings' tying)."""
    transformers = _import_optional("transformers", "llama_config_to_gpt2_config")
    hidden, heads = llama_config.hidden_size, llama_config.num_attention_heads
    head_dim = getattr(llama_config, "head_dim", None)
    if head_dim is not None and head_dim != hidden // heads:
        raise NotImplementedError(
            f"head_dim {head_dim} != hidden_size // num_attention_heads ({hidden // heads}): the GPT model's "
            "attention (flash_attn.modules.mha.MHA) derives its head dim from the width"
        )
    _warn_rope_scaling(llama_config)
    return transformers.GPT2Config(
        vocab_size=llama_config.vocab_size,
        n_positions=0,  # rotary embeddings only
        n_embd=hidden,
        n_layer=llama_config.num_hidden_layers,
        n_head=heads,
        n_inner=llama_config.intermediate_size,
        activation_function="swiglu",  # Hugging Face's "silu" of a gated MLP
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=llama_config.rms_norm_eps,
        initializer_range=llama_config.initializer_range,
        bos_token_id=llama_config.bos_token_id,
        eos_token_id=llama_config.eos_token_id,
        pad_token_id=llama_config.pad_token_id,
        # flash-attn's attributes
        rms_norm=True,
        rotary_emb_fraction=1.0,
        rotary_emb_interleaved=True,
        tie_word_embeddings=bool(getattr(llama_config, "tie_word_embeddings", False)),
        qkv_proj_bias=False,
        out_proj_bias=False,
        mlp_fc1_bias=False,
        mlp_fc2_bias=False,
        mlp_multiple_of=1,
        rotary_emb_base=_rope_theta(llama_config),
        n_head_kv=llama_config.num_key_value_heads,
    )
