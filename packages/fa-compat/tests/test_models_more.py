"""Tests for flash-attn's remaining model files: flash_attn.models.{gpt_neox, gptj, opt, falcon, bigcode, btlm,
baichuan, vit} (Triton; interpreter on CPU).

Tiny random Hugging Face models (GPT-NeoX, GPT-J, OPT, Falcon, GPTBigCode), built from configs (nothing
downloaded), are converted with ``<family>_config_to_gpt2_config`` and ``remap_state_dict_hf_<family>`` into
``GPTLMHeadModel`` (strict load); the logits follow the 2x rule against the HF model in float64 (the truth):
``|ours - truth| <= 2 * |HF - truth| + slack``. BTLM and Baichuan are remote-code models: their remaps are
checked on synthetic state dicts against the expected layout, and the converted models against small float64
references written here from the models' definitions (Baichuan-7B also against HF Llama, its architecture).
The BigCode inverse remap round-trips. ``VisionTransformer`` is checked against a plain-PyTorch ViT (timm's
layout, loaded from a timm-style state dict) and against timm when installed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fa_compat_hf import check_2x, needs_hf, randomize, tiny_hf, transformers  # noqa: E402
from fa_compat_testutils import DEVICE  # noqa: E402

from flash_attn.models.baichuan import baichuan_config_to_gpt2_config, remap_state_dict_hf_baichuan  # noqa: E402
from flash_attn.models.bigcode import (  # noqa: E402
    bigcode_config_to_gpt2_config,
    inv_remap_state_dict_hf_bigcode,
    remap_state_dict_hf_bigcode,
)
from flash_attn.models.btlm import btlm_config_to_gpt2_config, remap_state_dict_hf_btlm  # noqa: E402
from flash_attn.models.falcon import falcon_config_to_gpt2_config, remap_state_dict_hf_falcon  # noqa: E402
from flash_attn.models.gpt_neox import gpt_neox_config_to_gpt2_config, remap_state_dict_hf_gpt_neox  # noqa: E402
from flash_attn.models.gptj import gptj_config_to_gpt2_config, remap_state_dict_hf_gptj  # noqa: E402
from flash_attn.models.opt import opt_config_to_gpt2_config, remap_state_dict_hf_opt  # noqa: E402
from flash_attn.models.vit import VisionTransformer, init_weights_vit_timm, vit_base_patch16_224  # noqa: E402
from flash_attn.modules.mha import get_alibi_slopes  # noqa: E402

if transformers is not None:
    from flash_attn.models.gpt import GPTLMHeadModel

DTYPE = torch.float32  # these comparisons run in float32 on every device
VOCAB = 50


# ------------------------------------------------------------------------------------------------ helpers
def _ids(batch=2, seqlen=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seqlen), generator=g).to(DEVICE)


def _load_ours(state_dict, config, remap):
    model = GPTLMHeadModel(config, device=DEVICE)
    remapped = remap(state_dict, config)
    result = model.load_state_dict(remapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.to(dtype=DTYPE).eval()


def _compare_with_hf(hf_model, config, remap, input_ids=None):
    """The 2x rule for the logits of the converted model against the HF model (float32 vs float64 truth)."""
    input_ids = _ids() if input_ids is None else input_ids
    hf_model = hf_model.eval()
    truth_model = copy.deepcopy(hf_model).to(device=DEVICE, dtype=torch.float64)
    hf_lowp = copy.deepcopy(hf_model).to(device=DEVICE, dtype=DTYPE)
    ours = _load_ours(hf_model.state_dict(), config, remap)
    with torch.no_grad():
        truth = truth_model(input_ids).logits.double()
        hf = hf_lowp(input_ids).logits
        logits = ours(input_ids).logits[..., :VOCAB]
    assert logits.shape == truth.shape
    check_2x(logits, hf, truth, dtype=DTYPE)
    return ours


# ----------------------------------------------------------------------------------- HF families (2x rule)
def _tiny_hf(config_cls, model_cls, **kw):
    """A tiny random HF causal LM (eager attention) of the transformers classes named; ``kw``: config
    arguments."""
    kw = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, **kw}
    return tiny_hf(getattr(transformers, model_cls), getattr(transformers, config_cls)(**kw))


def _gptj_head_bias_padded(hf, ours):
    assert ours.lm_head.bias.shape == (56,) and not ours.lm_head.bias[VOCAB:].any()


def _opt_positions_offset(hf, ours):
    """OPT's position table starts at row 2 (its padding offset)."""
    table = hf.state_dict()["model.decoder.embed_positions.weight"]
    assert torch.equal(ours.transformer.embeddings.position_embeddings.weight.detach(), table[2:])


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family: its transformers config and causal-LM classes, a tiny size in its config's
    names, flash-attn's conversions of its config and state dict, the input ids of the comparison and a check
    of the converted model after it."""

    config_cls: str
    model_cls: str
    size: dict
    to_gpt2: Callable
    remap: Callable
    input_ids: Callable = _ids
    check_converted: Callable | None = None

    def tiny_hf(self, **variant):
        return _tiny_hf(self.config_cls, self.model_cls, **{**self.size, **variant})


FAMILIES = {
    "gpt_neox": Family(
        "GPTNeoXConfig", "GPTNeoXForCausalLM",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
         "max_position_embeddings": 64},
        gpt_neox_config_to_gpt2_config, remap_state_dict_hf_gpt_neox,
    ),
    "gptj": Family(
        "GPTJConfig", "GPTJForCausalLM", {"n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8},
        gptj_config_to_gpt2_config, remap_state_dict_hf_gptj, check_converted=_gptj_head_bias_padded,
    ),
    "opt": Family(
        "OPTConfig", "OPTForCausalLM",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 96,
         "max_position_embeddings": 32, "pad_token_id": 1, "eos_token_id": 0},
        opt_config_to_gpt2_config, remap_state_dict_hf_opt,
        input_ids=lambda: _ids(2, 9, seed=1).clamp(min=2),  # no padding token
        check_converted=_opt_positions_offset,
    ),
    "falcon": Family(
        "FalconConfig", "FalconForCausalLM",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64},
        falcon_config_to_gpt2_config, remap_state_dict_hf_falcon,
    ),
    "bigcode": Family(
        "GPTBigCodeConfig", "GPTBigCodeForCausalLM", {"n_positions": 32, "n_embd": 64, "n_layer": 2, "n_head": 4},
        bigcode_config_to_gpt2_config, remap_state_dict_hf_bigcode,
    ),
}  # fmt: skip


class Case(NamedTuple):
    """One variant of a family: its HF config arguments, the converted config's expected attributes (values
    and types) and settings changed on the converted config before the load."""

    family: str
    hf: dict
    expect: dict
    settings: dict = {}


_NEOX_ROPE = {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}
HF_CASES = {
    "gpt_neox-parallel": Case(
        "gpt_neox",
        hf={"use_parallel_residual": True, "rope_parameters": _NEOX_ROPE},
        expect={"rotary_emb_fraction": 0.5, "rotary_emb_base": 1000.0, "parallel_block": True,
                "parallel_block_tied_norm": False, "qkv_proj_bias": True},
        settings={"pad_vocab_size_multiple": 16},
    ),
    "gpt_neox-sequential": Case(
        "gpt_neox",
        hf={"use_parallel_residual": False, "rope_parameters": _NEOX_ROPE, "attention_bias": False,
            "tie_word_embeddings": True, "hidden_act": "gelu_fast"},
        expect={"rotary_emb_fraction": 0.5, "rotary_emb_base": 1000.0, "parallel_block": False,
                "parallel_block_tied_norm": False, "qkv_proj_bias": False},
        settings={"pad_vocab_size_multiple": 16},
    ),
    "gptj": Case(
        "gptj",
        hf={},
        expect={"rotary_emb_fraction": 0.5, "rotary_emb_interleaved": True, "lm_head_bias": True},
        settings={"pad_vocab_size_multiple": 8},
    ),
    "opt-prenorm_project": Case(
        "opt", hf={"word_embed_proj_dim": 32}, expect={"prenorm": True, "word_embed_proj_dim": 32}
    ),
    "opt-postnorm_nobias": Case(
        "opt",
        hf={"do_layer_norm_before": False, "enable_bias": False},
        expect={"prenorm": False, "word_embed_proj_dim": None},
    ),
    # Falcon-7B: multi-query, parallel attention, one norm, no biases
    "falcon-7b": Case(
        "falcon",
        hf={"multi_query": True, "parallel_attn": True, "bias": False},
        expect={"n_head_kv": 1, "parallel_block": True, "parallel_block_tied_norm": True},
    ),
    # Falcon-40B: new decoder architecture, grouped key / value heads, two norms
    "falcon-40b": Case(
        "falcon",
        hf={"new_decoder_architecture": True, "num_kv_heads": 2, "bias": False},
        expect={"n_head_kv": 2, "parallel_block": True, "parallel_block_tied_norm": False},
    ),
    # Falcon-RW: multi-head, sequential blocks, biases
    "falcon-rw": Case(
        "falcon",
        hf={"multi_query": False, "parallel_attn": False, "bias": True},
        expect={"n_head_kv": 4, "parallel_block": False, "parallel_block_tied_norm": True},
    ),
    "bigcode-multi_query": Case(
        "bigcode", hf={"multi_query": True}, expect={"multi_query": True, "model_type": "gpt_bigcode"}
    ),
    "bigcode-multi_head": Case(
        "bigcode", hf={"multi_query": False}, expect={"multi_query": False, "model_type": "gpt_bigcode"}
    ),
}  # fmt: skip


@needs_hf
@pytest.mark.parametrize("case", list(HF_CASES))
def test_family_matches_hf(case):
    """``<family>_config_to_gpt2_config`` + ``remap_state_dict_hf_<family>`` of a tiny random HF model: the
    converted config's attributes, then the 2x rule for the logits."""
    case = HF_CASES[case]
    family = FAMILIES[case.family]
    hf = family.tiny_hf(**case.hf)
    config = family.to_gpt2(hf.config)
    got = {attr: getattr(config, attr) for attr in case.expect}
    assert got == case.expect
    assert {attr: type(v) for attr, v in got.items()} == {attr: type(v) for attr, v in case.expect.items()}
    for attr, value in case.settings.items():
        setattr(config, attr, value)
    ours = _compare_with_hf(hf, config, family.remap, family.input_ids())
    if family.check_converted is not None:
        family.check_converted(hf, ours)


# ---------------------------------------------------------------------------------------------- GPT-NeoX
@needs_hf
def test_from_pretrained_by_family_prefix(monkeypatch):
    """``GPTLMHeadModel.from_pretrained`` converts a checkpoint named with one of flash-attn's family prefixes
    (here ``EleutherAI/pythia-``) with that family's remap (the checkpoint read is replaced: no network)."""
    import flash_attn.models.gpt as gpt_module

    hf = FAMILIES["gpt_neox"].tiny_hf().eval()
    names = []

    def fake_read(name, device=None, dtype=None):
        names.append(name)
        return {k: v.clone() for k, v in hf.state_dict().items()}

    monkeypatch.setattr(gpt_module, "state_dict_from_pretrained", fake_read)
    config = gpt_neox_config_to_gpt2_config(hf.config)
    model = GPTLMHeadModel.from_pretrained("EleutherAI/pythia-tiny", config, device=DEVICE).to(DTYPE).eval()
    assert names == ["EleutherAI/pythia-tiny"]
    expected = _load_ours(hf.state_dict(), config, remap_state_dict_hf_gpt_neox)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits)


def test_gpt_neox_remap_layout():
    """Per-head [q; k; v] rows -> [all q; all k; all v]; transformers 4 names and buffers."""
    heads, head_dim, hidden = 2, 3, 6
    config = SimpleNamespace(n_layer=1, n_embd=hidden, n_head=heads, tie_word_embeddings=False)
    qkv = torch.arange(3 * hidden * hidden, dtype=torch.float32).reshape(3 * hidden, hidden)
    sd = {
        "gpt_neox.embed_in.weight": torch.randn(VOCAB, hidden),
        "embed_out.weight": torch.randn(VOCAB, hidden),
        "gpt_neox.layers.0.attention.query_key_value.weight": qkv,
        "gpt_neox.layers.0.attention.query_key_value.bias": qkv[:, 0],
        "gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 4, 4),
        "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
        "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(2),
    }
    out = remap_state_dict_hf_gpt_neox(sd, config)
    assert set(out) == {
        "transformer.embeddings.word_embeddings.weight",
        "lm_head.weight",
        "transformer.layers.0.mixer.Wqkv.weight",
        "transformer.layers.0.mixer.Wqkv.bias",
    }
    wqkv = out["transformer.layers.0.mixer.Wqkv.weight"]
    for which in range(3):  # q, k, v
        for h in range(heads):
            src = qkv[(h * 3 + which) * head_dim : (h * 3 + which + 1) * head_dim]
            dst = wqkv[(which * heads + h) * head_dim : (which * heads + h + 1) * head_dim]
            assert torch.equal(src, dst)
    assert torch.equal(out["transformer.layers.0.mixer.Wqkv.bias"], wqkv[:, 0])
    assert torch.equal(out["lm_head.weight"], sd["embed_out.weight"])


# --------------------------------------------------------------------------------------------------- OPT
@needs_hf
def test_opt_config_refusals():
    with pytest.raises(ValueError, match="layerdrop"):
        opt_config_to_gpt2_config(transformers.OPTConfig(layerdrop=0.1))
    with pytest.raises(ValueError, match="elementwise_affine"):
        opt_config_to_gpt2_config(transformers.OPTConfig(layer_norm_elementwise_affine=False))


def test_opt_remap_metaseq_names():
    """``decoder.`` without ``model.`` and the final ``layer_norm`` name map like HF's."""
    config = SimpleNamespace(n_layer=1)
    sd = {
        "decoder.embed_tokens.weight": torch.randn(VOCAB, 4),
        "decoder.embed_positions.weight": torch.randn(10, 4),
        "decoder.layer_norm.weight": torch.randn(4),
        "decoder.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
        "decoder.layers.0.self_attn.k_proj.weight": torch.randn(4, 4),
        "decoder.layers.0.self_attn.v_proj.weight": torch.randn(4, 4),
        "decoder.layers.0.fc2.bias": torch.randn(4),
    }
    out = remap_state_dict_hf_opt(sd, config)
    assert torch.equal(out["transformer.ln_f.weight"], sd["decoder.layer_norm.weight"])
    assert out["transformer.embeddings.position_embeddings.weight"].shape == (8, 4)
    assert torch.equal(out["transformer.layers.0.mlp.fc2.bias"], sd["decoder.layers.0.fc2.bias"])
    assert out["transformer.layers.0.mixer.Wqkv.weight"].shape == (12, 4)
    assert out["lm_head.weight"] is out["transformer.embeddings.word_embeddings.weight"]


# ------------------------------------------------------------------------------------------------ Falcon
def test_falcon_regroup_layout():
    """Per group: the group's q heads, its k head, its v head -> [all q; all k; all v]."""
    n_head, n_head_kv = 4, 2  # head_dim 1
    config = SimpleNamespace(
        n_layer=1, n_head=n_head, n_head_kv=n_head_kv, n_embd=4, tie_word_embeddings=True
    )
    # rows: group 0 = q0 q1 k0 v0, group 1 = q2 q3 k1 v1 (labelled q: 0-3, k: 10-11, v: 20-21)
    labels = torch.tensor([0, 1, 10, 20, 2, 3, 11, 21], dtype=torch.float32)
    sd = {
        "transformer.word_embeddings.weight": torch.randn(VOCAB, 4),
        "transformer.h.0.self_attention.query_key_value.weight": labels[:, None].expand(-1, 4).clone(),
        "transformer.h.0.self_attention.query_key_value.bias": labels.clone(),
    }
    out = remap_state_dict_hf_falcon(sd, config)
    expected = torch.tensor([0, 1, 2, 3, 10, 11, 20, 21], dtype=torch.float32)
    assert torch.equal(out["transformer.layers.0.mixer.Wqkv.bias"], expected)
    assert torch.equal(out["transformer.layers.0.mixer.Wqkv.weight"][:, 0], expected)
    assert out["lm_head.weight"] is out["transformer.embeddings.word_embeddings.weight"]


@needs_hf
def test_falcon_config_alibi_refused():
    with pytest.raises(ValueError, match="alibi"):
        falcon_config_to_gpt2_config(transformers.FalconConfig(alibi=True))


# ----------------------------------------------------------------------------------------------- BigCode
@needs_hf
@pytest.mark.parametrize("multi_query", [True, False])
@pytest.mark.parametrize("pad", [1, 16])
def test_bigcode_inv_remap_round_trip(multi_query, pad):
    hf = FAMILIES["bigcode"].tiny_hf(multi_query=multi_query)
    config = bigcode_config_to_gpt2_config(hf.config)
    config.pad_vocab_size_multiple = pad
    original = hf.state_dict()
    remapped = remap_state_dict_hf_bigcode(original, config)
    assert remapped.keys() == GPTLMHeadModel(config).state_dict().keys()
    assert remapped["transformer.embeddings.word_embeddings.weight"].shape[0] == math.ceil(VOCAB / pad) * pad
    back = inv_remap_state_dict_hf_bigcode(remapped, config)
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(back[key], value), key


# -------------------------------------------------------------------------------------------------- BTLM
def _btlm_config(alibi):
    return SimpleNamespace(
        vocab_size=VOCAB,
        position_embedding_type="alibi" if alibi else "learned",
        n_positions=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        n_inner=48,
        activation_function="swiglu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
        mup_width_scale=0.5,
        mup_embeddings_scale=2.0,
        mup_output_alpha=1.5,
        mup_scale_qk_dot_by_d=True,
    )


def _btlm_state_dict(cfg, seed=0):
    """BTLM's names and GPT-2's ``Conv1D`` (in, out) weights."""
    g = torch.Generator().manual_seed(seed)
    d, inner = cfg.hidden_size, cfg.n_inner

    def r(*shape, scale=0.1, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    sd = {
        "transformer.wte.weight": r(cfg.vocab_size, d),
        "transformer.ln_f.weight": r(d, scale=0.2, base=1.0),
    }
    sd["transformer.ln_f.bias"] = r(d)
    if cfg.position_embedding_type == "alibi":
        sd["transformer.relative_pe.slopes"] = r(cfg.num_attention_heads)
    else:
        sd["transformer.wpe.weight"] = r(cfg.n_positions, d)
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}"
        for n in (1, 2):
            sd[f"{p}.ln_{n}.weight"], sd[f"{p}.ln_{n}.bias"] = r(d, scale=0.2, base=1.0), r(d)
        sd[f"{p}.attn.c_attn.weight"], sd[f"{p}.attn.c_attn.bias"] = r(d, 3 * d), r(3 * d)
        sd[f"{p}.attn.c_proj.weight"], sd[f"{p}.attn.c_proj.bias"] = r(d, d), r(d)
        sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"] = r(d, inner), r(inner)
        sd[f"{p}.mlp.c_fc2.weight"], sd[f"{p}.mlp.c_fc2.bias"] = r(d, inner), r(inner)
        sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"] = r(inner, d), r(d)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def _attention(q, k, v, scale, alibi):
    """Causal attention of (B, S, H, D) heads in float64, optional ALiBi (bias ``-slope * (i - j)``)."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    seqlen = q.shape[1]
    pos = torch.arange(seqlen, dtype=torch.float64)
    if alibi:
        slopes = torch.tensor(get_alibi_slopes(q.shape[2]), dtype=torch.float64)
        scores = scores - slopes[:, None, None] * (pos[:, None] - pos[None, :])
    scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).flatten(2)


def _btlm_reference(sd, cfg, input_ids):
    """BTLM's forward (GPT-2 with SwiGLU, ALiBi or learned positions, muP scales) in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim, eps = d // heads, cfg.layer_norm_epsilon
    alibi = cfg.position_embedding_type == "alibi"
    x = sd["transformer.wte.weight"][input_ids]
    if not alibi:
        x = x + sd["transformer.wpe.weight"][: input_ids.shape[1]]
    x = x * cfg.mup_embeddings_scale
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}"
        h = F.layer_norm(x, (d,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"], eps)
        qkv = h @ sd[f"{p}.attn.c_attn.weight"] + sd[f"{p}.attn.c_attn.bias"]
        q, k, v = (t.unflatten(-1, (heads, head_dim)) for t in qkv.split(d, dim=-1))
        scale = 1.0 / head_dim if cfg.mup_scale_qk_dot_by_d else head_dim**-0.5
        a = _attention(q, k, v, scale, alibi)
        x = x + a @ sd[f"{p}.attn.c_proj.weight"] + sd[f"{p}.attn.c_proj.bias"]
        h = F.layer_norm(x, (d,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"], eps)
        value = h @ sd[f"{p}.mlp.c_fc.weight"] + sd[f"{p}.mlp.c_fc.bias"]
        gate = h @ sd[f"{p}.mlp.c_fc2.weight"] + sd[f"{p}.mlp.c_fc2.bias"]
        x = x + (value * F.silu(gate)) @ sd[f"{p}.mlp.c_proj.weight"] + sd[f"{p}.mlp.c_proj.bias"]
    x = F.layer_norm(x, (d,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], eps)
    return (x @ sd["transformer.wte.weight"].t()) * cfg.mup_output_alpha * cfg.mup_width_scale


def test_btlm_remap_layout():
    cfg = _btlm_config(alibi=True)
    sd = _btlm_state_dict(cfg)
    config = SimpleNamespace(n_layer=2, pad_vocab_size_multiple=8)
    out = remap_state_dict_hf_btlm(sd, config)
    assert "transformer.relative_pe.slopes" not in out and not any(".h." in k for k in out)
    assert out["transformer.embeddings.word_embeddings.weight"].shape == (56, 32)
    assert out["lm_head.weight"] is out["transformer.embeddings.word_embeddings.weight"]
    p, q = "transformer.h.1", "transformer.layers.1"
    fc1 = out[f"{q}.mlp.fc1.weight"]
    assert torch.equal(fc1, torch.cat([sd[f"{p}.mlp.c_fc.weight"].t(), sd[f"{p}.mlp.c_fc2.weight"].t()]))
    assert torch.equal(
        out[f"{q}.mlp.fc1.bias"], torch.cat([sd[f"{p}.mlp.c_fc.bias"], sd[f"{p}.mlp.c_fc2.bias"]])
    )
    assert torch.equal(out[f"{q}.mlp.fc2.weight"], sd[f"{p}.mlp.c_proj.weight"].t())
    assert torch.equal(out[f"{q}.mixer.Wqkv.weight"], sd[f"{p}.attn.c_attn.weight"].t())
    assert torch.equal(out[f"{q}.mixer.Wqkv.bias"], sd[f"{p}.attn.c_attn.bias"])
    assert torch.equal(out[f"{q}.mixer.out_proj.weight"], sd[f"{p}.attn.c_proj.weight"].t())
    assert torch.equal(out[f"{q}.norm2.bias"], sd[f"{p}.ln_2.bias"])


@needs_hf
@pytest.mark.parametrize("alibi", [False, True])
def test_btlm_matches_reference(alibi):
    cfg = _btlm_config(alibi)
    config = btlm_config_to_gpt2_config(cfg)
    assert (
        config.use_alibi == alibi
        and config.use_flash_attn == alibi
        and config.n_positions == (0 if alibi else 32)
    )
    sd = _btlm_state_dict(cfg)
    ours = _load_ours(sd, config, remap_state_dict_hf_btlm)
    input_ids = _ids()
    with torch.no_grad():
        logits = ours(input_ids).logits.double()
    truth = _btlm_reference(sd, cfg, input_ids.cpu()).to(logits.device)
    torch.testing.assert_close(logits, truth, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- Baichuan
def _baichuan_config(hidden_size=64, vocab_size=VOCAB):
    return SimpleNamespace(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )


def _llama_to_baichuan(sd):
    """A HF Llama state dict (MHA) in Baichuan's names: ``W_pack = [q; k; v]``."""
    out = {}
    for key, value in sd.items():
        if key.endswith("self_attn.q_proj.weight"):
            prefix = key.removesuffix("q_proj.weight")
            out[prefix + "W_pack.weight"] = torch.cat(
                [sd[prefix + "q_proj.weight"], sd[prefix + "k_proj.weight"], sd[prefix + "v_proj.weight"]]
            )
        elif not key.endswith(("k_proj.weight", "v_proj.weight")):
            out[key] = value
    return out


@needs_hf
def test_baichuan_7b_matches_hf_llama():
    """Baichuan-7B is Llama (rotated-halves rotary, base 10000) with the q / k / v rows packed in ``W_pack``."""
    cfg = _baichuan_config()
    hf = _tiny_hf(
        "LlamaConfig", "LlamaForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=64,
        tie_word_embeddings=False,
    ).eval()  # fmt: skip
    config = baichuan_config_to_gpt2_config(cfg)
    assert config.rotary_emb_fraction == 1.0 and not config.use_alibi and not config.norm_head
    input_ids = _ids()
    truth_model = copy.deepcopy(hf).to(device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        truth = truth_model(input_ids).logits.double()
        hf_logits = hf.to(DEVICE)(input_ids).logits
        sd = _llama_to_baichuan(hf.state_dict())
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        logits = _load_ours(sd, config, remap_state_dict_hf_baichuan)(input_ids).logits
    check_2x(logits, hf_logits, truth, dtype=DTYPE)


def _baichuan_reference(sd, cfg, input_ids):
    """Baichuan-13B's forward (Llama blocks with ALiBi instead of rotary) in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    d, heads = cfg.hidden_size, cfg.num_attention_heads

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    x = sd["model.embed_tokens.weight"][input_ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        h = rms(x, sd[f"{p}.input_layernorm.weight"])
        q, k, v = (
            t.unflatten(-1, (heads, d // heads))
            for t in (h @ sd[f"{p}.self_attn.W_pack.weight"].t()).split(d, -1)
        )
        x = x + _attention(q, k, v, (d // heads) ** -0.5, alibi=True) @ sd[f"{p}.self_attn.o_proj.weight"].t()
        h = rms(x, sd[f"{p}.post_attention_layernorm.weight"])
        gate, up = h @ sd[f"{p}.mlp.gate_proj.weight"].t(), h @ sd[f"{p}.mlp.up_proj.weight"].t()
        x = x + (F.silu(gate) * up) @ sd[f"{p}.mlp.down_proj.weight"].t()
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].t()


@needs_hf
def test_baichuan_13b_alibi_matches_reference():
    """The ALiBi branch (``hidden_size >= 5000`` in the real config; forced here on a tiny width)."""
    cfg = _baichuan_config()
    config = baichuan_config_to_gpt2_config(_baichuan_config(hidden_size=5120))
    assert config.use_alibi and config.use_flash_attn and config.rotary_emb_fraction == 0.0
    config = baichuan_config_to_gpt2_config(cfg)
    config.rotary_emb_fraction, config.use_alibi, config.use_flash_attn = 0.0, True, True
    config.pad_vocab_size_multiple = 8
    g = torch.Generator().manual_seed(0)
    d, inner = 64, 96
    sd = {"model.embed_tokens.weight": 0.1 * torch.randn(VOCAB, d, generator=g)}
    sd["model.norm.weight"] = 1 + 0.2 * torch.randn(d, generator=g)
    sd["lm_head.weight"] = 0.1 * torch.randn(VOCAB, d, generator=g)
    for i in range(2):
        p = f"model.layers.{i}"
        for name, shape in [
            ("self_attn.W_pack", (3 * d, d)),
            ("self_attn.o_proj", (d, d)),
            ("mlp.gate_proj", (inner, d)),
            ("mlp.up_proj", (inner, d)),
            ("mlp.down_proj", (d, inner)),
        ]:
            sd[f"{p}.{name}.weight"] = 0.1 * torch.randn(*shape, generator=g)
        for name in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{p}.{name}.weight"] = 1 + 0.2 * torch.randn(d, generator=g)
    out = remap_state_dict_hf_baichuan(sd, config)
    fc1 = out["transformer.layers.1.mlp.fc1.weight"]
    assert torch.equal(
        fc1, torch.cat([sd["model.layers.1.mlp.up_proj.weight"], sd["model.layers.1.mlp.gate_proj.weight"]])
    )
    assert out["lm_head.weight"].shape == (56, d) and not out["lm_head.weight"][VOCAB:].any()
    ours = _load_ours(sd, config, remap_state_dict_hf_baichuan)
    input_ids = _ids()
    with torch.no_grad():
        logits = ours(input_ids).logits[..., :VOCAB].double()
    truth = _baichuan_reference(sd, cfg, input_ids.cpu()).to(logits.device)
    torch.testing.assert_close(logits, truth, atol=1e-4, rtol=1e-4)


@needs_hf
def test_baichuan2_norm_head_flag():
    assert baichuan_config_to_gpt2_config(_baichuan_config(vocab_size=125696)).norm_head
    assert not baichuan_config_to_gpt2_config(_baichuan_config(vocab_size=64000)).norm_head


# --------------------------------------------------------------------------------------------------- ViT
_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10}


def _timm_state_dict(no_embed_class=False, seed=0):
    """timm's ViT names: ``Conv2d`` patch weights, ``attn.qkv`` / ``attn.proj``."""
    g = torch.Generator().manual_seed(seed)
    d, p, hidden = _VIT["embed_dim"], _VIT["patch_size"], 4 * _VIT["embed_dim"]
    n_patches = (_VIT["img_size"] // p) ** 2

    def r(*shape, scale=0.1, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, d),
        "pos_embed": r(1, n_patches + (0 if no_embed_class else 1), d),
        "patch_embed.proj.weight": r(d, 3, p, p),
        "patch_embed.proj.bias": r(d),
        "norm.weight": r(d, scale=0.2, base=1.0),
        "norm.bias": r(d),
        "head.weight": r(_VIT["num_classes"], d),
        "head.bias": r(_VIT["num_classes"]),
    }
    for i in range(_VIT["depth"]):
        b = f"blocks.{i}"
        for n in (1, 2):
            sd[f"{b}.norm{n}.weight"], sd[f"{b}.norm{n}.bias"] = r(d, scale=0.2, base=1.0), r(d)
        sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"] = r(3 * d, d), r(3 * d)
        sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"] = r(d, d), r(d)
        sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"] = r(hidden, d), r(hidden)
        sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"] = r(d, hidden), r(d)
    return sd


def _vit_reference(sd, images, no_embed_class=False):
    """timm's ViT forward in float64: (features of every token after the final norm, logits)."""
    sd = {k: v.double() for k, v in sd.items()}
    d, heads = _VIT["embed_dim"], _VIT["num_heads"]
    x = F.conv2d(
        images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=_VIT["patch_size"]
    )
    x = x.flatten(2).transpose(1, 2)
    cls = sd["cls_token"].expand(x.shape[0], -1, -1)
    x = (
        torch.cat([cls, x + sd["pos_embed"]], 1)
        if no_embed_class
        else torch.cat([cls, x], 1) + sd["pos_embed"]
    )
    for i in range(_VIT["depth"]):
        b = f"blocks.{i}"
        h = F.layer_norm(x, (d,), sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"], 1e-6)
        q, k, v = (
            F.linear(h, sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"])
            .unflatten(-1, (3, heads, -1))
            .unbind(2)
        )
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d // heads)
        a = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).flatten(2)
        x = x + F.linear(a, sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"], 1e-6)
        h = F.gelu(F.linear(h, sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"]))
        x = x + F.linear(h, sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"])
    x = F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return x, F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_vit_matches_reference(no_embed_class):
    model = VisionTransformer(**_VIT, no_embed_class=no_embed_class).to(DEVICE).eval()
    assert model.blocks[-1].mixer.cross_attn and not model.blocks[0].mixer.cross_attn
    sd = _timm_state_dict(no_embed_class)
    kept = {k: v.clone() for k, v in sd.items()}
    result = model.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(sd[k], kept[k]) for k in kept)  # the caller's dict is untouched
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    features_ref, logits_ref = _vit_reference(sd, images, no_embed_class)
    with torch.no_grad():
        logits = model(images.to(DEVICE))
        features = model.forward_features(images.to(DEVICE), all_tokens=True)
        cls_only = model.forward_features(images.to(DEVICE), all_tokens=False)
    assert logits.shape == (3, 10) and features.shape == (3, 17, 32) and cls_only.shape == (3, 1, 32)
    torch.testing.assert_close(logits.double().cpu(), logits_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features.double().cpu(), features_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cls_only.double().cpu(), features_ref[:, :1], atol=1e-4, rtol=1e-4)


def test_vit_timm_parity():
    timm = pytest.importorskip("timm")
    reference = timm.models.vision_transformer.VisionTransformer(**_VIT).eval()
    randomize(reference)
    model = VisionTransformer(**_VIT).eval()
    model.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-4, rtol=1e-4)


def test_vit_init_and_training_path():
    torch.manual_seed(0)
    model = VisionTransformer(**{**_VIT, "embed_dim": 64}, drop_rate=0.1, drop_path_rate=0.2)
    w = model.blocks[0].mlp.fc1.weight
    assert 0.015 < w.std() < 0.025  # timm's init: truncated normal of std 0.02
    assert not model.blocks[0].mlp.fc1.bias.any() and model.cls_token.abs().max() < 1e-4
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert [b.drop_path2.p for b in model.blocks] == pytest.approx([0.0, 0.2])
    assert model.blocks[1].drop_path1.p == pytest.approx(0.0) and model.drop_path.p == pytest.approx(0.2)
    model.train()
    out = model(torch.randn(2, 3, 16, 16))
    out.sum().backward()
    assert out.shape == (2, 10) and model.pos_embed.grad is not None
    lin = torch.nn.Linear(4, 4)
    init_weights_vit_timm(lin)
    assert not lin.bias.any()


def test_vit_refusals_and_pretrained():
    for kw in ({"global_pool": "avg"}, {"class_token": False}, {"init_values": 1e-5}, {"pre_norm": True}):
        with pytest.raises(ValueError):
            VisionTransformer(**_VIT, **kw)
    try:
        import timm  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ImportError, match="timm"):
            vit_base_patch16_224(pretrained=True)
