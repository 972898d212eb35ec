"""``flash_attn.modules``: flash-attn 2.8.x's attention and MLP ``nn.Module`` building blocks
(:mod:`flash_attn.modules.mha`, :mod:`flash_attn.modules.mlp`), without the tensor-parallel variants."""
