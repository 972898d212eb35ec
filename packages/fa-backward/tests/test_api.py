"""Public API: packed variants, return conventions, signatures, errors, double backward."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from fa_backward_testutils import DEVICE, FP, cu_seqlens, rand

import fa_backward
from fa_backward import (
    flash_attn_backward,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from fa_core import flash_attn_forward

SIGNATURES = (
    Path(__file__).resolve().parents[2] / "fa-compat" / "tests" / "data" / "flash_attn_2_8_signatures.json"
)
PUBLIC = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]


@pytest.mark.skipif(not SIGNATURES.exists(), reason="flash-attn signature record not available")
@pytest.mark.parametrize("name", PUBLIC)
def test_signature_matches_flash_attn(name):
    records = json.loads(SIGNATURES.read_text())["records"]
    rec = next(r for r in records if r["module"] == "flash_attn" and r["name"] == name)
    params = list(inspect.signature(getattr(fa_backward, name)).parameters.values())
    assert [p.name for p in params] == [p["name"] for p in rec["params"]]
    for p, r in zip(params, rec["params"]):
        assert p.kind.name == r["kind"]
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        assert default == r["default"], (p.name, default, r["default"])


def _grads(fn, *tensors):
    out = fn(*tensors)
    torch.manual_seed(11)
    out.backward(torch.randn_like(out))
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked_matches_unpacked(causal):
    torch.manual_seed(0)
    qkv = rand(2, 33, 3, 2, 16).requires_grad_()
    out, (dqkv,) = _grads(lambda x: flash_attn_qkvpacked_func(x, causal=causal), qkv)
    q, k, v = (qkv[:, :, i].detach().clone().requires_grad_() for i in range(3))
    ref, (dq, dk, dv) = _grads(lambda a, b, c: flash_attn_func(a, b, c, causal=causal), q, k, v)
    assert torch.equal(out, ref)
    assert dqkv.shape == qkv.shape
    assert torch.equal(dqkv, torch.stack([dq, dk, dv], dim=2))


def test_kvpacked_matches_unpacked():
    torch.manual_seed(1)
    q = rand(1, 17, 4, 16).requires_grad_()
    kv = rand(1, 40, 2, 2, 16).requires_grad_()
    out, (dq, dkv) = _grads(lambda a, b: flash_attn_kvpacked_func(a, b, window_size=(8, 2)), q, kv)
    q2 = q.detach().clone().requires_grad_()
    k, v = (kv[:, :, i].detach().clone().requires_grad_() for i in range(2))
    ref, (dq2, dk, dv) = _grads(lambda a, b, c: flash_attn_func(a, b, c, window_size=(8, 2)), q2, k, v)
    assert torch.equal(out, ref) and torch.equal(dq, dq2)
    assert torch.equal(dkv, torch.stack([dk, dv], dim=2))


def test_varlen_packed_match_unpacked():
    torch.manual_seed(2)
    lens = [7, 0, 20]
    cu = cu_seqlens(lens)
    qkv = rand(sum(lens), 3, 2, 16).requires_grad_()
    out, (dqkv,) = _grads(lambda x: flash_attn_varlen_qkvpacked_func(x, cu, 20, causal=True), qkv)
    q, k, v = (qkv[:, i].detach().clone().requires_grad_() for i in range(3))
    ref, (dq, dk, dv) = _grads(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, cu, cu, 20, 20, causal=True), q, k, v
    )
    assert torch.equal(out, ref)
    assert torch.equal(dqkv, torch.stack([dq, dk, dv], dim=1))

    k_lens = [9, 3, 11]
    cu_k = cu_seqlens(k_lens)
    q = rand(sum(lens), 2, 16).requires_grad_()
    kv = rand(sum(k_lens), 2, 1, 16).requires_grad_()
    out, (dq, dkv) = _grads(lambda a, b: flash_attn_varlen_kvpacked_func(a, b, cu, cu_k, 20, 11), q, kv)
    q2 = q.detach().clone().requires_grad_()
    k, v = (kv[:, i].detach().clone().requires_grad_() for i in range(2))
    ref, (dq2, dk, dv) = _grads(lambda a, b, c: flash_attn_varlen_func(a, b, c, cu, cu_k, 20, 11), q2, k, v)
    assert torch.equal(out, ref) and torch.equal(dq, dq2)
    assert torch.equal(dkv, torch.stack([dk, dv], dim=1))


def test_return_attn_probs_conventions():
    torch.manual_seed(3)
    q, k, v = (rand(1, 17, 2, 16).requires_grad_() for _ in range(3))
    out, lse, s_dmask = flash_attn_func(q, k, v, return_attn_probs=True)
    assert s_dmask is None  # flash-attn only materialises S_dmask when dropout_p > 0
    assert lse.shape == (1, 2, 17) and lse.dtype == torch.float32
    # beyond flash-attn (which ignores it): the lse is differentiable
    from fa_core.reference import attention_ref

    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    _, lse_ref = attention_ref(*ref_in, upcast=False)
    for g, r in zip(torch.autograd.grad(lse.sum(), (q, k)), torch.autograd.grad(lse_ref.sum(), ref_in[:2])):
        torch.testing.assert_close(g.double(), r, atol=1e-3 if q.dtype == torch.float16 else 1e-5, rtol=1e-3)
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=0.2, return_attn_probs=True)
    assert s_dmask.shape == (1, 2, 17, 17) and not s_dmask.requires_grad
    assert out.requires_grad
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_no_grad_and_partial_requires_grad():
    torch.manual_seed(4)
    q = rand(1, 17, 2, 16).requires_grad_()
    k, v = rand(1, 17, 2, 16), rand(1, 17, 2, 16)
    with torch.no_grad():
        out0 = flash_attn_func(q, k, v)
    assert not out0.requires_grad
    out = flash_attn_func(q, k, v)
    assert torch.equal(out, out0)
    out.sum().backward()
    assert q.grad is not None and k.grad is None


def test_double_backward_raises():
    torch.manual_seed(5)
    q, k, v = (rand(1, 9, 1, 16).requires_grad_() for _ in range(3))
    out = flash_attn_func(q, k, v)
    (gq,) = torch.autograd.grad((out**2).sum(), q, create_graph=True)  # dout = 2 * out requires grad
    with pytest.raises(RuntimeError, match="twice|once_differentiable"):
        gq.sum().backward()


def test_block_table_not_supported():
    q = rand(9, 1, 16)
    cu = cu_seqlens([9])
    with pytest.raises(NotImplementedError, match="block_table"):
        flash_attn_varlen_func(q, q, q, cu, cu, 9, 9, block_table=torch.zeros(1, 1, dtype=torch.int32))


def _lowlevel_inputs():
    torch.manual_seed(6)
    q, k, v = rand(1, 17, 2, 16), rand(1, 9, 1, 16), rand(1, 9, 1, 16)
    res = flash_attn_forward(q, k, v)
    return dict(dout=torch.randn_like(res.out), q=q, k=k, v=v, out=res.out, softmax_lse=res.lse)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a: a.update(dout=a["dout"][:, :5]), ValueError, "dout"),
        (lambda a: a.update(out=a["out"].bfloat16()), TypeError, "out"),
        (lambda a: a.update(softmax_lse=a["softmax_lse"][..., :3]), ValueError, "softmax_lse"),
        (lambda a: a.update(softmax_lse=a["softmax_lse"].double()), ValueError, "softmax_lse"),
        (lambda a: a.update(dq=torch.empty(1, 17, 2, 8)), ValueError, "dq"),
        (
            lambda a: a.update(dk=torch.empty(1, 9, 1, 16, dtype=torch.bfloat16, device=DEVICE)),
            TypeError,
            "dk",
        ),
        (
            lambda a: a.update(dv=torch.empty(1, 9, 1, 32, dtype=FP, device=DEVICE)[..., ::2]),
            ValueError,
            "dv",
        ),
        (lambda a: a.update(dropout_p=0.1), ValueError, "rng_state"),
        (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p"),
        (lambda a: a.update(k=a["k"].bfloat16()), TypeError, "k"),
        (lambda a: a.update(q=a["q"][..., :8]), ValueError, "head dim"),
        (lambda a: a.update(window_size_left=-2), ValueError, "window_size"),
        (lambda a: a.update(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
        (lambda a: a.update(softcap=-1.0), ValueError, "softcap"),
    ],
)
def test_bad_input_raises(change, exc, match):
    args = _lowlevel_inputs()
    change(args)
    with pytest.raises(exc, match=match):
        flash_attn_backward(**args)


def test_bad_packed_shapes_raise():
    with pytest.raises(ValueError, match="qkv"):
        flash_attn_qkvpacked_func(rand(1, 9, 2, 1, 16))
    with pytest.raises(ValueError, match="kv"):
        flash_attn_kvpacked_func(rand(1, 9, 1, 16), rand(1, 9, 3, 1, 16))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU-tensor check")
def test_cpu_tensor_without_interpreter_message():
    # the interpreter is on in this process: a CPU tensor is accepted; the check itself is fa_core's
    q = rand(1, 9, 1, 16)
    assert flash_attn_func(q, q, q).shape == q.shape
