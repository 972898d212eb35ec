"""Tests for flash_attn.bert_padding (pure PyTorch; gradients checked with gradcheck in float64)."""

import pytest
import torch

from flash_attn.bert_padding import (
    IndexFirstAxis,
    IndexFirstAxisResidual,
    IndexPutFirstAxis,
    index_first_axis,
    index_first_axis_residual,
    index_put_first_axis,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
)


def _mask(lengths: list[int], seqlen: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    return (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


def test_aliases_are_autograd_apply():
    assert index_first_axis == IndexFirstAxis.apply
    assert index_put_first_axis == IndexPutFirstAxis.apply
    assert index_first_axis_residual == IndexFirstAxisResidual.apply


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64])
def test_unpad_input_returns_five_items(mask_dtype):
    torch.manual_seed(0)
    batch, seqlen = 3, 6
    x = torch.randn(batch, seqlen, 2, 4)
    mask = _mask([2, 6, 4], seqlen, mask_dtype)
    out = unpad_input(x, mask)
    assert len(out) == 5
    hs, indices, cu_seqlens, max_seqlen, seqused = out
    flat_mask = mask.bool().flatten()
    torch.testing.assert_close(hs, x.reshape(-1, 2, 4)[flat_mask])
    assert indices.dtype == torch.int64
    assert torch.equal(indices, flat_mask.nonzero().flatten())
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 8, 12]
    assert isinstance(max_seqlen, int) and max_seqlen == 6
    assert seqused.dtype == torch.int32 and seqused.tolist() == [2, 6, 4]


def test_unpad_input_with_unused_mask():
    x = torch.randn(2, 5, 3)
    mask = _mask([2, 3], 5)
    unused = torch.zeros(2, 5, dtype=torch.bool)
    unused[0, 2:4] = True  # allocated-but-unused slots directly after the valid tokens
    hs, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask, unused)
    assert cu_seqlens.tolist() == [0, 4, 7]
    assert max_seqlen == 4
    assert seqused.tolist() == [2, 3]
    assert indices.tolist() == [0, 1, 2, 3, 5, 6, 7]
    torch.testing.assert_close(hs, x.reshape(-1, 3)[indices])


def test_pad_input_roundtrip_and_zero_fill():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 4)
    mask = _mask([5, 1, 3], 5)
    hs, indices, _, _, _ = unpad_input(x, mask)
    padded = pad_input(hs, indices, 3, 5)
    assert padded.shape == x.shape
    torch.testing.assert_close(padded, x * mask[..., None])


def test_unpad_input_for_concatenated_sequences():
    x = torch.randn(3, 6, 2)
    lens = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    out = unpad_input_for_concatenated_sequences(x, lens)
    assert len(out) == 4
    hs, indices, cu_seqlens, max_seqlen = out
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 5, 8, 10, 16]
    assert max_seqlen == 6
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    torch.testing.assert_close(hs, x.reshape(-1, 2)[indices])


def test_index_first_axis_forward_non_contiguous():
    x = torch.randn(4, 6, 3).transpose(1, 2)  # (4, 3, 6), non-contiguous
    idx = torch.tensor([3, 0, 2])
    torch.testing.assert_close(index_first_axis(x, idx), x[idx])


def test_gradcheck_index_first_axis():
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([5, 1, 2])
    assert torch.autograd.gradcheck(lambda t: index_first_axis(t, idx), (x,))


def test_gradcheck_index_put_first_axis():
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 0, 2])
    assert torch.autograd.gradcheck(lambda t: index_put_first_axis(t, idx, 6), (v,))
    out = index_put_first_axis(v.detach(), idx, 6)
    assert out.shape == (6, 4) and torch.all(out[[1, 3, 5]] == 0)


def test_gradcheck_index_first_axis_residual():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 1])

    def f(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, residual = index_first_axis_residual(t, idx)
        return out * 2.0, residual * 3.0

    assert torch.autograd.gradcheck(f, (x,))
    out, residual = index_first_axis_residual(x, idx)
    assert not residual.requires_grad or residual.grad_fn is not None
    torch.testing.assert_close(out, x[idx])


def test_gradcheck_unpad_pad():
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    mask = _mask([3, 2], 4)

    def f(t: torch.Tensor) -> torch.Tensor:
        hs, indices, _, _, _ = unpad_input(t, mask)
        return pad_input(hs.sin(), indices, 2, 4)

    assert torch.autograd.gradcheck(f, (x,))
