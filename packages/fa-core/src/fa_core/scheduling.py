"""Program order of the attention kernels, as a ``@triton.jit`` helper shared by the forward and backward.

Grids are ``(blocks, heads, batch)``. The GPU hands out programs in linear order (axis 0 fastest), so with the
plain mapping one head's blocks run together: good for L2 (they share K / V), but under a causal mask the
blocks differ in work (block ``m`` of the forward sees ``m + 1`` key blocks), and the heaviest block of the
last heads starts near the end of the launch: a tail of up to one long program per SM. ``lpt_program_ids``
renumbers the programs longest-processing-time first within sections of a few heads: every head's heaviest block,
then every head's next one, and so on (FlashAttention-3's causal scheduler: LPT with an L2 swizzle), so the launch
ends on the lightest blocks while a section's K / V stay in L2.

Measured on an H200 (d128 bf16 causal, 128x128 tile forced, bench/forward_variants.py, each variant beside
FlagGems in its own process):

* the whole grid as one section lost: 4k 402 vs 420 TFLOP/s, 8k 453 vs 456, 16k 480 vs 497 (every head's K / V
  in flight at once; the plain order keeps a few heads' K / V in L2), and the backward ran 0.86-0.91x flex
  against 0.90-0.98x without it (another run);
* sections of 4 won: 4k 446 vs 426, 8k 471 vs 458, 16k 500 vs 495 (1.06 / 1.04 / 1.05x FlagGems against 1.01 /
  1.00 / 1.03x); sections of 16: 438 / 463 / 481;
* the full forward sweep with sections of 4 (session 9, bench/results/h200-forward.json): every point >= 1.0x
  FlagGems (causal d128 1.03-1.16x, d64 1.14-1.21x), the 1k / 2k points with their 64x64 tiles included.

The backward, fwd+bwd side by side in one process (session 9, bench/lpt_ab.py, H200, d128, 16 heads):

* dense causal, sections of 4 / 16 against the plain order: 4k 1.04 / 1.03x, 8k 1.00 / 1.00x, 16k 0.99 / 0.96x:
  no clear gain, the plain order stays;
* block-sparse causal sliding window + 64 global keys (each head's first key block is seen by every query: its
  dK/dV program is the heaviest by far): sections of 16 1.10 / 1.22 / 1.43x at 8k / 16k / 32k (sections of 4:
  1.01 / 1.04 / 1.06x);
* a causal score_mod (relative bias, dense): 0.97 / 0.94 / 0.96x with 16: the plain order.

Defaults: the forward runs sections of ``FORWARD_LPT`` = 4, the backward passes ``BACKWARD_LPT`` = 1 (plain),
block-sparse backward launches ``BACKWARD_SPARSE_LPT`` = 16. ``FA_PLUS_LPT`` / ``FA_PLUS_LPT_BWD`` override
them (1 = the plain order).
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


#: Section widths (head-batch pairs) of the forward and of the backward passes (see the module docstring).
FORWARD_LPT = 4
BACKWARD_LPT = 1
BACKWARD_SPARSE_LPT = 16


def lpt_section(
    is_local: bool, window_left_bounded: bool, backward: bool = False, sparse: bool = False
) -> int:
    """``LPT`` for a launch: the section width, for causal-shaped masks only (bounded on the right, unbounded on
    the left: the forward's and dQ pass's work grows with the block index, the dK/dV pass's shrinks),
    block-sparse ones included (a causal block mask with global keys makes the first key blocks the heaviest
    dK/dV programs by far). ``sparse``: a block-sparse backward launch. ``FA_PLUS_LPT`` (forward) /
    ``FA_PLUS_LPT_BWD`` (backward) override the defaults."""
    if not is_local or window_left_bounded:
        return 1
    if backward:
        name, default = "FA_PLUS_LPT_BWD", BACKWARD_SPARSE_LPT if sparse else BACKWARD_LPT
    else:
        name, default = "FA_PLUS_LPT", FORWARD_LPT
    raw = os.environ.get(name, "") or str(default)
    try:
        return max(1, int(raw))
    except ValueError:
        raise ValueError(f"{name} must be a positive integer (heads per section), got {raw!r}") from None
