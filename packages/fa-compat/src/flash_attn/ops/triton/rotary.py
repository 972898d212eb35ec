"""``flash_attn.ops.triton.rotary``: re-exports the Triton rotary kernel launcher.

``apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False,
inplace=False, conjugate=False)``; see ``fa_core.rotary.apply_rotary``.
"""

from fa_core.rotary import apply_rotary

__all__ = ["apply_rotary"]
