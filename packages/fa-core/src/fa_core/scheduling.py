"""Program order of the attention kernels, as a ``@triton.jit`` helper shared by the forward and backward.

Grids are ``(blocks, heads, batch)``. The GPU hands out programs in linear order (axis 0 fastest), so with the
plain mapping one head's blocks run together: good for L2 (they share K / V), but under a causal mask the
blocks differ in work (block ``m`` of the forward sees ``m + 1`` key blocks), and the heaviest block of the
last heads starts near the end of the launch: a tail of up to one long program per SM. ``lpt_program_ids``
renumbers the programs longest-processing-time first within sections of a few heads: every head's heaviest block,
then every head's next one, and so on (FlashAttention-3's causal scheduler: LPT with an L2 swizzle), so the launch
ends on the lightest blocks while a section's K / V stay in L2.

Opt-in, ``FA_PLUS_LPT=<head-batch pairs per section>`` (default 1: the plain order). Measured on an H200 (d128
bf16 causal, 128x128 tile forced, bench/forward_variants.py, each variant beside FlagGems in its own process):

* the whole grid as one section lost: 4k 402 vs 420 TFLOP/s, 8k 453 vs 456, 16k 480 vs 497 (every head's K / V
  in flight at once; the plain order keeps a few heads' K / V in L2), and the backward ran 0.86-0.91x flex
  against 0.90-0.98x without it (another run);
* sections of 4 won: 4k 446 vs 426, 8k 471 vs 458, 16k 500 vs 495 (1.06 / 1.04 / 1.05x FlagGems against 1.01 /
  1.00 / 1.03x); sections of 16: 438 / 463 / 481.

Not yet the default: the full sweep (both head dims, the short sequences with their 64x64 tiles, the backward)
has not run with it.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def lpt_program_ids(LPT: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """``(block, head, batch)`` of this program. ``LPT`` > 1: the head-batch pairs go in sections of ``LPT``
    (the last one possibly smaller), and inside a section the blocks in order of work over its heads (a
    bijection of the grid: any grid shape stays covered exactly once). A section's K / V stay in L2 while its
    programs run; ``LPT`` 1 is the plain order. ``HEAVY_LAST``: the heaviest block is the last index (the
    forward and the dQ pass under a causal mask); else the first (the dK / dV pass)."""
    pid_blk = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    if LPT > 1:
        n_blk = tl.num_programs(0)
        n_h = tl.num_programs(1)
        n_hb = n_h * tl.num_programs(2)
        lin = pid_blk + n_blk * (pid_h + n_h * pid_b)
        section = lin // (n_blk * LPT)
        width = tl.minimum(LPT, n_hb - section * LPT)  # head-batch pairs in this section
        inner = lin - section * (n_blk * LPT)
        pid_blk = inner // width
        hb = section * LPT + inner % width
        pid_h = hb % n_h
        pid_b = hb // n_h
    if HEAVY_LAST:
        pid_blk = tl.num_programs(0) - 1 - pid_blk
    return pid_blk, pid_h, pid_b


def lpt_section(is_local: bool, window_left_bounded: bool) -> int:
    """``LPT`` for a launch (``FA_PLUS_LPT``, default 1 = the plain order): the section width, for causal-shaped
    masks only (bounded on the right, unbounded on the left: the forward's and dQ pass's work grows with the
    block index, the dK/dV pass's shrinks), block-sparse ones included (a causal block mask with global keys
    makes the first key blocks the heaviest dK/dV programs by far). Off by default: see the module docstring."""
    if not is_local or window_left_bounded:
        return 1
    raw = os.environ.get("FA_PLUS_LPT", "1") or "1"
    try:
        return max(1, int(raw))
    except ValueError:
        raise ValueError(f"FA_PLUS_LPT must be a positive integer (heads per section), got {raw!r}") from None
