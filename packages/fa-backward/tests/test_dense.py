"""Dense backward: dq, dk, dv of flash_attn_func against autograd through the reference (2x rule)."""

from __future__ import annotations

import zlib

import pytest
import torch
from fa_backward_testutils import DEVICE, DTYPES, FP, check_2x, rand, ref_grads

from fa_backward import flash_attn_func

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, headdim_v, kwargs)
CASES = {
    "gqa": (2, 33, 47, 4, 2, 40, 40, {}),
    "len1": (1, 1, 1, 2, 1, 16, 16, {}),
    "q1": (1, 1, 33, 2, 2, 16, 16, {"causal": True}),
    "k1": (1, 17, 1, 2, 2, 16, 16, {}),
    "causal_q_gt_k": (1, 47, 17, 2, 1, 64, 64, {"causal": True}),  # 30 rows see no key: zero grad
    "causal_k_gt_q": (2, 17, 47, 2, 2, 40, 40, {"causal": True}),
    "window": (1, 47, 65, 2, 1, 16, 16, {"window_size": (5, 3)}),  # masked blocks on both sides
    "window_left": (1, 40, 33, 2, 2, 16, 16, {"window_size": (7, -1)}),
    "window_right_causal": (1, 33, 40, 2, 2, 16, 16, {"window_size": (-1, 4), "causal": True}),
    "softcap": (1, 33, 33, 2, 2, 40, 40, {"softcap": 2.0}),
    "alibi": (2, 33, 17, 2, 1, 16, 16, {"alibi_slopes": "batch"}),
    "alibi_causal": (1, 17, 40, 2, 1, 16, 16, {"alibi_slopes": "heads", "causal": True}),
    "mqa_all": (
        1,
        40,
        33,
        3,
        1,
        40,
        40,
        {"causal": True, "softcap": 3.0, "alibi_slopes": "heads", "window_size": (9, 2)},
    ),
    "dv_ne_d": (1, 33, 47, 2, 1, 40, 24, {"causal": True}),
    "scale": (1, 17, 33, 2, 2, 16, 16, {"softmax_scale": 0.3}),
    "d1": (1, 17, 17, 2, 2, 1, 1, {}),
    "d256": (1, 17, 9, 1, 1, 256, 256, {"causal": True}),
    # lengths that are multiples of 128: the kernels are compiled without the masked edge loops the host
    # knows to be empty (fa_backward.launch: HAS_WINDOW_LEFT / HAS_RIGHT_EDGE)
    "tiles_plain": (1, 128, 256, 2, 1, 16, 16, {}),
    "tiles_causal_k_gt_q": (1, 128, 256, 2, 2, 16, 16, {"causal": True}),
    "tiles_causal_q_gt_k": (1, 256, 128, 2, 1, 16, 16, {"causal": True}),
    "tiles_window": (1, 128, 128, 2, 2, 16, 16, {"window_size": (40, 8)}),
    "tiles_softcap_alibi": (1, 128, 128, 2, 1, 16, 16, {"softcap": 2.0, "alibi_slopes": "heads"}),
}
FP16_CASES = ["gqa", "causal_q_gt_k", "window", "softcap", "mqa_all", "dv_ne_d"]


def _alibi(spec, batch, nheads):
    if spec == "heads":
        return torch.rand(nheads, device=DEVICE) * 0.5
    if spec == "batch":
        return torch.rand(batch, nheads, device=DEVICE) * 0.5
    return None


def _run(case, dtype):
    batch, sq, sk, h, hk, d, dv, kw = CASES[case]
    kw = dict(kw)
    torch.manual_seed(zlib.crc32(case.encode()))
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = _alibi(kw["alibi_slopes"], batch, h)
    q = rand(batch, sq, h, d, dtype=dtype).requires_grad_()
    k = rand(batch, sk, hk, d, dtype=dtype).requires_grad_()
    v = rand(batch, sk, hk, dv, dtype=dtype).requires_grad_()
    out = flash_attn_func(q, k, v, **kw)
    dout = rand(*out.shape, dtype=dtype)
    out.backward(dout)
    _, _, truth = ref_grads(q, k, v, dout, **kw)
    _, _, lowp = ref_grads(q, k, v, dout, upcast=False, **kw)
    check_2x((q.grad, k.grad, v.grad), truth, lowp, dtype)
    return q, k, v


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_fp32(case):
    _run(case, DTYPES[0])


@pytest.mark.parametrize("case", FP16_CASES)
def test_dense_fp16(case):
    _run(case, torch.float16)


def test_rows_without_keys_get_zero_grad():
    """Causal with seqlen_q > seqlen_k: the first rows see no key (lse = +inf): zero dq, no NaN."""
    q, k, v = _run("causal_q_gt_k", DTYPES[0])
    first = 47 - 17
    assert torch.equal(q.grad[:, :first], torch.zeros_like(q.grad[:, :first]))
    assert q.grad[:, first:].abs().sum() > 0


def test_window_hides_keys_get_zero_grad():
    """Keys no query can see (left window on a short query block) get zero dk / dv."""
    torch.manual_seed(0)
    q = rand(1, 8, 2, 16).requires_grad_()
    k = rand(1, 40, 2, 16).requires_grad_()
    v = rand(1, 40, 2, 16).requires_grad_()
    out = flash_attn_func(q, k, v, window_size=(3, 0))
    out.backward(torch.randn_like(out))
    # diag = 32: query i sees keys [i + 29, i + 32]; keys < 29 are never seen
    assert torch.equal(k.grad[:, :29], torch.zeros_like(k.grad[:, :29]))
    assert torch.equal(v.grad[:, :29], torch.zeros_like(v.grad[:, :29]))
    assert k.grad[:, 29:].abs().sum() > 0


def test_strided_inputs_and_dout():
    """Inputs with non-trivial strides (slices of a bigger buffer) and a dout from a broadcasted loss."""
    torch.manual_seed(1)
    big = rand(1, 33, 3, 5, 48)  # (batch, seqlen, slot, heads, d) with padding in heads and d
    q = big[:, :, 0, :4, :40].detach().requires_grad_()
    k = big[:, :, 1, 1:3, :40].detach().requires_grad_()
    v = big[:, :, 2, 2:4, 8:48].detach().requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    out = flash_attn_func(q, k, v, causal=True)
    (out.sum() * 0.5).backward()  # dout is an expanded scalar (all strides 0)
    dout = torch.full_like(out, 0.5)
    _, _, truth = ref_grads(q, k, v, dout, causal=True)
    _, _, lowp = ref_grads(q, k, v, dout, causal=True, upcast=False)
    check_2x((q.grad, k.grad, v.grad), truth, lowp, FP)


@pytest.mark.parametrize("seqlen_q", [45, 64])
def test_lpt_order_same_results(monkeypatch, seqlen_q):
    """Causal launches can renumber their programs longest-processing-time first within sections of heads
    (fa_core.scheduling's widths): forward and gradients are bitwise those of the plain order, on grids with
    several blocks, heads and batches (12 head-batch pairs: sections of 5 leave a short last one) and a ragged
    last block, and match the reference (a program the renumbering skipped would leave rows unwritten)."""
    from fa_core import scheduling
    from fa_core.scheduling import lpt_section

    torch.manual_seed(7)
    q = rand(3, seqlen_q, 4, 16)
    k = rand(3, 64, 2, 16)
    v = rand(3, 64, 2, 16)
    dout = rand(3, seqlen_q, 4, 16)
    results = []
    for width in (1, 5, 65536):
        monkeypatch.setattr(scheduling, "FORWARD_LPT", width)
        monkeypatch.setattr(scheduling, "BACKWARD_LPT", width)
        assert lpt_section(True, False) == width == lpt_section(True, False, backward=True)
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = flash_attn_func(qq, kk, vv, causal=True)
        out.backward(dout)
        results.append((out, qq.grad, kk.grad, vv.grad))
    assert lpt_section(True, True) == 1 and lpt_section(False, False) == 1  # a left window; no mask
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.isfinite(a).all()
            assert torch.equal(a, b)
    out_t, _, truth = ref_grads(q, k, v, dout, causal=True)
    out_l, _, lowp = ref_grads(q, k, v, dout, causal=True, upcast=False)
    check_2x(results[0], (out_t, *truth), (out_l, *lowp), FP, names=("out", "dq", "dk", "dv"))
