"""The one masking / score-modification layer, as ``@triton.jit`` helpers.

Every kernel of the project (forward, backward, decode) builds its scores with these helpers, so that
causal, sliding window, softcap, ALiBi and dropout mean exactly the same thing everywhere.

Conventions (those of flash-attn >= 2.1):

* Positions are relative to the start of one sequence: query row ``i`` in ``[0, seqlen_q)``, key column
  ``j`` in ``[0, seqlen_k)``. The diagonal is aligned to the bottom-right: ``diag = seqlen_k - seqlen_q``.
* Key ``j`` is visible from query ``i`` iff ``i + diag - window_left <= j <= i + diag + window_right``
  and ``j < seqlen_k``. Causal is ``window_right = 0``. An unbounded side is encoded on the host as
  :data:`UNBOUNDED` (flash-attn's ``-1``), which keeps the arithmetic in int32 without special cases.
* Scores are kept in the log2 domain inside kernels (``exp2`` is the fast instruction):
  ``s2 = log2(e) * (softcap * tanh(qk * scale / softcap) - slope * |i + diag - j|)``.
* Dropout is decided per element by Philox keyed on ``(seed, j, i, batch * nheads + head, offset)``, so any
  kernel with any tiling regenerates the same mask from the ``(seed, offset)`` pair the forward returns.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Host-side encoding of an unbounded window side (``-1`` in flash-attn's API).
UNBOUNDED = 1 << 30

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def normalize_window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int, bool]:
    """Map flash-attn's ``(causal, window_size)`` to ``(left, right, is_local)`` for the kernels.

    ``is_local`` is False only when both sides are unbounded (plain full attention), so that kernels
    compile the masking code out.
    """
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    left = UNBOUNDED if left < 0 else left
    right = UNBOUNDED if right < 0 else right
    return left, right, not (left == UNBOUNDED and right == UNBOUNDED)


def has_window_left(is_local: bool, left: int) -> bool:
    """Whether a finite left window bounds the keys (``left`` and ``is_local`` from :func:`normalize_window`):
    only then do the kernels' masked left-edge loops have work; they are compiled out otherwise."""
    return is_local and left != UNBOUNDED


def has_right_edge(varlen, is_local, attention_chunk, mask_mod, seqused_k, seqlen_k) -> bool:
    """Whether some block needs a kernel's masked right-edge loop: a causal / window / chunk / mask_mod rule, or
    keys that may end inside a tile (varlen, ``seqused_k``, or a length that is not a multiple of 128, which
    every BLOCK_N / BLOCK_M of the autotune spaces divides). The backward's dK/dV pass asks it of the transposed
    problem (query rows, the left window)."""
    return bool(
        varlen
        or is_local
        or attention_chunk > 0
        or mask_mod is not None
        or seqused_k is not None
        or seqlen_k % 128
    )


@triton.jit
def visible(
    offs_m,
    offs_n,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    IS_LOCAL: tl.constexpr,
    CHECK_N: tl.constexpr,
):
    """Boolean ``(BLOCK_M, BLOCK_N)``: may query ``offs_m`` attend to key ``offs_n``?"""
    rows = offs_m[:, None]
    cols = offs_n[None, :]
    ok = cols < seqlen_k if CHECK_N else cols >= 0
    if IS_LOCAL:
        diag_col = rows + (seqlen_k - seqlen_q)
        ok = ok & (cols <= diag_col + window_right) & (cols >= diag_col - window_left)
    return ok


@triton.jit
def tanh(x):
    # tanh via exp2 keeps to ops that exist on every backend and in the interpreter.
    e = tl.exp2(x * (2.0 * 1.4426950408889634))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def scores_log2(
    qk,
    offs_m,
    offs_n,
    seqlen_q,
    seqlen_k,
    sm_scale,
    softcap,
    alibi_slope,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    """Raw ``q @ k^T`` (fp32) -> modified scores in the log2 domain (before masking)."""
    if HAS_SOFTCAP:
        # softcap is applied to the scaled score, as flash-attn does: softcap * tanh(s * scale / softcap)
        s = softcap * tanh(qk * (sm_scale / softcap))
        s = s * 1.4426950408889634
    else:
        s = qk * (sm_scale * 1.4426950408889634)
    if HAS_ALIBI:
        # |i + seqlen_k - seqlen_q - j| from fp32 row and column vectors (exact below 2^24): two conversions
        # per row / column instead of an int -> float conversion (quarter rate, like exp2) per element
        rows = (offs_m + (seqlen_k - seqlen_q)).to(tl.float32)
        rel = tl.abs(rows[:, None] - offs_n.to(tl.float32)[None, :])
        s = s - (alibi_slope * 1.4426950408889634) * rel
    return s


@triton.jit
def softcap_grad(qk, sm_scale, softcap):
    """d(softcap * tanh(qk * sm_scale / softcap)) / d(qk * sm_scale) = 1 - tanh^2."""
    t = tanh(qk * (sm_scale / softcap))
    return 1.0 - t * t


@triton.jit
def dropout_keep(seed, rng_offset, bh, offs_m, offs_n, dropout_p):
    """Boolean ``(BLOCK_M, BLOCK_N)`` keep-mask, a pure function of the element's coordinates."""
    rows = offs_m[:, None].to(tl.uint32)
    cols = offs_n[None, :].to(tl.uint32)
    zero = rows * 0 + cols * 0
    r0, _, _, _ = tl.philox(seed, cols + zero, rows + zero, zero + bh.to(tl.uint32), zero + rng_offset)
    u = tl.random.uint_to_uniform_float(r0)
    return u >= dropout_p


@triton.jit
def seq_bounds(off_b, cu_seqlens_q, cu_seqlens_k, seqlen_q_dense, seqlen_k_dense, IS_VARLEN: tl.constexpr):
    """``(q_start, seqlen_q, k_start, seqlen_k)`` of sequence ``off_b``: from ``cu_seqlens`` (varlen) or the
    dense lengths. ``seqused_k`` is applied by the caller (the backward still owns the unused key rows)."""
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + off_b)
        seqlen_q = tl.load(cu_seqlens_q + off_b + 1) - q_start
        k_start = tl.load(cu_seqlens_k + off_b)
        seqlen_k = tl.load(cu_seqlens_k + off_b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        seqlen_q = seqlen_q_dense
        seqlen_k = seqlen_k_dense
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def clamp(x, lo, hi):
    """``x`` clamped to ``[lo, hi]`` (``hi`` wins when ``lo > hi``)."""
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def clamp_index(x, n):
    """``x`` clamped to ``[0, n)``, and 0 when ``n <= 0``: every index a kernel reads from a tensor's values (a
    block id, a page) passes through it before it addresses memory."""
    return tl.maximum(tl.minimum(x, n - 1), 0)


@triton.jit
def varlen_bounds(cu_seqlens, off_b, total):
    """``(start, length)`` of sequence ``off_b`` of a packed batch, with both ``cu_seqlens`` entries clamped to
    ``[0, total]`` and the end to ``>= start``: for any values (non-monotone, negative, past the total: host
    checks off, CUDA-graph replays, ``torch.compile``) the sequence stays inside the ``total`` packed rows;
    for valid ones the clamps change nothing. Two scalar min / max per entry, once per program."""
    start = clamp(tl.load(cu_seqlens + off_b), 0, total)
    end = clamp(tl.load(cu_seqlens + off_b + 1), start, total)
    return start, end - start


@triton.jit
def kv_range(
    start_m,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_LOCAL: tl.constexpr,
):
    """Key blocks a query block touches, split so that only edge blocks pay for masking.

    Returns ``(lo, full_lo, full_hi, hi)``, multiples of BLOCK_N except ``hi`` (<= seqlen_k):
    ``[lo, full_lo)`` and ``[full_hi, hi)`` need the mask, ``[full_lo, full_hi)`` does not.
    """
    diag = seqlen_k - seqlen_q
    m_first = start_m * BLOCK_M
    m_last = m_first + BLOCK_M - 1
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if IS_LOCAL:
        lo = tl.maximum(m_first + diag - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(m_last + diag + window_right + 1, seqlen_k)
        hi = tl.maximum(hi, lo)
        # a block is fully visible when its first key is seen by the last row and its last key by the first
        full_lo = tl.maximum(m_last + diag - window_left, lo)
        full_lo = tl.minimum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, hi)
        full_hi = tl.minimum(m_first + diag + window_right + 1, seqlen_k)
        full_hi = tl.maximum((full_hi // BLOCK_N) * BLOCK_N, full_lo)
        # keep full_hi >= full_lo (empty full region) and both inside [lo, hi]
        full_hi = tl.minimum(full_hi, hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def q_range(
    start_n,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_LOCAL: tl.constexpr,
):
    """Query rows ``[lo, hi)`` that can see any key of key block ``start_n`` (for the backward)."""
    diag = seqlen_k - seqlen_q
    lo = 0
    hi = seqlen_q
    if IS_LOCAL:
        n_first = start_n * BLOCK_N
        n_last = n_first + BLOCK_N - 1
        # row i sees j iff j - diag - right <= i <= j - diag + left
        lo = tl.maximum(n_first - diag - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        hi = tl.minimum(n_last - diag + window_left + 1, seqlen_q)
        hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def _chunk_start(pos, chunk):
    # floor(pos / chunk) * chunk, also for negative positions (rows above the diagonal when sq > sk)
    rem = pos % chunk
    rem = tl.where(rem < 0, rem + chunk, rem)
    return pos - rem


@triton.jit
def chunk_visible(offs_m, offs_n, seqlen_q, seqlen_k, chunk):
    """Chunked attention (FlashAttention-3's ``attention_chunk``): query ``i`` sees key ``j`` only when both
    lie in the same chunk of ``chunk`` positions, positions aligned bottom-right (``i + diag``)."""
    start = _chunk_start(offs_m[:, None] + (seqlen_k - seqlen_q), chunk)
    cols = offs_n[None, :]
    return (cols >= start) & (cols < start + chunk)


@triton.jit
def chunk_kv_range(lo, hi, start_m, seqlen_q, seqlen_k, chunk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Narrow ``[lo, hi)`` to the chunks the rows of query block ``start_m`` live in."""
    diag = seqlen_k - seqlen_q
    first = _chunk_start(start_m * BLOCK_M + diag, chunk)
    last = _chunk_start(start_m * BLOCK_M + BLOCK_M - 1 + diag, chunk) + chunk
    lo = tl.maximum(lo, (tl.maximum(first, 0) // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(hi, last)
    hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def score_mod(fn: tl.constexpr, s2, off_b, off_h, offs_m, offs_n):
    """Apply a user ``score_mod(score, b, h, q_idx, kv_idx)`` (natural-log logits, FlexAttention-style) to
    log2-domain scores ``s2``; returns log2-domain scores."""
    s = fn(s2 * 0.6931471805599453, off_b, off_h, offs_m[:, None], offs_n[None, :])
    return s * 1.4426950408889634
