"""Losses with the API of ``flash_attn.losses`` (flash-attn 2.8.x)."""
