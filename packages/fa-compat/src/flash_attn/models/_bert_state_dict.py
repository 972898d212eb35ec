"""State-dict conversions of :mod:`flash_attn.models.bert` (re-exported there): Hugging Face / Google BERT names
<-> :class:`flash_attn.models.bert.BertForPreTraining`'s. Pure tensor manipulation: no transformers needed.

Names on the two sides (``{i}`` a layer index, the ``bert.`` prefix left out of the encoder rows):

=================================================  =======================================================
Hugging Face                                       flash-attn
=================================================  =======================================================
``bert.embeddings.LayerNorm.{weight,bias}``        ``bert.emb_ln.{weight,bias}``
``encoder.layer.{i}.attention.self.{query,key,     ``encoder.layers.{i}.mixer.Wqkv`` (rows ``[q; k; v]``),
value}``                                           or ``mixer.Wq`` + ``mixer.Wkv`` (``[k; v]``) for the
                                                   last layer with ``last_layer_subset``
``encoder.layer.{i}.attention.output.dense``       ``encoder.layers.{i}.mixer.out_proj``
``encoder.layer.{i}.attention.output.LayerNorm``   ``encoder.layers.{i}.norm1``
``encoder.layer.{i}.intermediate.dense``           ``encoder.layers.{i}.mlp.fc1``
``encoder.layer.{i}.output.dense``                 ``encoder.layers.{i}.mlp.fc2``
``encoder.layer.{i}.output.LayerNorm``             ``encoder.layers.{i}.norm2``
``cls.predictions.transform.LayerNorm``            ``cls.predictions.transform.layer_norm``
``cls.predictions.bias``                           ``cls.predictions.decoder.bias``
=================================================  =======================================================

Every other name (embeddings, pooler, ``cls.predictions.transform.dense``, ``cls.predictions.decoder.weight``,
``cls.seq_relationship``) is the same on both sides.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_attn.models._gpt_state_dict import _padded_vocab_size

__all__ = ["inv_remap_state_dict", "remap_state_dict"]

_LAYER = r"^(bert\.encoder\.layers\.\d+\.)"

#: Hugging Face -> flash-attn: every rule is applied, in order, to every key
_TO_FLASH: list[tuple[str, str]] = [
    (r"LayerNorm\.gamma$", "LayerNorm.weight"),  # TensorFlow-era checkpoints
    (r"LayerNorm\.beta$", "LayerNorm.bias"),
    (r"^bert\.encoder\.layer\.", "bert.encoder.layers."),
    (r"^bert\.embeddings\.LayerNorm\.", "bert.emb_ln."),
    (_LAYER + r"attention\.output\.LayerNorm\.", r"\1norm1."),
    (_LAYER + r"output\.LayerNorm\.", r"\1norm2."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "cls.predictions.transform.layer_norm."),
    (_LAYER + r"intermediate\.dense\.", r"\1mlp.fc1."),
    (_LAYER + r"output\.dense\.", r"\1mlp.fc2."),
    (_LAYER + r"attention\.output\.dense\.", r"\1mixer.out_proj."),
    (r"^cls\.predictions\.bias$", "cls.predictions.decoder.bias"),
]

#: flash-attn -> Hugging Face (LayerNorm parameters named gamma / beta, as flash-attn writes them)
_TO_HF: list[tuple[str, str]] = [
    (r"^bert\.emb_ln\.", "bert.embeddings.LayerNorm."),
    (_LAYER + r"norm1\.", r"\1attention.output.LayerNorm."),
    (_LAYER + r"norm2\.", r"\1output.LayerNorm."),
    (r"^cls\.predictions\.transform\.layer_norm\.", "cls.predictions.transform.LayerNorm."),
    (r"LayerNorm\.weight$", "LayerNorm.gamma"),
    (r"LayerNorm\.bias$", "LayerNorm.beta"),
    (_LAYER + r"mlp\.fc1\.", r"\1intermediate.dense."),
    (_LAYER + r"mlp\.fc2\.", r"\1output.dense."),
    (_LAYER + r"mixer\.out_proj\.", r"\1attention.output.dense."),
    (r"^cls\.predictions\.decoder\.bias$", "cls.predictions.bias"),
    (r"^bert\.encoder\.layers\.", "bert.encoder.layer."),
]

_WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
_DECODER_WEIGHT = "cls.predictions.decoder.weight"
_DECODER_BIAS = "cls.predictions.decoder.bias"


def _rewrite(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _prefixed(state_dict: Mapping[str, Tensor]) -> tuple[OrderedDict[str, Tensor], bool]:
    """A copy with the ``bert.`` prefix on every key, and whether it was added (a bare ``BertModel``'s dict:
    no key starts with ``bert.`` or ``cls.``)."""
    if any(k.startswith(("bert.", "cls.")) for k in state_dict):
        return OrderedDict(state_dict), False
    return OrderedDict((f"bert.{k}", v) for k, v in state_dict.items()), True


def _unprefixed(state_dict: OrderedDict[str, Tensor], added: bool) -> OrderedDict[str, Tensor]:
    if not added:
        return state_dict
    return OrderedDict((k.removeprefix("bert."), v) for k, v in state_dict.items())


def _last_layer_is_cross(config: Any, layer: int) -> bool:
    """Whether ``layer`` is built as cross-attention (``Wq`` / ``Wkv``): the last one with ``last_layer_subset``."""
    return bool(getattr(config, "last_layer_subset", False)) and layer == config.num_hidden_layers - 1


def remap_state_dict(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """Hugging Face BERT weights -> flash-attn's names (see the module docstring for the table).

    Per layer, ``query`` / ``key`` / ``value`` are concatenated into ``mixer.Wqkv`` (or ``mixer.Wq`` and
    ``mixer.Wkv`` for the last layer with ``config.last_layer_subset``). With ``config.pad_vocab_size_multiple
    > 1`` the word embeddings and the decoder weight are zero-padded to the vocabulary size rounded up to that
    multiple, and the decoder bias is padded with -100 (the padded entries are never predicted). Other keys
    (e.g. HF's ``position_ids`` buffer) pass through.

    Arguments:
        state_dict: a ``BertForPreTraining`` (``bert.`` / ``cls.`` prefixes) or a bare ``BertModel`` state dict
            (no prefix: the result has none either); ``LayerNorm.gamma`` / ``beta`` are read as ``weight`` /
            ``bias``. Not modified.
        config: ``num_hidden_layers``, ``vocab_size``; read with ``getattr``: ``last_layer_subset`` (False),
            ``pad_vocab_size_multiple`` (1).
    Return:
        a new ``OrderedDict``.
    """
    sd, added = _prefixed(state_dict)
    sd = OrderedDict((_rewrite(k, _TO_FLASH), v) for k, v in sd.items())
    for i in range(config.num_hidden_layers):
        source = f"bert.encoder.layers.{i}.attention.self."
        mixer = f"bert.encoder.layers.{i}.mixer."
        for kind in ("weight", "bias"):
            q, k, v = (sd.pop(f"{source}{name}.{kind}") for name in ("query", "key", "value"))
            if _last_layer_is_cross(config, i):
                sd[f"{mixer}Wq.{kind}"] = q
                sd[f"{mixer}Wkv.{kind}"] = torch.cat([k, v], dim=0)
            else:
                sd[f"{mixer}Wqkv.{kind}"] = torch.cat([q, k, v], dim=0)
    if getattr(config, "pad_vocab_size_multiple", 1) > 1:
        rows = _padded_vocab_size(config.vocab_size, config)
        for key in (_WORD_EMBEDDINGS, _DECODER_WEIGHT):
            if key in sd:
                sd[key] = F.pad(sd[key], (0, 0, 0, max(0, rows - sd[key].shape[0])))
        if _DECODER_BIAS in sd:
            sd[_DECODER_BIAS] = F.pad(
                sd[_DECODER_BIAS], (0, max(0, rows - sd[_DECODER_BIAS].shape[0])), value=-100.0
            )
    return _unprefixed(sd, added)


def inv_remap_state_dict(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """flash-attn's BERT names -> Hugging Face's: the inverse of :func:`remap_state_dict`.

    ``mixer.Wqkv`` is split in three equal row blocks (``mixer.Wkv`` in two), the LayerNorm parameters come back
    as ``LayerNorm.gamma`` / ``LayerNorm.beta`` (flash-attn's choice; rename them to ``weight`` / ``bias`` for
    ``transformers``' ``load_state_dict``) and the decoder bias as ``cls.predictions.bias``. With
    ``config.pad_vocab_size_multiple > 1`` the vocabulary rows are cut back to ``config.orig_vocab_size``
    (set by :class:`flash_attn.models.bert.BertModel` when it pads the config's ``vocab_size``), else to
    ``config.vocab_size``.

    Arguments:
        state_dict: ``BertForPreTraining``'s names, or a bare ``BertModel``'s (the result then has no prefix).
            Not modified.
        config: as in :func:`remap_state_dict`.
    """
    sd, added = _prefixed(state_dict)
    if getattr(config, "pad_vocab_size_multiple", 1) > 1:
        rows = getattr(config, "orig_vocab_size", None) or config.vocab_size
        for key in (_WORD_EMBEDDINGS, _DECODER_WEIGHT, _DECODER_BIAS):
            if key in sd:
                sd[key] = sd[key][:rows]
    for i in range(config.num_hidden_layers):
        mixer = f"bert.encoder.layers.{i}.mixer."
        target = f"bert.encoder.layers.{i}.attention.self."
        for kind in ("weight", "bias"):
            if _last_layer_is_cross(config, i):
                q = sd.pop(f"{mixer}Wq.{kind}")
                k, v = sd.pop(f"{mixer}Wkv.{kind}").chunk(2, dim=0)
            else:
                q, k, v = sd.pop(f"{mixer}Wqkv.{kind}").chunk(3, dim=0)
            sd[f"{target}query.{kind}"], sd[f"{target}key.{kind}"], sd[f"{target}value.{kind}"] = q, k, v
    sd = OrderedDict((_rewrite(k, _TO_HF), v) for k, v in sd.items())
    return _unprefixed(sd, added)
