"""FP8 (``float8_e4m3fn``) host preparation for the forward: input checks and the stacked descales, the
keys-last copy of V that Hopper's FP8 dot needs, and the output dtype (bf16 for FP8 inputs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa_core import validation as V
from fa_core.validation import FP8_DTYPE

__all__ = ["fp8_descale", "out_dtype", "transposed_v"]


def out_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if q.dtype == FP8_DTYPE else q.dtype


def fp8_descale(q, k, batch, q_descale, k_descale, v_descale, return_probs):
    """Validate the FP8 inputs; return the stacked ``(3, batch, nheads_k)`` float32 descales, or None."""
    given = [d is not None for d in (q_descale, k_descale, v_descale)]
    if q.dtype != FP8_DTYPE:
        if any(given):
            raise ValueError("q_descale / k_descale / v_descale are only valid with float8_e4m3fn q, k, v")
        return None
    if V.interpreting() or not q.is_cuda:
        raise ValueError(
            "FP8 (float8_e4m3fn) attention needs a CUDA GPU; the CPU interpreter cannot run FP8 dots"
        )
    if torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError(
            f"FP8 attention needs FP8 tensor cores (sm_89 or newer), got {torch.cuda.get_device_name()}"
        )
    if return_probs:
        raise ValueError("return_probs is not supported with FP8 inputs")
    nheads_k = k.shape[-2]
    scales = []
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if d is None:
            scales.append(torch.ones(batch, nheads_k, device=q.device, dtype=torch.float32))
            continue
        V.check_tensor(name, d, 2)
        V.check_device(name, d, "q", q)
        if d.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {d.dtype}")
        if tuple(d.shape) != (batch, nheads_k):
            raise ValueError(
                f"{name} must have shape (batch, nheads_k) = ({batch}, {nheads_k}), got {tuple(d.shape)}"
            )
        scales.append(d)
    return torch.stack(scales).contiguous()


@triton.jit
def _keys_last_kernel(
    V,
    VT,
    n_keys,
    head_dim,
    nheads_k,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_tb,
    stride_th,
    stride_td,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One ``(BLOCK_N keys, BLOCK_D dims)`` tile of V written keys-last: both the load (dims contiguous) and
    the store (keys contiguous) are coalesced; the transposition goes through shared memory."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // nheads_k
    h = bh % nheads_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (offs_n[:, None] < n_keys) & (offs_d[None, :] < head_dim)
    src = (
        V
        + b.to(tl.int64) * stride_vb
        + h * stride_vh
        + offs_n[:, None].to(tl.int64) * stride_vn
        + offs_d[None, :]
    )
    tile = tl.load(src, mask=ok)
    dst = (
        VT
        + b.to(tl.int64) * stride_tb
        + h * stride_th
        + offs_d[:, None].to(tl.int64) * stride_td
        + offs_n[None, :]
    )
    tl.store(dst, tl.trans(tile), mask=tl.trans(ok))


def transposed_v(v: torch.Tensor, varlen: bool) -> torch.Tensor:
    """V with keys last, ``(batch, nheads_k, headdim_v, seqlen_k)`` (varlen ``(nheads_k, headdim_v,
    total_k)``), the key dim padded to a multiple of 16 elements so that its row stride suits TMA (the padding
    is never read: the kernels bound the keys by seqlen_k).

    Hopper's FP8 tensor-core dot (wgmma) needs both operands K-major; for P @ V the K dim is the key dim, so
    V must be read from a keys-contiguous copy. One tiled copy kernel per call, coalesced on both sides: 24 us
    for 16k tokens of 16 heads at d128 on an H200 (2.8 TB/s), 5% of an FP8 forward at 4k keys; the strided
    torch copy it replaced took 181-193 us (bench/results/h200-fp8-prep.json).
    """
    if varlen:
        n, hk, d = v.shape
        batch, (svb, svn, svh) = 1, (0, v.stride(0), v.stride(1))
    else:
        batch, n, hk, d = v.shape
        svb, svn, svh = v.stride(0), v.stride(1), v.stride(2)
    padded = -(-n // 16) * 16
    shape = (hk, d, padded) if varlen else (batch, hk, d, padded)
    vt = torch.empty(shape, dtype=v.dtype, device=v.device)
    stb = 0 if varlen else vt.stride(0)
    block_n, block_d = 128, 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d), batch * hk)
    _keys_last_kernel[grid](
        v, vt, n, d, hk, svb, svn, svh, stb, vt.stride(-3), vt.stride(-2), BLOCK_N=block_n, BLOCK_D=block_d
    )
    return vt
