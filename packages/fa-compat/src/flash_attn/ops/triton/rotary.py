"""``flash_attn.ops.triton.rotary``: the Triton rotary kernel and its launcher (flash-attn 2.8.x names).

``apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False,
inplace=False, conjugate=False)``; see ``fa_core.rotary.apply_rotary`` (differentiable, and
``torch.compile``-able through custom ops). ``rotary_kernel`` is the ``@triton.jit`` kernel itself: its
compile cache (``rotary_kernel.device_caches`` / ``rotary_kernel.cache``, by Triton version) holds one entry
per dtype / constexpr class, whatever the batch size or sequence length.
"""

from fa_core.rotary import apply_rotary, rotary_kernel

__all__ = ["apply_rotary", "rotary_kernel"]
