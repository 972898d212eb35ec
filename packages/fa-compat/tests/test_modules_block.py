"""Tests for flash_attn.modules.block, flash_attn.modules.embedding, flash_attn.utils.distributed and
flash_attn.layers.patch_embed (Triton layer norm; interpreter on CPU).

The blocks are held against references written here in plain PyTorch from the same weights (attention by
einsum + softmax, the MLP and the norms by ``torch.nn.functional``); the fused dropout + add + norm path against
the unfused one, gradients included. The distributed helpers and the parallel embeddings run in spawned gloo
process groups of one and two ranks (CPU).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from functools import partial  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fa_compat_dist import spawn_gloo  # noqa: E402
from fa_compat_testutils import DEVICE, HI, LOWP  # noqa: E402
from torch import nn  # noqa: E402

from flash_attn.layers.patch_embed import PatchEmbed  # noqa: E402
from flash_attn.modules.block import Block, ParallelBlock, StochasticDepth, stochastic_depth  # noqa: E402
from flash_attn.modules.embedding import (  # noqa: E402
    BertEmbeddings,
    ColumnParallelEmbedding,
    GPT2Embeddings,
    ParallelGPT2Embeddings,
    VocabParallelEmbedding,
)
from flash_attn.modules.mha import MHA  # noqa: E402
from flash_attn.modules.mlp import Mlp  # noqa: E402
from flash_attn.ops.triton.layer_norm import RMSNorm  # noqa: E402
from flash_attn.utils.distributed import get_dim_for_local_rank  # noqa: E402

TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DIM, HEADS, BATCH, SEQ = 32, 2, 2, 5  # head dim 16


def _close(a, b, dtype=HI, msg=""):
    tol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=msg or None)


def _close_scaled(a, b, dtype=HI, msg=""):
    """Like _close, the absolute tolerance scaled by b's largest magnitude (gradients summed over tokens)."""
    tol = TOL[dtype] * max(1.0, b.float().abs().max().item())
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=TOL[dtype], msg=msg or None)


def _randn(*shape, dtype=HI, requires_grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------- plain references
def _lin(x, layer):
    return F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())


def _attention(q, k, v):
    """q (B, Sq, H, D), k / v (B, Sk, H, D) -> (B, Sq, H * D), non-causal softmax attention in fp32."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
    return out.flatten(-2)


def ref_mha(mha, x, mixer_subset=None):
    """MHA (self-attention, or cross-attention of x[:, mixer_subset] over x) from its weights."""
    h = mha.num_heads
    if mha.cross_attn:
        xq = x if mixer_subset is None else x[:, mixer_subset]
        q = _lin(xq, mha.Wq).unflatten(-1, (h, -1))
        k, v = _lin(x, mha.Wkv).unflatten(-1, (2, h, -1)).unbind(2)
    else:
        q, k, v = _lin(x, mha.Wqkv).unflatten(-1, (3, h, -1)).unbind(2)
    return _lin(_attention(q, k, v), mha.out_proj)


def ref_mlp(mlp, x):
    return _lin(F.gelu(_lin(x, mlp.fc1)), mlp.fc2)


def ref_norm(norm, x):
    w = norm.weight.float()
    if isinstance(norm, RMSNorm):
        w = w + 1 if norm.zero_centered_weight else w
        return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps) * w
    return F.layer_norm(x.float(), (x.shape[-1],), w, norm.bias.float(), norm.eps)


def ref_block_prenorm(block, x, residual=None, mixer_subset=None):
    res = x.float() if residual is None else x.float() + residual.float()
    h = ref_mha(block.mixer, ref_norm(block.norm1, res), mixer_subset)
    if mixer_subset is not None:
        res = res[:, mixer_subset]
    res = h + res
    return ref_mlp(block.mlp, ref_norm(block.norm2, res)), res


def ref_block_postnorm(block, x):
    h = ref_norm(block.norm1, ref_mha(block.mixer, x) + x.float())
    return ref_norm(block.norm2, ref_mlp(block.mlp, h) + h)


def ref_parallel_block(block, x1, x2=None, residual=None):
    res = x1.float() if residual is None else residual.float() + x1.float()
    if x2 is not None:
        res = res + x2.float()
    n1 = ref_norm(block.norm1, res)
    n2 = n1 if block.tied_norm else ref_norm(block.norm2, res)
    return ref_mha(block.mixer, n1), ref_mlp(block.mlp, n2), res


def _mixer(**kw):
    return partial(MHA, num_heads=HEADS, **kw)


def _block(seed=0, dtype=HI, **kw):
    torch.manual_seed(seed)
    kw.setdefault("mixer_cls", _mixer())
    kw.setdefault("mlp_cls", partial(Mlp, hidden_features=2 * DIM))
    block = Block(DIM, **kw).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():  # non-trivial norm weights
        for name, p in block.named_parameters():
            if name.startswith("norm"):
                p.add_(0.3 * torch.randn_like(p))
    return block


def _parallel_block(seed=0, dtype=HI, **kw):
    torch.manual_seed(seed)
    kw.setdefault("mixer_cls", _mixer())
    kw.setdefault("mlp_cls", partial(Mlp, hidden_features=2 * DIM))
    block = ParallelBlock(DIM, **kw).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.startswith("norm"):
                p.add_(0.3 * torch.randn_like(p))
    return block


def _outputs_and_grads(module, inputs, **kw):
    """Forward + backward of the sum of every output times fixed random weights."""
    for t in inputs:
        if t is not None:
            t.grad = None
    module.zero_grad()
    outs = module(*inputs, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device="cpu").manual_seed(123)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    grads.update({f"input{i}": t.grad.clone() for i, t in enumerate(inputs) if t is not None})
    return [o.detach() for o in outs], grads


def _fused_and_unfused_runs(make_block, inputs):
    """_outputs_and_grads of ``make_block(fused_dropout_add_ln=...)`` in training mode: unfused, then fused."""
    return [_outputs_and_grads(make_block(fused_dropout_add_ln=f).train(), inputs) for f in (False, True)]


def _assert_same_run(run_a, run_b, dtype=HI):
    outs_a, grads_a = run_a
    outs_b, grads_b = run_b
    assert len(outs_a) == len(outs_b)
    for i, (a, b) in enumerate(zip(outs_a, outs_b)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"output {i}"
        _close(a, b, dtype, f"output {i}")
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        _close_scaled(grads_a[name], grads_b[name], dtype, f"gradient of {name}")


# ------------------------------------------------------------------------------------------- Block
def test_block_defaults_and_parameter_names():
    block = Block(128)
    assert isinstance(block.mixer, MHA) and block.mixer.num_heads == 2 and block.mixer.use_flash_attn is False
    assert isinstance(block.mlp, Mlp) and block.mlp.fc1.out_features == 512
    assert isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)
    assert isinstance(block.dropout1, nn.Dropout) and isinstance(block.drop_path1, StochasticDepth)
    assert block.prenorm and not block.fused_dropout_add_ln and not block.residual_in_fp32
    assert block.drop_path1.p == 0.0 and block.drop_path1.mode == "row"
    assert sorted(block.state_dict()) == sorted(
        f"{m}.{p}"
        for m in ("mixer.Wqkv", "mixer.out_proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2")
        for p in ("weight", "bias")
    )
    # an Identity MLP: no second sub-layer
    attn_only = Block(64, mlp_cls=nn.Identity)
    assert not any(hasattr(attn_only, n) for n in ("dropout2", "drop_path2", "norm2"))
    assert sorted(attn_only.state_dict()) == [
        "mixer.Wqkv.bias", "mixer.Wqkv.weight", "mixer.out_proj.bias", "mixer.out_proj.weight",
        "norm1.bias", "norm1.weight",
    ]  # fmt: skip
    # fused and unfused blocks share the state dict
    fused = Block(128, fused_dropout_add_ln=True)
    fused.load_state_dict(block.state_dict())
    pblock = ParallelBlock(128)
    assert sorted(pblock.state_dict()) == sorted(block.state_dict())
    assert "norm2.weight" not in ParallelBlock(128, tied_norm=True).state_dict()


def test_block_invalid_configurations():
    with pytest.raises(ValueError, match="residual_in_fp32"):
        Block(64, prenorm=False, residual_in_fp32=True)
    with pytest.raises(ValueError, match="fused_dropout_add_ln"):
        Block(64, norm_cls=nn.Identity, fused_dropout_add_ln=True)
    with pytest.raises(ValueError, match="fused_dropout_add_ln"):
        ParallelBlock(64, dropout_cls=lambda p: nn.Identity(), fused_dropout_add_ln=True)
    post = _block(prenorm=False)
    x = _randn(BATCH, SEQ, DIM)
    with pytest.raises(ValueError, match="residual"):
        post(x, x)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("first", [True, False])
def test_block_prenorm_matches_reference(fused, first):
    block = _block(fused_dropout_add_ln=fused, resid_dropout1=0.25, drop_path1=0.5, drop_path2=0.5).eval()
    x = _randn(BATCH, SEQ, DIM)
    residual = None if first else _randn(BATCH, SEQ, DIM)
    out, res = block(x, residual)
    ref_out, ref_res = ref_block_prenorm(block, x, residual)
    assert out.dtype == res.dtype == HI and out.shape == res.shape == (BATCH, SEQ, DIM)
    _close(res, ref_res, msg="residual")
    _close(out, ref_out, msg="hidden states")


@pytest.mark.parametrize("first", [True, False])
def test_block_prenorm_fused_matches_unfused_with_gradients(first):
    x = _randn(BATCH, SEQ, DIM, requires_grad=True)
    residual = None if first else _randn(BATCH, SEQ, DIM, requires_grad=True)
    _assert_same_run(*_fused_and_unfused_runs(_block, (x, residual)))


@pytest.mark.parametrize("fused", [False, True])
def test_block_residual_in_fp32(fused):
    dtype = LOWP
    block = _block(dtype=dtype, fused_dropout_add_ln=fused, residual_in_fp32=True)
    x = _randn(BATCH, SEQ, DIM, dtype=dtype)
    out, res = block(x)
    assert res.dtype == torch.float32 and out.dtype == dtype
    ref_out, ref_res = ref_block_prenorm(block, x)
    _close(res, ref_res, dtype, "residual")
    _close(out, ref_out, dtype, "hidden states")
    # the next block takes the fp32 residual and keeps it in fp32
    out2, res2 = block(out, res)
    assert res2.dtype == torch.float32
    ref_out2, ref_res2 = ref_block_prenorm(block, out, res)
    _close(res2, ref_res2, dtype, "second residual")
    _close(out2, ref_out2, dtype, "second hidden states")
    # without residual_in_fp32 the residual keeps the input dtype
    _, res_lp = _block(dtype=dtype, fused_dropout_add_ln=fused)(x)
    assert res_lp.dtype == dtype


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("return_residual", [False, True])
def test_block_postnorm_matches_reference(fused, return_residual):
    kw = {"return_residual": return_residual}
    block = _block(
        prenorm=False,
        fused_dropout_add_ln=fused,
        mixer_cls=_mixer(**kw),
        mlp_cls=partial(Mlp, hidden_features=2 * DIM, **kw),
        drop_path1=0.3,
        resid_dropout2=0.4,
        **kw,
    ).eval()
    x = _randn(BATCH, SEQ, DIM)
    out = block(x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == HI
    _close(out, ref_block_postnorm(block, x))


def test_block_postnorm_fused_matches_unfused_with_gradients():
    x = _randn(BATCH, SEQ, DIM, requires_grad=True)
    _assert_same_run(*_fused_and_unfused_runs(partial(_block, prenorm=False), (x,)))


@pytest.mark.parametrize("zero_centered_weight", [False, True])
@pytest.mark.parametrize("prenorm", [True, False])
def test_block_rms_norm(prenorm, zero_centered_weight):
    norm_cls = partial(RMSNorm, zero_centered_weight=zero_centered_weight)
    x = _randn(BATCH, SEQ, DIM, requires_grad=True)
    residual = _randn(BATCH, SEQ, DIM, requires_grad=True) if prenorm else None
    blocks = [_block(prenorm=prenorm, norm_cls=norm_cls, fused_dropout_add_ln=f) for f in (False, True)]
    assert "norm1.bias" not in blocks[0].state_dict()
    runs = [_outputs_and_grads(b, (x, residual)) for b in blocks]
    _assert_same_run(*runs)
    if prenorm:
        ref_out, ref_res = ref_block_prenorm(blocks[0], x, residual)
        _close(runs[0][0][0], ref_out)
        _close(runs[0][0][1], ref_res)
    else:
        _close(runs[0][0][0], ref_block_postnorm(blocks[0], x))


def test_block_mixer_subset_cross_attention():
    block = _block(mixer_cls=_mixer(cross_attn=True))
    x, residual = _randn(BATCH, SEQ, DIM), _randn(BATCH, SEQ, DIM)
    subset = slice(0, 1)  # a ViT's CLS token
    out, res = block(x, residual, mixer_subset=subset)
    assert out.shape == res.shape == (BATCH, 1, DIM)
    ref_out, ref_res = ref_block_prenorm(block, x, residual, mixer_subset=subset)
    _close(res, ref_res, msg="residual")
    _close(out, ref_out, msg="hidden states")


class _RecordingMixer(nn.Module):
    """Doubles its input and records the keyword arguments of each call."""

    def __init__(self, dim):
        super().__init__()
        self.calls = []

    def forward(self, x, **kwargs):
        self.calls.append(kwargs)
        return 2 * x

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return ("cache", batch_size, max_seqlen, dtype, kwargs)


def test_block_mixer_kwargs_and_inference_cache():
    block = _block(mixer_cls=_RecordingMixer, mlp_cls=nn.Identity)
    x = _randn(BATCH, SEQ, DIM)
    kwargs = {"key_padding_mask": None, "scale": 3}
    out, res = block(x, mixer_kwargs=kwargs, mixer_subset=slice(1, 3))
    assert block.mixer.calls[-1] == {"key_padding_mask": None, "scale": 3, "mixer_subset": slice(1, 3)}
    assert kwargs == {"key_padding_mask": None, "scale": 3}  # the caller's dict is left alone
    assert res.shape == (BATCH, 2, DIM)  # the residual is indexed like the mixer's queries
    _close(out, 2 * ref_norm(block.norm1, x))  # Identity MLP: the mixer's output is returned as is
    _close(res, x[:, 1:3])
    block(x)
    assert block.mixer.calls[-1] == {}
    assert block.allocate_inference_cache(2, 7, dtype=torch.float16, foo=1) == (
        "cache", 2, 7, torch.float16, {"foo": 1},
    )  # fmt: skip
    pblock = _parallel_block(mixer_cls=_RecordingMixer)
    pblock(x, mixer_kwargs={"a": 1})
    assert pblock.mixer.calls[-1] == {"a": 1}
    assert pblock.allocate_inference_cache(1, 4) == ("cache", 1, 4, None, {})
    # with MHA: its KV cache
    mha_block = _block(mixer_cls=_mixer(layer_idx=0))
    cache = mha_block.allocate_inference_cache(3, 11, dtype=torch.float16)
    assert cache.shape == (3, 11, 2, HEADS, DIM // HEADS) and cache.dtype == torch.float16


def test_block_marks_norm_parameters():
    block = Block(64, sequence_parallel=True)
    marked = {n for n, p in block.named_parameters() if getattr(p, "_sequence_parallel", False)}
    assert marked == {"norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"}
    assert not any(hasattr(p, "_shared_params") for p in block.parameters())
    pblock = ParallelBlock(64, tied_norm=True, mark_shared_params=True)
    assert {n for n, p in pblock.named_parameters() if getattr(p, "_shared_params", False)} == {
        "norm1.weight",
        "norm1.bias",
    }
    assert not any(hasattr(p, "_sequence_parallel") for p in Block(64).parameters())


# ------------------------------------------------------------------------------------ stochastic depth
def test_stochastic_depth_eval_and_validation():
    x = torch.randn(6, 3, 4)
    sd = StochasticDepth(0.7, mode="row").eval()
    assert sd(x) is x
    assert repr(sd) == "StochasticDepth(p=0.7, mode=row)"
    assert StochasticDepth(0.0, "row").train()(x) is x
    assert stochastic_depth(x, 1.0, "row").abs().sum() == 0  # every row dropped, no division by zero
    with pytest.raises(ValueError, match="between 0 and 1"):
        stochastic_depth(x, 1.5, "row")
    with pytest.raises(ValueError, match="mode"):
        stochastic_depth(x, 0.5, "col")


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_statistics(mode):
    torch.manual_seed(0)
    p, n = 0.3, 4000
    x = torch.ones(n, 2, 3)
    sd = StochasticDepth(p, mode).train()
    if mode == "row":
        out = sd(x)
        per_row = out.flatten(1)
        assert torch.equal(per_row, per_row[:, :1].expand_as(per_row))  # whole rows kept or dropped
        values = per_row[:, 0]
        kept = values != 0
        torch.testing.assert_close(values[kept], torch.full_like(values[kept], 1 / (1 - p)))
        assert abs((values == 0).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
        assert abs(values.mean().item() - 1.0) < 0.05  # unbiased
    else:
        dropped = [(sd(x[:1]) == 0).all().item() for _ in range(n // 10)]
        assert abs(sum(dropped) / len(dropped) - p) < 5 * math.sqrt(p * (1 - p) / len(dropped))


@pytest.mark.parametrize("fused", [False, True])
def test_block_drop_path_training_drops_samples(fused):
    """Training mode: the residual stream gets each sample's sub-layer output either not at all or scaled by
    1 / (1 - p), the whole sample at once (row mode), in about a fraction p of the samples."""
    torch.manual_seed(1)
    p, n = 0.4, 300 if DEVICE == "cpu" else 4000
    block = Block(16, mixer_cls=nn.Identity, mlp_cls=nn.Identity, drop_path1=p, fused_dropout_add_ln=fused)
    block = block.to(DEVICE, HI).train()
    x = torch.ones(n, 2, 16, device=DEVICE, dtype=HI)
    residual = torch.full_like(x, 0.5)
    _, res = block(x, residual)
    added = (res - residual).float().flatten(1)
    assert torch.equal(added, added[:, :1].expand_as(added))
    values = added[:, 0]
    kept = values != 0
    _close(values[kept], torch.full_like(values[kept], 1 / (1 - p)))
    assert abs((~kept).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # eval mode: the identity
    _, res_eval = block.eval()(x, residual)
    _close(res_eval, x + residual)


@pytest.mark.parametrize("fused", [False, True])
def test_block_resid_dropout_training(fused):
    """Training mode: each element of the sub-layer's output is dropped with probability p or scaled by
    1 / (1 - p) before the residual add (fused: inside the kernel)."""
    torch.manual_seed(2)
    p = 0.25
    block = Block(
        16, mixer_cls=nn.Identity, mlp_cls=nn.Identity, resid_dropout1=p, fused_dropout_add_ln=fused
    )
    block = block.to(DEVICE, HI).train()
    x = torch.ones(64, 4, 16, device=DEVICE, dtype=HI)
    residual = torch.full_like(x, 0.5)
    _, res = block(x, residual)
    added = (res - residual).float().flatten()
    kept = added != 0
    _close(added[kept], torch.full_like(added[kept], 1 / (1 - p)))
    assert abs((~kept).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / added.numel())


# ----------------------------------------------------------------------------------- ParallelBlock
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tied_norm", [False, True])
@pytest.mark.parametrize("first", [True, False])
def test_parallel_block_matches_reference(fused, tied_norm, first):
    block = _parallel_block(fused_dropout_add_ln=fused, tied_norm=tied_norm, resid_dropout1=0.5).eval()
    x1 = _randn(BATCH, SEQ, DIM)
    x2 = None if first else _randn(BATCH, SEQ, DIM)
    residual = None if first else _randn(BATCH, SEQ, DIM)
    out1, out2, res = block(x1, x2, residual)
    ref1, ref2, ref_res = ref_parallel_block(block, x1, x2, residual)
    assert out1.shape == out2.shape == res.shape == (BATCH, SEQ, DIM) and res.dtype == HI
    _close(res, ref_res, msg="residual")
    _close(out1, ref1, msg="mixer output")
    _close(out2, ref2, msg="mlp output")


@pytest.mark.parametrize("tied_norm", [False, True])
@pytest.mark.parametrize("rms", [False, True])
def test_parallel_block_fused_matches_unfused_with_gradients(tied_norm, rms):
    kw = {"tied_norm": tied_norm, "norm_cls": RMSNorm if rms else nn.LayerNorm}
    x1, x2, residual = (_randn(BATCH, SEQ, DIM, requires_grad=True) for _ in range(3))
    _assert_same_run(*_fused_and_unfused_runs(partial(_parallel_block, **kw), (x1, x2, residual)))


@pytest.mark.parametrize("fused", [False, True])
def test_parallel_block_residual_in_fp32(fused):
    dtype = LOWP
    block = _parallel_block(dtype=dtype, fused_dropout_add_ln=fused, residual_in_fp32=True)
    x1, x2 = _randn(BATCH, SEQ, DIM, dtype=dtype), _randn(BATCH, SEQ, DIM, dtype=dtype)
    out1, out2, res = block(x1)
    assert res.dtype == torch.float32 and out1.dtype == out2.dtype == dtype
    ref1, ref2, ref_res = ref_parallel_block(block, x1)
    _close(res, ref_res, dtype)
    _close(out1, ref1, dtype)
    _close(out2, ref2, dtype)
    _, _, res2 = block(out1, x2, res)
    assert res2.dtype == torch.float32
    _close(res2, ref_parallel_block(block, out1, x2, res)[2], dtype)


# -------------------------------------------------------------------------------------- embeddings
def test_gpt2_embeddings():
    torch.manual_seed(2)
    ids = torch.randint(0, 11, (2, 5), device=DEVICE)
    no_pos = GPT2Embeddings(8, 11, 0, device=DEVICE)
    assert not hasattr(no_pos, "position_embeddings") and no_pos.project_in is None
    assert torch.equal(no_pos(ids), no_pos.word_embeddings.weight[ids])

    emb = GPT2Embeddings(8, 11, 7, padding_idx=3, device=DEVICE, dtype=torch.float64)
    assert emb.word_embeddings.padding_idx == 3 and emb.word_embeddings.weight.dtype == torch.float64
    assert emb.position_embeddings.weight.shape == (7, 8)
    words, pos = emb.word_embeddings.weight, emb.position_embeddings.weight
    torch.testing.assert_close(emb(ids), words[ids] + pos[:5])
    position_ids = torch.tensor([[6, 5, 4, 3, 2], [0, 0, 1, 1, 2]], device=DEVICE)
    torch.testing.assert_close(emb(ids, position_ids), words[ids] + pos[position_ids])

    proj = GPT2Embeddings(8, 11, 7, word_embed_proj_dim=4, device=DEVICE)
    assert proj.word_embeddings.weight.shape == (11, 4) and proj.project_in.bias is None
    assert sorted(proj.state_dict()) == [
        "position_embeddings.weight", "project_in.weight", "word_embeddings.weight",
    ]  # fmt: skip
    expected = (
        proj.word_embeddings.weight[ids] @ proj.project_in.weight.T + proj.position_embeddings.weight[:5]
    )
    torch.testing.assert_close(proj(ids), expected)


def test_bert_embeddings():
    torch.manual_seed(3)
    emb = BertEmbeddings(6, 13, 9, 2, padding_idx=0, device=DEVICE)
    ids = torch.randint(0, 13, (3, 4), device=DEVICE)
    words, pos, types = (
        emb.word_embeddings.weight,
        emb.position_embeddings.weight,
        emb.token_type_embeddings.weight,
    )
    torch.testing.assert_close(emb(ids), words[ids] + pos[:4] + types[0])
    token_type_ids = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]], device=DEVICE)
    position_ids = torch.tensor([8, 1, 2, 3], device=DEVICE)
    torch.testing.assert_close(
        emb(ids, position_ids, token_type_ids), words[ids] + pos[position_ids] + types[token_type_ids]
    )
    bare = BertEmbeddings(6, 13, 0, 0, device=DEVICE)
    assert sorted(bare.state_dict()) == ["word_embeddings.weight"]
    torch.testing.assert_close(bare(ids, token_type_ids=token_type_ids), bare.word_embeddings.weight[ids])


def test_parallel_embeddings_without_process_group():
    vocab = VocabParallelEmbedding(10, 4, padding_idx=1, device=DEVICE)
    col = ColumnParallelEmbedding(10, 4, device=DEVICE)
    assert isinstance(vocab, nn.Embedding) and vocab.weight.shape == (10, 4) and vocab.padding_idx == 1
    assert col.weight.shape == (10, 4) and vocab.process_group is None
    ids = torch.tensor([[0, 9, 3]], device=DEVICE)
    assert torch.equal(vocab(ids), vocab.weight[ids])

    torch.manual_seed(4)
    par = ParallelGPT2Embeddings(8, 12, 6, process_group=None, device=DEVICE)
    ref = GPT2Embeddings(8, 12, 6, device=DEVICE)
    ref.load_state_dict(par.state_dict())  # same parameter names and shapes
    ids = torch.randint(0, 12, (2, 5), device=DEVICE)
    torch.testing.assert_close(par(ids), ref(ids))
    position_ids = torch.tensor([5, 4, 3, 2, 1], device=DEVICE)
    torch.testing.assert_close(
        par(ids, position_ids, combine_batch_seqlen_dim=True), ref(ids, position_ids).reshape(10, 8)
    )


# ------------------------------------------------------------------------------------- distributed
def test_get_dim_for_local_rank():
    assert [get_dim_for_local_rank(10, 3, r) for r in range(3)] == [4, 3, 3]
    assert [get_dim_for_local_rank(10, 3, r, multiple_of=2) for r in range(3)] == [4, 4, 2]
    assert [get_dim_for_local_rank(7, 2, r, multiple_of=2) for r in range(2)] == [4, 2]
    assert [get_dim_for_local_rank(4096, 8, r, multiple_of=128) for r in range(8)] == [512] * 8
    assert get_dim_for_local_rank(5, 1, 0) == 5
    for dim in range(1, 40):
        for world in range(1, 6):
            for mult in (1, 2, 3):
                dims = [get_dim_for_local_rank(dim, world, r, mult) for r in range(world)]
                assert sum(dims) == (dim // mult) * mult and max(dims) - min(dims) <= mult
                assert all(d % mult == 0 for d in dims) and dims == sorted(dims, reverse=True)


def _rank_tensor(rank, *shape, salt=0):
    """A tensor every process can rebuild for any rank."""
    gen = torch.Generator().manual_seed(1000 * rank + salt)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _check_collectives(rank, world, group):
    from flash_attn.utils.distributed import (
        all_gather,
        all_gather_raw,
        all_reduce,
        all_reduce_raw,
        reduce_scatter,
        reduce_scatter_raw,
    )

    x = _rank_tensor(rank, 2, 3)
    every = [_rank_tensor(r, 2, 3) for r in range(world)]
    out, handle = all_gather_raw(x, group)
    assert handle is None and torch.equal(out, torch.cat(every))
    out, handle = all_gather_raw(x.t(), group, async_op=True)  # non-contiguous input, asynchronous
    handle.wait()
    assert torch.equal(out, torch.cat([t.t() for t in every]))

    big = _rank_tensor(rank, 2 * world, 3, salt=1)
    total = sum(_rank_tensor(r, 2 * world, 3, salt=1) for r in range(world))
    out, handle = reduce_scatter_raw(big, group)
    assert handle is None and out.shape == (2, 3)
    torch.testing.assert_close(out, total[2 * rank : 2 * rank + 2])
    if world > 1:
        with pytest.raises(ValueError, match="divisible"):
            reduce_scatter_raw(_rank_tensor(rank, 2 * world + 1, 3), group)

    y = x.clone()
    out, _ = all_reduce_raw(y, group)
    assert out is y  # in place for a contiguous input
    torch.testing.assert_close(out, sum(every))
    xt = x.t()
    out, _ = all_reduce_raw(xt, group)
    torch.testing.assert_close(out, sum(every).t())
    assert torch.equal(xt, x.t())  # a non-contiguous input is reduced in a copy

    # autograd: all-gather <-> reduce-scatter, all-reduce passes the gradient through
    leaf = x.clone().requires_grad_()
    gathered = all_gather(leaf, group)
    g = _rank_tensor(rank, 2 * world, 3, salt=2)
    gathered.backward(g)
    g_total = sum(_rank_tensor(r, 2 * world, 3, salt=2) for r in range(world))
    torch.testing.assert_close(leaf.grad, g_total[2 * rank : 2 * rank + 2])

    leaf = big.clone().requires_grad_()
    scattered = reduce_scatter(leaf, group)
    torch.testing.assert_close(scattered, total[2 * rank : 2 * rank + 2])
    g = _rank_tensor(rank, 2, 3, salt=3)
    scattered.backward(g)
    torch.testing.assert_close(leaf.grad, torch.cat([_rank_tensor(r, 2, 3, salt=3) for r in range(world)]))

    leaf = x.clone().requires_grad_()
    reduced = all_reduce(leaf * 1.0, group)
    torch.testing.assert_close(reduced, sum(every))
    g = _rank_tensor(rank, 2, 3, salt=4)
    reduced.backward(g)
    torch.testing.assert_close(leaf.grad, g)


def _check_parameter_sync(rank, world, group):
    from flash_attn.utils.distributed import allreduce_sequence_parallel_grad, sync_shared_params

    torch.manual_seed(rank)  # different values on every rank
    model = nn.ModuleDict(
        {
            "a": Block(8, mixer_cls=nn.Identity, mlp_cls=nn.Identity, mark_shared_params=True),
            "b": Block(8, mixer_cls=nn.Identity, mlp_cls=nn.Identity, sequence_parallel=True),
            "c": nn.Linear(8, 8),
        }
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_rank_tensor(rank, *p.shape).to(p.dtype))
    sync_shared_params(model, group)
    for name, p in model.named_parameters():
        src = 0 if name.startswith("a.") else rank
        assert torch.equal(p, _rank_tensor(src, *p.shape).to(p.dtype)), name

    for i, (_, p) in enumerate(sorted(model.named_parameters())):
        p.grad = _rank_tensor(rank, *p.shape, salt=10 + i).to(p.dtype)
    allreduce_sequence_parallel_grad(model, group)
    for i, (name, p) in enumerate(sorted(model.named_parameters())):
        mine = _rank_tensor(rank, *p.shape, salt=10 + i).to(p.dtype)
        if name.startswith("b."):
            want = sum(_rank_tensor(r, *p.shape, salt=10 + i) for r in range(world)).to(p.dtype)
            torch.testing.assert_close(p.grad, want, msg=name)
        else:
            assert torch.equal(p.grad, mine), name
    allreduce_sequence_parallel_grad(nn.Linear(2, 2), group)  # nothing marked: no collective


def _check_parallel_embeddings(rank, world, group):
    vocab, dim, max_pos, batch, seq = 8, 6 * world, 7, 2 * world, 3
    if world > 1:
        with pytest.raises(ValueError, match="num_embeddings"):
            VocabParallelEmbedding(vocab + 1, dim, process_group=group)
        with pytest.raises(RuntimeError, match="padding_idx"):
            VocabParallelEmbedding(vocab, dim, padding_idx=0, process_group=group)
        with pytest.raises(ValueError, match="embedding_dim"):
            ColumnParallelEmbedding(vocab, dim + 1, process_group=group)

    torch.manual_seed(0)  # the same full model on every rank
    full = GPT2Embeddings(dim, vocab, max_pos, dtype=torch.float64)
    ids = torch.randint(0, vocab, (batch, seq))
    position_ids = torch.tensor([4, 0, 6])
    g_full = torch.randn(batch, seq, dim, dtype=torch.float64)
    ref = full(ids, position_ids)
    ref.backward(g_full)
    rows, cols = vocab // world, dim // world

    shard = VocabParallelEmbedding(vocab, dim, process_group=group, dtype=torch.float64)
    assert shard.weight.shape == (rows, dim)
    with torch.no_grad():
        shard.weight.copy_(full.word_embeddings.weight[rank * rows : (rank + 1) * rows])
    mine = (ids >= rank * rows) & (ids < (rank + 1) * rows)
    part = shard(ids)
    torch.testing.assert_close(part, full.word_embeddings.weight[ids] * mine.unsqueeze(-1))
    column = ColumnParallelEmbedding(max_pos, dim, process_group=group)
    assert column.weight.shape == (max_pos, cols)

    for sequence_parallel in (True, False):
        for combine in (False, True):
            par = ParallelGPT2Embeddings(
                dim, vocab, max_pos, group, sequence_parallel=sequence_parallel, dtype=torch.float64
            )
            with torch.no_grad():
                par.word_embeddings.weight.copy_(full.word_embeddings.weight[rank * rows : (rank + 1) * rows])
                par.position_embeddings.weight.copy_(
                    full.position_embeddings.weight[:, rank * cols : (rank + 1) * cols]
                )
            out = par(ids, position_ids, combine_batch_seqlen_dim=combine)
            want, g = ref.detach(), g_full
            if combine:
                want, g = want.reshape(batch * seq, dim), g.reshape(batch * seq, dim)
            # sequence parallel: this rank's rows of dim 0, and the backward all-gathers their gradients;
            # all-reduce: every rank holds (and back-propagates) the full output
            if sequence_parallel:
                n = want.shape[0] // world
                want, g = want[rank * n : (rank + 1) * n], g[rank * n : (rank + 1) * n]
            torch.testing.assert_close(out, want, msg=f"sequence_parallel={sequence_parallel} {combine=}")
            out.backward(g)
            torch.testing.assert_close(
                par.word_embeddings.weight.grad,
                full.word_embeddings.weight.grad[rank * rows : (rank + 1) * rows],
            )
            torch.testing.assert_close(
                par.position_embeddings.weight.grad,
                full.position_embeddings.weight.grad[:, rank * cols : (rank + 1) * cols],
            )


@pytest.mark.parametrize("world", [1, 2])
def test_distributed_helpers_and_parallel_embeddings(world, tmp_path):
    checks = ["_check_collectives", "_check_parameter_sync", "_check_parallel_embeddings"]
    spawn_gloo(__file__, checks, world, tmp_path, limit_s=240)


# ------------------------------------------------------------------------------------- PatchEmbed
def test_patch_embed_matches_conv2d():
    torch.manual_seed(5)
    embed = PatchEmbed(img_size=(8, 12), patch_size=(4, 3), in_chans=2, embed_dim=5).to(DEVICE)
    assert embed.grid_size == (2, 4) and embed.num_patches == 8 and isinstance(embed.norm, nn.Identity)
    assert embed.proj.weight.shape == (5, 2 * 4 * 3)
    assert sorted(embed.state_dict()) == ["proj.bias", "proj.weight"]
    x = torch.randn(3, 2, 8, 12, device=DEVICE)
    conv = F.conv2d(x, embed.proj.weight.view(5, 2, 4, 3), embed.proj.bias, stride=(4, 3))  # (B, E, 2, 4)
    out = embed(x)
    assert out.shape == (3, 8, 5)
    torch.testing.assert_close(out, conv.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)

    grid = PatchEmbed(img_size=(8, 12), patch_size=(4, 3), in_chans=2, embed_dim=5, flatten=False).to(DEVICE)
    grid.load_state_dict(embed.state_dict())
    torch.testing.assert_close(grid(x), conv.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)

    normed = PatchEmbed(
        8, 4, in_chans=2, embed_dim=6, norm_layer=nn.LayerNorm, bias=False, fused_bias_fc=True
    )
    assert normed.img_size == (8, 8) and normed.patch_size == (4, 4) and normed.proj.bias is None
    assert sorted(normed.state_dict()) == ["norm.bias", "norm.weight", "proj.weight"]
    xs = torch.randn(2, 2, 8, 8)
    conv = F.conv2d(xs, normed.proj.weight.view(6, 2, 4, 4), stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(normed(xs), F.layer_norm(conv, (6,)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="height"):
        normed(torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="width"):
        normed(torch.randn(1, 2, 8, 12))
    default = PatchEmbed()
    assert default.num_patches == 196 and default.proj.weight.shape == (768, 768)
