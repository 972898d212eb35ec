"""Gradients of learnable sinks (gpt-oss) and of V head dim != QK head dim against the reference's autograd."""

from __future__ import annotations

import pytest
import torch

from fa_backward.programmable import attention
from fa_core import attention_ref
from fa_core.testing import DEVICE, assert_close_2x

DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
HI = torch.float64 if DEVICE == "cpu" else torch.float32

CASES = {
    "sink": {},
    "sink_causal_empty_rows": {"causal": True, "_shape": (40, 17)},
    "sink_window_softcap_gqa_vdim": {"window_size": (6, 2), "softcap": 3.0, "_dv": 24},
}


@pytest.mark.parametrize("case", list(CASES))
def test_sink_gradients(case):
    torch.manual_seed(hash(case) % 2**31)
    kw = dict(CASES[case])
    sq, sk = kw.pop("_shape", (33, 45))
    dv = kw.pop("_dv", 16)
    h, hk, d = 4, 2, 16
    q = torch.randn(2, sq, h, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    k = torch.randn(2, sk, hk, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    v = torch.randn(2, sk, hk, dv, device=DEVICE, dtype=DTYPE, requires_grad=True)
    sink = (torch.randn(h, device=DEVICE) * 2).requires_grad_()
    dout = torch.randn(2, sq, h, dv, device=DEVICE, dtype=DTYPE)

    out, _ = attention(q, k, v, learnable_sink=sink, **kw)
    ours = torch.autograd.grad(out, (q, k, v, sink), dout)

    def ref_grads(upcast: bool):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v, sink)]
        o, _ = attention_ref(ins[0], ins[1], ins[2], learnable_sink=ins[3], upcast=upcast, dtype=HI, **kw)
        return torch.autograd.grad(o, ins, dout.to(o.dtype))

    ref, low = ref_grads(True), ref_grads(False)
    for name, a, r, lo in zip(("dq", "dk", "dv", "dsink"), ours, ref, low):
        assert a.shape == r.shape
        assert_close_2x(a, r, lo, name, slack=1e-4 if torch.float32 == DTYPE else 2e-2)
