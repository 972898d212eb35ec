"""Program order of the attention kernels, as a ``@triton.jit`` helper shared by the forward and backward.

Grids are ``(blocks, heads, batch)``. The GPU hands out programs in linear order (axis 0 fastest), so with the
plain mapping one head's blocks run together: good for L2 (they share K / V), but under a causal mask the
blocks differ in work (block ``m`` of the forward sees ``m + 1`` key blocks), and the heaviest block of the
last heads starts near the end of the launch: a tail of up to one long program per SM. ``lpt_program_ids``
renumbers the programs longest-processing-time first within sections of a few heads: every head's heaviest block,
then every head's next one, and so on (FlashAttention-3's causal scheduler: LPT with an L2 swizzle), so the launch
ends on the lightest blocks while a section's K / V stay in L2.

Section widths (H200, d128, bf16; ``bench/results/h200-forward.json``, ``bench/results/h200-lpt-ab.json``,
``bench/results/h200-lpt-ab-sparse.json``):

* forward, causal: sections of :data:`FORWARD_LPT` = 4 heads. One section over all heads loses (every head's
  K / V in flight at once); sections of 4 gain 1-5% over the plain order at 4k-16k;
* backward, dense causal: the plain order (:data:`BACKWARD_LPT` = 1); sections gain nothing clear;
* backward, block-sparse: sections of :data:`BACKWARD_SPARSE_LPT` = 16. With global tokens (a few key blocks seen
  by every query) those keys' dK/dV programs are each head's heaviest by far: 1.10-1.43x at 8k-32k.
"""

from __future__ import annotations

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
    dK/dV programs by far). ``sparse``: a block-sparse backward launch. Other masks: 1 (the plain order)."""
    if not is_local or window_left_bounded:
        return 1
    if backward:
        return BACKWARD_SPARSE_LPT if sparse else BACKWARD_LPT
    return FORWARD_LPT
