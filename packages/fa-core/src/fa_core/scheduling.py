"""Program order of the attention kernels, as a ``@triton.jit`` helper shared by the forward and backward.

Grids are ``(blocks, heads, batch)``. The GPU hands out programs in linear order (axis 0 fastest), so with the
plain mapping one head's blocks run together: good for L2 (they share K / V), but under a causal mask the
blocks differ in work (block ``m`` of the forward sees ``m + 1`` key blocks), and the heaviest block of the
last heads starts near the end of the launch: a tail of up to one long program per SM. ``lpt_program_ids``
renumbers the programs longest-processing-time first: every head's heaviest block, then every head's next one,
and so on (the order FlashAttention-3's causal scheduler uses), so the launch ends on the lightest blocks.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def lpt_program_ids(LPT: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """``(block, head, batch)`` of this program. ``LPT``: blocks in order of work over all heads and batches
    (a bijection of the grid: any grid shape stays covered exactly once). ``HEAVY_LAST``: the heaviest block
    is the last index (the forward and the dQ pass under a causal mask); else the first (the dK / dV pass)."""
    pid_blk = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    if LPT:
        n_blk = tl.num_programs(0)
        n_h = tl.num_programs(1)
        n_hb = n_h * tl.num_programs(2)
        lin = pid_blk + n_blk * (pid_h + n_h * pid_b)
        pid_blk = lin // n_hb
        r = lin - pid_blk * n_hb
        pid_h = r % n_h
        pid_b = r // n_h
    if HEAVY_LAST:
        pid_blk = tl.num_programs(0) - 1 - pid_blk
    return pid_blk, pid_h, pid_b


def lpt_enabled(is_local: bool, window_left_bounded: bool) -> bool:
    """``LPT`` for a launch: causal-shaped masks (bounded on the right, unbounded on the left: the forward's and
    dQ pass's work grows with the block index, the dK/dV pass's shrinks), block-sparse ones included (a causal
    block mask with global keys, e.g. a sliding window plus global tokens, makes the first key blocks the
    heaviest dK/dV programs by far: one per head, which the plain order starts as late as the last head).
    ``FA_PLUS_LPT=0`` keeps the plain order (A/B timing)."""
    return is_local and not window_left_bounded and os.environ.get("FA_PLUS_LPT", "1") != "0"
