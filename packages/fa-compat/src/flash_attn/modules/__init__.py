"""``flash_attn.modules``: flash-attn 2.8.x's ``nn.Module`` building blocks: attention
(:mod:`flash_attn.modules.mha`, ``ParallelMHA`` included), MLPs (:mod:`flash_attn.modules.mlp`, the
tensor-parallel ``ParallelMLP`` / ``ParallelGatedMlp`` included), Transformer blocks
(:mod:`flash_attn.modules.block`) and embeddings (:mod:`flash_attn.modules.embedding`)."""
