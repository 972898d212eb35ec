"""Ops with the API of ``flash_attn.ops`` (flash-attn 2.8.x)."""
