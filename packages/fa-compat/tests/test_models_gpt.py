"""Tests for flash_attn.models.gpt, flash_attn.models.llama and flash_attn.utils.pretrained (Triton; interpreter on
CPU).

Tiny random Hugging Face models (``GPT2LMHeadModel``; ``LlamaForCausalLM`` with GQA and a non-default rope base),
built from configs (nothing downloaded), are converted with ``remap_state_dict_hf_gpt2`` / ``remap_state_dict_hf_llama``
into ``GPTLMHeadModel``. The logits and the gradient of a language-model loss (every parameter's, mapped through the
same remap function) follow the 2x rule against the HF model in float64 (the truth): ``|ours - truth| <= 2 * |HF -
truth| + slack``, HF and ours in the same dtype (float32 on CPU, bfloat16 on GPU). Generation with the KV cache is
held against full forwards; the state-dict conversions (tensor-parallel shards, Meta checkpoints, the inverse HF
remap, Megatron) against their inverses built here and the partial sums of a sharded layer against the full layer;
``state_dict_from_pretrained`` against checkpoints saved to temporary directories and to a temporary HF cache read
offline. The conversions that need no ``GPT2Config`` run without transformers; the rest skip.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fa_compat_hf import DTYPE, OPTIMIZED, TOL, check_2x, eager, needs_hf, randomize, tiny_hf, transformers  # noqa: E402
from fa_compat_testutils import DEVICE, needs_backward  # noqa: E402

from flash_attn.models.gpt import (  # noqa: E402
    GPTLMHeadModel,
    GPTModel,
    _init_weights,
    combine_state_dicts_tp,
    create_mixer_cls,
    remap_state_dict_hf_gpt2,
    remap_state_dict_megatron,
    shard_state_dict_tp,
)
from flash_attn.models.llama import (  # noqa: E402
    config_from_checkpoint,
    inv_remap_state_dict_hf_llama,
    llama_config_to_gpt2_config,
    remap_state_dict_hf_llama,
    remap_state_dict_meta_llama,
    state_dicts_from_checkpoint,
)
from flash_attn.utils.distributed import get_dim_for_local_rank  # noqa: E402
from flash_attn.utils.generation import InferenceParams  # noqa: E402
from flash_attn.utils.pretrained import state_dict_from_pretrained  # noqa: E402

VOCAB = 50
flash_params = [False, pytest.param(True, marks=needs_backward)]


# ------------------------------------------------------------------------------------------------ helpers
def _gpt2_config(**kw):
    base = {"vocab_size": VOCAB, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2}
    base.update(bos_token_id=0, eos_token_id=0, use_flash_attn=False)
    return transformers.GPT2Config(**{**base, **kw})


def _hf_gpt2(seed=0):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return tiny_hf(transformers.GPT2LMHeadModel, config, seed).eval()


def _llama_hf_config(**kw):
    kw = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA
        "max_position_embeddings": 64,
        "rope_theta": 1000.0,  # not the default: the rotary base must be read from the config
        "bos_token_id": 0,
        "eos_token_id": 1,
        **kw,
    }
    return eager(transformers.LlamaConfig(**kw))


def _hf_llama(seed=0, **kw):
    return tiny_hf(transformers.LlamaForCausalLM, _llama_hf_config(**kw), seed).eval()


def _ours(hf_model, config, remap, dtype=DTYPE):
    model = GPTLMHeadModel(config, device=DEVICE)
    result = model.load_state_dict(remap(hf_model.state_dict(), config))
    assert not result.missing_keys and not result.unexpected_keys
    return model.to(dtype=dtype).eval()


def _loss_and_grads(model, input_ids, targets):
    """Logits (float64, vocab-truncated) and the gradients of the mean cross entropy, by parameter name."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids).logits[..., :VOCAB]
    F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
    grads = {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().double(), grads


def _compare_with_hf(hf_model, config, remap, input_ids):
    """The 2x rule for the logits and every parameter's gradient (HF's mapped by ``remap``)."""
    truth_model = copy.deepcopy(hf_model).to(device=DEVICE, dtype=torch.float64)
    hf_lowp = copy.deepcopy(hf_model).to(device=DEVICE, dtype=DTYPE)
    ours = _ours(hf_model.to(DEVICE), config, remap)
    targets = torch.roll(input_ids, -1, dims=1)
    truth_logits, truth_grads = _loss_and_grads(truth_model, input_ids, targets)
    hf_logits, hf_grads = _loss_and_grads(hf_lowp, input_ids, targets)
    logits, grads = _loss_and_grads(ours, input_ids, targets)
    check_2x(logits, hf_logits, truth_logits, "logits")
    truth_grads, hf_grads = remap(truth_grads, config), remap(hf_grads, config)
    assert set(grads) <= set(truth_grads)
    assert len(grads) == len(dict(ours.named_parameters()))
    for name, grad in grads.items():
        check_2x(grad, hf_grads[name], truth_grads[name], f"grad of {name}")


def _ids(batch, seqlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seqlen), generator=g).to(DEVICE)


# -------------------------------------------------------------------------------- HF parity (logits, grads)
@needs_hf
@pytest.mark.parametrize(
    "variant",
    [
        "plain",
        pytest.param("flash", marks=needs_backward),
        pytest.param("optimized", marks=needs_backward),
    ],
)
def test_gpt2_matches_hf(variant):
    kw = {
        "plain": {},
        "flash": {"use_flash_attn": True},
        # every flash-attn switch this package implements, and a padded vocabulary
        "optimized": {**OPTIMIZED, "residual_in_fp32": True},
    }[variant]
    config = _gpt2_config(**kw)
    _compare_with_hf(_hf_gpt2(), config, remap_state_dict_hf_gpt2, _ids(2, 9))


@needs_hf
@pytest.mark.parametrize("use_flash_attn", flash_params)
def test_llama_gqa_matches_hf(use_flash_attn):
    hf = _hf_llama()
    config = llama_config_to_gpt2_config(hf.config)
    config.use_flash_attn = use_flash_attn
    assert config.n_head_kv == 2 and config.rotary_emb_base == 1000.0
    _compare_with_hf(hf, config, remap_state_dict_hf_llama, _ids(2, 9))


@needs_hf
def test_remap_gpt2_hub_and_model_names_agree():
    """The hub checkpoint's names (no ``transformer.`` prefix, no lm_head, mask buffers) map like the model's."""
    hf = _hf_gpt2()
    config = _gpt2_config(pad_vocab_size_multiple=16)
    model_form = hf.state_dict()
    hub_form = {k.removeprefix("transformer."): v for k, v in model_form.items() if k != "lm_head.weight"}
    hub_form["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)  # old checkpoints store the causal mask
    hub_form["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    a, b = remap_state_dict_hf_gpt2(model_form, config), remap_state_dict_hf_gpt2(hub_form, config)
    assert a.keys() == b.keys() == GPTLMHeadModel(config).state_dict().keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    emb = a["transformer.embeddings.word_embeddings.weight"]
    assert emb.shape == (64, 32) and torch.equal(emb[:VOCAB], model_form["transformer.wte.weight"])
    assert not emb[VOCAB:].any() and a["lm_head.weight"] is emb
    assert torch.equal(
        a["transformer.layers.1.mixer.Wqkv.weight"], model_form["transformer.h.1.attn.c_attn.weight"].t()
    )


@needs_hf
@pytest.mark.parametrize("pad", [1, 8])
def test_llama_inv_remap_round_trip(pad):
    hf = _hf_llama()
    config = llama_config_to_gpt2_config(hf.config)
    config.pad_vocab_size_multiple = pad
    original = hf.state_dict()
    remapped = remap_state_dict_hf_llama(dict(original), config)
    assert remapped.keys() == GPTLMHeadModel(config).state_dict().keys()
    back = inv_remap_state_dict_hf_llama(remapped, config)
    assert back.keys() == original.keys()
    padded = math.ceil(VOCAB / pad) * pad
    for k, v in original.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert back[k].shape[0] == padded and not back[k][VOCAB:].any()
            assert torch.equal(back[k][:VOCAB], v), k
        else:
            assert torch.equal(back[k], v), k


# --------------------------------------------------------------------------------------------- generation
def _model_for(kind, use_flash_attn):
    if kind == "gpt2":
        config = _gpt2_config(use_flash_attn=use_flash_attn)
        return _ours(_hf_gpt2(), config, remap_state_dict_hf_gpt2)
    hf = _hf_llama()
    config = llama_config_to_gpt2_config(hf.config)
    config.use_flash_attn = use_flash_attn
    return _ours(hf, config, remap_state_dict_hf_llama)


@needs_hf
@pytest.mark.parametrize("use_flash_attn", [False, True])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_generate_matches_full_forward(kind, use_flash_attn):
    """Greedy ``generate`` with the KV cache: every step's scores are the full forward's logits at that position
    and every token is the argmax of its scores."""
    model = _model_for(kind, use_flash_attn)
    prompt = _ids(2, 5, seed=1)
    out = model.generate(prompt, max_length=10, top_k=1, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (2, 10) and torch.equal(out.sequences[:, :5], prompt)
    scores = torch.stack(out.scores, dim=1)  # (2, 5, vocab)
    with torch.no_grad():
        full = model(out.sequences[:, :-1]).logits[:, 4:]
    torch.testing.assert_close(scores.float(), full.float(), atol=TOL, rtol=TOL)
    assert torch.equal(out.sequences[:, 5:], scores.argmax(dim=-1))
    assert torch.equal(model.generate(prompt, max_length=10), out.sequences)


@needs_hf
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_chunked_prefill_with_inference_params(kind):
    """Feeding 5, then 3, then 2 tokens through ``inference_params`` (with ``position_ids``) gives the full
    forward's logits."""
    model = _model_for(kind, use_flash_attn=True)
    ids = _ids(1, 10, seed=2)
    params = InferenceParams(max_seqlen=10, max_batch_size=1)
    chunks = []
    with torch.no_grad():
        full = model(ids).logits
        for beg, end in ((0, 5), (5, 8), (8, 10)):
            position_ids = torch.arange(beg, end, device=DEVICE)
            chunks.append(model(ids[:, beg:end], position_ids=position_ids, inference_params=params).logits)
            params.seqlen_offset += end - beg
    torch.testing.assert_close(torch.cat(chunks, dim=1).float(), full.float(), atol=TOL, rtol=TOL)
    caches = model.allocate_inference_cache(3, 16)
    assert set(caches) == {0, 1}
    n_head_kv = getattr(model.config, "n_head_kv", None) or model.config.n_head
    assert caches[0].shape == (3, 16, 2, n_head_kv, 16)


@needs_hf
def test_num_last_tokens_and_output_type():
    model = _model_for("gpt2", use_flash_attn=False)
    ids = _ids(2, 7)
    with torch.no_grad():
        out = model(ids)
        last = model(ids, num_last_tokens=3)
    assert isinstance(out, tuple) and type(out).__name__ == "CausalLMOutput" and out._fields == ("logits",)
    assert out.logits.shape == (2, 7, VOCAB) and last.logits.shape == (2, 3, VOCAB)
    torch.testing.assert_close(last.logits, out.logits[:, -3:], atol=TOL, rtol=TOL)
    hidden = model.transformer(ids)
    assert isinstance(model.transformer, GPTModel) and hidden.shape == (2, 7, 32)
    with pytest.raises(ValueError, match="shape"):
        model(ids[0])


# --------------------------------------------------------------------------- tensor-parallel conversions
def _tp_config(n_head, n_head_kv, activation, hidden=64):
    return SimpleNamespace(
        vocab_size=30,
        pad_vocab_size_multiple=8,
        hidden_size=hidden,
        n_embd=hidden,
        n_head=n_head,
        num_attention_heads=n_head,
        n_head_kv=n_head_kv,
        n_inner=96,
        num_hidden_layers=2,
        n_layer=2,
        activation_function=activation,
    )


def _random_gpt_state_dict(cfg, seed=0, positions=16):
    """A GPTLMHeadModel-shaped state dict (random values) for ``cfg``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    h, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.n_head
    vocab = math.ceil(cfg.vocab_size / cfg.pad_vocab_size_multiple) * cfg.pad_vocab_size_multiple
    fc1 = 2 * cfg.n_inner if cfg.activation_function in ("glu", "swiglu", "geglu") else cfg.n_inner
    qkv = (cfg.n_head + 2 * (cfg.n_head_kv or cfg.n_head)) * head_dim
    sd = {"transformer.embeddings.word_embeddings.weight": r(vocab, h)}
    if positions:
        sd["transformer.embeddings.position_embeddings.weight"] = r(positions, h)
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.layers.{i}"
        sd.update({
            f"{p}.norm1.weight": r(h), f"{p}.norm1.bias": r(h),
            f"{p}.mixer.Wqkv.weight": r(qkv, h), f"{p}.mixer.Wqkv.bias": r(qkv),
            f"{p}.mixer.out_proj.weight": r(h, h), f"{p}.mixer.out_proj.bias": r(h),
            f"{p}.norm2.weight": r(h), f"{p}.norm2.bias": r(h),
            f"{p}.mlp.fc1.weight": r(fc1, h), f"{p}.mlp.fc1.bias": r(fc1),
            f"{p}.mlp.fc2.weight": r(h, cfg.n_inner), f"{p}.mlp.fc2.bias": r(h),
        })  # fmt: skip
    sd.update({"transformer.ln_f.weight": r(h), "transformer.ln_f.bias": r(h), "lm_head.weight": r(vocab, h)})
    return sd


def _layer_output(sd, cfg, i, x, n_head, n_head_kv, with_biases):
    """Attention (non-causal) + MLP of layer ``i`` on x (S, hidden), norms left out, from (possibly sharded)
    weights holding ``n_head`` / ``n_head_kv`` heads; output biases added when present and ``with_biases``."""
    p = f"transformer.layers.{i}"
    head_dim = cfg.hidden_size // cfg.n_head
    qkv = F.linear(x, sd[f"{p}.mixer.Wqkv.weight"], sd[f"{p}.mixer.Wqkv.bias"]).unflatten(-1, (-1, head_dim))
    q, k, v = qkv.split([n_head, n_head_kv, n_head_kv], dim=1)
    if n_head_kv:
        k, v = (t.repeat_interleave(n_head // n_head_kv, dim=1) for t in (k, v))
        attn = torch.einsum("qhd,khd->hqk", q, k).softmax(-1)
        ctx = torch.einsum("hqk,khd->qhd", attn, v).flatten(1)
    else:
        ctx = x.new_zeros(x.shape[0], 0)
    out = F.linear(
        ctx, sd[f"{p}.mixer.out_proj.weight"], sd.get(f"{p}.mixer.out_proj.bias") if with_biases else None
    )
    hidden = F.linear(x, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])
    if cfg.activation_function == "swiglu":
        value, gate = hidden.chunk(2, dim=-1)
        hidden = value * F.silu(gate)
    else:
        hidden = F.gelu(hidden)
    return out + F.linear(
        hidden, sd[f"{p}.mlp.fc2.weight"], sd.get(f"{p}.mlp.fc2.bias") if with_biases else None
    )


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 4), (8, 2), (6, 2)])
def test_shard_combine_round_trip_and_partial_sums(heads, activation):
    """World size 2: combine(shards) is the original; the ranks' layer outputs sum to the full layer's; the
    embeddings split as flash-attn's parallel modules expect. Pure tensor code: runs without transformers."""
    n_head, n_head_kv = heads
    world_size = 2
    cfg = _tp_config(n_head, n_head_kv, activation, hidden=8 * n_head)
    h = cfg.hidden_size
    sd = _random_gpt_state_dict(cfg)
    shards = [shard_state_dict_tp(dict(sd), cfg, world_size, rank) for rank in range(world_size)]
    combined = combine_state_dicts_tp(shards, cfg)
    assert combined.keys() == sd.keys()
    for k in sd:
        assert torch.equal(combined[k], sd[k]), k
    assert all("transformer.layers.0.mixer.out_proj.bias" not in s for s in shards[1:])
    assert all("transformer.layers.1.mlp.fc2.bias" not in s for s in shards[1:])
    assert shards[1]["transformer.embeddings.word_embeddings.weight"].shape == (16, h)
    assert torch.equal(shards[1]["lm_head.weight"], sd["lm_head.weight"][16:])
    assert torch.equal(
        shards[1]["transformer.embeddings.position_embeddings.weight"],
        sd["transformer.embeddings.position_embeddings.weight"][:, h // 2 :],
    )
    assert torch.equal(shards[1]["transformer.ln_f.weight"], sd["transformer.ln_f.weight"])
    x = torch.randn(5, h, generator=torch.Generator().manual_seed(1))
    for i in range(cfg.num_hidden_layers):
        full = _layer_output(sd, cfg, i, x, n_head, n_head_kv, True)
        parts = [
            _layer_output(
                s,
                cfg,
                i,
                x,
                get_dim_for_local_rank(n_head, world_size, rank),
                get_dim_for_local_rank(n_head_kv, world_size, rank),
                rank == 0,
            )
            for rank, s in enumerate(shards)
        ]
        torch.testing.assert_close(sum(parts), full, atol=1e-4, rtol=1e-4)


def test_shard_refuses_indivisible_sizes():
    cfg = _tp_config(8, 8, "gelu")
    with pytest.raises(ValueError, match="divisible"):
        shard_state_dict_tp(_random_gpt_state_dict(cfg), cfg, 3, 0)


@needs_hf
def test_shard_combine_model_state_dict():
    """The real model's state dict (Llama layout: GQA, SwiGLU, no biases, untied head) round-trips."""
    config = llama_config_to_gpt2_config(_llama_hf_config(vocab_size=64))
    sd = GPTLMHeadModel(config).state_dict()
    shards = [shard_state_dict_tp(dict(sd), config, 2, rank) for rank in range(2)]
    assert shards[0]["transformer.layers.0.mixer.Wqkv.weight"].shape == ((2 + 2 * 1) * 16, 64)
    combined = combine_state_dicts_tp(shards, config)
    assert combined.keys() == sd.keys() and all(torch.equal(combined[k], sd[k]) for k in sd)


def test_remap_megatron():
    """Megatron's names and (heads, 3, head_dim) qkv order, built here from a GPT state dict, map back to it."""
    cfg = _tp_config(4, 4, "gelu")
    cfg.pad_vocab_size_multiple = 1
    sd = _random_gpt_state_dict(cfg, positions=0)
    del sd["lm_head.weight"]  # tied
    megatron = {}
    names = {
        "norm1": "input_layernorm",
        "norm2": "post_attention_layernorm",
        "mlp.fc1": "mlp.dense_h_to_4h",
        "mlp.fc2": "mlp.dense_4h_to_h",
        "mixer.out_proj": "self_attention.dense",
        "mixer.Wqkv": "self_attention.query_key_value",
    }
    for k, v in sd.items():
        if k == "transformer.embeddings.word_embeddings.weight":
            megatron["language_model.embedding.word_embeddings.weight"] = v
        elif k.startswith("transformer.ln_f."):
            megatron[k.replace("transformer.ln_f.", "language_model.encoder.final_layernorm.")] = v
        else:
            _, _, i, rest = k.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module == "mixer.Wqkv":  # (3, heads, head_dim) -> (heads, 3, head_dim)
                v = v.unflatten(0, (3, 4, 16)).transpose(0, 1).flatten(0, 2)
            megatron[f"language_model.encoder.layers.{i}.{names[module]}.{kind}"] = v
    out = remap_state_dict_megatron(megatron, cfg)
    assert set(out) == set(sd) | {"lm_head.weight"}
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    assert out["lm_head.weight"] is out["transformer.embeddings.word_embeddings.weight"]


# ------------------------------------------------------------------------------------------ Meta checkpoint
def _meta_from_hf(hf_sd, n_layer, n_head, n_head_kv, head_dim):
    """Meta's names and interleaved q / k rows (the inverse of HF's conversion script's permutation)."""

    def unpermute(w, heads):
        # HF's script: hf = w.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
        rows = w.shape[0]
        index = torch.arange(rows).view(heads, head_dim // 2, 2).transpose(1, 2).reshape(rows)
        meta = torch.empty_like(w)
        meta[index] = w
        return meta

    sd = {
        "tok_embeddings.weight": hf_sd["model.embed_tokens.weight"],
        "norm.weight": hf_sd["model.norm.weight"],
        "output.weight": hf_sd["lm_head.weight"],
        "rope.freqs": torch.ones(head_dim // 2),
    }
    for i in range(n_layer):
        h = f"model.layers.{i}"
        sd.update({
            f"layers.{i}.attention.wq.weight": unpermute(hf_sd[f"{h}.self_attn.q_proj.weight"], n_head),
            f"layers.{i}.attention.wk.weight": unpermute(hf_sd[f"{h}.self_attn.k_proj.weight"], n_head_kv),
            f"layers.{i}.attention.wv.weight": hf_sd[f"{h}.self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf_sd[f"{h}.self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf_sd[f"{h}.mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf_sd[f"{h}.mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf_sd[f"{h}.mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf_sd[f"{h}.input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf_sd[f"{h}.post_attention_layernorm.weight"],
        })  # fmt: skip
    return sd


def _meta_shard(sd, rank, world_size):
    """Meta's model parallelism: embeddings by columns, output / wq / wk / wv / w1 / w3 by rows, wo / w2 by
    columns, norms and rope.freqs replicated."""
    out = {}
    for k, v in sd.items():
        if k == "tok_embeddings.weight" or k.endswith(("wo.weight", "w2.weight")):
            out[k] = v.chunk(world_size, dim=1)[rank].clone()
        elif k == "output.weight" or k.endswith(
            ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")
        ):
            out[k] = v.chunk(world_size, dim=0)[rank].clone()
        else:
            out[k] = v.clone()
    return out


@needs_hf
def test_meta_llama_checkpoint(tmp_path):
    """params.json + two consolidated.*.pth shards -> config, remap per shard, combine: the HF model's weights."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5}
    params["rope_theta"] = 500000.0
    (folder / "params.json").write_text(json.dumps(params))
    config = config_from_checkpoint(tmp_path, "tiny")
    # Meta's MLP width: int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 32; vocabulary 32000 (no tokenizer)
    assert config.intermediate_size == 192 and config.vocab_size == 32000 and config.num_key_value_heads == 2
    assert config.rotary_emb_base == 500000.0
    hf = _hf_llama(vocab_size=32000, intermediate_size=192, rope_theta=500000.0)
    for rank in range(2):
        meta = _meta_from_hf(hf.state_dict(), 2, 4, 2, 16)
        torch.save(_meta_shard(meta, rank, 2), folder / f"consolidated.{rank:02d}.pth")
    hf.config.save_pretrained(tmp_path / "tiny-hf")
    gpt_config = llama_config_to_gpt2_config(config)
    assert gpt_config.rotary_emb_base == 500000.0 and gpt_config.n_inner == 192
    shards = state_dicts_from_checkpoint(tmp_path, "tiny")
    assert len(shards) == 2
    combined = combine_state_dicts_tp(
        [remap_state_dict_meta_llama(s, gpt_config) for s in shards], gpt_config
    )
    expected = remap_state_dict_hf_llama(hf.state_dict(), gpt_config)
    model_sd = GPTLMHeadModel(gpt_config, device="meta").state_dict()
    assert combined.keys() == expected.keys() == model_sd.keys()
    for k in expected:
        assert combined[k].shape == model_sd[k].shape, k
        assert torch.equal(combined[k], expected[k]), k
    hf_config = config_from_checkpoint(tmp_path, "tiny", checkpoint_format="hf")
    assert hf_config.intermediate_size == 192 and hf_config.num_key_value_heads == 2


@needs_hf
def test_llama_config_to_gpt2_config():
    config = llama_config_to_gpt2_config(_llama_hf_config(tie_word_embeddings=True, intermediate_size=100))
    assert isinstance(config, transformers.GPT2Config)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_head_kv, config.n_inner) == (
        64,
        2,
        4,
        2,
        100,
    )
    assert config.activation_function == "swiglu" and config.rms_norm and config.rotary_emb_interleaved
    assert config.rotary_emb_fraction == 1.0 and config.rotary_emb_base == 1000.0 and config.n_positions == 0
    assert not (config.qkv_proj_bias or config.out_proj_bias or config.mlp_fc1_bias or config.mlp_fc2_bias)
    assert config.tie_word_embeddings and config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.0
    model = GPTLMHeadModel(config)  # any MLP width: no rounding to a multiple of 128
    assert model.transformer.layers[0].mlp.fc1.weight.shape == (200, 64)
    assert model.lm_head.weight is model.transformer.embeddings.word_embeddings.weight
    odd = _llama_hf_config()
    odd.head_dim = 8
    with pytest.raises(NotImplementedError, match="head_dim"):
        llama_config_to_gpt2_config(odd)


# ----------------------------------------------------------------------------------- loading checkpoints
@needs_hf
def test_state_dict_from_pretrained_local(tmp_path):
    hf = _hf_gpt2()
    reference = hf.state_dict()
    hf.save_pretrained(tmp_path / "safe")  # model.safetensors
    (tmp_path / "bin").mkdir()
    torch.save(reference, tmp_path / "bin" / "pytorch_model.bin")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for folder in ("safe", "bin", "sharded"):
        sd = state_dict_from_pretrained(tmp_path / folder)
        assert set(sd) <= set(reference) and "transformer.wte.weight" in sd, folder
        assert len(sd) >= len(reference) - 1, folder  # the tied lm_head may be left out
        for k, v in sd.items():
            assert torch.equal(v, reference[k]), (folder, k)
    half = state_dict_from_pretrained(str(tmp_path / "safe"), device="cpu", dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())
    torch.testing.assert_close(
        half["transformer.wte.weight"].float(), reference["transformer.wte.weight"], atol=1e-3, rtol=1e-3
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="not found"):
        state_dict_from_pretrained(tmp_path / "empty")
    # a local directory: the checkpoint is recognized by its keys
    config = _gpt2_config()
    model = GPTLMHeadModel.from_pretrained(str(tmp_path / "safe"), config, device=DEVICE, dtype=DTYPE).eval()
    expected = _ours(hf, config, remap_state_dict_hf_gpt2)
    ids = _ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, atol=TOL, rtol=TOL)


@needs_hf
def test_state_dict_from_pretrained_hf_cache_offline(tmp_path):
    """A Hub id read from the HF cache with the network off (HF_HUB_OFFLINE=1): the weights and, through the
    ``gpt2`` name prefix, ``from_pretrained``."""
    hf = _hf_gpt2()
    hf.save_pretrained(tmp_path / "saved")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--gpt2-fa-plus-tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(tmp_path / "saved" / name, snapshot / name)
    ids = _ids(1, 6).cpu()
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(
        """
        import sys, torch
        from transformers import GPT2Config
        from flash_attn.models.gpt import GPTLMHeadModel
        from flash_attn.utils.pretrained import state_dict_from_pretrained
        out = sys.argv[1]
        sd = state_dict_from_pretrained("gpt2-fa-plus-tiny")
        config = GPT2Config.from_pretrained("gpt2-fa-plus-tiny")
        model = GPTLMHeadModel.from_pretrained("gpt2-fa-plus-tiny", config).eval()
        with torch.no_grad():
            logits = model(torch.load(out + "/ids.pt")).logits
        try:
            state_dict_from_pretrained("gpt2-not-in-the-cache")
            missing = "no error"
        except OSError as exc:
            missing = str(exc)
        torch.save({"sd": sd, "logits": logits, "missing": missing}, out + "/result.pt")
        """
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "FA_PLUS_SILENCE_CONFLICT": "1",
        "CUDA_VISIBLE_DEVICES": "",  # the CPU (interpreter) in the child
        "TRITON_INTERPRET": "1",
    }
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=300)
    result = torch.load(tmp_path / "result.pt")
    reference = hf.state_dict()
    assert "transformer.wte.weight" in result["sd"]
    assert all(torch.equal(v, reference[k]) for k, v in result["sd"].items())
    assert "not found" in result["missing"]
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(result["logits"], expected, atol=1e-4, rtol=1e-4)


@needs_hf
def test_load_state_dict_converts_the_old_norm_layout():
    """flash-attn's old checkpoints: ln_0 before the first block, each block's norms after its sub-layers."""
    config = _gpt2_config(n_layer=3)
    model = randomize(GPTLMHeadModel(config), 3)
    current = model.state_dict()
    old = {k: v.clone() for k, v in current.items() if ".norm" not in k and "ln_f" not in k}
    old["transformer.ln_0.weight"] = current["transformer.layers.0.norm1.weight"].clone()
    old["transformer.ln_0.bias"] = current["transformer.layers.0.norm1.bias"].clone()
    for i in range(3):
        after = f"transformer.layers.{i + 1}.norm1" if i < 2 else "transformer.ln_f"
        for kind in ("weight", "bias"):
            old[f"transformer.layers.{i}.norm1.{kind}"] = current[
                f"transformer.layers.{i}.norm2.{kind}"
            ].clone()
            old[f"transformer.layers.{i}.norm2.{kind}"] = current[f"{after}.{kind}"].clone()
    keys_before = set(old)
    fresh = GPTLMHeadModel(config)
    fresh.load_state_dict(old)
    assert set(old) == keys_before  # the caller's dict is left alone
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, current[k]), k


# --------------------------------------------------------------------------------- construction and init
@needs_hf
def test_init_weights():
    config = _gpt2_config(n_embd=256, n_head=4, n_layer=4, n_inner=512, initializer_range=0.05)
    model = GPTLMHeadModel(config)
    layer = model.transformer.layers[1]
    assert abs(layer.mixer.Wqkv.weight.std().item() - 0.05) < 0.003
    assert abs(layer.mlp.fc1.weight.std().item() - 0.05) < 0.003
    for p in (layer.mixer.out_proj.weight, layer.mlp.fc2.weight):  # rescaled by 1 / sqrt(2 * n_layer)
        assert abs(p.std().item() - 0.05 / math.sqrt(8)) < 0.001
    assert not layer.mixer.Wqkv.bias.any() and not layer.mlp.fc2.bias.any()
    assert layer.mixer.Wqkv.weight._optim == {"lr_multiplier": 1.0}
    assert abs(model.transformer.embeddings.word_embeddings.weight.std().item() - 0.05) < 0.01
    assert model.lm_head.weight is model.transformer.embeddings.word_embeddings.weight
    lin = torch.nn.Linear(64, 64)
    _init_weights(lin, n_layer=2, initializer_range=0.1, mup_width_scale=4.0)
    assert abs(lin.weight.std().item() - 0.2) < 0.02 and lin.weight._optim["lr_multiplier"] == 4.0
    # dropouts: embd_pdrop before the first layer's mixer, resid_pdrop elsewhere, attn_pdrop in the attention
    drops = GPTLMHeadModel(_gpt2_config(embd_pdrop=0.3, resid_pdrop=0.2, attn_pdrop=0.1)).transformer
    assert [layer.dropout1.p for layer in drops.layers] == [0.3, 0.2]
    assert [layer.dropout2.p for layer in drops.layers] == [0.2, 0.2] and drops.drop_f.p == 0.2
    assert drops.layers[1].mixer.inner_attn.drop.p == 0.1
    # rotary: one module shared by every layer
    rotary = GPTLMHeadModel(_gpt2_config(rotary_emb_fraction=0.5, n_positions=0))
    mixers = [layer.mixer for layer in rotary.transformer.layers]
    assert mixers[0].rotary_emb_dim == 8 and mixers[1].rotary_emb is mixers[0].rotary_emb


@needs_hf
@pytest.mark.parametrize("layout", ["block", "parallel_rms", "parallel_tied"])
def test_fused_final_norm_matches_unfused(layout):
    """``fused_dropout_add_ln``: the fused dropout + add + norm (blocks and ``ln_f``) vs the unfused path."""
    kw = {
        "block": {},
        "parallel_rms": {"parallel_block": True, "rms_norm": True},
        "parallel_tied": {
            "parallel_block": True,
            "parallel_block_tied_norm": True,
            "activation_function": "gelu",
        },
    }[layout]
    unfused = randomize(GPTLMHeadModel(_gpt2_config(**kw)), 4).to(device=DEVICE, dtype=DTYPE).eval()
    fused = (
        GPTLMHeadModel(_gpt2_config(fused_dropout_add_ln=True, **kw)).to(device=DEVICE, dtype=DTYPE).eval()
    )
    fused.load_state_dict(unfused.state_dict())
    ids = _ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits.float(), unfused(ids).logits.float(), atol=TOL, rtol=TOL)


@needs_hf
def test_postnorm_and_mlp_variants():
    """prenorm=False (no ln_f), the other activations, no biases, ``word_embed_proj_dim``, ``norm_head``."""
    for activation in ("relu", "sqrelu", "gelu", "geglu", "glu"):
        config = _gpt2_config(prenorm=False, activation_function=activation, mlp_fc1_bias=False)
        model = GPTLMHeadModel(config).to(DEVICE).eval()
        assert not hasattr(model.transformer, "ln_f") and model.transformer.layers[0].mlp.fc1.bias is None
        with torch.no_grad():
            assert torch.isfinite(model(_ids(1, 4)).logits).all()
    config = _gpt2_config(
        word_embed_proj_dim=16, norm_head=True, tie_word_embeddings=False, lm_head_bias=True
    )
    model = GPTLMHeadModel(config).to(DEVICE).eval()
    assert model.project_out.weight.shape == (16, 32) and model.lm_head.weight.shape == (VOCAB, 16)
    ids = _ids(1, 4)
    with torch.no_grad():
        hidden = model.project_out(model.transformer(ids))
        expected = F.linear(hidden, F.normalize(model.lm_head.weight), model.lm_head.bias)
        torch.testing.assert_close(model(ids).logits, expected)


@needs_hf
def test_fused_dense_sqrelu_dense_matches_plain_mlp():
    """``fused_dense_sqrelu_dense=True`` builds flash_attn.ops.triton.mlp.FusedDenseSqreluDense blocks whose
    state dict loads into the plain sqrelu ``Mlp`` model and gives its logits and gradients."""
    from flash_attn.ops.triton.mlp import FusedDenseSqreluDense

    torch.manual_seed(3)
    fused = GPTLMHeadModel(_gpt2_config(fused_dense_sqrelu_dense=True, activation_function="sqrelu"))
    plain = GPTLMHeadModel(_gpt2_config(activation_function="sqrelu"))
    assert all(isinstance(layer.mlp, FusedDenseSqreluDense) for layer in fused.transformer.layers)
    plain.load_state_dict(fused.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9))
    logits = [model.to(torch.float64).eval()(ids).logits for model in (fused, plain)]
    torch.testing.assert_close(logits[0], logits[1])
    grads = []
    for model, out in zip((fused, plain), logits, strict=True):
        out.square().mean().backward()
        grads.append(model.transformer.layers[0].mlp.fc1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


@needs_hf
def test_refusals():
    """What is refused (tensor parallelism and fused_mlp: test_models_gpt_parallel.py)."""
    config = _gpt2_config()
    with pytest.raises(ValueError, match="process_group"):  # no process group to shard for
        GPTLMHeadModel.from_pretrained("gpt2", config, world_size=2, rank=0)
    with pytest.raises(ValueError, match="GPT2Config"):
        GPTLMHeadModel(_llama_hf_config())
    with pytest.raises(ValueError, match="activation_function"):
        GPTLMHeadModel(_gpt2_config(activation_function="tanh"))
    with pytest.raises(ValueError, match="prenorm"):
        GPTLMHeadModel(_gpt2_config(parallel_block=True, prenorm=False))
    # fused_bias_fc is accepted (nn.Linear projections, as flash-attn 2.8 builds them)
    assert isinstance(
        GPTLMHeadModel(_gpt2_config(fused_bias_fc=True)).transformer.layers[0].mixer.Wqkv, torch.nn.Linear
    )
    # softmax scale: mup and inverse-layer-index scaling
    scaled = create_mixer_cls(_gpt2_config(scale_attn_by_inverse_layer_idx=True, mup_attn_multiplier=2.0), 3)
    assert scaled.keywords["softmax_scale"] == pytest.approx(2.0 / 4 / math.sqrt(16))
    assert create_mixer_cls(_gpt2_config(scale_attn_weights=False), 0).keywords["softmax_scale"] == 1.0


def test_imports_without_transformers():
    """The modules import and convert state dicts with transformers unavailable; what needs it says so."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None  # import transformers -> ImportError
        from types import SimpleNamespace
        import torch
        from flash_attn.models.gpt import GPTLMHeadModel, remap_state_dict_hf_gpt2
        from flash_attn.models.llama import llama_config_to_gpt2_config
        from flash_attn.utils.pretrained import state_dict_from_pretrained
        cfg = SimpleNamespace(vocab_size=4, num_hidden_layers=0)
        assert list(remap_state_dict_hf_gpt2({"wte.weight": torch.ones(4, 2)}, cfg)) == [
            "transformer.embeddings.word_embeddings.weight", "lm_head.weight"]
        for call in (lambda: GPTLMHeadModel(cfg), lambda: llama_config_to_gpt2_config(cfg),
                     lambda: state_dict_from_pretrained("gpt2")):
            try:
                call()
            except ImportError as exc:
                assert "pip install transformers" in str(exc), exc
            else:
                raise AssertionError("no ImportError")
        """
    )
    env = {**os.environ, "FA_PLUS_SILENCE_CONFLICT": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
