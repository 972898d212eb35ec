"""``flash_attn.models.gpt``: flash-attn 2.8.x's GPT model family.

* :class:`GPTModel`: embeddings (:class:`flash_attn.modules.embedding.GPT2Embeddings`), a stack of
  :class:`flash_attn.modules.block.Block` / :class:`~flash_attn.modules.block.ParallelBlock` built by
  :func:`create_block` (:func:`create_mixer_cls`: :class:`flash_attn.modules.mha.MHA`; :func:`create_mlp_cls`:
  :class:`~flash_attn.modules.mlp.Mlp` / :class:`~flash_attn.modules.mlp.GatedMlp`, or with ``fused_mlp``
  :class:`flash_attn.ops.fused_dense.FusedMLP`, or with ``fused_dense_sqrelu_dense``
  :class:`flash_attn.ops.triton.mlp.FusedDenseSqreluDense`) and the final norm;
* :class:`GPTLMHeadModel`: ``GPTModel`` + language-model head, returning ``CausalLMOutput(logits=...)``, with
  ``generate`` (:class:`flash_attn.utils.generation.GenerationMixin`, KV cache through ``inference_params``);
* :class:`GPTPreTrainedModel`: the base class (config check, ``from_pretrained``); :func:`_init_weights`, the
  GPT-2 initialization;
* :func:`remap_state_dict_hf_gpt2`: Hugging Face GPT-2 weights -> this model's names;
  :func:`shard_state_dict_tp` / :func:`combine_state_dicts_tp`: a state dict -> tensor-parallel shards and back.

Tensor parallelism, as in flash-attn: built with a ``torch.distributed`` ``process_group``, every rank holds its
shard of the model (the layout of :func:`shard_state_dict_tp`): ``ParallelGPT2Embeddings``, ``ParallelMHA``,
``ParallelMLP`` / ``ParallelGatedMlp`` / ``ParallelFusedMLP`` and a ``ColumnParallelLinear`` head over the
vocabulary; the norms are replicated (tagged ``_shared_params``, broadcast from the first rank by
``tie_weights``). ``config.sequence_parallel`` (default True) splits the flattened (batch * seqlen) rows over
the ranks between the parallel layers (the norms' gradients are then partial sums: call
:func:`flash_attn.utils.distributed.allreduce_sequence_parallel_grad` after the backward). The logits are this
rank's vocabulary shard (for a vocabulary-parallel loss such as
``flash_attn.losses.cross_entropy.CrossEntropyLoss(process_group=...)``), all-gathered to the full vocabulary
during generation (``sequence_parallel=False``). ``from_pretrained(..., process_group=, world_size=, rank=)``
loads this rank's shard of a checkpoint. The communication runs through :mod:`flash_attn.ops.fused_dense`
(plain PyTorch + ``torch.distributed``, any device and backend).

The models are configured by a ``transformers.GPT2Config``; flash-attn's extra attributes are read with
``getattr`` and flash-attn's defaults (``use_flash_attn``, ``fused_dropout_add_ln``, ``residual_in_fp32``,
``prenorm``, ``parallel_block``, ``rms_norm``, ``rotary_emb_fraction`` / ``_base`` / ``_scale_base`` /
``_interleaved``, ``n_head_kv``, ``qkv_proj_bias``, ``out_proj_bias``, ``mlp_fc1_bias``, ``mlp_fc2_bias``,
``fused_mlp`` / ``mlp_checkpoint_lvl``, ``sequence_parallel``, ``tie_word_embeddings``,
``pad_vocab_size_multiple``, ``window_size``, ``use_alibi``, the ``mup_*`` scales, ...).
Parameter names, signatures, defaults and forward semantics are flash-attn's, so state dicts load either way.
HF transformers is imported only where a ``GPT2Config`` is checked (:class:`GPTPreTrainedModel`) or a
checkpoint is read, so the conversions work without it.

``from_pretrained`` converts GPT-2 and Llama checkpoints here and those of OPT, GPT-J, GPT-NeoX, Falcon and
BigCode (by flash-attn's model-name prefixes) with the remaps of their modules in :mod:`flash_attn.models`.
``fused_bias_fc=True`` is accepted and builds ``nn.Linear`` projections (see :mod:`flash_attn.modules.mha`).

Differences from flash-attn 2.8.3, all supersets:

* invalid configurations raise ``ValueError`` instead of failing an ``assert``;
* :func:`remap_state_dict_hf_gpt2` also takes ``GPT2LMHeadModel.state_dict()`` (``transformer.`` prefix and
  ``lm_head.weight``) and drops the ``attn.masked_bias`` buffers of old checkpoints;
* ``from_pretrained`` recognizes a name it does not know (a local directory, ``openai-community/gpt2``) by the
  checkpoint's keys (GPT-2, Hugging Face Llama, or already this model's names);
* :func:`combine_state_dicts_tp` reassembles a gated MLP's ``fc1.bias`` in the gated layout (flash-attn
  concatenates the shards plainly, which interleaves value and gate halves); a ``n_head_kv`` of None means
  ``n_head`` in both functions; both split / join ``lm_head.bias`` by vocabulary rows (flash-attn keeps it whole,
  which does not load into its parallel head);
* :meth:`GPTLMHeadModel.load_state_dict` converts the old norm layout on a copy (the caller's dict is kept);
* the fused final norm applies an RMSNorm's ``zero_centered_weight``, as the blocks do;
* tensor parallelism does not require ``fused_bias_fc=True`` (a flag without effect here);
* tensor parallelism with ``norm_head`` all-reduces the hidden states' gradient without ``sequence_parallel``
  too (flash-attn's plain ``F.linear`` there leaves out the other ranks' vocabulary shards);
* with a process group, ``word_embed_proj_dim`` raises ``ValueError`` (flash-attn's parallel embeddings drop
  it, leaving a head of the wrong width), as do ``inference_params`` / ``num_last_tokens`` with
  ``sequence_parallel`` (before the layers run; flash-attn asserts after them, or slices the flattened rows),
  and ``from_pretrained`` with a process group that is not of ``world_size`` ranks with this process as
  ``rank`` (flash-attn fails in ``load_state_dict`` or loads another rank's shard).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flash_attn.models._gpt_parallel import (
    TANH_GELUS,
    _checkpoint_lvl,
    build_embeddings,
    build_lm_head,
    check_pretrained_group,
    fused_mlp_cls,
    gather_vocab_logits,
    lm_head_logits,
    mark_shared_params,
    parallel_kwargs,
)
from flash_attn.models._gpt_state_dict import (
    _GATED,
    _convert_ln_0_layout,
    _padded_vocab_size,
    combine_state_dicts_tp,
    remap_state_dict_hf_gpt2,
    remap_state_dict_megatron,
    shard_state_dict_tp,
)
from flash_attn.models.llama import remap_state_dict_hf_llama
from flash_attn.modules.block import Block, ParallelBlock
from flash_attn.modules.mha import MHA, ParallelMHA
from flash_attn.modules.mlp import GatedMlp, Mlp, ParallelGatedMlp, ParallelMLP
from flash_attn.ops.activations import sqrelu_fwd
from flash_attn.ops.triton.layer_norm import RMSNorm, layer_norm_fn
from flash_attn.ops.triton.mlp import FusedDenseSqreluDense
from flash_attn.utils.distributed import sync_shared_params
from flash_attn.utils.generation import GenerationMixin
from flash_attn.utils.pretrained import _import_optional, state_dict_from_pretrained

__all__ = [
    "CausalLMOutput",
    "GPTLMHeadModel",
    "GPTModel",
    "GPTPreTrainedModel",
    "combine_state_dicts_tp",
    "create_block",
    "create_mixer_cls",
    "create_mlp_cls",
    "remap_state_dict_hf_gpt2",
    "remap_state_dict_megatron",
    "shard_state_dict_tp",
]

logger = logging.getLogger(__name__)

#: ``config.activation_function`` values the models accept
_ACTIVATIONS = ("gelu", *TANH_GELUS, "relu", "sqrelu", *_GATED)


class CausalLMOutput(NamedTuple):
    """What :meth:`GPTLMHeadModel.forward` returns (flash-attn's ``namedtuple("CausalLMOutput", ["logits"])``)."""

    logits: Tensor


def _check_activation(config: Any) -> None:
    if config.activation_function not in _ACTIVATIONS:
        raise ValueError(
            f"activation_function {config.activation_function!r} is not supported; expected one of {_ACTIVATIONS}"
        )


def create_mixer_cls(
    config: Any,
    layer_idx: int | None = None,
    process_group: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Callable[..., nn.Module]:
    """The attention constructor of one layer, called with the model width: ``partial(MHA, ...)`` (causal) or,
    with a ``process_group``, ``partial(ParallelMHA, ...)`` (this rank's heads; ``sequence_parallel`` from
    ``config.sequence_parallel``, default True).

    Reads ``head_dim`` (default ``hidden_size // num_attention_heads``; sets the softmax scale and the rotary
    dimension), ``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx`` (divides the scale by
    ``layer_idx + 1``), ``mup_scale_qk_dot_by_d`` / ``mup_attn_multiplier``, ``attn_pdrop``, ``n_head_kv``,
    ``qkv_proj_bias`` / ``out_proj_bias``, ``attn_dwconv`` (not with a process group: ``ValueError``),
    ``rotary_emb_fraction`` (of the head dim) / ``_base`` / ``_scale_base`` / ``_interleaved``, ``use_alibi``,
    ``window_size``, ``use_flash_attn``, ``fused_bias_fc`` (no effect).
    """
    factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    if config.scale_attn_weights:
        power = 1.0 if getattr(config, "mup_scale_qk_dot_by_d", False) else 0.5
        softmax_scale = head_dim ** (-power)
    else:
        softmax_scale = 1.0
    softmax_scale *= getattr(config, "mup_attn_multiplier", 1.0)
    if config.scale_attn_by_inverse_layer_idx:
        if layer_idx is None:
            raise ValueError("scale_attn_by_inverse_layer_idx needs layer_idx")
        softmax_scale /= float(layer_idx + 1)
    dwconv = getattr(config, "attn_dwconv", False)
    if process_group is None:
        mha_cls: Callable[..., nn.Module] = MHA
        extra: dict[str, Any] = {"fused_bias_fc": getattr(config, "fused_bias_fc", False), "dwconv": dwconv}
    else:
        if dwconv:
            raise ValueError(
                "attn_dwconv: the tensor-parallel attention (ParallelMHA) does not support dwconv"
            )
        mha_cls, extra = ParallelMHA, parallel_kwargs(config, process_group)
    return partial(
        mha_cls,
        num_heads=config.num_attention_heads,
        num_heads_kv=getattr(config, "n_head_kv", None),
        qkv_proj_bias=getattr(config, "qkv_proj_bias", True),
        out_proj_bias=getattr(config, "out_proj_bias", True),
        dropout=config.attn_pdrop,
        softmax_scale=softmax_scale,
        causal=True,
        layer_idx=layer_idx,
        rotary_emb_dim=int(getattr(config, "rotary_emb_fraction", 0.0) * head_dim),
        rotary_emb_base=getattr(config, "rotary_emb_base", 10000.0),
        rotary_emb_scale_base=getattr(config, "rotary_emb_scale_base", None),
        rotary_emb_interleaved=getattr(config, "rotary_emb_interleaved", False),
        use_alibi=getattr(config, "use_alibi", False),
        window_size=getattr(config, "window_size", (-1, -1)),
        use_flash_attn=getattr(config, "use_flash_attn", False),
        **extra,
        **factory_kwargs,
    )


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    """The element-wise function of a non-gated ``activation_function``."""
    if name == "relu":
        return partial(F.relu, inplace=True)
    if name == "sqrelu":
        return sqrelu_fwd
    return partial(F.gelu, approximate="tanh" if name in TANH_GELUS else "none")


#: gated activation_function -> the function GatedMlp applies to the gate
_GATE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "glu": F.sigmoid,
    "swiglu": F.silu,
    "geglu": F.gelu,
}


def _fused_dense_sqrelu_dense_cls(
    config: Any, layer_idx: int | None, process_group: Any, factory_kwargs: dict[str, Any]
) -> Callable[..., nn.Module]:
    """``fused_dense_sqrelu_dense=True``: flash-attn's configuration checks (``ValueError``), then
    ``partial(FusedDenseSqreluDense, hidden_features=n_inner, checkpoint_lvl=...)``."""
    if config.activation_function != "sqrelu":
        raise ValueError(
            "fused_dense_sqrelu_dense only supports approximate activation_function sqrelu, got "
            f"{config.activation_function!r}"
        )
    if getattr(config, "fused_mlp", False):
        raise ValueError("fused_mlp and fused_dense_sqrelu_dense cannot both be set")
    if process_group is not None:
        raise ValueError("Tensor Parallel is not implemented for FusedDenseSqreluDense")
    return partial(
        FusedDenseSqreluDense,
        hidden_features=config.n_inner,
        checkpoint_lvl=_checkpoint_lvl(config, layer_idx),
        **factory_kwargs,
    )


def create_mlp_cls(
    config: Any,
    layer_idx: int | None = None,
    process_group: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Callable[..., nn.Module]:
    """The MLP constructor of one layer, called with the model width: ``partial(GatedMlp, ...)`` for
    ``activation_function`` ``glu`` / ``swiglu`` / ``geglu`` (gate activation sigmoid / SiLU / GeLU,
    ``mlp_multiple_of`` default 128), else ``partial(Mlp, ...)`` (``relu``, ``sqrelu``, exact ``gelu`` or the
    tanh GeLUs); hidden width ``n_inner``, biases ``mlp_fc1_bias`` / ``mlp_fc2_bias``. With a
    ``process_group``: ``ParallelGatedMlp`` / ``ParallelMLP`` (``sequence_parallel`` from the config, default
    True). ``fused_mlp=True``: ``FusedMLP`` / ``ParallelFusedMLP`` of :mod:`flash_attn.ops.fused_dense` (tanh
    GeLUs, ``relu`` or ``sqrelu`` only; ``mlp_checkpoint_lvl``, an int or one per layer).
    ``fused_dense_sqrelu_dense=True``: ``partial(FusedDenseSqreluDense, ...)`` of
    :mod:`flash_attn.ops.triton.mlp` (``activation_function="sqrelu"`` only, no ``fused_mlp``, no process
    group; hidden width ``n_inner``, ``mlp_checkpoint_lvl``; both biases, whatever ``mlp_fc1_bias`` /
    ``mlp_fc2_bias`` say, as in flash-attn, so its state dicts load).
    """
    factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if getattr(config, "fused_dense_sqrelu_dense", False):
        return _fused_dense_sqrelu_dense_cls(config, layer_idx, process_group, factory_kwargs)
    if getattr(config, "fused_mlp", False):
        return fused_mlp_cls(config, layer_idx, process_group, factory_kwargs)
    _check_activation(config)
    kwargs: dict[str, Any] = {
        "hidden_features": config.n_inner,
        "bias1": getattr(config, "mlp_fc1_bias", True),
        "bias2": getattr(config, "mlp_fc2_bias", True),
        **parallel_kwargs(config, process_group),
        **factory_kwargs,
    }
    name = config.activation_function
    if name in _GATED:
        return partial(
            GatedMlp if process_group is None else ParallelGatedMlp,
            activation=_GATE_ACTIVATIONS[name],
            multiple_of=getattr(config, "mlp_multiple_of", 128),
            **kwargs,
        )
    return partial(Mlp if process_group is None else ParallelMLP, activation=_activation(name), **kwargs)


def create_block(
    config: Any,
    layer_idx: int | None = None,
    process_group: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Block | ParallelBlock:
    """One Transformer layer: :class:`Block` (``parallel_block=False``, pre- or post-norm with ``prenorm``) or
    :class:`ParallelBlock` (``parallel_block=True``, ``parallel_block_tied_norm``), with the mixer of
    :func:`create_mixer_cls`, the MLP of :func:`create_mlp_cls`, ``nn.LayerNorm`` or ``RMSNorm``
    (``rms_norm``) of eps ``layer_norm_epsilon``, dropouts ``embd_pdrop`` (before the first layer's mixer) /
    ``resid_pdrop``, ``fused_dropout_add_ln`` and ``residual_in_fp32``. ``block.layer_idx`` is set. With a
    ``process_group`` the norms' parameters are tagged ``_shared_params`` and, with ``config.sequence_parallel``
    (default True), ``_sequence_parallel`` (see :mod:`flash_attn.utils.distributed`).
    """
    factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    mixer_cls = create_mixer_cls(config, layer_idx, process_group=process_group, **factory_kwargs)
    mlp_cls = create_mlp_cls(config, layer_idx, process_group=process_group, **factory_kwargs)
    norm_cls = partial(
        RMSNorm if getattr(config, "rms_norm", False) else nn.LayerNorm,
        eps=config.layer_norm_epsilon,
        **factory_kwargs,
    )
    # the block's first dropout acts on the previous layer's output: for the first layer, the embeddings
    resid_dropout1 = config.embd_pdrop if layer_idx == 0 else config.resid_pdrop
    common: dict[str, Any] = {
        "norm_cls": norm_cls,
        "resid_dropout1": resid_dropout1,
        "resid_dropout2": config.resid_pdrop,
        "fused_dropout_add_ln": getattr(config, "fused_dropout_add_ln", False),
        "residual_in_fp32": getattr(config, "residual_in_fp32", False),
        "sequence_parallel": getattr(config, "sequence_parallel", True) and process_group is not None,
        "mark_shared_params": process_group is not None,
    }
    prenorm = getattr(config, "prenorm", True)
    block: Block | ParallelBlock
    if getattr(config, "parallel_block", False):
        if not prenorm:
            raise ValueError("parallel_block=True needs prenorm=True")
        block = ParallelBlock(
            config.hidden_size,
            mixer_cls,
            mlp_cls,
            tied_norm=getattr(config, "parallel_block_tied_norm", False),
            **common,
        )
    else:
        block = Block(config.hidden_size, mixer_cls, mlp_cls, prenorm=prenorm, **common)
    block.layer_idx = layer_idx  # type: ignore[assignment]
    return block


class GPTPreTrainedModel(nn.Module):
    """Base class of the GPT models: keeps the ``transformers.GPT2Config`` as ``self.config`` and loads
    pretrained weights (:meth:`from_pretrained`)."""

    def __init__(self, config: Any, *inputs: Any, **kwargs: Any) -> None:
        """config: a ``transformers.GPT2Config`` (``ValueError`` otherwise; ``ImportError`` without
        transformers). ``inputs`` / ``kwargs`` are ignored."""
        super().__init__()
        transformers = _import_optional("transformers", f"{type(self).__name__} (a transformers.GPT2Config)")
        if not isinstance(config, transformers.GPT2Config):
            name = type(self).__name__
            raise ValueError(
                f"Parameter config in `{name}(config)` should be an instance of class `GPT2Config`, got "
                f"{type(config).__name__}. To create a model from a pretrained checkpoint use "
                f"`model = {name}.from_pretrained(PRETRAINED_MODEL_NAME, config)`"
            )
        self.config = config

    @classmethod
    def from_pretrained(
        cls,
        model_name: str | os.PathLike[str],
        config: Any,
        *args: Any,
        strict: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        world_size: int = 1,
        rank: int = 0,
        **kwargs: Any,
    ) -> Any:
        """Build ``cls(config, *args, device=device, dtype=dtype, **kwargs)`` and load a Hugging Face checkpoint
        into it (:func:`flash_attn.utils.pretrained.state_dict_from_pretrained`, read on the CPU).

        The checkpoint's names are converted by the model name's prefix as in flash-attn: ``gpt2*``
        (:func:`remap_state_dict_hf_gpt2`), ``meta-llama/Llama-*``
        (:func:`flash_attn.models.llama.remap_state_dict_hf_llama`); other names (a local directory, another
        Hub id) by the checkpoint's keys. ``strict`` is ``load_state_dict``'s.

        Tensor parallelism: pass ``process_group=`` (forwarded to the model) and this process's ``world_size``
        / ``rank`` in it; the converted checkpoint is cut to this rank's shard by :func:`shard_state_dict_tp`
        when ``world_size > 1``. A model whose process group is not of ``world_size`` ranks with this process as
        rank ``rank`` (or none with ``world_size > 1``) raises ``ValueError`` before the checkpoint is read.
        """
        name = os.fspath(model_name)
        model = cls(config, *args, device=device, dtype=dtype, **kwargs)
        check_pretrained_group(model, world_size, rank)
        state_dict = state_dict_from_pretrained(name, device="cpu", dtype=dtype)
        state_dict = _remap_pretrained(name, state_dict, config)
        if world_size > 1:
            state_dict = shard_state_dict_tp(state_dict, config, world_size, rank)
        load_return = model.load_state_dict(state_dict, strict=strict)
        logger.info(load_return)
        return model


#: flash-attn's model-name prefixes whose converters (flash_attn.models.<module>) are not provided here
#: flash-attn's model-name prefixes of the families whose checkpoints ``from_pretrained`` converts with
#: ``flash_attn.models.<module>.remap_state_dict_hf_<module>``
_FAMILY_PREFIXES = {
    "opt": ("facebook/opt",),
    "gptj": ("EleutherAI/gpt-j-", "togethercomputer/GPT-JT-"),
    "gpt_neox": ("EleutherAI/gpt-neox-", "EleutherAI/pythia-", "togethercomputer/RedPajama-INCITE-"),
    "falcon": ("tiiuae/falcon-",),
    "bigcode": ("bigcode/", "WizardLM/"),
}


def _remap_pretrained(model_name: str, state_dict: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    """A checkpoint's state dict in this model's names, by the model name (flash-attn's prefixes) or else by
    its keys."""
    if model_name.startswith("gpt2"):
        return remap_state_dict_hf_gpt2(state_dict, config)
    if model_name.startswith("meta-llama/Llama-"):
        return remap_state_dict_hf_llama(state_dict, config)
    for module, prefixes in _FAMILY_PREFIXES.items():
        if model_name.startswith(prefixes):
            family = importlib.import_module(f"flash_attn.models.{module}")
            return getattr(family, f"remap_state_dict_hf_{module}")(state_dict, config)
    if "wte.weight" in state_dict or "transformer.wte.weight" in state_dict:
        return remap_state_dict_hf_gpt2(state_dict, config)
    if "model.embed_tokens.weight" in state_dict:
        return remap_state_dict_hf_llama(state_dict, config)
    if "transformer.embeddings.word_embeddings.weight" in state_dict:
        return state_dict
    raise NotImplementedError(f"Model {model_name} not supported")


def _init_weights(
    module: nn.Module,
    n_layer: int,
    initializer_range: float = 0.02,
    mup_width_scale: float = 1.0,
    rescale_prenorm_residual: bool = True,
) -> None:
    """GPT-2's initialization of one module (applied with ``model.apply``).

    ``nn.Linear``: weight ~ N(0, initializer_range * sqrt(mup_width_scale)), bias 0, and the weight's
    ``_optim`` dict gets ``lr_multiplier = mup_width_scale``; ``nn.Embedding``: weight ~ N(0,
    initializer_range). With ``rescale_prenorm_residual``, a module's own ``out_proj.weight`` / ``fc2.weight``
    (the projections back into the residual stream) are redrawn with the std divided by ``sqrt(2 * n_layer)``.
    """
    scale = math.sqrt(mup_width_scale)
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=initializer_range * scale)
        optim_cfg = getattr(module.weight, "_optim", {})
        optim_cfg.update({"lr_multiplier": mup_width_scale})
        module.weight._optim = optim_cfg  # type: ignore[attr-defined]
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.normal_(p, mean=0.0, std=initializer_range * scale / math.sqrt(2 * n_layer))


def _apply_init(model: nn.Module, config: Any) -> None:
    model.apply(
        partial(
            _init_weights,
            n_layer=config.num_hidden_layers,
            initializer_range=config.initializer_range,
            mup_width_scale=getattr(config, "mup_width_scale", 1.0),
        )
    )


class GPTModel(GPTPreTrainedModel):
    """The GPT body: ``input_ids`` (B, S) -> hidden states (B, S, hidden_size) after the last layer and, with
    ``prenorm`` (the default), the final dropout + residual add + norm ``ln_f``.

    The blocks run flash-attn's reordered layout: each one starts with the dropout + residual add + norm of
    the previous sub-layer's output (the first with ``embd_pdrop`` on the embeddings), so the model finishes
    with ``drop_f`` + add + ``ln_f``. ``rotary_emb_fraction > 0``: every layer shares layer 0's rotary module.

    Tensor parallelism (``process_group``): :class:`~flash_attn.modules.embedding.ParallelGPT2Embeddings`, the
    parallel blocks of :func:`create_block`, ``ln_f`` tagged as the blocks' norms. With
    ``config.sequence_parallel`` (default True) the embeddings' output is flattened to (B * S, hidden_size) and
    reduce-scattered: every rank runs the norms on its (B * S / world_size) rows, and the output is those
    rows; else every rank holds the full (B, S, hidden_size).
    """

    def __init__(
        self,
        config: Any,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            config: a ``transformers.GPT2Config`` (flash-attn's attributes, see the module docstring).
            process_group: the tensor-parallel group (a ``torch.distributed`` process group), or None.
            device, dtype: of the parameters.
        """
        super().__init__(config)
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.process_group = process_group
        self.sequence_parallel = getattr(config, "sequence_parallel", True)
        _check_activation(config)
        vocab_size = _padded_vocab_size(config.vocab_size, config)
        self.embeddings_multiplier = getattr(config, "mup_embeddings_multiplier", 1.0)
        self.residual_in_fp32 = getattr(config, "residual_in_fp32", False)
        self.prenorm = getattr(config, "prenorm", True)
        self.parallel_block = getattr(config, "parallel_block", False)
        self.embeddings = build_embeddings(config, vocab_size, process_group, factory_kwargs)
        blocks = [
            create_block(config, layer_idx=i, process_group=process_group, **factory_kwargs)
            for i in range(config.num_hidden_layers)
        ]
        if getattr(config, "rotary_emb_fraction", 0.0) > 0.0 and len(blocks) > 1:
            shared = getattr(blocks[0].mixer, "rotary_emb", None)
            if shared is not None:  # one cos / sin cache for the whole model
                for block in blocks[1:]:
                    block.mixer.rotary_emb = shared
        self.layers = nn.ModuleList(blocks)
        self.fused_dropout_add_ln = getattr(config, "fused_dropout_add_ln", False)
        if self.prenorm:
            self.drop_f = nn.Dropout(config.resid_pdrop)
            norm_cls = RMSNorm if getattr(config, "rms_norm", False) else nn.LayerNorm
            self.ln_f = norm_cls(config.hidden_size, eps=config.layer_norm_epsilon, **factory_kwargs)
            if process_group is not None:
                mark_shared_params(self.ln_f, self.sequence_parallel)
        _apply_init(self, config)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With a process group: broadcast the parameters tagged ``_shared_params`` (the norms) from the
        group's first rank (:func:`flash_attn.utils.distributed.sync_shared_params`)."""
        if self.process_group is not None:
            sync_shared_params(self, self.process_group)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> dict[int, Any]:
        """``{layer index: that layer's KV cache (batch_size, max_seqlen, 2, H_k, D)}``."""
        blocks: Any = self.layers
        return {
            i: block.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
            for i, block in enumerate(blocks)
        }

    def _final_norm(
        self, hidden_states: Tensor, hidden_states2: Tensor | None, residual: Tensor | None
    ) -> Tensor:
        """``ln_f(drop_f(hidden_states) [+ drop_f(hidden_states2)] + residual)``."""
        ln_f: Any = self.ln_f
        if self.fused_dropout_add_ln:
            return layer_norm_fn(
                hidden_states,
                ln_f.weight,
                ln_f.bias,
                residual=residual,
                x1=hidden_states2 if self.parallel_block else None,
                eps=ln_f.eps,
                dropout_p=self.drop_f.p if self.training else 0.0,
                prenorm=False,
                zero_centered_weight=bool(getattr(ln_f, "zero_centered_weight", False)),
                is_rms_norm=isinstance(ln_f, RMSNorm),
            )
        dropped = self.drop_f(hidden_states)
        if self.parallel_block and hidden_states2 is not None:
            dropped2 = self.drop_f(hidden_states2)
            summed = residual + dropped + dropped2 if residual is not None else dropped + dropped2
        else:
            summed = dropped + residual if residual is not None else dropped
        return ln_f(summed.to(dtype=ln_f.weight.dtype))

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None = None, inference_params: Any = None
    ) -> Tensor:
        """
        Arguments:
            input_ids: (B, S) int64 token ids.
            position_ids: (B, S) or (S,) positions of the learned position embeddings (default ``0 .. S - 1``);
                rotary positions come from ``inference_params`` instead.
            inference_params: generation state (:class:`flash_attn.utils.generation.InferenceParams`), passed to
                every attention layer.
        Return:
            (B, S, hidden_size); with a process group and ``sequence_parallel``, this rank's
            (B * S / world_size, hidden_size) rows of the flattened output.
        """
        # sequence parallelism splits the flattened (B * S) rows: only the attention needs the seqlen
        rows = self.process_group is not None and self.sequence_parallel
        embedding_kwargs: dict[str, Any] = {"combine_batch_seqlen_dim": True} if rows else {}
        hidden_states = self.embeddings(input_ids, position_ids=position_ids, **embedding_kwargs)
        if self.embeddings_multiplier != 1.0:
            hidden_states = hidden_states * self.embeddings_multiplier
        mixer_kwargs: dict[str, Any] = {"seqlen": input_ids.shape[1]} if rows else {}
        if inference_params is not None:
            mixer_kwargs["inference_params"] = inference_params
        hidden_states2: Tensor | None = None
        residual: Tensor | None = None
        for layer in self.layers:
            if not self.prenorm:
                hidden_states = layer(hidden_states, mixer_kwargs=mixer_kwargs)
            elif self.parallel_block:
                hidden_states, hidden_states2, residual = layer(
                    hidden_states, hidden_states2, residual, mixer_kwargs=mixer_kwargs
                )
            else:
                hidden_states, residual = layer(hidden_states, residual, mixer_kwargs=mixer_kwargs)
        if not self.prenorm:
            return hidden_states
        return self._final_norm(hidden_states, hidden_states2, residual)


class GPTLMHeadModel(GPTPreTrainedModel, GenerationMixin):
    """:class:`GPTModel` (``transformer``) + language-model head ``lm_head`` (tied to the word embeddings with
    ``tie_word_embeddings``, the default); ``generate`` from :class:`GenerationMixin`.

    With a ``process_group`` the head is a :class:`~flash_attn.ops.fused_dense.ColumnParallelLinear` over the
    vocabulary: the logits are this rank's vocabulary shard (vocab / world_size columns, rank order), of
    (B * S) rows with ``sequence_parallel`` (the head all-gathers the rows) or (B, S) without; with
    ``inference_params`` (generation, ``sequence_parallel=False`` needed) they are all-gathered to the full
    vocabulary on every rank.
    """

    def __init__(
        self,
        config: Any,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Arguments:
            config: a ``transformers.GPT2Config``; besides :class:`GPTModel`'s attributes it reads
                ``tie_word_embeddings`` (default True), ``lm_head_bias`` (False), ``word_embed_proj_dim``
                (``project_out`` back to that width before the head), ``norm_head`` (L2-normalized head rows),
                ``mup_width_scale`` / ``mup_output_multiplier`` (logit scale).
            process_group: the tensor-parallel group, or None (see the class docstring).
            device, dtype: of the parameters.
        """
        super().__init__(config)
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.process_group = process_group
        self.transformer = GPTModel(config, process_group=process_group, **factory_kwargs)
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
        vocab_size = _padded_vocab_size(config.vocab_size, config)
        word_embed_proj_dim = getattr(config, "word_embed_proj_dim", None)
        embed_dim = config.hidden_size if word_embed_proj_dim is None else word_embed_proj_dim
        self.project_out: nn.Linear | None = (
            None
            if word_embed_proj_dim is None
            else nn.Linear(config.hidden_size, embed_dim, bias=False, **factory_kwargs)
        )
        mup_width_scale = getattr(config, "mup_width_scale", 1.0)
        self.output_scale = getattr(config, "mup_output_multiplier", 1.0) * mup_width_scale
        self.lm_head = build_lm_head(config, embed_dim, vocab_size, process_group, factory_kwargs)
        self.norm_head = getattr(config, "norm_head", False)
        _apply_init(self, config)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``: ``lm_head.weight`` is the word embeddings' weight; with a process group
        the shared parameters are then broadcast from the group's first rank."""
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.embeddings.word_embeddings.weight
        if self.process_group is not None:
            sync_shared_params(self, self.process_group)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> dict[int, Any]:
        """``{layer index: KV cache}`` for ``batch_size`` sequences of up to ``max_seqlen`` tokens."""
        return self.transformer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        inference_params: Any = None,
        num_last_tokens: int = 0,
    ) -> CausalLMOutput:
        """
        Arguments:
            input_ids: (B, S) int64 token ids.
            position_ids: (B, S) or (S,), see :meth:`GPTModel.forward`.
            inference_params: generation state (KV caches, ``seqlen_offset``), see :meth:`GPTModel.forward`.
            num_last_tokens: > 0: the logits of the last ``num_last_tokens`` positions only.
        Return:
            ``CausalLMOutput(logits)``, logits (B, S or num_last_tokens, padded vocab size); with a process
            group see the class docstring.
        """
        if input_ids.ndim != 2:
            raise ValueError(
                f"Expected `input_ids` to have shape [b, slen], but got shape {tuple(input_ids.shape)}"
            )
        rows = self.process_group is not None and self.transformer.sequence_parallel
        if rows and (inference_params is not None or num_last_tokens > 0):
            raise ValueError(
                "sequence_parallel is not supported in generation mode (inference_params, num_last_tokens): "
                "build the model with config.sequence_parallel=False"
            )
        hidden_states = self.transformer(
            input_ids, position_ids=position_ids, inference_params=inference_params
        )
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        if self.output_scale != 1.0:
            hidden_states = hidden_states * self.output_scale
        logits = lm_head_logits(self.lm_head, hidden_states, self.norm_head)
        if self.process_group is not None and inference_params is not None:
            logits = gather_vocab_logits(logits, self.process_group, input_ids.shape[0])
        return CausalLMOutput(logits=logits)

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> Any:
        """``nn.Module.load_state_dict``, also taking the old layout of flash-attn's GPT checkpoints
        (``transformer.ln_0`` before the first block, each block's norms after its sub-layers), converted to
        the current one on a copy."""
        if "transformer.ln_0.weight" in state_dict:
            state_dict = _convert_ln_0_layout(state_dict, len(self.transformer.layers))
        return super().load_state_dict(state_dict, strict=strict)
