"""``flash_attn.modules``: flash-attn 2.8.x's ``nn.Module`` building blocks: attention
(:mod:`flash_attn.modules.mha`), MLPs (:mod:`flash_attn.modules.mlp`), Transformer blocks
(:mod:`flash_attn.modules.block`) and embeddings (:mod:`flash_attn.modules.embedding`), without the
tensor-parallel attention and MLP variants."""
