"""``fa_core.forward_configs.force_tile``: the forced tile runs (and gives the reference's result), the kernel's
config list and autotune picks are restored afterwards, and bad tiles are refused."""

from __future__ import annotations

import pytest
import torch

from fa_core import attention_ref, flash_attn_forward
from fa_core.errors import FlashAttnValueError
from fa_core.forward_configs import config_key, force_tile, forced_tile
from fa_core.forward_kernel import fwd_kernel
from fa_core.forward_launch import fwd_launch
from fa_core.testing import DEVICE, assert_close_2x, poisoned

# a tile that is in no tuned list and differs from the interpreter's one config (32 x 16)
TILE = (16, 32, 4, 1, False)


def _case():
    """Fresh random inputs: float32 under the interpreter, float16 on a GPU."""
    torch.manual_seed(3)
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    q = torch.randn(2, 45, 4, 32, device=DEVICE, dtype=dtype)
    k = torch.randn(2, 61, 2, 32, device=DEVICE, dtype=dtype)
    v = torch.randn(2, 61, 2, 32, device=DEVICE, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_forced_tile_runs_and_is_restored(causal):
    q, k, v = _case()
    before = [config_key(c) for c in fwd_kernel.configs]
    assert TILE not in before
    with force_tile(TILE) as tile:
        assert tile == TILE and forced_tile() == TILE
        assert TILE in [config_key(c) for c in fwd_kernel.configs]
        out = poisoned(q.shape, q.dtype, q.device)
        res = flash_attn_forward(q, k, v, causal=causal, out=out)
        used = fwd_launch.last_config if fwd_launch.last_config is not None else fwd_kernel.best_config
        assert config_key(used) == TILE
    assert forced_tile() is None
    assert [config_key(c) for c in fwd_kernel.configs] == before
    ref, _ = attention_ref(q, k, v, causal=causal, dtype=torch.float64)
    ref_lowp, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_close_2x(res.out, ref.to(q.dtype), ref_lowp, "out")
    # outside the block the tuned space runs again
    flash_attn_forward(q, k, v, causal=causal)
    used = fwd_launch.last_config if fwd_launch.last_config is not None else fwd_kernel.best_config
    assert config_key(used) != TILE


def test_nested_blocks_innermost_wins():
    with force_tile((32, 32, 4, 1, False)):
        with force_tile(TILE):
            assert forced_tile() == TILE
        assert forced_tile() == (32, 32, 4, 1, False)
    assert forced_tile() is None


@pytest.mark.parametrize(
    "tile",
    [
        (16, 32, 4, 1),
        (16, 32, 4, 1, 1),
        (24, 32, 4, 1, False),
        (8, 32, 4, 1, False),
        (16, 32, 0, 1, False),
        "x",
    ],
)
def test_bad_tiles_are_refused(tile):
    with pytest.raises(FlashAttnValueError, match="tile"), force_tile(tile):
        pass
    assert forced_tile() is None


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors never take tensor descriptors")
def test_tma_tile_without_descriptors_is_refused():
    q, k, v = _case()
    with force_tile((16, 32, 4, 1, True)), pytest.raises(FlashAttnValueError, match="tensor descriptors"):
        flash_attn_forward(q, k, v)
    assert forced_tile() is None
