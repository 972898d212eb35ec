"""Tests for flash_attn.models.gpt's tensor-parallel mode and fused MLP (Triton through the interpreter on CPU).

Single process: ``fused_mlp=True`` (FusedMLP, ``mlp_checkpoint_lvl`` per layer) against the unfused model with the
same weights (logits and every gradient), the configuration checks of ``fused_mlp`` /
``fused_dense_sqrelu_dense`` / tensor parallelism. Distributed (spawned gloo groups, CPU, float32): every rank
builds the single-process model from the same seed, then the tensor-parallel model (``process_group``) from
``shard_state_dict_tp`` of its state dict; the logits are the single-process logits' vocabulary shard and the
gradients, gathered from the ranks and combined with ``combine_state_dicts_tp``, are the single-process gradients,
with and without ``sequence_parallel``, for GPT-2 (vocabulary-parallel cross entropy), GQA + SwiGLU + rotary +
RMSNorm, a parallel block with ``norm_head`` and FusedMLP, and FusedMLP with ``fused_dropout_add_ln``; greedy
generation (logits all-gathered) against the single-process model; ``from_pretrained(world_size, rank)`` from a
saved HF GPT-2 checkpoint.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fa_compat_dist import spawn_gloo  # noqa: E402
from fa_compat_hf import needs_hf, transformers  # noqa: E402
from fa_compat_testutils import DEVICE  # noqa: E402

from flash_attn.models.gpt import (  # noqa: E402
    GPTLMHeadModel,
    combine_state_dicts_tp,
    create_mixer_cls,
    create_mlp_cls,
    shard_state_dict_tp,
)
from flash_attn.modules.mha import MHA, ParallelMHA  # noqa: E402
from flash_attn.modules.mlp import GatedMlp, Mlp, ParallelGatedMlp, ParallelMLP  # noqa: E402
from flash_attn.ops.fused_dense import ColumnParallelLinear, FusedMLP, ParallelFusedMLP  # noqa: E402

pytestmark = needs_hf

VOCAB = 50
#: our model against itself (sharded vs whole, fused vs unfused): summation order only, float32
TOL = 1e-4


def _config(**kw):
    base = {
        "vocab_size": VOCAB,
        "n_positions": 32,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_flash_attn": False,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    return transformers.GPT2Config(**{**base, **kw})


def _randomize(model, seed):
    """Norm weights ~ 1 + N(0, 0.2), everything else ~ N(0, 0.1) (biases included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.device)
            p.copy_(
                1.0 + 0.2 * noise
                if ("norm" in name or "ln_f" in name) and name.endswith("weight")
                else 0.1 * noise
            )
    return model


def _ids(batch, seqlen, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seqlen), generator=g).to(device)


def _close(a, b, msg=""):
    scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a.detach(), b.detach(), atol=TOL * scale, rtol=TOL, msg=msg or None)


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


# ================================================================================ single process
@pytest.mark.parametrize(
    "activation, lvl",
    [("gelu_new", 0), ("gelu_pytorch_tanh", [2, 1]), ("relu", 1), ("sqrelu", 2)],
)
def test_fused_mlp_matches_unfused(activation, lvl):
    """fused_mlp=True builds FusedMLP (tanh GeLU as "gelu_approx", mlp_checkpoint_lvl per layer) with the
    unfused model's parameter names: the same logits and gradients."""
    kw = {"activation_function": activation, "n_inner": 48, "mlp_fc2_bias": activation != "relu"}
    ref = _randomize(GPTLMHeadModel(_config(**kw), device=DEVICE), 1)
    model = GPTLMHeadModel(_config(fused_mlp=True, mlp_checkpoint_lvl=lvl, **kw), device=DEVICE)
    model.load_state_dict(ref.state_dict())  # strict
    levels = lvl if isinstance(lvl, list) else [lvl, lvl]
    for layer, want in zip(model.transformer.layers, levels):
        assert type(layer.mlp) is FusedMLP and layer.mlp.checkpoint_lvl == want
        assert layer.mlp.activation == ("gelu_approx" if activation.startswith("gelu") else activation)
        assert layer.mlp.fc1.weight.shape == (48, 32) and (layer.mlp.fc2.bias is None) == (
            activation == "relu"
        )
    ids = _ids(2, 7, device=DEVICE)
    outs = []
    for m in (ref, model):
        logits = m(ids).logits
        F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        outs.append(logits)
    _close(outs[1], outs[0])
    ref_grads = _grads(ref)
    for name, grad in _grads(model).items():
        _close(grad, ref_grads[name], msg=name)
    model.eval()  # nothing kept for the backward
    with torch.no_grad():
        _close(model(ids).logits, outs[0])


def test_configuration_checks():
    for activation in ("gelu", "swiglu"):  # flash-attn's FusedMLP takes tanh GeLU / relu / sqrelu only
        with pytest.raises(ValueError, match="fused_mlp"):
            GPTLMHeadModel(_config(fused_mlp=True, activation_function=activation))
    with pytest.raises(ValueError, match="mlp_checkpoint_lvl"):
        create_mlp_cls(_config(fused_mlp=True, mlp_checkpoint_lvl=[0, 1]), None)
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        GPTLMHeadModel(_config(fused_mlp=True, mlp_checkpoint_lvl=3))
    # fused_dense_sqrelu_dense: flash-attn's checks (single process only)
    with pytest.raises(ValueError, match="sqrelu"):
        GPTLMHeadModel(_config(fused_dense_sqrelu_dense=True))
    with pytest.raises(ValueError, match="both"):
        create_mlp_cls(_config(fused_dense_sqrelu_dense=True, fused_mlp=True, activation_function="sqrelu"))
    with pytest.raises(ValueError, match="Tensor Parallel"):
        create_mlp_cls(_config(fused_dense_sqrelu_dense=True, activation_function="sqrelu"), 0, object())
    # the constructors with a process group (not called: building them needs a real group)
    group = object()
    mixer = create_mixer_cls(_config(n_head_kv=1, sequence_parallel=False), 0, process_group=group)
    assert mixer.func is ParallelMHA and mixer.keywords["process_group"] is group
    assert mixer.keywords["sequence_parallel"] is False and mixer.keywords["num_heads_kv"] == 1
    assert "fused_bias_fc" not in mixer.keywords and "dwconv" not in mixer.keywords
    assert create_mixer_cls(_config(), 0).func is MHA
    with pytest.raises(ValueError, match="dwconv"):
        create_mixer_cls(_config(attn_dwconv=True), 0, process_group=group)
    for kw, serial, parallel in (
        ({}, Mlp, ParallelMLP),
        ({"activation_function": "swiglu"}, GatedMlp, ParallelGatedMlp),
        ({"fused_mlp": True}, FusedMLP, ParallelFusedMLP),
    ):
        assert create_mlp_cls(_config(**kw), 0).func is serial
        built = create_mlp_cls(_config(**kw), 0, process_group=group)
        assert built.func is parallel and built.keywords["process_group"] is group
        assert built.keywords["sequence_parallel"] is True  # flash-attn's default
    # from_pretrained(world_size > 1) without a process group: refused before reading any checkpoint
    with pytest.raises(ValueError, match="process_group"):
        GPTLMHeadModel.from_pretrained("gpt2", _config(), world_size=2, rank=0)


# ================================================================================== distributed
#: (name, config attributes, loss): the tensor-parallel model against the single-process one
TP_CONFIGS = [
    ("gpt2_seq_ce", {"pad_vocab_size_multiple": 16}, "ce"),
    (
        "parallel_block_norm_head_fused_mlp_replicated",
        {
            "sequence_parallel": False, "parallel_block": True, "norm_head": True, "fused_mlp": True,
            "activation_function": "relu", "mlp_checkpoint_lvl": 1, "n_inner": 64,
        },
        "weighted",
    ),
    (
        "gqa_swiglu_rotary_rms_seq",
        {
            "n_head": 4, "n_head_kv": 2, "activation_function": "swiglu", "n_inner": 48, "mlp_multiple_of": 16,
            "rotary_emb_fraction": 0.5, "n_positions": 0, "rms_norm": True, "qkv_proj_bias": False,
            "out_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "tie_word_embeddings": False,
            "lm_head_bias": True,
        },
        "weighted",
    ),
    (
        "fused_mlp_fused_ln_seq",
        {
            "fused_mlp": True, "activation_function": "sqrelu", "mlp_checkpoint_lvl": [1, 2],
            "fused_dropout_add_ln": True, "residual_in_fp32": True, "n_inner": 64,
        },
        "weighted",
    ),
]  # fmt: skip


def _gather(obj, group):
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _serial_and_parallel(config, group, seed):
    """The single-process model (same on every rank) and the tensor-parallel one holding its shard."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(seed)
    serial = _randomize(GPTLMHeadModel(config), seed)
    model = GPTLMHeadModel(config, process_group=group)
    result = model.load_state_dict(shard_state_dict_tp(serial.state_dict(), config, world, rank))
    assert not result.missing_keys and not result.unexpected_keys
    return serial, model


def _check_tp_matches_serial(rank, world, group, data):
    import torch.distributed as dist

    from flash_attn.losses.cross_entropy import CrossEntropyLoss
    from flash_attn.utils.distributed import allreduce_sequence_parallel_grad

    batch, seqlen = 2, 8
    for name, kw, loss_kind in TP_CONFIGS:
        if kw.get("fused_dropout_add_ln") and os.environ.get("TRITON_INTERPRET") != "1":
            continue  # CPU tensors through Triton need the interpreter
        config = _config(**kw)
        seq = getattr(config, "sequence_parallel", True)
        serial, model = _serial_and_parallel(config, group, seed=5)
        vocab = serial.lm_head.weight.shape[0]
        beg, end = rank * vocab // world, (rank + 1) * vocab // world

        # the construction: this rank's share of the parameters, the norms shared and tagged
        total = sum(p.numel() for p in serial.parameters())
        shared = [n for n, p in model.named_parameters() if getattr(p, "_shared_params", False)]
        assert shared and all(("norm" in n or "ln_f" in n) for n in shared), name
        assert all(
            getattr(p, "_sequence_parallel", False) == seq for n, p in model.named_parameters() if n in shared
        )
        counts = _gather((sum(p.numel() for p in model.parameters()), shared), group)
        n_shared = sum(p.numel() for n, p in model.named_parameters() if n in shared)
        assert all(c[1] == shared for c in counts), name
        assert total == sum(c[0] for c in counts) - (world - 1) * n_shared, name
        assert isinstance(model.lm_head, ColumnParallelLinear) and model.lm_head.weight.shape[0] == end - beg
        assert model.transformer.layers[0].mixer.num_heads_per_rank == config.n_head // world
        if config.tie_word_embeddings:
            assert model.lm_head.weight is model.transformer.embeddings.word_embeddings.weight

        ids = _ids(batch, seqlen, seed=6)
        targets = ids.roll(-1, 1).flatten()
        want = serial(ids).logits
        logits = model(ids).logits
        if seq:  # every (batch * seqlen) row (the head all-gathers them), this rank's vocabulary
            assert logits.shape == (batch * seqlen, end - beg), name
            _close(logits, want.flatten(0, 1)[:, beg:end], msg=name)
        else:
            assert logits.shape == (batch, seqlen, end - beg), name
            _close(logits, want[..., beg:end], msg=name)
        if loss_kind == "ce":
            F.cross_entropy(want.flatten(0, 1), targets).backward()
            loss = CrossEntropyLoss(process_group=group)(logits.reshape(-1, end - beg), targets)
            _close(loss, F.cross_entropy(want.detach().flatten(0, 1), targets), msg=name)
            loss.backward()
        else:
            g = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
            (want * g).sum().backward()
            (logits * g[..., beg:end].reshape(logits.shape)).sum().backward()
        if seq:
            allreduce_sequence_parallel_grad(model, group)

        # replicated parameters: the full gradient on every rank; the rest combined over the ranks
        serial_grads = _grads(serial)
        grads = _grads(model)
        for n in shared:
            _close(grads[n], serial_grads[n], msg=f"{name} rank {rank}: {n}")
        combined = combine_state_dicts_tp(_gather(grads, group), config)
        assert combined.keys() == serial_grads.keys(), name
        for n, grad in combined.items():
            _close(grad, serial_grads[n], msg=f"{name}: {n}")

        # tie_weights broadcasts the shared parameters from the first rank
        with torch.no_grad():
            model.transformer.ln_f.weight.add_(float(rank))
        model.tie_weights()
        assert torch.equal(model.transformer.ln_f.weight, serial.transformer.ln_f.weight), name
        dist.barrier(group)


def _check_tp_generation(rank, world, group, data):
    """Greedy generation: the full-vocabulary logits (all-gathered) and tokens of the single-process model."""
    kw = dict(TP_CONFIGS[2][1], sequence_parallel=False, pad_vocab_size_multiple=8)
    config = _config(**kw)
    serial, model = _serial_and_parallel(config, group, seed=8)
    serial.eval()
    model.eval()
    prompt = _ids(2, 4, seed=9)
    vocab = serial.lm_head.weight.shape[0]
    with torch.no_grad():
        _close(
            model(prompt).logits,
            serial(prompt).logits[..., rank * vocab // world : (rank + 1) * vocab // world],
        )
    out = model.generate(
        prompt, max_length=8, top_k=1, vocab_size=VOCAB, tensor_parallel=world,
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    want = serial.generate(
        prompt, max_length=8, top_k=1, vocab_size=VOCAB, return_dict_in_generate=True, output_scores=True
    )
    assert torch.equal(out.sequences, want.sequences)
    assert all(s.shape == (2, VOCAB) for s in out.scores)
    _close(torch.stack(out.scores), torch.stack(want.scores))
    # sequence parallelism has no generation mode: refused before the layers run
    seq_model = GPTLMHeadModel(_config(**dict(kw, sequence_parallel=True)), process_group=group)
    cache = seq_model.allocate_inference_cache(2, 8)
    assert cache[0].shape == (2, 8, 2, 2 // world, 8)
    from flash_attn.utils.generation import InferenceParams

    for call in (
        lambda: seq_model(prompt, inference_params=InferenceParams(max_seqlen=8, max_batch_size=2)),
        lambda: seq_model(prompt, num_last_tokens=1),
    ):
        with pytest.raises(ValueError, match="sequence_parallel"):
            call()


def _check_tp_from_pretrained(rank, world, group, data):
    """from_pretrained(world_size, rank) of a saved HF GPT-2 checkpoint: this rank's shard of the weights."""
    folder = data["checkpoint"]
    config = _config(pad_vocab_size_multiple=8 * world)
    serial = GPTLMHeadModel.from_pretrained(folder, config)
    model = GPTLMHeadModel.from_pretrained(folder, config, process_group=group, world_size=world, rank=rank)
    want = shard_state_dict_tp(serial.state_dict(), config, world, rank)
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    ids = _ids(2, 6, seed=10)
    vocab = serial.lm_head.weight.shape[0]
    with torch.no_grad():
        _close(
            model(ids).logits,
            serial(ids).logits.flatten(0, 1)[:, rank * vocab // world : (rank + 1) * vocab // world],
        )
    for kwargs in ({"world_size": world, "rank": world - 1 - rank}, {"world_size": world + 1, "rank": rank}):
        if kwargs["rank"] == rank and kwargs["world_size"] == world:
            continue
        with pytest.raises(ValueError, match="process group"):
            GPTLMHeadModel.from_pretrained(folder, config, process_group=group, **kwargs)


@pytest.mark.parametrize("world", [1, 2])
def test_tensor_parallel_matches_single_process(world, tmp_path):
    spawn_gloo(__file__, ["_check_tp_matches_serial"], world, tmp_path, {})


def test_tensor_parallel_generation_and_from_pretrained(tmp_path):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(11)
    hf = _randomize(transformers.GPT2LMHeadModel(config), 11)
    hf.save_pretrained(tmp_path / "gpt2-tiny")
    data = {"checkpoint": str(tmp_path / "gpt2-tiny")}
    spawn_gloo(__file__, ["_check_tp_generation", "_check_tp_from_pretrained"], 2, tmp_path, data)
