"""``flash_attn.models.bert``: flash-attn 2.8.x's BERT (post-norm encoder, MLPerf-style optimizations).

* :class:`BertModel`: :class:`flash_attn.modules.embedding.BertEmbeddings` + LayerNorm ``emb_ln`` + dropout,
  :class:`BertEncoder` (post-norm :class:`flash_attn.modules.block.Block` layers built by :func:`create_block`
  from :func:`create_mixer_cls` / :func:`create_mlp_cls`) and :class:`BertPooler`; returns transformers'
  ``BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state, pooler_output)``;
* :class:`BertForPreTraining`: ``BertModel`` (``bert``) + :class:`BertPreTrainingHeads` (``cls``:
  :class:`BertLMPredictionHead` with :class:`BertPredictionHeadTransform`, and the next-sentence classifier),
  the decoder tied to the word embeddings; returns transformers' ``BertForPreTrainingOutput(loss,
  prediction_logits, seq_relationship_logits)``;
* :class:`BertPreTrainedModel` (config check, ``from_pretrained``), :func:`_init_weights` (BERT's init);
* :func:`remap_state_dict` / :func:`inv_remap_state_dict`: Hugging Face BERT weights <-> these names.

The models are configured by a ``transformers.BertConfig``; flash-attn's extra attributes are read with
``getattr`` and flash-attn's defaults: ``use_flash_attn`` (False), ``fused_bias_fc`` (False), ``fused_mlp``
(False), ``mlp_checkpoint_lvl`` (0), ``fused_dropout_add_ln`` (False), ``dense_seq_output`` (False),
``last_layer_subset`` (False), ``use_xentropy`` (False), ``pad_vocab_size_multiple`` (1),
``position_embedding_type`` ("absolute"; "rotary" with ``rotary_emb_dim`` (``hidden_size``), ``_base``,
``_scale_base``, ``_interleaved``). Parameter names, signatures, defaults and forward semantics are
flash-attn's, so state dicts load either way:

* with ``use_flash_attn`` and an ``attention_mask``, the encoder unpads the tokens
  (:func:`flash_attn.bert_padding.unpad_input`) and runs the varlen kernels; the padded rows of
  ``last_hidden_state`` are then zeros. Without ``use_flash_attn`` the mask is a key padding mask;
* ``masked_tokens_mask`` (``BertForPreTraining`` passes ``labels > 0`` with ``last_layer_subset``): the last
  layer computes only those tokens and the first one (cross-attention over every token), and the model
  returns ``last_hidden_state`` (n_masked, hidden) in row-major order and the pooled first tokens;
* ``dense_seq_output`` with ``labels``: the prediction head runs on the masked tokens only
  (``prediction_logits`` (n_masked, vocab)); the masked-LM loss ignores label 0, the next-sentence loss -1,
  ``loss`` is their float32 sum (only when both ``labels`` and ``next_sentence_label`` are given).

HF transformers is imported when a model is built (the ``BertConfig`` check) and for the output classes
(``BertForPreTrainingOutput``, ``BaseModelOutputWithPoolingAndCrossAttentions``; these two, ``BertConfig`` and
``PretrainedConfig`` are also attributes of this module, as in flash-attn's, resolved on first access); the
state-dict conversions work without it.

Not provided: ``fused_mlp=True`` needs ``FusedMLP`` from ``flash_attn.ops.fused_dense`` (the CUDA
``fused_dense`` extension in flash-attn) and raises ``NotImplementedError`` when that module does not provide
it. With ``fused_bias_fc=True`` the pooler and the prediction heads are ``FusedDense`` layers when
``flash_attn.ops.fused_dense`` provides it, else ``nn.Linear`` (same parameters, same math); the attention
projections are ``nn.Linear`` in both cases, as in flash-attn's :class:`~flash_attn.modules.mha.MHA`. ``use_xentropy=True`` uses
:class:`flash_attn.losses.cross_entropy.CrossEntropyLoss` (Triton). Rotary embeddings need the padded path
(no ``attention_mask`` or ``use_flash_attn=False``): with an ``attention_mask`` and ``use_flash_attn`` the
unpadded tokens reach :class:`~flash_attn.modules.mha.MHA`, which raises ``ValueError`` for rotary there
(flash-attn's rotary reads the packed ``(total, 3, H, D)`` projections as 3-token sequences: wrong
positions).

Differences from flash-attn 2.8.3, all supersets:

* invalid configurations raise ``ValueError`` instead of failing an ``assert``;
* :class:`BertModel` accepts an integer (0 / 1) ``attention_mask`` / ``masked_tokens_mask`` (made boolean);
  when it pads ``config.vocab_size`` (as flash-attn does, in place) it records the original size as
  ``config.orig_vocab_size`` (unless set), which :func:`inv_remap_state_dict` reads;
* :func:`remap_state_dict` pads the vocabulary to the rounded-up size whether or not a model already padded
  the config, takes a bare ``BertModel`` state dict (no ``bert.`` prefix; the result has none either) and
  a checkpoint without the tied decoder weight; :func:`inv_remap_state_dict` likewise;
* ``from_pretrained`` matches the checkpoint's ``bert.`` prefix to the model (flash-attn's ``BertModel`` loads
  nothing from a ``BertForPreTraining`` checkpoint);
* with ``last_layer_subset`` but no ``labels``, the cross-attention last layer also runs on unpadded tokens
  (flash-attn's kernel wrapper refuses the missing key lengths); ``BertModel(masked_tokens_mask=...)`` on
  the unpadded path also works without ``last_layer_subset`` (every token computed, the subset picked; in
  flash-attn the self-attention last layer refuses the keys' input);
* ``config.position_embedding_type`` is optional (transformers 5's ``BertConfig`` no longer has it).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flash_attn.bert_padding import index_first_axis, index_first_axis_residual, pad_input, unpad_input
from flash_attn.losses.cross_entropy import CrossEntropyLoss
from flash_attn.models._bert_state_dict import inv_remap_state_dict, remap_state_dict
from flash_attn.modules.block import Block
from flash_attn.modules.embedding import BertEmbeddings
from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import Mlp
from flash_attn.ops.triton.layer_norm import layer_norm_fn
from flash_attn.utils.pretrained import _import_optional, state_dict_from_pretrained

__all__ = [
    "BertEncoder",
    "BertForPreTraining",
    "BertLMPredictionHead",
    "BertModel",
    "BertPooler",
    "BertPreTrainedModel",
    "BertPredictionHeadTransform",
    "BertPreTrainingHeads",
    "create_block",
    "create_mixer_cls",
    "create_mlp_cls",
    "inv_remap_state_dict",
    "remap_state_dict",
]

logger = logging.getLogger(__name__)

_TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")
_ACTIVATIONS = ("gelu", *_TANH_GELUS)

#: transformers' names that flash-attn's module imports, resolved on first access (module ``__getattr__``)
_TRANSFORMERS_NAMES = {
    "BertForPreTrainingOutput": "transformers.models.bert.modeling_bert",
    "BaseModelOutputWithPoolingAndCrossAttentions": "transformers.modeling_outputs",
    "BertConfig": "transformers",
    "PretrainedConfig": "transformers",
}


def __getattr__(name: str) -> Any:
    if name in _TRANSFORMERS_NAMES:
        return getattr(_import_optional(_TRANSFORMERS_NAMES[name], f"flash_attn.models.bert.{name}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _from_fused_dense(name: str) -> Any:
    """``name`` of ``flash_attn.ops.fused_dense`` when that module exists and provides it, else None."""
    try:
        module = importlib.import_module("flash_attn.ops.fused_dense")
    except ImportError:
        return None
    return getattr(module, name, None)


#: flash-attn's ``FusedMLP`` (None: not available, ``fused_mlp=True`` raises ``NotImplementedError``)
FusedMLP: Any = _from_fused_dense("FusedMLP")
#: flash-attn's ``FusedDense`` (None: not available, ``fused_bias_fc=True`` builds ``nn.Linear`` heads)
FusedDense: Any = _from_fused_dense("FusedDense")


def _linear_cls(config: Any) -> Any:
    """The heads' linear layer: ``FusedDense`` with ``fused_bias_fc`` when available, else ``nn.Linear`` (the
    same parameters and the same math)."""
    return FusedDense if getattr(config, "fused_bias_fc", False) and FusedDense is not None else nn.Linear


def _gelu_approximate(config: Any) -> str:
    return "tanh" if config.hidden_act in _TANH_GELUS else "none"


def create_mixer_cls(
    config: Any, cross_attn: bool = False, return_residual: bool = False
) -> Callable[..., nn.Module]:
    """The attention constructor of a layer: ``partial(MHA, ...)``, bidirectional, ``num_attention_heads``
    heads, dropout ``attention_probs_dropout_prob``, ``use_flash_attn``, ``fused_bias_fc``, rotary embeddings
    with ``position_embedding_type == "rotary"``; ``cross_attn`` (``Wq`` / ``Wkv``) for the last layer with
    ``last_layer_subset``."""
    rotary: dict[str, Any] = {}
    if getattr(config, "position_embedding_type", "absolute") == "rotary":
        rotary = {
            "rotary_emb_dim": getattr(config, "rotary_emb_dim", config.hidden_size),
            "rotary_emb_base": getattr(config, "rotary_emb_base", 10000.0),
            "rotary_emb_scale_base": getattr(config, "rotary_emb_scale_base", None),
            "rotary_emb_interleaved": getattr(config, "rotary_emb_interleaved", False),
        }
    return partial(
        MHA,
        num_heads=config.num_attention_heads,
        cross_attn=cross_attn,
        dropout=config.attention_probs_dropout_prob,
        causal=False,
        fused_bias_fc=getattr(config, "fused_bias_fc", False),
        use_flash_attn=getattr(config, "use_flash_attn", False),
        return_residual=return_residual,
        **rotary,
    )


def create_mlp_cls(
    config: Any, layer_idx: int | None = None, return_residual: bool = False
) -> Callable[..., nn.Module]:
    """The MLP constructor of a layer: ``partial(Mlp, ...)`` of width ``intermediate_size`` with GeLU (tanh
    approximation for ``hidden_act`` ``gelu_new`` / ``gelu_fast`` / ``gelu_pytorch_tanh``); with ``fused_mlp``
    flash-attn's ``FusedMLP`` (tanh GeLU only; ``mlp_checkpoint_lvl``, an int or one per layer)."""
    if not getattr(config, "fused_mlp", False):
        return partial(
            Mlp,
            hidden_features=config.intermediate_size,
            activation=partial(F.gelu, approximate=_gelu_approximate(config)),
            return_residual=return_residual,
        )
    if config.hidden_act not in _TANH_GELUS:
        raise ValueError(
            f"fused_mlp only supports the tanh-approximate GeLU {_TANH_GELUS}, got {config.hidden_act!r}"
        )
    if FusedMLP is None:
        raise NotImplementedError(
            "config.fused_mlp=True needs FusedMLP from flash_attn.ops.fused_dense (flash-attn's CUDA fused_dense "
            "extension), which is not available; with fused_mlp=False the same MLP is built from nn.Linear layers "
            "(same parameter names)"
        )
    checkpoint_lvl = getattr(config, "mlp_checkpoint_lvl", 0)
    if isinstance(checkpoint_lvl, Sequence):
        if layer_idx is None:
            raise ValueError("a per-layer mlp_checkpoint_lvl needs layer_idx")
        checkpoint_lvl = checkpoint_lvl[layer_idx]
    return partial(
        FusedMLP,
        hidden_features=config.intermediate_size,
        checkpoint_lvl=checkpoint_lvl,
        return_residual=return_residual,
    )


def create_block(config: Any, layer_idx: int | None = None) -> Block:
    """One post-norm layer: ``norm1(x + dropout(mixer(x)))``, then ``norm2(h + dropout(mlp(h)))`` (LayerNorm of
    eps ``layer_norm_eps``, dropout ``hidden_dropout_prob``, ``fused_dropout_add_ln``). The mixer and the MLP
    return their input for the residual, except in the last layer with ``last_layer_subset``: that one is a
    cross-attention layer whose residual is its (subset) query input."""
    cross_attn = (
        bool(getattr(config, "last_layer_subset", False)) and layer_idx == config.num_hidden_layers - 1
    )
    return_residual = not cross_attn
    return Block(
        config.hidden_size,
        create_mixer_cls(config, cross_attn, return_residual=return_residual),
        create_mlp_cls(config, layer_idx, return_residual=return_residual),
        norm_cls=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        prenorm=False,
        resid_dropout1=config.hidden_dropout_prob,
        resid_dropout2=config.hidden_dropout_prob,
        fused_dropout_add_ln=getattr(config, "fused_dropout_add_ln", False),
        return_residual=return_residual,
    )


def _init_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """BERT's initialization of one module (applied with ``model.apply``): ``nn.Linear`` weight ~ N(0,
    initializer_range), bias 0; ``nn.Embedding`` weight ~ N(0, initializer_range), its ``padding_idx`` row 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def _cu_seqlens(mask: Tensor) -> Tensor:
    """(B, S) bool -> int32 (B + 1,) cumulative counts of the True entries per row."""
    return F.pad(torch.cumsum(mask.sum(dim=-1, dtype=torch.int32), dim=0, dtype=torch.int32), (1, 0))


class BertEncoder(nn.Module):
    """The stack of :func:`create_block` layers (``layers``)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.use_flash_attn = getattr(config, "use_flash_attn", False)
        self.layers = nn.ModuleList(
            [create_block(config, layer_idx=i) for i in range(config.num_hidden_layers)]
        )

    def _run(self, layers: Any, hidden_states: Tensor, mixer_kwargs: dict[str, Any] | None) -> Tensor:
        for layer in layers:
            hidden_states = layer(hidden_states, mixer_kwargs=mixer_kwargs)
        return hidden_states

    def forward(
        self, hidden_states: Tensor, key_padding_mask: Tensor | None = None, subset_mask: Tensor | None = None
    ) -> Tensor:
        """
        Arguments:
            hidden_states: (B, S, hidden).
            key_padding_mask: (B, S) bool, True = token. With ``use_flash_attn`` the tokens are unpadded and run
                through the varlen kernels; otherwise it masks the keys.
            subset_mask: (B, S) bool: only these tokens' outputs are wanted. On the unpadded path the last layer
                (cross-attention, built with ``last_layer_subset``) computes only them (its queries), attending
                over every token; a self-attention last layer computes every token, the subset is then picked.
        Return:
            (B, S, hidden) (padded rows zero on the unpadded path), or with ``subset_mask`` (n, hidden): the
            subset's rows in row-major order (tokens outside ``key_padding_mask`` left out on the unpadded
            path).
        """
        if key_padding_mask is None or not self.use_flash_attn:
            kwargs = None if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
            hidden_states = self._run(self.layers, hidden_states, kwargs)
            return hidden_states if subset_mask is None else hidden_states[subset_mask]
        batch, seqlen = hidden_states.shape[:2]
        hidden_states, indices, cu_seqlens, max_seqlen, _ = unpad_input(hidden_states, key_padding_mask)
        varlen = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        if subset_mask is None:
            hidden_states = self._run(self.layers, hidden_states, varlen)
            return pad_input(hidden_states, indices, batch, seqlen)
        # positions of the subset among the unpadded tokens
        subset_idx = torch.nonzero(subset_mask[key_padding_mask], as_tuple=False).flatten()
        if not getattr(self.layers[-1].mixer, "cross_attn", False):  # built without last_layer_subset
            hidden_states = self._run(self.layers, hidden_states, varlen)
            return index_first_axis(hidden_states, subset_idx)
        hidden_states = self._run(self.layers[:-1], hidden_states, varlen)
        queries, hidden_states = index_first_axis_residual(hidden_states, subset_idx)
        last_kwargs = {
            "x_kv": hidden_states,
            "cu_seqlens": _cu_seqlens(subset_mask & key_padding_mask),
            "max_seqlen": max_seqlen,  # an upper bound of the query lengths is enough
            "cu_seqlens_k": cu_seqlens,
            "max_seqlen_k": max_seqlen,
        }
        return self.layers[-1](queries, mixer_kwargs=last_kwargs)


class BertPooler(nn.Module):
    """``tanh(dense(first token))``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = _linear_cls(config)(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: Tensor, pool: bool = True) -> Tensor:
        """hidden_states: (B, S, hidden) -> (B, hidden) from the first tokens; with ``pool=False`` the rows
        given, (n, hidden) -> (n, hidden)."""
        first_token = hidden_states[:, 0] if pool else hidden_states
        return self.activation(self.dense(first_token))


class BertPredictionHeadTransform(nn.Module):
    """``layer_norm(gelu(dense(x)))`` (GeLU as ``hidden_act``; the norm through :func:`layer_norm_fn` with
    ``fused_dropout_add_ln``)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.fused_dropout_add_ln = getattr(config, "fused_dropout_add_ln", False)
        self.dense = _linear_cls(config)(config.hidden_size, config.hidden_size)
        self.transform_act_fn = nn.GELU(approximate=_gelu_approximate(config))
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(..., hidden) -> (..., hidden)."""
        hidden_states = self.transform_act_fn(self.dense(hidden_states))
        if not self.fused_dropout_add_ln:
            return self.layer_norm(hidden_states)
        norm = self.layer_norm
        return layer_norm_fn(hidden_states, norm.weight, norm.bias, eps=norm.eps)


class BertLMPredictionHead(nn.Module):
    """``decoder(transform(x))``: the masked-LM logits; ``decoder`` (hidden -> vocab_size, with bias) is tied to
    the word embeddings by :class:`BertForPreTraining`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = _linear_cls(config)(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(..., hidden) -> (..., vocab_size)."""
        return self.decoder(self.transform(hidden_states))


class BertPreTrainingHeads(nn.Module):
    """The masked-LM head ``predictions`` and the next-sentence classifier ``seq_relationship``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output: Tensor, pooled_output: Tensor) -> tuple[Tensor, Tensor]:
        """``(predictions(sequence_output) (..., vocab_size), seq_relationship(pooled_output) (B, 2))``."""
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class BertPreTrainedModel(nn.Module):
    """Base class of the BERT models: keeps the ``transformers.BertConfig`` as ``self.config`` and loads
    pretrained weights (:meth:`from_pretrained`)."""

    def __init__(self, config: Any, *inputs: Any, **kwargs: Any) -> None:
        """config: a ``transformers.BertConfig`` (``ValueError`` otherwise; ``ImportError`` without
        transformers). ``inputs`` / ``kwargs`` are ignored."""
        super().__init__()
        transformers = _import_optional("transformers", f"{type(self).__name__} (a transformers.BertConfig)")
        if not isinstance(config, transformers.BertConfig):
            name = type(self).__name__
            raise ValueError(
                f"Parameter config in `{name}(config)` should be an instance of class `BertConfig`, got "
                f"{type(config).__name__}. To create a model from a pretrained checkpoint use "
                f"`model = {name}.from_pretrained(PRETRAINED_MODEL_NAME, config)`"
            )
        self.config = config

    @classmethod
    def from_pretrained(
        cls, model_name: str | os.PathLike[str], config: Any, *inputs: Any, **kwargs: Any
    ) -> Any:
        """Build ``cls(config, *inputs, **kwargs)`` and load a Hugging Face BERT checkpoint into it
        (:func:`flash_attn.utils.pretrained.state_dict_from_pretrained`, converted by :func:`remap_state_dict`,
        its ``bert.`` prefix matched to the model), with ``strict=False`` as flash-attn (the result is logged).
        """
        model = cls(config, *inputs, **kwargs)
        state_dict = remap_state_dict(state_dict_from_pretrained(model_name), config)
        load_return = model.load_state_dict(_match_prefix(state_dict, model), strict=False)
        logger.info(load_return)
        return model


def _match_prefix(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` with the ``bert.`` prefix added (a ``BertForPreTraining`` loading a bare ``BertModel``
    checkpoint) or stripped, the heads dropped (a ``BertModel`` loading a ``BertForPreTraining`` checkpoint)."""
    model_prefixed = any(k.startswith("bert.") for k in model.state_dict())
    dict_prefixed = any(k.startswith(("bert.", "cls.")) for k in state_dict)
    if model_prefixed and not dict_prefixed:
        return {f"bert.{k}": v for k, v in state_dict.items()}
    if dict_prefixed and not model_prefixed:
        return {k.removeprefix("bert."): v for k, v in state_dict.items() if k.startswith("bert.")}
    return state_dict


def _as_bool(mask: Tensor | None) -> Tensor | None:
    return mask if mask is None or mask.dtype == torch.bool else mask.bool()


class BertModel(BertPreTrainedModel):
    """The BERT body: embeddings -> ``emb_ln`` -> ``emb_drop`` -> :class:`BertEncoder` -> :class:`BertPooler`
    (see the module docstring for the unpadded path and ``masked_tokens_mask``)."""

    def __init__(self, config: Any, add_pooling_layer: bool = True) -> None:
        """
        Arguments:
            config: a ``transformers.BertConfig`` (flash-attn's attributes, see the module docstring);
                ``hidden_act`` one of gelu, gelu_new, gelu_fast, gelu_pytorch_tanh. With
                ``pad_vocab_size_multiple`` > 1, ``config.vocab_size`` is rounded up in place (as in flash-attn).
            add_pooling_layer: build ``pooler`` (else ``pooler_output`` is None).
        """
        super().__init__(config)
        self.pad_vocab_size_multiple = getattr(config, "pad_vocab_size_multiple", 1)
        if config.vocab_size % self.pad_vocab_size_multiple != 0:
            if getattr(config, "orig_vocab_size", None) is None:
                config.orig_vocab_size = config.vocab_size
            config.vocab_size += (
                self.pad_vocab_size_multiple - config.vocab_size % self.pad_vocab_size_multiple
            )
        self.fused_dropout_add_ln = getattr(config, "fused_dropout_add_ln", False)
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act {config.hidden_act!r} is not supported; expected one of {_ACTIVATIONS}"
            )
        self.embeddings = BertEmbeddings(
            config.hidden_size,
            config.vocab_size,
            config.max_position_embeddings,
            config.type_vocab_size,
            padding_idx=config.pad_token_id,
        )
        self.emb_drop = nn.Dropout(config.hidden_dropout_prob)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(partial(_init_weights, initializer_range=config.initializer_range))

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        masked_tokens_mask: Tensor | None = None,
    ) -> Any:
        """
        Arguments:
            input_ids: (B, S) token ids; position_ids / token_type_ids: (B, S) or (S,) (defaults ``0 .. S - 1``
                / zeros).
            attention_mask: (B, S) bool (or 0 / 1), True = token, False = padding.
            masked_tokens_mask: (B, S) bool: only these tokens' outputs are wanted (computed in the last layer
                with the first token, which the pooler needs; see :meth:`BertEncoder.forward`).
        Return:
            ``BaseModelOutputWithPoolingAndCrossAttentions``: ``last_hidden_state`` (B, S, hidden), or
            (n_masked, hidden) with ``masked_tokens_mask``; ``pooler_output`` (B, hidden) or None.
        """
        attention_mask, masked_tokens_mask = _as_bool(attention_mask), _as_bool(masked_tokens_mask)
        hidden_states = self.embeddings(input_ids, position_ids=position_ids, token_type_ids=token_type_ids)
        if self.fused_dropout_add_ln:  # BERT normalizes the embeddings before the dropout
            ln = self.emb_ln
            hidden_states = layer_norm_fn(hidden_states, ln.weight, ln.bias, eps=ln.eps)
        else:
            hidden_states = self.emb_ln(hidden_states)
        hidden_states = self.emb_drop(hidden_states)

        subset_mask: Tensor | None = None
        first_token: Tensor | None = None
        if masked_tokens_mask is not None:
            first_token = torch.zeros_like(masked_tokens_mask)
            first_token[:, 0] = True
            subset_mask = masked_tokens_mask | first_token
        sequence_output = self.encoder(
            hidden_states, key_padding_mask=attention_mask, subset_mask=subset_mask
        )

        if masked_tokens_mask is None:
            pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        else:
            assert subset_mask is not None and first_token is not None
            # the encoder's rows are the subset's tokens (among the attended ones when there is a mask)
            kept = subset_mask if attention_mask is None else attention_mask
            in_subset = subset_mask[kept]
            pool_input = sequence_output[first_token[kept][in_subset]]
            sequence_output = sequence_output[masked_tokens_mask[kept][in_subset]]
            pooled_output = self.pooler(pool_input, pool=False) if self.pooler is not None else None
        output_cls = __getattr__("BaseModelOutputWithPoolingAndCrossAttentions")
        return output_cls(last_hidden_state=sequence_output, pooler_output=pooled_output)


class BertForPreTraining(BertPreTrainedModel):
    """:class:`BertModel` (``bert``) + :class:`BertPreTrainingHeads` (``cls``), the decoder weight tied to the
    word embeddings; masked-LM (``mlm_loss``, ignore_index 0) and next-sentence (``nsp_loss``, ignore_index -1)
    losses, ``torch.nn.CrossEntropyLoss`` or, with ``use_xentropy``, flash-attn's Triton one."""

    def __init__(self, config: Any) -> None:
        """config: a ``transformers.BertConfig``; besides :class:`BertModel`'s attributes it reads
        ``dense_seq_output``, ``last_layer_subset`` (needs ``dense_seq_output``) and ``use_xentropy``."""
        super().__init__(config)
        self.dense_seq_output = getattr(config, "dense_seq_output", False)
        self.last_layer_subset = getattr(config, "last_layer_subset", False)
        if self.last_layer_subset and not self.dense_seq_output:
            raise ValueError("last_layer_subset requires dense_seq_output")
        use_xentropy = getattr(config, "use_xentropy", False)
        loss_cls: Callable[..., nn.Module] = (
            partial(CrossEntropyLoss, inplace_backward=True) if use_xentropy else nn.CrossEntropyLoss
        )
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.mlm_loss = loss_cls(ignore_index=0)
        self.nsp_loss = loss_cls(ignore_index=-1)
        self.apply(partial(_init_weights, initializer_range=config.initializer_range))
        self.tie_weights()

    def tie_weights(self) -> None:
        """``cls.predictions.decoder.weight`` is the word embeddings' weight."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        next_sentence_label: Tensor | None = None,
    ) -> Any:
        """
        Arguments:
            input_ids, position_ids, token_type_ids, attention_mask: as in :meth:`BertModel.forward`.
            labels: (B, S) masked-LM targets, 0 for the tokens not predicted (padding included).
            next_sentence_label: (B,) 0 / 1 (-1 ignored).
        Return:
            ``BertForPreTrainingOutput``: ``loss`` (float32 masked-LM + next-sentence loss, when both labels are
            given, else None), ``prediction_logits`` (B, S, vocab_size), or (n_masked, vocab_size) with
            ``dense_seq_output`` and ``labels`` (the tokens with ``labels > 0``, row-major),
            ``seq_relationship_logits`` (B, 2).
        """
        masked_tokens_mask = labels > 0 if (self.last_layer_subset and labels is not None) else None
        outputs = self.bert(
            input_ids,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            attention_mask=_as_bool(attention_mask),
            masked_tokens_mask=masked_tokens_mask,
        )
        sequence_output, pooled_output = outputs.last_hidden_state, outputs.pooler_output
        dense = self.dense_seq_output and labels is not None
        masked_token_idx: Tensor | None = None
        if dense:
            assert labels is not None
            masked_token_idx = torch.nonzero(labels.flatten() > 0, as_tuple=False).flatten()
            if not self.last_layer_subset:
                sequence_output = index_first_axis(sequence_output.flatten(0, 1), masked_token_idx)
        prediction_scores, seq_relationship_score = self.cls(sequence_output, pooled_output)

        total_loss: Tensor | None = None
        if labels is not None and next_sentence_label is not None:
            if masked_token_idx is not None:  # the scores are already the masked tokens' rows
                masked_lm_loss = self.mlm_loss(prediction_scores, labels.flatten()[masked_token_idx])
            else:
                masked_lm_loss = self.mlm_loss(prediction_scores.flatten(0, -2), labels.flatten())
            next_sentence_loss = self.nsp_loss(
                seq_relationship_score.reshape(-1, 2), next_sentence_label.flatten()
            )
            total_loss = masked_lm_loss.float() + next_sentence_loss.float()
        output_cls = __getattr__("BertForPreTrainingOutput")
        return output_cls(
            loss=total_loss,
            prediction_logits=prediction_scores,
            seq_relationship_logits=seq_relationship_score,
        )
