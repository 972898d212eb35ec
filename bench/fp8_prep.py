"""What the FP8 forward spends outside its attention kernel (GPU exploration, issue #7).

At the standard sweep points (batch * seqlen = 16384, hidden 2048, causal) times, with ``do_bench`` medians in
one process: the whole FP8 call (``flash_attn_forward`` on e4m3 inputs with descales), the keys-last copy of V
it makes (:func:`fa_core.fp8.transposed_v`, a tiled Triton kernel), the strided torch copy it replaced, and the
descale stacking. Prints a table; writes ``bench/results/<device>-fp8-prep.json``.

    python bench/fp8_prep.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_ms, write_json  # noqa: E402

from fa_core import flash_attn_forward  # noqa: E402
from fa_core.fp8 import fp8_descale, transposed_v  # noqa: E402


def _torch_copy(v: torch.Tensor) -> torch.Tensor:
    """The former keys-last copy: a strided torch copy of the permuted tensor."""
    keys = v.permute(0, 2, 3, 1)
    n = keys.shape[-1]
    vt = torch.empty(*keys.shape[:-1], -(-n // 16) * 16, dtype=v.dtype, device=v.device)
    vt[..., :n].copy_(keys)
    return vt


def _point(d: int, s: int) -> dict:
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda").to(torch.float8_e4m3fn) for _ in range(3))
    ones = torch.ones(b, h, device="cuda")

    def call() -> None:
        with torch.no_grad():
            flash_attn_forward(q, k, v, causal=True, q_descale=ones, k_descale=ones, v_descale=ones)

    full = bench_ms(call)
    ours = bench_ms(lambda: transposed_v(v, False))
    old = bench_ms(lambda: _torch_copy(v))
    stack = bench_ms(lambda: fp8_descale(q, k, b, ones, ones, ones, False))
    same = transposed_v(v, False)[..., :s].view(torch.uint8).equal(_torch_copy(v)[..., :s].view(torch.uint8))
    assert same, "the Triton copy differs from the torch copy"
    gbps = 2 * v.numel() / (ours * 1e-3) / 1e9
    row = {"headdim": d, "seqlen": s, "batch": b, "nheads": h, "causal": True, "full_ms": full}
    row.update(copy_ms=ours, copy_gbps=round(gbps), torch_copy_ms=old, descale_ms=stack)
    print(
        f"d{d:3d} s{s:6d}: fp8 call {full * 1e3:7.1f} us | V copy {ours * 1e3:6.1f} us ({gbps:5.0f} GB/s, "
        f"{ours / full:5.1%}) | torch copy {old * 1e3:6.1f} us | descales {stack * 1e3:5.1f} us",
        flush=True,
    )
    return row


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("fp8_prep.py times GPU kernels: no CUDA device here")
    rows = [_point(d, s) for d in (128, 64) for s in (4096, 8192, 16384)]
    print(f"[fp8_prep] wrote {write_json('fp8-prep', rows)}")


if __name__ == "__main__":
    main()
