"""GPU: our kernels on PyTorch's own FlexAttention BlockMask against ``flex_attention`` on the same mask, bf16,
forward and gradients (causal, sliding window, documents, documents + causal)."""

from __future__ import annotations

import pytest
import torch

from fa_core import attention_ref
from fa_core.block_sparse import as_block_mask, block_mask_to_dense
from fa_core.testing import assert_close_2x

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (FlexAttention comparison at bf16)", allow_module_level=True)

flex = pytest.importorskip("torch.nn.attention.flex_attention")
prog = pytest.importorskip("fa_backward.programmable")

SEQ = 1024
WINDOW = 256
BATCH, HEADS, D = 2, 4, 64


def _documents() -> torch.Tensor:
    """``(BATCH, SEQ)`` document ids, boundaries on multiples of 128 (the block size), random per row."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(BATCH):
        cuts = sorted(set((torch.randperm(SEQ // 128 - 1, generator=gen)[:3] + 1).tolist()))
        ids = torch.zeros(SEQ, dtype=torch.int64)
        for c in cuts:
            ids[c * 128 :] += 1
        rows.append(ids)
    return torch.stack(rows).cuda()


DOCS = _documents()


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _sliding(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)


def _document(b, h, q_idx, kv_idx):
    return DOCS[b, q_idx] == DOCS[b, kv_idx]


def _document_causal(b, h, q_idx, kv_idx):
    return (DOCS[b, q_idx] == DOCS[b, kv_idx]) & (q_idx >= kv_idx)


# name: (mask fn, mask batch (None = broadcast), our built-in rules)
CASES = {
    "causal": (_causal, None, {"causal": True}),
    "sliding_window": (_sliding, None, {"window_size": (WINDOW, 0)}),
    "document": (_document, BATCH, {}),
    "document_causal": (_document_causal, BATCH, {"causal": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_block_mask_vs_flex_attention(case):
    torch.manual_seed(len(case))
    fn, mb, rules = CASES[case]
    tbm = flex.create_block_mask(fn, mb, None, SEQ, SEQ, device="cuda")
    q, k, v = (
        torch.randn(BATCH, SEQ, HEADS, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    g = torch.randn(BATCH, SEQ, HEADS, D, device="cuda", dtype=torch.bfloat16)
    bm = as_block_mask(tbm, BATCH, HEADS, SEQ, SEQ, **rules)
    listed = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) * (1 if mb else BATCH)
    assert listed < BATCH * (SEQ // 128) ** 2  # really block-sparse
    out, _ = prog.attention(q, k, v, block_mask=bm, **rules)
    grads = torch.autograd.grad(out, (q, k, v), g)

    # FlexAttention on the same BlockMask, float32, (batch, heads, seq, d) layout: the reference
    qf, kf, vf = (t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    try:  # eager FlexAttention (a dense implementation, exact semantics)
        ref = flex.flex_attention(qf, kf, vf, block_mask=tbm)
    except NotImplementedError:  # a torch whose eager path has no backward here: the compiled kernel
        ref = torch.compile(flex.flex_attention)(qf, kf, vf, block_mask=tbm)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), g.float().transpose(1, 2))
    ref = ref.transpose(1, 2)
    ref_grads = [t.transpose(1, 2) for t in ref_grads]

    # the same element mask in low precision (plain PyTorch, bf16): the error budget of the 2x rule
    dense = flex.create_mask(fn, mb, 1, SEQ, SEQ, device="cuda")
    assert bool((block_mask_to_dense(bm, SEQ, SEQ) | ~dense).all())

    def mask(b, h, q_idx, kv_idx):
        return dense[b if dense.shape[0] > 1 else b * 0, h * 0, q_idx, kv_idx]

    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    low, _ = attention_ref(ql, kl, vl, mask_mod=mask, upcast=False, **rules)
    low_grads = torch.autograd.grad(low, (ql, kl, vl), g)

    assert_close_2x(out, ref, low, "out")
    for name, ours, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_close_2x(ours, r, lo, name)
