"""fa_backward: FlashAttention-2 backward kernels in Triton and the differentiable flash-attn 2.8 API.

Public functions (flash-attn 2.8 signatures): :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`,
:func:`flash_attn_kvpacked_func`, :func:`flash_attn_varlen_func`, :func:`flash_attn_varlen_qkvpacked_func`,
:func:`flash_attn_varlen_kvpacked_func`, all views of the one autograd layer (:mod:`fa_backward.autograd`).
Low level (``_flash_attn_backward`` semantics): :func:`flash_attn_backward`, :func:`flash_attn_varlen_backward`.
"""

from fa_backward import (
    ops,  # the backward custom ops and the autograd of the forward ops
    programmable,  # attention with learnable sinks, score_mod / mask_mod, block masks (gradient included)
    sdpa,  # registers "FA_PLUS" with torch's SDPA registry; never activates it
)
from fa_backward.autograd import (
    FlashAttnFunc,
    FlashAttnKVPackedFunc,
    FlashAttnQKVPackedFunc,
    FlashAttnVarlenFunc,
    FlashAttnVarlenKVPackedFunc,
    FlashAttnVarlenQKVPackedFunc,
)
from fa_backward.backward import BwdResult, flash_attn_backward, flash_attn_varlen_backward
from fa_backward.interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

__version__ = "0.1.0"

__all__ = [
    "ops",
    "programmable",
    "sdpa",
    "BwdResult",
    "FlashAttnFunc",
    "FlashAttnKVPackedFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnVarlenFunc",
    "FlashAttnVarlenKVPackedFunc",
    "FlashAttnVarlenQKVPackedFunc",
    "__version__",
    "flash_attn_backward",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_backward",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]
