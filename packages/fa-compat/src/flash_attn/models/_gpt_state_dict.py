"""State-dict conversions of :mod:`flash_attn.models.gpt` (re-exported there): Hugging Face GPT-2 and Megatron-LM
checkpoints -> :class:`flash_attn.models.gpt.GPTLMHeadModel`'s names, tensor-parallel shards and back, and the old
norm layout of flash-attn's own checkpoints. Pure tensor manipulation: no transformers, no process group."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_attn.utils.distributed import get_dim_for_local_rank

#: gated MLP activations (``fc1`` holds the value and the gate halves)
_GATED = ("glu", "swiglu", "geglu")


def _padded_vocab_size(vocab_size: int, config: Any) -> int:
    """``vocab_size`` rounded up to a multiple of ``config.pad_vocab_size_multiple`` (default 1)."""
    multiple = getattr(config, "pad_vocab_size_multiple", 1)
    return math.ceil(vocab_size / multiple) * multiple


def _pad_rows(weight: Tensor, rows: int) -> Tensor:
    """``weight`` (n, ...) zero-padded along dim 0 to ``rows`` rows."""
    return F.pad(weight, (0, 0, 0, rows - weight.shape[0]))


def _convert_ln_0_layout(state_dict: Mapping[str, Any], n_layers: int) -> OrderedDict[str, Any]:
    """Old layout (``ln_0``, then per layer ``mixer -> norm1 -> mlp -> norm2``) -> current (per layer
    ``norm1 -> mixer -> norm2 -> mlp``, then ``ln_f``): the norm applied before a sub-layer keeps its place in
    the sequence of norms."""
    old = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    # the sequence of norms in order of application, old names
    sequence = ["transformer.ln_0"]
    for i in range(n_layers):
        sequence += [f"transformer.layers.{i}.norm1", f"transformer.layers.{i}.norm2"]
    # the same positions, new names
    new_names = []
    for i in range(n_layers):
        new_names += [f"transformer.layers.{i}.norm1", f"transformer.layers.{i}.norm2"]
    new_names.append("transformer.ln_f")
    moved = {}
    for old_name, new_name in zip(sequence, new_names):
        for suffix in ("weight", "bias"):
            key = f"{old_name}.{suffix}"
            if key in old:
                moved[f"{new_name}.{suffix}"] = old.pop(key)
    old.update(moved)
    if metadata is not None:
        old._metadata = metadata  # type: ignore[attr-defined]
    return old


# ------------------------------------------------------------------------------------- state-dict conversions
def remap_state_dict_hf_gpt2(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """Hugging Face GPT-2 weights -> :class:`GPTLMHeadModel`'s names.

    Takes the hub checkpoint's names (``wte.weight``, ``h.{i}.attn.c_attn.weight``, ...) or those of
    ``GPT2LMHeadModel.state_dict()`` (``transformer.`` prefix). HF's ``Conv1D`` weights ``(in, out)`` are
    transposed to ``nn.Linear``'s ``(out, in)``; the word embeddings are zero-padded to the padded vocabulary
    size (``pad_vocab_size_multiple``) and ``lm_head.weight`` is the same tensor (GPT-2 ties them); the
    attention mask buffers (``attn.bias`` / ``attn.masked_bias``) are dropped. Other keys pass unchanged.

    Arguments:
        state_dict: ``{name: tensor}`` (not modified).
        config: the ``GPT2Config`` (``vocab_size``, ``pad_vocab_size_multiple``).
    Return:
        a new ``OrderedDict`` in this model's names.
    """
    layer_names = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "attn.c_attn": "mixer.Wqkv",
        "attn.c_proj": "mixer.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    out: OrderedDict[str, Tensor] = OrderedDict()
    source = {
        (k[len("transformer.") :] if k.startswith("transformer.") else k): v for k, v in state_dict.items()
    }
    if "wte.weight" not in source:
        raise KeyError("wte.weight")
    word_embeddings = _pad_rows(source.pop("wte.weight"), _padded_vocab_size(config.vocab_size, config))
    out["transformer.embeddings.word_embeddings.weight"] = word_embeddings
    for key, value in source.items():
        if key == "lm_head.weight":  # tied to the word embeddings
            continue
        if key == "wpe.weight":
            out["transformer.embeddings.position_embeddings.weight"] = value
            continue
        match = re.fullmatch(r"ln_f\.(weight|bias)", key)
        if match:
            out[f"transformer.ln_f.{match.group(1)}"] = value
            continue
        match = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", key)
        if match and match.group(2) in layer_names:
            layer, module, kind = match.groups()
            conv1d = kind == "weight" and module not in ("ln_1", "ln_2")
            out[f"transformer.layers.{layer}.{layer_names[module]}.{kind}"] = value.t() if conv1d else value
            continue
        if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", key):  # causal mask buffers
            continue
        out[key] = value
    out["lm_head.weight"] = word_embeddings
    return out


def _head_counts(config: Any) -> tuple[int, int]:
    """``(n_head, n_head_kv)``; a missing or None ``n_head_kv`` means ``n_head``."""
    n_head = config.n_head
    n_head_kv = getattr(config, "n_head_kv", None)
    return n_head, n_head if n_head_kv is None else n_head_kv


def _check_tp_sizes(config: Any, world_size: int) -> int:
    """Check the sizes split over ``world_size`` ranks; return the padded vocab size."""
    vocab_size = _padded_vocab_size(config.vocab_size, config)
    inner = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
    for what, size in (
        ("padded vocab_size", vocab_size),
        ("hidden_size", config.hidden_size),
        ("n_inner", inner),
    ):
        if size % world_size != 0:
            raise ValueError(f"{what} ({size}) must be divisible by the world size ({world_size})")
    if config.hidden_size % config.n_head != 0:
        raise ValueError(f"hidden_size ({config.hidden_size}) must be divisible by n_head ({config.n_head})")
    return vocab_size


def _rank_sizes(dim: int, world_size: int, multiple_of: int = 1) -> list[int]:
    return [get_dim_for_local_rank(dim, world_size, r, multiple_of) for r in range(world_size)]


def _is_gated(config: Any) -> bool:
    return config.activation_function in _GATED


def shard_state_dict_tp(
    state_dict: dict[str, Tensor], config: Any, world_size: int, rank: int
) -> dict[str, Tensor]:
    """The tensor-parallel shard of rank ``rank`` out of ``world_size`` of a :class:`GPTLMHeadModel` state dict
    (in place: ``state_dict`` is modified and returned).

    Word embeddings and ``lm_head`` (weight and bias): equal blocks of vocabulary rows; position embeddings:
    columns. Per layer: ``Wqkv`` by heads (q, k and v each keep this rank's heads, split with
    :func:`flash_attn.utils.distributed.get_dim_for_local_rank`, the kv heads on their own with GQA);
    ``out_proj.weight`` by input columns in units of the head dim; ``fc1`` by output rows (each half of a gated
    MLP's ``fc1`` separately); ``fc2.weight`` by input columns; the output biases (``out_proj.bias``,
    ``fc2.bias``) only on rank 0; norms replicated. (flash-attn leaves ``lm_head.bias`` whole, which does not
    load into its tensor-parallel model.)
    """
    _check_tp_sizes(config, world_size)
    n_head, n_head_kv = _head_counts(config)
    head_dim = config.hidden_size // n_head

    def bounds(sizes: list[int]) -> tuple[int, int]:
        return sum(sizes[:rank]), sum(sizes[: rank + 1])

    q_beg, q_end = bounds(_rank_sizes(n_head, world_size))
    kv_beg, kv_end = bounds(_rank_sizes(n_head_kv, world_size))

    def rows(key: str) -> None:
        if key in state_dict:
            x = state_dict[key]
            n = x.shape[0] // world_size
            state_dict[key] = x[rank * n : (rank + 1) * n]

    def cols(key: str, multiple_of: int = 1) -> None:
        if key in state_dict:
            x = state_dict[key]
            beg, end = bounds(_rank_sizes(x.shape[-1], world_size, multiple_of))
            state_dict[key] = x[..., beg:end]

    def gated_rows(key: str) -> None:
        if key in state_dict:
            halves = state_dict[key].unflatten(0, (2, -1))
            n = halves.shape[1] // world_size
            state_dict[key] = halves[:, rank * n : (rank + 1) * n].flatten(0, 1)

    def qkv(key: str) -> None:
        if key not in state_dict:
            return
        x = state_dict[key]
        if n_head_kv == n_head:
            three = x.unflatten(0, (3, -1))
            state_dict[key] = three[:, q_beg * head_dim : q_end * head_dim].flatten(0, 1)
            return
        heads = x.unflatten(0, (n_head + 2 * n_head_kv, head_dim))
        k0, v0 = n_head, n_head + n_head_kv
        parts = [heads[q_beg:q_end], heads[k0 + kv_beg : k0 + kv_end], heads[v0 + kv_beg : v0 + kv_end]]
        state_dict[key] = torch.cat(parts, dim=0).flatten(0, 1)

    rows("transformer.embeddings.word_embeddings.weight")
    rows("lm_head.weight")
    rows("lm_head.bias")  # lm_head_bias: the ColumnParallelLinear head's rows (flash-attn leaves it whole)
    cols("transformer.embeddings.position_embeddings.weight")
    fc1 = gated_rows if _is_gated(config) else rows
    for i in range(config.num_hidden_layers):
        prefix = f"transformer.layers.{i}"
        qkv(f"{prefix}.mixer.Wqkv.weight")
        qkv(f"{prefix}.mixer.Wqkv.bias")
        cols(f"{prefix}.mixer.out_proj.weight", multiple_of=head_dim)
        fc1(f"{prefix}.mlp.fc1.weight")
        fc1(f"{prefix}.mlp.fc1.bias")
        cols(f"{prefix}.mlp.fc2.weight")
        if rank != 0:
            state_dict.pop(f"{prefix}.mixer.out_proj.bias", None)
            state_dict.pop(f"{prefix}.mlp.fc2.bias", None)
    return state_dict


def combine_state_dicts_tp(state_dicts: Sequence[Mapping[str, Tensor]], config: Any) -> dict[str, Tensor]:
    """The full :class:`GPTLMHeadModel` state dict from its tensor-parallel shards, ordered by rank: the inverse
    of :func:`shard_state_dict_tp`.

    Word embeddings / ``lm_head`` are concatenated along the dimension they were split on (rows when a shard
    holds ``vocab_size // world_size`` of them, else columns, as in Meta's Llama checkpoints), ``lm_head.bias``
    along its rows; the tensors that are not split (norms, output biases) come from the first shard. The shards
    are not modified.
    """
    world_size = len(state_dicts)
    vocab_size = _check_tp_sizes(config, world_size)
    n_head, n_head_kv = _head_counts(config)
    head_dim = config.hidden_size // n_head
    q_sizes = _rank_sizes(n_head, world_size)
    kv_sizes = _rank_sizes(n_head_kv, world_size)
    out = dict(state_dicts[0])

    def cat(key: str, dim: int) -> None:
        if key in out:
            out[key] = torch.cat([s[key] for s in state_dicts], dim=dim)

    def word_embeddings(key: str) -> None:
        if key in out:
            cat(key, 0 if out[key].shape[0] == vocab_size // world_size else 1)

    def gated(key: str) -> None:
        if key in out:
            out[key] = torch.cat([s[key].unflatten(0, (2, -1)) for s in state_dicts], dim=1).flatten(0, 1)

    def qkv(key: str) -> None:
        if key not in out:
            return
        if n_head_kv == n_head:
            out[key] = torch.cat([s[key].unflatten(0, (3, -1)) for s in state_dicts], dim=1).flatten(0, 1)
            return
        q, k, v = [], [], []
        for s, nq, nkv in zip(state_dicts, q_sizes, kv_sizes):
            heads = s[key].unflatten(0, (nq + 2 * nkv, head_dim))
            q.append(heads[:nq])
            k.append(heads[nq : nq + nkv])
            v.append(heads[nq + nkv :])
        out[key] = torch.cat(q + k + v, dim=0).flatten(0, 1)

    word_embeddings("transformer.embeddings.word_embeddings.weight")
    word_embeddings("lm_head.weight")
    cat("lm_head.bias", 0)
    cat("transformer.embeddings.position_embeddings.weight", -1)
    fc1: Callable[[str], None] = gated if _is_gated(config) else partial(cat, dim=0)
    for i in range(config.num_hidden_layers):
        prefix = f"transformer.layers.{i}"
        qkv(f"{prefix}.mixer.Wqkv.weight")
        qkv(f"{prefix}.mixer.Wqkv.bias")
        cat(f"{prefix}.mixer.out_proj.weight", -1)
        fc1(f"{prefix}.mlp.fc1.weight")
        fc1(f"{prefix}.mlp.fc1.bias")
        cat(f"{prefix}.mlp.fc2.weight", -1)
    return out


def remap_state_dict_megatron(state_dict: Mapping[str, Tensor], config: Any) -> OrderedDict[str, Tensor]:
    """A Megatron-LM GPT checkpoint -> :class:`GPTLMHeadModel`'s names.

    ``language_model.[encoder.]`` -> ``transformer.``; ``embedding.word_embeddings`` -> word embeddings
    (zero-padded to a multiple of ``pad_vocab_size_multiple``; ``lm_head.weight`` is the same tensor);
    ``final_layernorm`` / ``input_layernorm`` / ``post_attention_layernorm`` -> ``ln_f`` / ``norm1`` /
    ``norm2``; ``mlp.dense_h_to_4h`` / ``dense_4h_to_h`` -> ``mlp.fc1`` / ``fc2``;
    ``self_attention.query_key_value`` / ``dense`` / ``rotary_emb.inv_freq`` -> ``mixer.Wqkv`` / ``out_proj`` /
    ``rotary_emb.inv_freq``. Megatron's fused projection is ordered ``(heads, 3, head_dim)``: ``Wqkv``'s weight
    and bias are reordered to ``(3, heads, head_dim)``.

    Arguments:
        state_dict: Megatron's names (not modified).
        config: the ``GPT2Config`` (``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``,
            ``pad_vocab_size_multiple``).
    """
    rules = [
        (r"^language_model\.encoder\.", "transformer."),
        (r"^language_model\.", "transformer."),
        (r"^wpe\.", "transformer.embeddings.position_embeddings."),
        (r"^transformer\.final_layernorm\.(weight|bias)$", r"transformer.ln_f.\1"),
        (r"^transformer\.layers\.(\d+)\.input_layernorm\.", r"transformer.layers.\1.norm1."),
        (r"^transformer\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.layers.\1.norm2."),
        (r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"transformer.layers.\1.mlp.fc1."),
        (r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"transformer.layers.\1.mlp.fc2."),
        (
            r"^transformer\.layers\.(\d+)\.self_attention\.rotary_emb\.",
            r"transformer.layers.\1.mixer.rotary_emb.",
        ),
        (
            r"^transformer\.layers\.(\d+)\.self_attention\.query_key_value\.",
            r"transformer.layers.\1.mixer.Wqkv.",
        ),
        (r"^transformer\.layers\.(\d+)\.self_attention\.dense\.", r"transformer.layers.\1.mixer.out_proj."),
    ]
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        # the prefix rules first, then at most one of the module rules
        for pattern, replacement in rules[:2]:
            key, n = re.subn(pattern, replacement, key, count=1)
            if n:
                break
        for pattern, replacement in rules[2:]:
            key, n = re.subn(pattern, replacement, key, count=1)
            if n:
                break
        out[key] = value
    word_embeddings = out.pop("transformer.embedding.word_embeddings.weight")
    word_embeddings = _pad_rows(word_embeddings, _padded_vocab_size(word_embeddings.shape[0], config))
    out["transformer.embeddings.word_embeddings.weight"] = word_embeddings
    out["lm_head.weight"] = word_embeddings
    head_dim = config.hidden_size // config.num_attention_heads
    for i in range(config.num_hidden_layers):
        for kind in ("weight", "bias"):
            key = f"transformer.layers.{i}.mixer.Wqkv.{kind}"
            out[key] = out.pop(key).unflatten(0, (-1, 3, head_dim)).transpose(0, 1).flatten(0, 2)
    return out
