"""``flash_attn.models``: flash-attn 2.8.x's model definitions built from :mod:`flash_attn.modules`.

* :mod:`flash_attn.models.gpt`: the GPT family (``GPTModel``, ``GPTLMHeadModel`` configured by a
  ``transformers.GPT2Config`` with flash-attn's extra attributes), its state-dict conversions from Hugging Face
  GPT-2 and between tensor-parallel shards;
* :mod:`flash_attn.models.llama`: Llama (Meta and Hugging Face checkpoints) as a ``GPTLMHeadModel``;
* :mod:`flash_attn.models.bert`: BERT (``BertModel``, ``BertForPreTraining``) with the unpadded flash encoder and
  its state-dict conversions from Hugging Face BERT;
* :mod:`flash_attn.models.gpt_neox`, :mod:`~flash_attn.models.gptj`, :mod:`~flash_attn.models.opt`,
  :mod:`~flash_attn.models.falcon`, :mod:`~flash_attn.models.bigcode` (also the inverse remap),
  :mod:`~flash_attn.models.btlm`, :mod:`~flash_attn.models.baichuan`: GPT-NeoX, GPT-J, OPT, Falcon, BigCode
  (StarCoder), BTLM and Baichuan as a ``GPTLMHeadModel``: ``<family>_config_to_gpt2_config`` and
  ``remap_state_dict_hf_<family>``;
* :mod:`flash_attn.models.vit`: the Vision Transformer (``VisionTransformer``, ``vit_base_patch16_224``, timm's
  layout and state dicts, without needing timm).

Nothing here is imported by ``import flash_attn``.
"""
