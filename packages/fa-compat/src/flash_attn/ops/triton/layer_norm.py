"""``flash_attn.ops.triton.layer_norm``: fused dropout + residual + LayerNorm / RMSNorm (flash-attn 2.8.x names).

``layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
rowscale=None, prenorm=False, residual_in_fp32=False, zero_centered_weight=False, is_rms_norm=False,
return_dropout_mask=False, out_dtype=None, out=None, residual_out=None)`` and ``rms_norm_fn`` (the same without
``is_rms_norm``) return ``out``, then ``out1`` (with ``weight1``), the residual (``prenorm``) and the two
dropout masks (``return_dropout_mask``). ``layer_norm_linear_fn`` fuses the norm with a following linear
layer (autocast-aware), ``RMSNorm`` is the module, ``layer_norm_ref`` / ``rms_norm_ref`` the plain-PyTorch
references (``upcast=True``: in fp32). See :mod:`fa_core.layer_norm` for the semantics and decisions.
"""

from fa_core.layer_norm import (
    LayerNormFn,
    LayerNormLinearFn,
    RMSNorm,
    layer_norm_fn,
    layer_norm_linear_fn,
    layer_norm_ref,
    maybe_contiguous,
    maybe_contiguous_lastdim,
    rms_norm_fn,
    rms_norm_ref,
)

__all__ = [
    "LayerNormFn",
    "LayerNormLinearFn",
    "RMSNorm",
    "layer_norm_fn",
    "layer_norm_linear_fn",
    "layer_norm_ref",
    "maybe_contiguous",
    "maybe_contiguous_lastdim",
    "rms_norm_fn",
    "rms_norm_ref",
]
