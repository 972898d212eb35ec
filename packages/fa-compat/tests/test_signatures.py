"""Every recorded flash-attn 2.8.3 signature (tests/data/flash_attn_2_8_signatures.json) holds here: names,
order, kinds and defaults of the parameters, aliases, and the public names of ``flash_attn``.

The only parameters beyond the record are the documented keyword-only extras of :data:`EXTRAS` (newer
flash-attn interfaces' names), after every recorded parameter, so positional calls keep 2.8's meaning."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

import pytest
import torch
import triton

import flash_attn
from flash_attn.layers.patch_embed import PatchEmbed

DATA = json.loads((Path(__file__).parent / "data" / "flash_attn_2_8_signatures.json").read_text())
RECORDS = DATA["records"]

#: flash-attn 2.8.3 modules outside the JSON record: (module, name, parameter list as written in flash-attn's
#: v2.8.3 source, annotations left out). Turned into records of the same form by the same method (ast).
SOURCE_SIGNATURES: list[tuple[str, str, str]] = [
    ("flash_attn.modules.block", "Block.__init__",
     "self, dim, mixer_cls=None, mlp_cls=None, norm_cls=nn.LayerNorm, dropout_cls=nn.Dropout, prenorm=True, "
     "resid_dropout1=0.0, resid_dropout2=0.0, drop_path1=0.0, drop_path2=0.0, fused_dropout_add_ln=False, "
     "return_residual=False, residual_in_fp32=False, sequence_parallel=False, mark_shared_params=False"),
    ("flash_attn.modules.block", "Block.allocate_inference_cache",
     "self, batch_size, max_seqlen, dtype=None, **kwargs"),
    ("flash_attn.modules.block", "Block.forward",
     "self, hidden_states, residual=None, mixer_subset=None, mixer_kwargs=None"),
    ("flash_attn.modules.block", "ParallelBlock.__init__",
     "self, dim, mixer_cls=None, mlp_cls=None, norm_cls=nn.LayerNorm, dropout_cls=nn.Dropout, "
     "resid_dropout1=0.0, resid_dropout2=0.0, tied_norm=False, fused_dropout_add_ln=False, "
     "residual_in_fp32=False, sequence_parallel=False, mark_shared_params=False"),
    ("flash_attn.modules.block", "ParallelBlock.allocate_inference_cache",
     "self, batch_size, max_seqlen, dtype=None, **kwargs"),
    ("flash_attn.modules.block", "ParallelBlock.forward",
     "self, hidden_states1, hidden_states2=None, residual=None, mixer_kwargs=None"),
    ("flash_attn.modules.embedding", "GPT2Embeddings.__init__",
     "self, embed_dim, vocab_size, max_position_embeddings, padding_idx=None, word_embed_proj_dim=None, "
     "device=None, dtype=None"),
    ("flash_attn.modules.embedding", "GPT2Embeddings.forward", "self, input_ids, position_ids=None"),
    ("flash_attn.modules.embedding", "BertEmbeddings.__init__",
     "self, embed_dim, vocab_size, max_position_embeddings, type_vocab_size, padding_idx=None, device=None, "
     "dtype=None"),
    ("flash_attn.modules.embedding", "BertEmbeddings.forward",
     "self, input_ids, position_ids=None, token_type_ids=None"),
    ("flash_attn.modules.embedding", "VocabParallelEmbedding.__init__",
     "self, num_embeddings, *args, process_group=None, padding_idx=None, **kwargs"),
    ("flash_attn.modules.embedding", "VocabParallelEmbedding.forward", "self, input"),
    ("flash_attn.modules.embedding", "ColumnParallelEmbedding.__init__",
     "self, num_embeddings, embedding_dim, *args, process_group=None, **kwargs"),
    ("flash_attn.modules.embedding", "ParallelGPT2Embeddings.__init__",
     "self, embed_dim, vocab_size, max_position_embeddings, process_group, padding_idx=None, "
     "sequence_parallel=True, device=None, dtype=None"),
    ("flash_attn.modules.embedding", "ParallelGPT2Embeddings.forward",
     "self, input_ids, position_ids=None, combine_batch_seqlen_dim=False"),
    ("flash_attn.utils.distributed", "all_gather_raw", "input_, process_group, async_op=False"),
    ("flash_attn.utils.distributed", "reduce_scatter_raw", "input_, process_group, async_op=False"),
    ("flash_attn.utils.distributed", "all_reduce_raw", "input_, process_group, async_op=False"),
    ("flash_attn.utils.distributed", "AllGatherFunc.forward", "ctx, input_, process_group"),
    ("flash_attn.utils.distributed", "AllGatherFunc.backward", "ctx, grad_output"),
    ("flash_attn.utils.distributed", "ReduceScatterFunc.forward", "ctx, input_, process_group"),
    ("flash_attn.utils.distributed", "ReduceScatterFunc.backward", "ctx, grad_output"),
    ("flash_attn.utils.distributed", "AllReduceFunc.forward", "ctx, input_, process_group"),
    ("flash_attn.utils.distributed", "AllReduceFunc.backward", "ctx, grad_output"),
    ("flash_attn.utils.distributed", "sync_shared_params", "model, process_group"),
    ("flash_attn.utils.distributed", "allreduce_sequence_parallel_grad", "model, process_group"),
    ("flash_attn.utils.distributed", "get_dim_for_local_rank", "dim, world_size, local_rank, multiple_of=1"),
    ("flash_attn.layers.patch_embed", "PatchEmbed.__init__",
     "self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True, bias=True, "
     "fused_bias_fc=False"),
    ("flash_attn.layers.patch_embed", "PatchEmbed.forward", "self, x"),
    ("flash_attn.models.gpt", "create_mixer_cls",
     "config, layer_idx=None, process_group=None, device=None, dtype=None"),
    ("flash_attn.models.gpt", "create_mlp_cls", "config, layer_idx=None, process_group=None, device=None, dtype=None"),
    ("flash_attn.models.gpt", "create_block", "config, layer_idx=None, process_group=None, device=None, dtype=None"),
    ("flash_attn.models.gpt", "GPTPreTrainedModel.__init__", "self, config, *inputs, **kwargs"),
    # a classmethod: inspect.signature leaves cls out
    ("flash_attn.models.gpt", "GPTPreTrainedModel.from_pretrained",
     "model_name, config, *args, strict=True, device=None, dtype=None, world_size=1, rank=0, **kwargs"),
    ("flash_attn.models.gpt", "_init_weights",
     "module, n_layer, initializer_range=0.02, mup_width_scale=1.0, rescale_prenorm_residual=True"),
    ("flash_attn.models.gpt", "GPTModel.__init__", "self, config, process_group=None, device=None, dtype=None"),
    ("flash_attn.models.gpt", "GPTModel.tie_weights", "self"),
    ("flash_attn.models.gpt", "GPTModel.allocate_inference_cache",
     "self, batch_size, max_seqlen, dtype=None, **kwargs"),
    ("flash_attn.models.gpt", "GPTModel.forward", "self, input_ids, position_ids=None, inference_params=None"),
    ("flash_attn.models.gpt", "GPTLMHeadModel.__init__",
     "self, config, process_group=None, device=None, dtype=None"),
    ("flash_attn.models.gpt", "GPTLMHeadModel.tie_weights", "self"),
    ("flash_attn.models.gpt", "GPTLMHeadModel.allocate_inference_cache",
     "self, batch_size, max_seqlen, dtype=None, **kwargs"),
    ("flash_attn.models.gpt", "GPTLMHeadModel.forward",
     "self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0"),
    ("flash_attn.models.gpt", "GPTLMHeadModel.load_state_dict", "self, state_dict, strict=True"),
    ("flash_attn.models.gpt", "shard_state_dict_tp", "state_dict, config, world_size, rank"),
    ("flash_attn.models.gpt", "combine_state_dicts_tp", "state_dicts, config"),
    ("flash_attn.models.gpt", "remap_state_dict_hf_gpt2", "state_dict, config"),
    ("flash_attn.models.gpt", "remap_state_dict_megatron", "state_dict, config"),
    ("flash_attn.models.llama", "remap_state_dict_meta_llama", "state_dict, config"),
    ("flash_attn.models.llama", "remap_state_dict_hf_llama", "state_dict, config"),
    ("flash_attn.models.llama", "inv_remap_state_dict_hf_llama", "state_dict, config"),
    ("flash_attn.models.llama", "config_from_meta_checkpoint", "checkpoint_path, model_name"),
    ("flash_attn.models.llama", "config_from_hf_checkpoint", "checkpoint_path, model_name"),
    ("flash_attn.models.llama", "config_from_checkpoint", "checkpoint_path, model_name, checkpoint_format='meta'"),
    ("flash_attn.models.llama", "state_dicts_from_checkpoint", "checkpoint_path, model_name"),
    ("flash_attn.models.llama", "llama_config_to_gpt2_config", "llama_config"),
    ("flash_attn.models.bert", "create_mixer_cls", "config, cross_attn=False, return_residual=False"),
    ("flash_attn.models.bert", "create_mlp_cls", "config, layer_idx=None, return_residual=False"),
    ("flash_attn.models.bert", "create_block", "config, layer_idx=None"),
    ("flash_attn.models.bert", "_init_weights", "module, initializer_range=0.02"),
    ("flash_attn.models.bert", "BertEncoder.__init__", "self, config"),
    ("flash_attn.models.bert", "BertEncoder.forward", "self, hidden_states, key_padding_mask=None, subset_mask=None"),
    ("flash_attn.models.bert", "BertPooler.__init__", "self, config"),
    ("flash_attn.models.bert", "BertPooler.forward", "self, hidden_states, pool=True"),
    ("flash_attn.models.bert", "BertPredictionHeadTransform.__init__", "self, config"),
    ("flash_attn.models.bert", "BertPredictionHeadTransform.forward", "self, hidden_states"),
    ("flash_attn.models.bert", "BertLMPredictionHead.__init__", "self, config"),
    ("flash_attn.models.bert", "BertLMPredictionHead.forward", "self, hidden_states"),
    ("flash_attn.models.bert", "BertPreTrainingHeads.__init__", "self, config"),
    ("flash_attn.models.bert", "BertPreTrainingHeads.forward", "self, sequence_output, pooled_output"),
    ("flash_attn.models.bert", "BertPreTrainedModel.__init__", "self, config, *inputs, **kwargs"),
    # a classmethod: inspect.signature leaves cls out
    ("flash_attn.models.bert", "BertPreTrainedModel.from_pretrained", "model_name, config, *inputs, **kwargs"),
    ("flash_attn.models.bert", "BertModel.__init__", "self, config, add_pooling_layer=True"),
    ("flash_attn.models.bert", "BertModel.forward",
     "self, input_ids, position_ids=None, token_type_ids=None, attention_mask=None, masked_tokens_mask=None"),
    ("flash_attn.models.bert", "BertForPreTraining.__init__", "self, config"),
    ("flash_attn.models.bert", "BertForPreTraining.tie_weights", "self"),
    ("flash_attn.models.bert", "BertForPreTraining.forward",
     "self, input_ids, position_ids=None, token_type_ids=None, attention_mask=None, labels=None, "
     "next_sentence_label=None"),
    ("flash_attn.models.bert", "remap_state_dict", "state_dict, config"),
    ("flash_attn.models.bert", "inv_remap_state_dict", "state_dict, config"),
    ("flash_attn.utils.pretrained", "state_dict_from_pretrained", "model_name, device=None, dtype=None"),
    ("flash_attn.ops.fused_dense", "FusedDenseFunc.forward", "ctx, x, weight, bias, return_residual=False, process_group=None, sequence_parallel=True"),
    ("flash_attn.ops.fused_dense", "FusedDenseFunc.backward", "ctx, grad_output, *args"),
    ("flash_attn.ops.fused_dense", "fused_dense_func", "x, weight, bias=None, return_residual=False, process_group=None, sequence_parallel=True"),
    ("flash_attn.ops.fused_dense", "FusedDense.__init__", "self, in_features, out_features, bias=True, return_residual=False, device=None, dtype=None"),
    ("flash_attn.ops.fused_dense", "FusedDense.forward", "self, x, process_group=None"),
    ("flash_attn.ops.fused_dense", "ColumnParallelLinear.__init__", "self, in_features, out_features, process_group, bias=True, sequence_parallel=True, multiple_of=1, device=None, dtype=None"),
    ("flash_attn.ops.fused_dense", "ColumnParallelLinear.forward", "self, x"),
    ("flash_attn.ops.fused_dense", "RowParallelLinear.__init__", "self, in_features, out_features, process_group, bias=True, sequence_parallel=True, multiple_of=1, device=None, dtype=None"),
    ("flash_attn.ops.fused_dense", "RowParallelLinear.forward", "self, x"),
    ('flash_attn.ops.fused_dense', 'FusedMLPFunc.forward', "ctx, x, weight1, bias1, weight2, bias2, activation='gelu_approx', save_pre_act=True, return_residual=False, checkpoint_lvl=0, heuristic=0, process_group=None, sequence_parallel=True"),
    ("flash_attn.ops.fused_dense", "FusedMLPFunc.backward", "ctx, grad_output, *args"),
    ('flash_attn.ops.fused_dense', 'fused_mlp_func', "x, weight1, weight2, bias1=None, bias2=None, activation='gelu_approx', save_pre_act=True, return_residual=False, checkpoint_lvl=0, heuristic=0, process_group=None, sequence_parallel=True"),
    ('flash_attn.ops.fused_dense', 'FusedMLP.__init__', "self, in_features, hidden_features=None, out_features=None, bias1=True, bias2=True, activation='gelu_approx', return_residual=False, checkpoint_lvl=0, heuristic='auto', device=None, dtype=None"),
    ("flash_attn.ops.fused_dense", "FusedMLP.forward", "self, x, process_group=None"),
    ('flash_attn.ops.fused_dense', 'ParallelFusedMLP.__init__', "self, in_features, hidden_features=None, out_features=None, activation='gelu_approx', process_group=None, bias1=True, bias2=True, sequence_parallel=True, checkpoint_lvl=0, heuristic='auto', device=None, dtype=None"),
    ("flash_attn.ops.fused_dense", "ParallelFusedMLP.forward", "self, x"),
    ("flash_attn.modules.mlp", "ParallelMLP.__init__", "self, in_features, hidden_features=None, out_features=None, activation=F.gelu, process_group=None, sequence_parallel=True, bias1=True, bias2=True, device=None, dtype=None"),
    ("flash_attn.modules.mlp", "ParallelMLP.forward", "self, x"),
    ("flash_attn.modules.mlp", "ParallelGatedMlp.__init__", "self, in_features, process_group, hidden_features=None, out_features=None, activation=F.sigmoid, bias1=True, bias2=True, multiple_of=128, sequence_parallel=True, device=None, dtype=None"),
    ("flash_attn.modules.mlp", "ParallelGatedMlp.forward", "self, x"),
    ("flash_attn.modules.mha", "ParallelMHA.__init__", "self, embed_dim, num_heads, process_group, num_heads_kv=None, qkv_proj_bias=True, out_proj_bias=True, dropout=0.0, softmax_scale=None, causal=False, layer_idx=None, rotary_emb_dim=0, rotary_emb_base=10000.0, rotary_emb_scale_base=None, rotary_emb_interleaved=False, use_alibi=False, window_size=(-1, -1), use_flash_attn=False, checkpointing=False, sequence_parallel=True, device=None, dtype=None"),
    ("flash_attn.modules.mha", "ParallelMHA.allocate_inference_cache", "self, batch_size, max_seqlen, dtype=None"),
    ("flash_attn.modules.mha", "ParallelMHA.forward", "self, x, seqlen=None, inference_params=None, **kwargs"),
    ("flash_attn.models.gpt_neox", "remap_state_dict_hf_gpt_neox", "state_dict, config"),
    ("flash_attn.models.gpt_neox", "gpt_neox_config_to_gpt2_config", "gpt_neox_config"),
    ("flash_attn.models.gptj", "remap_state_dict_hf_gptj", "state_dict, config"),
    ("flash_attn.models.gptj", "gptj_config_to_gpt2_config", "gptj_config"),
    ("flash_attn.models.opt", "remap_state_dict_hf_opt", "state_dict, config"),
    ("flash_attn.models.opt", "opt_config_to_gpt2_config", "opt_config"),
    ("flash_attn.models.falcon", "remap_state_dict_hf_falcon", "state_dict, config"),
    ("flash_attn.models.falcon", "falcon_config_to_gpt2_config", "falcon_config"),
    ("flash_attn.models.bigcode", "remap_state_dict_hf_bigcode", "state_dict, config"),
    ("flash_attn.models.bigcode", "inv_remap_state_dict_hf_bigcode", "state_dict, config"),
    ("flash_attn.models.bigcode", "bigcode_config_to_gpt2_config", "bigcode_config"),
    ("flash_attn.models.btlm", "remap_state_dict_hf_btlm", "state_dict, config"),
    ("flash_attn.models.btlm", "btlm_config_to_gpt2_config", "btlm_config"),
    ("flash_attn.models.baichuan", "remap_state_dict_hf_baichuan", "state_dict, config"),
    ("flash_attn.models.baichuan", "baichuan_config_to_gpt2_config", "baichuan_config"),
    ("flash_attn.models.vit", "create_mixer_cls", "num_heads, qkv_bias, attn_drop, use_flash_attn, fused_bias_fc, cross_attn=False"),
    ("flash_attn.models.vit", "create_mlp_cls", "embed_dim, mlp_ratio, act_layer, fused_mlp"),
    ("flash_attn.models.vit", "create_block", "embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path1, drop_path2, norm_layer, act_layer, use_flash_attn, fused_bias_fc, fused_mlp, fused_dropout_add_ln, layer_idx=None, n_layer=None, last_layer_subset=False"),
    ("flash_attn.models.vit", "VisionTransformer.__init__", "self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool='token', embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, init_values=None, class_token=True, no_embed_class=False, pre_norm=False, fc_norm=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, weight_init='', embed_layer=PatchEmbed, norm_layer=None, act_layer=None, use_flash_attn=False, fused_bias_fc=False, fused_mlp=False, fused_dropout_add_ln=False"),
    ("flash_attn.models.vit", "VisionTransformer.init_weights", "self, mode=''"),
    ("flash_attn.models.vit", "VisionTransformer._init_weights", "self, m"),
    ("flash_attn.models.vit", "VisionTransformer.no_weight_decay", "self"),
    ("flash_attn.models.vit", "VisionTransformer._pos_embed", "self, x"),
    ("flash_attn.models.vit", "VisionTransformer.forward_features", "self, x, all_tokens=True"),
    ("flash_attn.models.vit", "VisionTransformer.forward_head", "self, x, pre_logits=False"),
    ("flash_attn.models.vit", "VisionTransformer.forward", "self, x"),
    ("flash_attn.models.vit", "VisionTransformer.load_state_dict", "self, state_dict, strict=True"),
    ("flash_attn.models.vit", "init_weights_vit_timm", "module, name=''"),
    ("flash_attn.models.vit", "vit_base_patch16_224", "pretrained=False, **kwargs"),
    ("flash_attn.utils.torch", "custom_fwd", "*args, **kwargs"),
    ("flash_attn.utils.torch", "custom_bwd", "*args, **kwargs"),
    ("flash_attn.utils.torch", "custom_amp_decorator", "dec, cuda_amp_deprecated"),
    ("flash_attn.utils.library", "triton_op",
     "name, fn=None, /, *, mutates_args, schema=None, allow_decomposition=True"),
    ("flash_attn.utils.testing", "generate_random_padding_mask",
     "max_seqlen, batch_size, device, mode='random', zero_lengths=False"),
    ("flash_attn.utils.testing", "generate_qkv",
     "q, k, v, query_padding_mask=None, key_padding_mask=None, qv=None, kvpacked=False, qkvpacked=False, "
     "query_unused_mask=None, key_unused_mask=None"),
    ("flash_attn.utils.testing", "construct_local_mask",
     "seqlen_q, seqlen_k, window_size=(None, None), sink_token_length=0, query_padding_mask=None, "
     "key_padding_mask=None, key_leftpad=None, device=None"),
    ("flash_attn.utils.testing", "construct_chunk_mask",
     "seqlen_q, seqlen_k, attention_chunk, query_padding_mask=None, key_padding_mask=None, key_leftpad=None, "
     "device=None"),
    ("flash_attn.utils.testing", "attention_ref",
     "q, k, v, query_padding_mask=None, key_padding_mask=None, key_leftpad=None, attn_bias=None, dropout_p=0.0, "
     "dropout_mask=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None, "
     "window_size=(None, None), attention_chunk=0, sink_token_length=0, learnable_sink=None, softcap=0.0, "
     "upcast=True, reorder_ops=False, intermediate_dtype=None"),
    ("flash_attn.ops.triton.k_activations", "get_triton_activation_kernel", "activation"),
    ("flash_attn.ops.triton.k_activations", "get_triton_activation_bwd_kernel", "activation"),
    *[("flash_attn.ops.triton.k_activations", name, "x") for name in (
        "tanh", "cosh", "relu", "relu_grad", "squared_relu", "squared_relu_grad", "leaky_relu", "leaky_relu_grad",
        "gelu", "gelu_grad", "gelu_approx", "gelu_approx_grad")],
    ("flash_attn.ops.triton.linear", "triton_linear_act",
     "x, weight, bias=None, activation='id', save_act_input=False"),
    ("flash_attn.ops.triton.linear", "triton_dgrad_act", "grad_output, weight, activation='id', act_input=None"),
    ("flash_attn.ops.triton.mlp", "FusedDenseSqreluDenseFunc.forward",
     "ctx, x, weight1, bias1, weight2, bias2, checkpoint_lvl=0"),
    ("flash_attn.ops.triton.mlp", "FusedDenseSqreluDenseFunc.backward", "ctx, grad_output"),
    ("flash_attn.ops.triton.mlp", "FusedDenseSqreluDense.__init__",
     "self, in_features, hidden_features=None, out_features=None, bias1=True, bias2=True, checkpoint_lvl=0, "
     "device=None, dtype=None"),
    ("flash_attn.ops.triton.mlp", "FusedDenseSqreluDense.forward", "self, x"),
]  # fmt: skip
#: module-level aliases of those modules: (module, name, target)
SOURCE_ALIASES = [
    ("flash_attn.utils.distributed", "all_gather", "AllGatherFunc.apply"),
    ("flash_attn.utils.distributed", "reduce_scatter", "ReduceScatterFunc.apply"),
    ("flash_attn.utils.distributed", "all_reduce", "AllReduceFunc.apply"),
    ("flash_attn.ops.triton.mlp", "fused_dense_sqrelu_dense_function", "FusedDenseSqreluDenseFunc.apply"),
]


def _source_record(module: str, name: str, params: str) -> dict:
    args = ast.parse(f"def f({params}): pass").body[0].args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    kinds = ["POSITIONAL_ONLY"] * len(args.posonlyargs) + ["POSITIONAL_OR_KEYWORD"] * len(args.args)
    out = [
        {"name": a.arg, "kind": kind, "default": None if d is None else ast.unparse(d)}
        for a, kind, d in zip(positional, kinds, defaults)
    ]
    if args.vararg is not None:
        out.append({"name": args.vararg.arg, "kind": "VAR_POSITIONAL", "default": None})
    out += [
        {"name": a.arg, "kind": "KEYWORD_ONLY", "default": None if d is None else ast.unparse(d)}
        for a, d in zip(args.kwonlyargs, args.kw_defaults)
    ]
    if args.kwarg is not None:
        out.append({"name": args.kwarg.arg, "kind": "VAR_KEYWORD", "default": None})
    record = {"module": module, "name": name, "params": out}
    if out and out[0]["name"] in ("self", "ctx"):
        record["params"] = out[1:]
        record["note"] = "first parameter (self/ctx) omitted"
    return record


RECORDS = (
    RECORDS
    + [_source_record(*entry) for entry in SOURCE_SIGNATURES]
    + [{"module": m, "name": n, "alias_of": target} for m, n, target in SOURCE_ALIASES]
)
#: names a recorded default may refer to besides literals (flash-attn's ``nn.LayerNorm`` / ``nn.Dropout`` / ``F.gelu``)
DEFAULT_NAMES = {"nn": torch.nn, "F": torch.nn.functional, "PatchEmbed": PatchEmbed}


def _default_value(text: str):
    try:
        return ast.literal_eval(text)
    except ValueError:  # a dotted name such as nn.LayerNorm
        head, *rest = text.split(".")
        obj = DEFAULT_NAMES[head]
        for part in rest:
            obj = getattr(obj, part)
        return obj


_EXTRA_FUNCS = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache")
#: {(module, function): [(name, default)]}: keyword-only parameters allowed after the recorded ones.
EXTRAS: dict[tuple[str, str], list[tuple[str, object]]] = {
    (module, name): [("attention_chunk", 0), ("learnable_sink", None)]
    for module in ("flash_attn", "flash_attn.flash_attn_interface")
    for name in _EXTRA_FUNCS
}
# FlashAttention-3's FP8 cache descales on flash_attn_with_kvcache
for _module in ("flash_attn", "flash_attn.flash_attn_interface"):
    EXTRAS[(_module, "flash_attn_with_kvcache")] += [("k_descale", None), ("v_descale", None)]
# flash-attn main's ``num_splits`` on the low-level forwards (ignored there: the forward does not split)
EXTRAS.update(
    {
        ("flash_attn.flash_attn_interface", name): [("num_splits", 0)]
        for name in ("_flash_attn_forward", "_flash_attn_varlen_forward")
    }
)


def _resolve(module: str, name: str):
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _signature(obj) -> inspect.Signature:
    """The signature of a function, or of the Python function behind a ``@triton.jit`` device function
    (compiled or interpreted)."""
    if isinstance(obj, triton.runtime.KernelInterface):
        obj = obj.fn
    return inspect.signature(obj)


def _id(record: dict) -> str:
    return f"{record['module']}.{record['name']}"


@pytest.mark.parametrize("record", RECORDS, ids=_id)
def test_signature_matches_flash_attn_2_8(record):
    obj = _resolve(record["module"], record["name"])
    if "alias_of" in record:
        target = _resolve(record["module"], record["alias_of"])
        assert obj is target or obj == target, f"{_id(record)} must be an alias of {record['alias_of']}"
        return
    params = list(_signature(obj).parameters.values())
    if record.get("note", "").startswith("first parameter"):
        params = params[1:]  # self / ctx
    extras = EXTRAS.get((record["module"], record["name"]), [])
    n = len(params) - len(extras)
    params, extra_params = params[:n], params[n:]
    got_extras = [(p.name, p.kind.name, p.default) for p in extra_params]
    want_extras = [(name, "KEYWORD_ONLY", default) for name, default in extras]
    assert got_extras == want_extras, f"{_id(record)}: extra parameters {got_extras} != {want_extras}"
    for p, (_, default) in zip(extra_params, extras):
        assert type(p.default) is type(default), f"{_id(record)}: default of {p.name} is {p.default!r}"
    got = [(p.name, p.kind.name) for p in params]
    want = [(p["name"], p["kind"]) for p in record["params"]]
    assert got == want, f"{_id(record)}: parameters {got} != flash-attn's {want}"
    for p, rec in zip(params, record["params"]):
        if rec["default"] is None:
            assert p.default is inspect.Parameter.empty, f"{_id(record)}: {p.name} must have no default"
        else:
            expected = _default_value(rec["default"])
            assert p.default == expected and type(p.default) is type(expected), (
                f"{_id(record)}: default of {p.name} is {p.default!r}, flash-attn has {rec['default']}"
            )


def test_extras_cover_recorded_functions():
    """Every allow-listed function is a recorded one (the allow-list cannot silently go stale)."""
    recorded = {(r["module"], r["name"]) for r in RECORDS if "alias_of" not in r}
    assert set(EXTRAS) <= recorded


def test_top_level_exports_and_versions():
    for name in (
        "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
        "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
    ):  # fmt: skip
        assert getattr(flash_attn, name) is getattr(flash_attn.flash_attn_interface, name)
    assert flash_attn.__version__ == "2.8.3"
    assert flash_attn.__fa_plus__ is True
    core = importlib.import_module("fa_core")
    assert flash_attn.__fa_plus_version__ == core.__version__  # the members are released together


def test_fa_plus_version_matches_pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert flash_attn.__fa_plus_version__ == version
    shim = tomllib.loads((Path(__file__).parents[1] / "flash-attn-shim" / "pyproject.toml").read_text())[
        "project"
    ]
    assert shim["version"] == f"{flash_attn.__version__}+{flash_attn.SHIM_LOCAL_LABEL}.{version}"
    assert shim["dependencies"] == [f"fa-compat[all]=={version}"]


def _mutated(op) -> list[str]:
    args = op.default._schema.arguments
    return [a.name for a in args if a.alias_info is not None and a.alias_info.is_write]


def test_custom_ops_schemas():
    """The ops behind the API (namespace flash_attn_plus) declare what they mutate, as flash-attn's do."""
    import torch
    from fa_compat_testutils import HAS_BACKWARD

    import fa_core.ops  # noqa: F401  (registers the forward ops)
    import flash_attn._kvcache  # noqa: F401  (registers the kvcache op)

    ops = torch.ops.flash_attn_plus
    assert _mutated(ops.fwd) == [] and _mutated(ops.varlen_fwd) == []
    assert _mutated(ops.kvcache) == ["k_cache", "v_cache"]
    if HAS_BACKWARD:  # the backward ops live in fa-backward
        import fa_backward.ops  # noqa: F401

        assert _mutated(ops.bwd) == ["dq", "dk", "dv"] == _mutated(ops.varlen_bwd)
    else:
        assert not hasattr(ops, "bwd")
