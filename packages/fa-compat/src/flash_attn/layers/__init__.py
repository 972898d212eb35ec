"""Layers with the API of ``flash_attn.layers`` (flash-attn 2.8.x)."""
