"""Argument checks of the ``flash_attn`` API that the custom ops cannot make themselves (each error names the
caller's argument), and the gradient guard that refuses at the forward when fa-backward is absent."""

from __future__ import annotations

import torch

from fa_core import validation as V
from flash_attn import _extras

Tensor = torch.Tensor


def _check_grad(*tensors: Tensor | None) -> None:
    """Refuse at the forward (not at the backward, long after) when a gradient is wanted but fa-backward is
    absent. ``BACKWARD`` and ``requires_grad`` are constants for torch.compile's tracer: no graph break."""
    if _extras.BACKWARD is None and torch.is_grad_enabled():
        if any(t is not None and t.requires_grad for t in tensors):
            _extras.require_backward()


def _check_args(window_size, **tensors: object) -> None:
    """Checks the custom ops cannot do themselves. A tensor on another device (``meta`` included) would make
    the dispatcher pick the op's fake implementation and return garbage instead of an error; a non-tensor
    would fail deep inside; a window must be a pair. Everything named after the caller's argument."""
    if window_size is not None:
        V.check_window(window_size)
    ref_name, ref = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t is None:
            continue
        V.check_tensor(name, t)
        assert isinstance(t, torch.Tensor) and isinstance(ref, torch.Tensor)
        V.check_device(name, t, ref_name, ref)


def _check_block_table(block_table: Tensor, k_cache: Tensor, cu_seqlens_k: Tensor) -> None:
    """Paged varlen keys: int32 ``(batch, max_blocks)`` on k's device, used entries in [0, num_blocks)."""
    V.check_tensor("block_table", block_table, 2)
    V.check_device("block_table", block_table, "k", k_cache)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.shape[0] != cu_seqlens_k.numel() - 1:
        raise ValueError(f"block_table must have one row per sequence, got {tuple(block_table.shape)}")
    if V.value_checks_enabled(block_table):
        page = k_cache.shape[1]
        lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long().cpu()
        need = (lens + page - 1) // page
        if bool((need > block_table.shape[1]).any()):
            raise ValueError("block_table has fewer columns than the longest sequence needs")
        used = torch.arange(block_table.shape[1])[None, :] < need[:, None]
        vals = block_table.cpu()[used]
        if bool(((vals < 0) | (vals >= k_cache.shape[0])).any()):
            raise ValueError(f"block_table entries must lie in [0, {k_cache.shape[0]}) for the pages in use")


def _as_int(x) -> int:
    # HF transformers passes max_seqlen as a 0-dim tensor (cu_seqlens.diff().max()): one host sync, as in
    # flash-attn, where the C++ binding converts it too.
    return int(x)
