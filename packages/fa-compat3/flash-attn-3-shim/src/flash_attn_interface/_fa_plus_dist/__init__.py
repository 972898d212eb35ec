"""Marker of the metadata-only ``flash-attn-3`` distribution of Flash Attention Plus (see its pyproject.toml).

Its presence in this wheel's RECORD is what maps the ``flash_attn_interface`` import name to the
``flash-attn-3`` distribution in ``importlib.metadata.packages_distributions()``. Nothing imports it.
"""

DISTRIBUTION = "flash-attn-3"
