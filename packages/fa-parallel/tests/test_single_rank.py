"""World size 1 in this process (gloo, file store): both strategies reduce to plain attention; argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fa_core.reference import attention_ref
from fa_core.testing import assert_close_2x
from fa_parallel import context_parallel_attn_func


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield None
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_world_one(group, strategy):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 16, requires_grad=True) for _ in range(3))
    out = context_parallel_attn_func(q, k, v, causal=True, strategy=strategy)
    ref, _ = attention_ref(*(t.double() for t in (q, k, v)), causal=True, dtype=torch.float64)
    low, _ = attention_ref(q, k, v, causal=True, upcast=False)
    assert_close_2x(out, ref, low, "out")
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_unsupported_arguments(group):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="dropout"):
        context_parallel_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="ALiBi"):
        context_parallel_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="strategy"):
        context_parallel_attn_func(q, q, q, strategy="tree")
    with pytest.raises(ValueError, match="layout"):
        context_parallel_attn_func(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="even"):
        context_parallel_attn_func(q[:, :7], q[:, :7], q[:, :7])


def test_needs_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attn_func(q, q, q)


def test_documents_zigzag_world_one_and_checks(group):
    from fa_core.reference import attention_varlen_ref
    from fa_parallel import context_parallel_varlen_attn_func, document_sharding

    torch.manual_seed(0)
    cu = torch.tensor([0, 1, 6, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 2, 16, requires_grad=True) for _ in range(3))
    docs = document_sharding(cu, 1)
    out = context_parallel_varlen_attn_func(q, k, v, docs, causal=True, layout="zigzag")
    ref, _ = attention_varlen_ref(*(t.double() for t in (q, k, v)), cu, cu, causal=True, dtype=torch.float64)
    low, _ = attention_varlen_ref(q, k, v, cu, cu, causal=True, upcast=False)
    assert_close_2x(out, ref, low, "out")
    with pytest.raises(NotImplementedError, match="window_size"):
        context_parallel_varlen_attn_func(q, k, v, cu, window_size=(2, 3), layout="zigzag")
    with pytest.raises(ValueError, match="holds 20 tokens"):
        context_parallel_varlen_attn_func(q[:19], k[:19], v[:19], cu, layout="zigzag")
    with pytest.raises(TypeError, match="layout='zigzag'"):
        context_parallel_varlen_attn_func(q, k, v, docs)
    with pytest.raises(ValueError, match="layout"):
        context_parallel_varlen_attn_func(q, k, v, cu, layout="striped")
