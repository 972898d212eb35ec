"""fa-core: forward FlashAttention kernels in Triton, the shared masking layer and the reference."""

from fa_core.forward import FwdResult, flash_attn_forward, flash_attn_varlen_forward, new_rng_state
from fa_core.reference import attention_ref, attention_varlen_ref

__version__ = "0.1.0"

__all__ = [
    "FwdResult",
    "attention_ref",
    "attention_varlen_ref",
    "flash_attn_forward",
    "flash_attn_varlen_forward",
    "new_rng_state",
    "__version__",
]
