"""Tests for flash_attn.models.bert (Triton; interpreter on CPU).

Tiny random Hugging Face ``BertForPreTraining`` / ``BertModel`` models, built from configs (nothing downloaded), are
converted with ``remap_state_dict`` into ours. With padded batches (a different length per row), the sequence and
pooled outputs, the prediction and next-sentence logits, the pre-training loss (masked-LM loss ignoring label 0 +
next-sentence loss) and every parameter's gradient follow the 2x rule against the HF model in float64 (the truth):
``|ours - truth| <= 2 * |HF - truth| + slack``, HF and ours in the same dtype (float32 on CPU, bfloat16 on GPU).
``dense_seq_output`` / ``last_layer_subset`` (the last layer computed for the masked tokens only) are held against
the full computation of the same weights; the state-dict conversions against their inverses (without transformers)
and ``from_pretrained`` against checkpoints saved to temporary directories.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from functools import partial  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fa_compat_hf import DTYPE, OPTIMIZED, TOL, check_2x, eager, needs_hf, tiny_hf, transformers  # noqa: E402
from fa_compat_testutils import DEVICE, needs_backward  # noqa: E402
from torch import nn  # noqa: E402

import flash_attn.models.bert as bert_module  # noqa: E402
from flash_attn.models.bert import (  # noqa: E402
    BertEncoder,
    BertForPreTraining,
    BertModel,
    BertPooler,
    _init_weights,
    create_block,
    create_mixer_cls,
    create_mlp_cls,
    inv_remap_state_dict,
    remap_state_dict,
)
from flash_attn.modules.mha import MHA  # noqa: E402
from flash_attn.modules.mlp import Mlp  # noqa: E402

VOCAB = 50
#: what randomize takes for norms in the HF BERT models: their LayerNorm modules
BERT_NORMS = ("LayerNorm",)
LENGTHS = [10, 7, 3]  # per row: the padded batch is (3, 10)


# ------------------------------------------------------------------------------------------------ helpers
def _config(**kw):
    base = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 16,
        "type_vocab_size": 2,
    }
    return eager(transformers.BertConfig(**{**base, **kw}))


def _hf_pretraining(seed=0, **kw):
    return tiny_hf(transformers.BertForPreTraining, _config(**kw), seed, BERT_NORMS).eval()


def _inputs(masked=True, seed=0):
    """ids, token types, the attention mask (None when not ``masked``: every token counts), labels (about 40% of
    the tokens, at least one per row, 0 elsewhere and on padding) and next-sentence labels."""
    g = torch.Generator().manual_seed(seed)
    batch, seqlen = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(0, VOCAB, (batch, seqlen), generator=g)
    token_types = (torch.arange(seqlen)[None, :] >= torch.tensor(LENGTHS)[:, None] // 2).long()
    if masked:
        mask = torch.arange(seqlen)[None, :] < torch.tensor(LENGTHS)[:, None]
    else:
        mask = torch.ones(batch, seqlen, dtype=torch.bool)
    chosen = (torch.rand(batch, seqlen, generator=g) < 0.4) & mask
    chosen[torch.arange(batch), torch.tensor(LENGTHS) - 1] = True  # the last token of each row
    chosen[1, 0] = True  # the first token too, once: it is also the pooler's
    labels = torch.randint(1, VOCAB, (batch, seqlen), generator=g) * chosen
    nsp = torch.tensor([0, 1, 1])
    out = [ids, token_types, mask if masked else None, labels, nsp]
    return [t.to(DEVICE) if t is not None else None for t in out]


def _pretraining_loss(prediction_logits, seq_logits, labels, nsp):
    """The loss of flash-attn's BertForPreTraining (masked LM ignoring label 0) from HF's full logits."""
    mlm = F.cross_entropy(prediction_logits.flatten(0, 1), labels.flatten(), ignore_index=0)
    return mlm + F.cross_entropy(seq_logits, nsp, ignore_index=-1)


def _ours(hf_model, config, model_cls=BertForPreTraining, dtype=DTYPE, **kw):
    model = model_cls(config, **kw).to(DEVICE)
    result = model.load_state_dict(remap_state_dict(hf_model.state_dict(), config))
    assert not result.missing_keys and not result.unexpected_keys
    return model.to(dtype=dtype).eval()


def _grads(model):
    grads = {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _clone_config(config, **kw):
    clone = copy.deepcopy(config)
    for k, v in kw.items():
        setattr(clone, k, v)
    return clone


# -------------------------------------------------------------------------------- HF parity (outputs, grads)
VARIANTS = {
    "plain": {},
    "flash": {"use_flash_attn": True},
    # the fused switches (fused_mlp aside), a padded vocabulary and the tanh GeLU
    "optimized": {**OPTIMIZED, "use_xentropy": True, "hidden_act": "gelu_new"},
    "dense": {"use_flash_attn": True, "dense_seq_output": True},
    "subset": {
        "use_flash_attn": True,
        "dense_seq_output": True,
        "last_layer_subset": True,
        "use_xentropy": True,
    },
    "subset_unfused": {"dense_seq_output": True, "last_layer_subset": True},
    # flash_attn.ops.fused_dense's FusedMLP (per-layer checkpoint levels; the last layer without the residual)
    "fused_mlp": {
        "use_flash_attn": True,
        "fused_mlp": True,
        "mlp_checkpoint_lvl": [0, 2],
        "fused_bias_fc": True,
        "hidden_act": "gelu_pytorch_tanh",
        "dense_seq_output": True,
        "last_layer_subset": True,
    },
}
needs_fused_mlp = pytest.mark.skipif(
    bert_module.FusedMLP is None, reason="flash_attn.ops.fused_dense does not provide FusedMLP"
)


def _variant_param(name):
    if name in ("plain", "subset_unfused"):
        return name
    marks = [needs_backward, needs_fused_mlp] if name == "fused_mlp" else [needs_backward]
    return pytest.param(name, marks=marks)


@needs_hf
@pytest.mark.parametrize("variant", [_variant_param(v) for v in VARIANTS])
def test_bert_pretraining_matches_hf(variant):
    kw = VARIANTS[variant]
    hf_kw = {"hidden_act": kw["hidden_act"]} if "hidden_act" in kw else {}
    hf = _hf_pretraining(**hf_kw)
    config = _config(**kw)
    truth_model = copy.deepcopy(hf).to(device=DEVICE, dtype=torch.float64)
    hf_lowp = copy.deepcopy(hf).to(device=DEVICE, dtype=DTYPE)
    ours = _ours(hf, config)
    ids, token_types, mask, labels, nsp = _inputs()
    valid = mask
    if kw.get("fused_bias_fc") and bert_module.FusedDense is not None:
        assert isinstance(ours.cls.predictions.decoder, bert_module.FusedDense)
        assert isinstance(ours.bert.pooler.dense, bert_module.FusedDense)
    if kw.get("fused_mlp"):
        assert all(isinstance(layer.mlp, bert_module.FusedMLP) for layer in ours.bert.encoder.layers)
        assert [layer.mlp.checkpoint_lvl for layer in ours.bert.encoder.layers] == [0, 2]

    # the body alone: every valid token's hidden state and the pooled output
    with torch.no_grad():
        res = {
            name: m.bert(ids, token_type_ids=token_types, attention_mask=mask)
            for name, m in (("truth", truth_model), ("hf", hf_lowp), ("ours", ours))
        }
    for field in ("last_hidden_state", "pooler_output"):
        pick = (lambda t: t[valid]) if field == "last_hidden_state" else (lambda t: t)  # noqa: E731
        check_2x(*(pick(getattr(res[n], field)) for n in ("ours", "hf", "truth")), f"bert.{field}")
    if kw.get("use_flash_attn"):  # unpadded: the padding rows are zeros
        assert not res["ours"].last_hidden_state[~valid].any()

    # pre-training heads, loss, gradients
    dense = kw.get("dense_seq_output", False)
    hf_outputs = {}
    for name, model in (("truth", truth_model), ("hf", hf_lowp)):
        out = model(ids, token_type_ids=token_types, attention_mask=mask.long())
        loss = _pretraining_loss(out.prediction_logits, out.seq_relationship_logits, labels, nsp)
        loss.backward()
        logits = out.prediction_logits.detach().double()
        logits = logits.flatten(0, 1)[labels.flatten() > 0] if dense else logits[valid]
        hf_outputs[name] = (logits, out.seq_relationship_logits.detach().double(), loss.detach().double())
        hf_outputs[name] += (_grads(model),)
    out = ours(ids, token_type_ids=token_types, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    # use_xentropy (inplace_backward): the backward overwrites the logits with their gradients
    logits = out.prediction_logits.detach().clone()
    seq_logits = out.seq_relationship_logits.detach().clone()
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    grads = _grads(ours)
    n_masked = int((labels > 0).sum())
    assert logits.shape == ((n_masked,) if dense else (len(LENGTHS), max(LENGTHS))) + (config.vocab_size,)
    logits = logits[..., :VOCAB] if dense else logits[valid][..., :VOCAB]
    (t_logits, t_seq, t_loss, t_grads), (h_logits, h_seq, h_loss, h_grads) = (
        hf_outputs["truth"],
        hf_outputs["hf"],
    )
    check_2x(logits, h_logits, t_logits, "prediction_logits")
    check_2x(seq_logits, h_seq, t_seq, "seq_relationship_logits")
    check_2x(out.loss.detach(), h_loss, t_loss, "loss")

    # HF's gradients in our names (vocabulary unpadded: our padded rows are cut off)
    grad_config = _clone_config(config, pad_vocab_size_multiple=1, vocab_size=VOCAB)
    t_grads, h_grads = remap_state_dict(t_grads, grad_config), remap_state_dict(h_grads, grad_config)
    assert len(grads) == len(dict(ours.named_parameters()))
    assert set(grads) <= set(t_grads)
    for name, grad in grads.items():
        rows = t_grads[name].shape[0]
        check_2x(grad[:rows], h_grads[name], t_grads[name], f"grad of {name}")


@needs_hf
@pytest.mark.parametrize(
    "use_flash_attn, add_pooling_layer",
    [(False, True), (False, False), pytest.param(True, True, marks=needs_backward)],
)
def test_bert_model_matches_hf(use_flash_attn, add_pooling_layer):
    """A bare HF ``BertModel`` state dict (no ``bert.`` prefix) converts into our ``BertModel``; an integer
    (0 / 1) attention mask acts as the boolean one; the conversion inverts."""
    config = _config(use_flash_attn=use_flash_attn)
    model_cls = partial(transformers.BertModel, add_pooling_layer=add_pooling_layer)
    hf = tiny_hf(model_cls, config, 1, BERT_NORMS).eval()
    truth_model = copy.deepcopy(hf).to(device=DEVICE, dtype=torch.float64)
    hf_lowp = copy.deepcopy(hf).to(device=DEVICE, dtype=DTYPE)
    ours = _ours(hf, config, model_cls=BertModel, add_pooling_layer=add_pooling_layer)
    ids, token_types, mask, _, _ = _inputs(seed=3)
    with torch.no_grad():
        truth = truth_model(ids, token_type_ids=token_types, attention_mask=mask.long())
        ref = hf_lowp(ids, token_type_ids=token_types, attention_mask=mask.long())
        out = ours(ids, token_type_ids=token_types, attention_mask=mask)
        out_int = ours(ids, token_type_ids=token_types, attention_mask=mask.long())
    check_2x(
        out.last_hidden_state[mask], ref.last_hidden_state[mask], truth.last_hidden_state[mask], "hidden"
    )
    assert torch.equal(out_int.last_hidden_state, out.last_hidden_state)
    if add_pooling_layer:
        check_2x(out.pooler_output, ref.pooler_output, truth.pooler_output, "pooler_output")
    else:
        assert out.pooler_output is None and ours.pooler is None
    assert isinstance(out, transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions)

    original = hf.state_dict()
    remapped = remap_state_dict(original, config)
    assert remapped.keys() == ours.state_dict().keys()
    back = inv_remap_state_dict(remapped, config)
    renamed = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", k): v for k, v in original.items()}
    renamed = {re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k): v for k, v in renamed.items()}
    assert back.keys() == renamed.keys()
    for k, v in renamed.items():
        assert torch.equal(back[k], v), k


# -------------------------------------------------------------------- dense_seq_output / last_layer_subset
@needs_hf
@pytest.mark.parametrize("last_layer_subset", [False, True])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("use_flash_attn", [False, pytest.param(True, marks=needs_backward)])
def test_dense_seq_output_matches_full(use_flash_attn, masked, last_layer_subset):
    """The masked tokens' logits, the next-sentence logits, the loss and the gradients (in HF names) of a model
    computing only the masked tokens equal those of the full model; so do ``BertModel``'s outputs with
    ``masked_tokens_mask``."""
    hf = _hf_pretraining(seed=2)
    full_config = _config(use_flash_attn=use_flash_attn)
    dense_config = _config(
        use_flash_attn=use_flash_attn, dense_seq_output=True, last_layer_subset=last_layer_subset
    )
    full, dense = _ours(hf, full_config), _ours(hf, dense_config)
    ids, token_types, mask, labels, nsp = _inputs(masked=masked, seed=4)
    if last_layer_subset:
        last = dense.bert.encoder.layers[-1].mixer
        assert last.cross_attn and hasattr(last, "Wkv") and not hasattr(last, "Wqkv")
    kwargs = {
        "token_type_ids": token_types,
        "attention_mask": mask,
        "labels": labels,
        "next_sentence_label": nsp,
    }
    out_full, out_dense = full(ids, **kwargs), dense(ids, **kwargs)
    picked = labels.flatten() > 0
    assert out_dense.prediction_logits.shape == (int(picked.sum()), VOCAB)
    torch.testing.assert_close(
        out_dense.prediction_logits, out_full.prediction_logits.flatten(0, 1)[picked], atol=TOL, rtol=TOL
    )
    torch.testing.assert_close(
        out_dense.seq_relationship_logits, out_full.seq_relationship_logits, atol=TOL, rtol=TOL
    )
    torch.testing.assert_close(out_dense.loss, out_full.loss, atol=TOL, rtol=TOL)
    out_full.loss.backward()
    out_dense.loss.backward()
    grads_full = inv_remap_state_dict(_grads(full), full_config)
    grads_dense = inv_remap_state_dict(_grads(dense), dense_config)
    assert grads_full.keys() == grads_dense.keys()
    for name, grad in grads_full.items():
        atol = TOL * max(1.0, grad.abs().max().item())
        torch.testing.assert_close(grads_dense[name], grad, atol=atol, rtol=TOL, msg=name)

    # the body with masked_tokens_mask: the masked tokens' rows (row-major) and the pooled first tokens
    with torch.no_grad():
        whole = full.bert(ids, token_type_ids=token_types, attention_mask=mask)
        subset = dense.bert(
            ids, token_type_ids=token_types, attention_mask=mask, masked_tokens_mask=labels > 0
        )
    torch.testing.assert_close(
        subset.last_hidden_state, whole.last_hidden_state[labels > 0], atol=TOL, rtol=TOL
    )
    torch.testing.assert_close(subset.pooler_output, whole.pooler_output, atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------- state-dict conversions
def _hf_names_state_dict(cfg, seed=0, gamma_beta=True):
    """A random state dict with the names of a Hugging Face / Google BERT pre-training checkpoint (LayerNorm
    parameters as gamma / beta, the decoder bias as ``cls.predictions.bias``)."""
    g = torch.Generator().manual_seed(seed)
    h, inner = cfg.hidden_size, cfg.intermediate_size
    w, b = ("gamma", "beta") if gamma_beta else ("weight", "bias")

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def linear(prefix, n_out, n_in):
        return {f"{prefix}.weight": r(n_out, n_in), f"{prefix}.bias": r(n_out)}

    def norm(prefix):
        return {f"{prefix}.{w}": r(h), f"{prefix}.{b}": r(h)}

    sd = {
        "bert.embeddings.word_embeddings.weight": r(cfg.vocab_size, h),
        "bert.embeddings.position_embeddings.weight": r(16, h),
        "bert.embeddings.token_type_embeddings.weight": r(2, h),
        **norm("bert.embeddings.LayerNorm"),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"bert.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            sd.update(linear(f"{p}.attention.self.{proj}", h, h))
        sd.update(linear(f"{p}.attention.output.dense", h, h))
        sd.update(norm(f"{p}.attention.output.LayerNorm"))
        sd.update(linear(f"{p}.intermediate.dense", inner, h))
        sd.update(linear(f"{p}.output.dense", h, inner))
        sd.update(norm(f"{p}.output.LayerNorm"))
    sd.update(linear("bert.pooler.dense", h, h))
    sd.update(linear("cls.predictions.transform.dense", h, h))
    sd.update(norm("cls.predictions.transform.LayerNorm"))
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    sd["cls.predictions.bias"] = r(cfg.vocab_size)
    sd.update(linear("cls.seq_relationship", 2, h))
    return sd


@pytest.mark.parametrize("last_layer_subset", [False, True])
@pytest.mark.parametrize("pad", [1, 8])
def test_remap_inv_remap_round_trip(pad, last_layer_subset):
    """Pure tensor code: runs without transformers (the config is a namespace)."""
    cfg = SimpleNamespace(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        pad_vocab_size_multiple=pad,
        last_layer_subset=last_layer_subset,
    )
    original = _hf_names_state_dict(cfg)
    snapshot = dict(original)
    remapped = remap_state_dict(original, cfg)
    assert original.keys() == snapshot.keys()  # the input is not modified
    padded = math.ceil(VOCAB / pad) * pad
    emb = remapped["bert.embeddings.word_embeddings.weight"]
    bias = remapped["cls.predictions.decoder.bias"]
    assert emb.shape == (padded, 16) and torch.equal(
        emb[:VOCAB], original["bert.embeddings.word_embeddings.weight"]
    )
    assert not emb[VOCAB:].any() and (bias[VOCAB:] == -100.0).all()
    assert torch.equal(bias[:VOCAB], original["cls.predictions.bias"])
    last = cfg.num_hidden_layers - 1
    for i in range(cfg.num_hidden_layers):
        p = f"bert.encoder.layer.{i}.attention.self"
        q, k, v = (original[f"{p}.{n}.weight"] for n in ("query", "key", "value"))
        mixer = f"bert.encoder.layers.{i}.mixer"
        if last_layer_subset and i == last:
            assert torch.equal(remapped[f"{mixer}.Wq.weight"], q)
            assert torch.equal(remapped[f"{mixer}.Wkv.weight"], torch.cat([k, v]))
        else:
            assert torch.equal(remapped[f"{mixer}.Wqkv.weight"], torch.cat([q, k, v]))
    assert torch.equal(
        remapped["bert.encoder.layers.1.norm2.weight"],
        original["bert.encoder.layer.1.output.LayerNorm.gamma"],
    )
    assert torch.equal(
        remapped["bert.encoder.layers.2.mlp.fc1.bias"],
        original["bert.encoder.layer.2.intermediate.dense.bias"],
    )
    assert torch.equal(
        remapped["cls.predictions.transform.layer_norm.bias"],
        original["cls.predictions.transform.LayerNorm.beta"],
    )
    # a config already padded by a model (orig_vocab_size recorded) converts the same way
    padded_cfg = SimpleNamespace(**{**vars(cfg), "vocab_size": padded, "orig_vocab_size": VOCAB})
    again = remap_state_dict(original, padded_cfg)
    assert again.keys() == remapped.keys() and all(torch.equal(again[k], remapped[k]) for k in again)
    for config in (cfg, padded_cfg):
        back = inv_remap_state_dict(remapped, config)
        assert back.keys() == original.keys()
        for k, v in original.items():
            assert torch.equal(back[k], v), k
    # HF's own names (LayerNorm weight / bias, both decoder bias names) map to the same dict
    modern = _hf_names_state_dict(cfg, gamma_beta=False)
    modern["cls.predictions.decoder.bias"] = modern["cls.predictions.bias"]
    modern_remapped = remap_state_dict(modern, cfg)
    assert modern_remapped.keys() == remapped.keys()
    for k in remapped:
        assert torch.equal(modern_remapped[k], remapped[k]), k


@needs_hf
@pytest.mark.parametrize("last_layer_subset", [False, True])
@pytest.mark.parametrize("pad", [1, 8])
def test_remapped_keys_and_shapes_are_the_models(pad, last_layer_subset):
    hf = _hf_pretraining()
    config = _config(pad_vocab_size_multiple=pad, dense_seq_output=True, last_layer_subset=last_layer_subset)
    remapped = remap_state_dict(hf.state_dict(), config)  # before the model pads the config
    model = BertForPreTraining(config)
    assert config.vocab_size == math.ceil(VOCAB / pad) * pad
    assert getattr(config, "orig_vocab_size", VOCAB) == VOCAB
    ours = model.state_dict()
    assert ours.keys() == remapped.keys()
    for k, v in ours.items():
        assert v.shape == remapped[k].shape, k
    back = inv_remap_state_dict(remapped, config)
    for k, v in back.items():
        hf_name = re.sub(
            r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        )
        assert torch.equal(v, hf.state_dict()[hf_name]), k


@needs_hf
def test_from_pretrained_local_checkpoints(tmp_path):
    """``from_pretrained`` reads a saved HF ``BertForPreTraining`` (into both of our models: the ``bert.`` prefix is
    matched) and a saved bare ``BertModel`` (into our ``BertForPreTraining``'s body)."""
    hf = _hf_pretraining(seed=5)
    hf.save_pretrained(tmp_path / "pretraining")
    hf.bert.save_pretrained(tmp_path / "body")
    config = _config()
    expected = remap_state_dict(hf.state_dict(), config)

    model = BertForPreTraining.from_pretrained(str(tmp_path / "pretraining"), config)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight

    body = BertModel.from_pretrained(tmp_path / "pretraining", config)
    for k, v in body.state_dict().items():
        assert torch.equal(v, expected[f"bert.{k}"]), k

    torch.manual_seed(9)
    model = BertForPreTraining.from_pretrained(tmp_path / "body", config)
    for k, v in model.state_dict().items():
        if k.startswith("bert."):
            assert torch.equal(v, expected[k]), k


# ------------------------------------------------------------------------------- construction, init, errors
@needs_hf
def test_structure_init_and_tying():
    config = _config(initializer_range=0.5, hidden_size=64, intermediate_size=128, last_layer_subset=True)
    config.dense_seq_output = True
    config.hidden_act = "gelu_new"
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert isinstance(model.bert.encoder, BertEncoder) and isinstance(model.bert.pooler, BertPooler)
    assert isinstance(model.mlm_loss, nn.CrossEntropyLoss) and model.mlm_loss.ignore_index == 0
    assert model.nsp_loss.ignore_index == -1
    emb = model.bert.embeddings.word_embeddings
    assert emb.padding_idx == config.pad_token_id and not emb.weight[config.pad_token_id].any()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert module.bias is None or not module.bias.any(), name
            if module.weight.numel() >= 4096:
                assert abs(module.weight.std().item() - 0.5) < 0.05, name
    layers = model.bert.encoder.layers
    assert not layers[0].mixer.cross_attn and layers[0].return_residual and layers[0].mixer.return_residual
    assert layers[1].mixer.cross_attn and not layers[1].return_residual and not layers[1].mlp.return_residual
    mlp = layers[0].mlp
    assert (
        isinstance(mlp, Mlp)
        and mlp.fc1.out_features == 128
        and mlp.activation.keywords == {"approximate": "tanh"}
    )
    assert model.cls.predictions.transform.transform_act_fn.approximate == "tanh"

    # the factories, called as flash-attn's callers do
    mixer = create_mixer_cls(config, cross_attn=True)(64)
    assert isinstance(mixer, MHA) and mixer.cross_attn and not mixer.causal and mixer.num_heads == 2
    assert isinstance(create_mlp_cls(_config())(32), Mlp)
    block = create_block(_config(), layer_idx=1)
    assert isinstance(block.mixer, MHA) and block.norm1.eps == 1e-12 and not block.prenorm

    emb = nn.Embedding(10, 4, padding_idx=3)
    _init_weights(emb, initializer_range=1.0)
    assert not emb.weight[3].any() and emb.weight[4].abs().sum() > 0


@needs_hf
def test_outputs_are_transformers_classes():
    from transformers.models.bert import modeling_bert

    assert bert_module.BertForPreTrainingOutput is modeling_bert.BertForPreTrainingOutput
    assert bert_module.BaseModelOutputWithPoolingAndCrossAttentions is (
        transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions
    )
    with pytest.raises(AttributeError):
        bert_module.NoSuchName  # noqa: B018
    model = BertForPreTraining(_config(pad_vocab_size_multiple=16)).to(DEVICE)
    ids = _inputs()[0]
    with torch.no_grad():
        out = model(ids)
    assert isinstance(out, modeling_bert.BertForPreTrainingOutput) and out.loss is None
    assert out.prediction_logits.shape == (len(LENGTHS), max(LENGTHS), 64)
    assert out.seq_relationship_logits.shape == (len(LENGTHS), 2)


@needs_hf
def test_invalid_configurations(monkeypatch):
    with pytest.raises(ValueError, match="last_layer_subset requires dense_seq_output"):
        BertForPreTraining(_config(last_layer_subset=True))
    with pytest.raises(ValueError, match="hidden_act"):
        BertModel(_config(hidden_act="relu"))
    with pytest.raises(ValueError, match="BertConfig"):
        BertModel(transformers.GPT2Config())
    with pytest.raises(ValueError, match="tanh"):
        create_mlp_cls(_config(fused_mlp=True))
    if bert_module.FusedMLP is not None:
        with pytest.raises(ValueError, match="layer_idx"):
            create_mlp_cls(_config(fused_mlp=True, hidden_act="gelu_new", mlp_checkpoint_lvl=[0, 1]))
    # without flash_attn.ops.fused_dense's classes: fused_mlp refused, fused_bias_fc heads are nn.Linear
    monkeypatch.setattr(bert_module, "FusedMLP", None)
    monkeypatch.setattr(bert_module, "FusedDense", None)
    with pytest.raises(NotImplementedError, match="FusedMLP"):
        BertModel(_config(fused_mlp=True, hidden_act="gelu_new"))
    heads = BertForPreTraining(_config(fused_bias_fc=True))
    assert type(heads.bert.pooler.dense) is nn.Linear and type(heads.cls.predictions.decoder) is nn.Linear


@needs_hf
def test_rotary_position_embeddings():
    """``position_embedding_type="rotary"`` gives every layer's attention a rotary embedding of ``rotary_emb_dim``:
    without position embeddings, the model is no longer permutation-equivariant (it is without rotary). The
    unpadded (varlen) path refuses rotary instead of rotating the packed tokens as one sequence."""
    ids = _inputs()[0]
    for rotary in (False, True):
        kw = (
            {"position_embedding_type": "rotary", "rotary_emb_dim": 16, "rotary_emb_base": 100.0}
            if rotary
            else {}
        )
        config = _config(max_position_embeddings=0, **kw)
        torch.manual_seed(0)
        model = BertModel(config).to(DEVICE).eval()
        assert all(
            getattr(layer.mixer, "rotary_emb_dim", 0) == (16 if rotary else 0)
            for layer in model.encoder.layers
        )
        with torch.no_grad():
            out = model(ids).last_hidden_state
            flipped = model(ids.flip(1)).last_hidden_state.flip(1)
        assert torch.allclose(out, flipped, atol=TOL) != rotary
    assert model.encoder.layers[0].mixer.rotary_emb.base == 100.0
    config.use_flash_attn = True
    with pytest.raises(ValueError, match="rotary"):
        BertModel(config).to(DEVICE)(ids, attention_mask=_inputs()[2])
