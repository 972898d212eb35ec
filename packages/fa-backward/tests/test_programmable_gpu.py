"""GPU tests of programmable attention, forward and backward, bf16/fp16, against the fp32 reference's
autograd with the 2x rule: chunks, sinks (and the lse gradient), mask_mod, score_mod + derivative, block-sparse
masks with partial and full blocks, the worked examples of :mod:`fa_core.score_mods`, varlen.

Run (repository root, CUDA machine; FA_PLUS_AUTOTUNE=0 keeps compiles few):
    FA_PLUS_AUTOTUNE=0 PYTHONPATH=packages/fa-core/src:packages/fa-backward/src \
        python -m pytest packages/fa-backward/tests/test_programmable_gpu.py -m gpu -q -n 8
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (jit functions need it in their module scope)

from fa_backward.programmable import attention, attention_varlen
from fa_core import attention_ref, attention_varlen_ref
from fa_core import score_mods as sm
from fa_core.block_sparse import block_mask_from_dense, create_block_mask
from fa_core.testing import assert_close_2x

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@triton.jit
def _striped(b, h, q_idx, kv_idx):
    return ((kv_idx % 3) != 1) & ((h % 2 == 0) | (kv_idx <= q_idx + 5))


def _striped_torch(b, h, q_idx, kv_idx):
    return ((kv_idx % 3) != 1) & ((h % 2 == 0) | (kv_idx <= q_idx + 5))


def _win_global(b, h, q_idx, kv_idx):
    return (kv_idx < 64) | ((q_idx - kv_idx).abs() <= 200)


@triton.jit
def _win_global_jit(b, h, q_idx, kv_idx):
    rel = q_idx - kv_idx
    return (kv_idx < 64) | ((rel <= 200) & (rel >= -200))


def _grads(fn, ins, dout, dlse):
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    out, lse = fn(*leaves)
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + (lse * dlse).sum()
    return (out.detach(), *torch.autograd.grad(loss, leaves))


# kernel kwargs, reference kwargs; "_sink", "_lse", "_dv", "_bm" (block mask builder)
CASES = {
    "chunk_causal": ({"attention_chunk": 256, "causal": True}, {}),
    "chunk_window": ({"attention_chunk": 192, "window_size": (100, 30)}, {}),
    "sink_chunk_lse": ({"attention_chunk": 256, "_sink": True, "_lse": True}, {}),
    "sink_causal_vdim": ({"causal": True, "_sink": True, "_dv": 64}, {}),
    "mask_mod_gqa": ({"mask_mod": _striped}, {"mask_mod": _striped_torch}),
    "score_mod_causal": (
        {"score_mod": sm.relative_position_bias, "score_mod_grad": sm.additive_grad, "causal": True},
        {"score_mod": sm.relative_position_bias_torch},
    ),
    "softcap_score_mod": (
        {"score_mod": sm.tanh_softcap, "score_mod_grad": sm.tanh_softcap_grad},
        {"score_mod": sm.tanh_softcap_torch},
    ),
    "prefix_lm": ({"mask_mod": sm.prefix_lm}, {"mask_mod": sm.prefix_lm_torch}),
    "sparse_random_causal": ({"causal": True, "_bm": "random"}, {}),
    "sparse_full_blocks_mask_mod": (
        {"mask_mod": _win_global_jit, "_bm": "mask_fn"},
        {"mask_mod": _win_global},
    ),
    "sparse_full_blocks_only": ({"_bm": "mask_fn"}, {}),
}


def _block_mask(kind: str, sq: int, sk: int, h: int):
    if kind == "random":
        g = torch.Generator(device="cpu").manual_seed(0)
        blocks = torch.rand(1, h, -(-sq // 128), -(-sk // 128), generator=g) < 0.5
        blocks[..., 0] = True
        return block_mask_from_dense(blocks.cuda(), (128, 128))
    return create_block_mask(_win_global, None, None, sq, sk, (128, 128), "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_programmable_gpu(case, dtype):
    kern, ref_kw = (dict(x) for x in CASES[case])
    torch.manual_seed(len(case))
    b, sq, sk, h, hk, d = 2, 1024, 1024, 4, 2, 128
    dv = kern.pop("_dv", d)
    use_sink, use_lse, bm_kind = kern.pop("_sink", False), kern.pop("_lse", False), kern.pop("_bm", None)
    ref_kw.update(
        {k_: v_ for k_, v_ in kern.items() if k_ not in ("score_mod", "score_mod_grad", "mask_mod")}
    )
    if bm_kind is not None:
        kern["block_mask"] = ref_kw["block_mask"] = _block_mask(bm_kind, sq, sk, h)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, dv, device="cuda", dtype=dtype)
    ins = [q, k, v]
    if use_sink:
        ins.append(torch.randn(h, device="cuda") * 2)
    dout = torch.randn(b, sq, h, dv, device="cuda", dtype=dtype)
    dlse = torch.randn(b, h, sq, device="cuda") if use_lse else None

    def ours(*t):
        return attention(t[0], t[1], t[2], learnable_sink=t[3] if use_sink else None, **kern)

    def ref(upcast):
        def fn(*t):
            return attention_ref(
                t[0], t[1], t[2], learnable_sink=t[3] if use_sink else None, upcast=upcast, **ref_kw
            )

        return fn

    got = _grads(ours, ins, dout, dlse)
    hi = _grads(ref(True), ins, dout, dlse)
    low = _grads(ref(False), ins, dout, dlse)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv", "dsink"), got, hi, low):
        assert_close_2x(a, r, lo, name, slack=1e-2 if name == "dsink" else None)


def test_varlen_sink_chunk_gpu():
    torch.manual_seed(3)
    lens = [300, 1024, 0, 517]
    cu = torch.tensor([0, 300, 1324, 1324, 1841], dtype=torch.int32, device="cuda")
    q = torch.randn(1841, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1841, 1, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1841, 1, 128, device="cuda", dtype=torch.bfloat16)
    sink = torch.randn(4, device="cuda")
    dout = torch.randn_like(q)
    dlse = torch.randn(4, 1841, device="cuda")
    kw = {"causal": True, "attention_chunk": 256}

    def ours(*t):
        return attention_varlen(t[0], t[1], t[2], cu, cu, max(lens), max(lens), learnable_sink=t[3], **kw)

    def ref(upcast):
        return lambda *t: attention_varlen_ref(
            t[0], t[1], t[2], cu, cu, learnable_sink=t[3], upcast=upcast, **kw
        )

    got = _grads(ours, [q, k, v, sink], dout, dlse)
    hi = _grads(ref(True), [q, k, v, sink], dout, dlse)
    low = _grads(ref(False), [q, k, v, sink], dout, dlse)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv", "dsink"), got, hi, low):
        assert_close_2x(a, r, lo, name, slack=1e-2 if name == "dsink" else None)


@pytest.mark.parametrize("example", ["alibi", "tanh_softcap"])
def test_examples_equal_builtin_gpu(example):
    torch.manual_seed(5)
    q = torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 1024, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 1024, 2, 128, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(q)
    if example == "alibi":
        mod = {"score_mod": sm.alibi, "score_mod_grad": sm.additive_grad}
        builtin = {"alibi_slopes": sm.alibi_slopes(8, "cuda")}
    else:
        mod = {"score_mod": sm.tanh_softcap, "score_mod_grad": sm.tanh_softcap_grad}
        builtin = {"softcap": sm.TANH_SOFTCAP}
    a = _grads(lambda *t: attention(*t, causal=True, **mod), [q, k, v], dout, None)
    b = _grads(lambda *t: attention(*t, causal=True, **builtin), [q, k, v], dout, None)
    ref = _grads(
        lambda *t: attention_ref(*t, causal=True, **builtin), [q, k, v], dout, None
    )  # fp32 reference of the built-in
    low = _grads(lambda *t: attention_ref(*t, causal=True, upcast=False, **builtin), [q, k, v], dout, None)
    for name, x, y, r, lo in zip(("out", "dq", "dk", "dv"), a, b, ref, low):
        assert_close_2x(x, r, lo, name + " (score_mod)")
        assert_close_2x(y, r, lo, name + " (built-in)")
