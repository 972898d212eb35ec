"""``flash_attn.models``: flash-attn 2.8.x's model definitions built from :mod:`flash_attn.modules`.

* :mod:`flash_attn.models.gpt`: the GPT family (``GPTModel``, ``GPTLMHeadModel`` configured by a
  ``transformers.GPT2Config`` with flash-attn's extra attributes), its state-dict conversions from Hugging Face
  GPT-2 and between tensor-parallel shards;
* :mod:`flash_attn.models.llama`: Llama (Meta and Hugging Face checkpoints) as a ``GPTLMHeadModel``;
* :mod:`flash_attn.models.bert`: BERT (``BertModel``, ``BertForPreTraining``) with the unpadded flash encoder and
  its state-dict conversions from Hugging Face BERT.

flash-attn's other model files (ViT, OPT, GPT-J, GPT-NeoX, Falcon, BigCode, BTLM, Baichuan) are
not provided. Nothing here is imported by ``import flash_attn``.
"""
