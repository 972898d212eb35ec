"""Triton ops with the API of ``flash_attn.ops.triton`` (flash-attn 2.8.x)."""
