"""Tensor-parallel and fused-MLP pieces of :mod:`flash_attn.models.gpt` (flash-attn 2.8.3's behaviour), kept
apart so the model module stays readable: the keyword arguments of the parallel modules, the ``fused_mlp``
constructor (:class:`flash_attn.ops.fused_dense.FusedMLP` / ``ParallelFusedMLP``), the ``fused_dense_sqrelu_dense``
refusal, the (parallel) embeddings and language-model head and the head's ``norm_head`` computation, the
``_shared_params`` / ``_sequence_parallel`` tags of the final norm, the all-gather of the vocabulary-parallel
logits during generation and the process-group check of ``from_pretrained``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flash_attn.modules.embedding import GPT2Embeddings, ParallelGPT2Embeddings
from flash_attn.ops.fused_dense import ColumnParallelLinear, FusedMLP, ParallelFusedMLP, fused_dense_func
from flash_attn.utils.distributed import all_gather_raw

#: ``activation_function`` values computed as the tanh-approximate GeLU
TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_approx", "gelu_pytorch_tanh")
#: ``activation_function`` values ``fused_mlp=True`` accepts (flash-attn's list)
FUSED_MLP_ACTIVATIONS = (*TANH_GELUS, "relu", "sqrelu")


def parallel_kwargs(config: Any, process_group: Any) -> dict[str, Any]:
    """``process_group`` / ``sequence_parallel`` (``config.sequence_parallel``, default True) for the parallel
    modules; nothing without a process group."""
    if process_group is None:
        return {}
    return {"process_group": process_group, "sequence_parallel": getattr(config, "sequence_parallel", True)}


def _checkpoint_lvl(config: Any, layer_idx: int | None) -> int:
    """``config.mlp_checkpoint_lvl`` (default 0): an int, or a sequence of one per layer."""
    lvl = getattr(config, "mlp_checkpoint_lvl", 0)
    if isinstance(lvl, Sequence):
        if layer_idx is None:
            raise ValueError("a per-layer mlp_checkpoint_lvl needs layer_idx")
        lvl = lvl[layer_idx]
    return lvl


def fused_mlp_cls(
    config: Any, layer_idx: int | None, process_group: Any, factory_kwargs: dict[str, Any]
) -> Callable[..., nn.Module]:
    """``fused_mlp=True``: ``partial(FusedMLP, ...)`` or, with a process group, ``partial(ParallelFusedMLP,
    ...)``; activation ``"gelu_approx"`` for the tanh GeLUs, else ``relu`` / ``sqrelu``; ``checkpoint_lvl`` from
    ``mlp_checkpoint_lvl``; hidden width ``n_inner``; biases ``mlp_fc1_bias`` / ``mlp_fc2_bias``."""
    name = config.activation_function
    if name not in FUSED_MLP_ACTIVATIONS:
        raise ValueError(
            f"fused_mlp=True supports activation_function in {FUSED_MLP_ACTIVATIONS}, got {name!r} (use "
            "fused_mlp=False for it)"
        )
    return partial(
        FusedMLP if process_group is None else ParallelFusedMLP,
        hidden_features=config.n_inner,
        activation="gelu_approx" if name in TANH_GELUS else name,
        checkpoint_lvl=_checkpoint_lvl(config, layer_idx),
        bias1=getattr(config, "mlp_fc1_bias", True),
        bias2=getattr(config, "mlp_fc2_bias", True),
        **parallel_kwargs(config, process_group),
        **factory_kwargs,
    )


def build_embeddings(
    config: Any, vocab_size: int, process_group: Any, factory_kwargs: dict[str, Any]
) -> GPT2Embeddings | ParallelGPT2Embeddings:
    """``GPT2Embeddings`` (``word_embed_proj_dim``), or with a process group ``ParallelGPT2Embeddings``
    (``sequence_parallel`` from the config; ``word_embed_proj_dim`` refused: the parallel embeddings have no
    ``project_in``)."""
    word_embed_proj_dim = getattr(config, "word_embed_proj_dim", None)
    if process_group is None:
        return GPT2Embeddings(
            config.hidden_size,
            vocab_size,
            config.max_position_embeddings,
            word_embed_proj_dim=word_embed_proj_dim,
            **factory_kwargs,
        )
    if word_embed_proj_dim is not None:
        raise ValueError("word_embed_proj_dim is not supported with tensor parallelism (process_group)")
    return ParallelGPT2Embeddings(
        config.hidden_size,
        vocab_size,
        config.max_position_embeddings,
        **parallel_kwargs(config, process_group),
        **factory_kwargs,
    )


def build_lm_head(
    config: Any, embed_dim: int, vocab_size: int, process_group: Any, factory_kwargs: dict[str, Any]
) -> nn.Linear:
    """``nn.Linear(embed_dim, vocab_size)``, or with a process group a ``ColumnParallelLinear`` holding this
    rank's vocabulary rows (``sequence_parallel`` from the config); bias ``lm_head_bias`` (default False)."""
    bias = getattr(config, "lm_head_bias", False)
    if process_group is None:
        return nn.Linear(embed_dim, vocab_size, bias=bias, **factory_kwargs)
    return ColumnParallelLinear(
        embed_dim,
        vocab_size,
        process_group,
        bias=bias,
        sequence_parallel=getattr(config, "sequence_parallel", True),
        **factory_kwargs,
    )


def lm_head_logits(lm_head: nn.Linear, hidden_states: Tensor, norm_head: bool) -> Tensor:
    """``lm_head(hidden_states)``; with ``norm_head`` the same computation (for a ``ColumnParallelLinear``: the
    all-gather of the rows and the reduction of the input gradient) with L2-normalized weight rows."""
    if not norm_head:
        return lm_head(hidden_states)
    logits = fused_dense_func(
        hidden_states,
        F.normalize(lm_head.weight),
        lm_head.bias,
        process_group=getattr(lm_head, "process_group", None),
        sequence_parallel=getattr(lm_head, "sequence_parallel", True),
    )
    assert isinstance(logits, Tensor)
    return logits


def mark_shared_params(module: nn.Module, sequence_parallel: bool) -> None:
    """Tag ``module``'s parameters ``_shared_params`` (broadcast from the group's first rank by
    ``sync_shared_params``) and, with ``sequence_parallel``, ``_sequence_parallel`` (gradients summed by
    ``allreduce_sequence_parallel_grad``)."""
    for p in module.parameters():
        p._shared_params = True  # type: ignore[attr-defined]
        if sequence_parallel:
            p._sequence_parallel = True  # type: ignore[attr-defined]


def gather_vocab_logits(logits: Tensor, process_group: Any, batch_size: int) -> Tensor:
    """Every rank's vocabulary shard of ``logits`` (batch, ..., vocab / W) side by side: (batch, ..., vocab),
    rank 0's shard first (no autograd, as flash-attn's ``all_gather_raw``)."""
    gathered, _ = all_gather_raw(logits, process_group)  # (W * batch, ..., vocab / W)
    return gathered.unflatten(0, (-1, batch_size)).movedim(0, -2).flatten(-2)


def check_pretrained_group(model: nn.Module, world_size: int, rank: int) -> None:
    """``from_pretrained(world_size, rank)`` shards the checkpoint for rank ``rank`` of ``world_size``: the
    model's process group must be that (``ValueError`` otherwise, instead of a size mismatch or a silently wrong
    shard)."""
    group = getattr(model, "process_group", None)
    if group is None:
        if world_size > 1:
            raise ValueError(
                f"from_pretrained(world_size={world_size}): the model was built without a process group; pass "
                f"process_group=<a group of {world_size} ranks> (forwarded to the model)"
            )
        return
    got = (dist.get_world_size(group), dist.get_rank(group))
    if got != (world_size, rank):
        raise ValueError(
            f"from_pretrained(world_size={world_size}, rank={rank}): the model's process group has world size "
            f"{got[0]} and this process is its rank {got[1]}"
        )
