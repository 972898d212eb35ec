"""``flash_attn.utils``: flash-attn 2.8.x's pure-Python helpers for user scripts.

* :mod:`flash_attn.utils.benchmark`: timing (``torch.utils.benchmark.Timer``), profiling and peak-memory
  helpers for the forward, backward and forward + backward of any function.
* :mod:`flash_attn.utils.generation`: autoregressive decoding with a KV cache (``InferenceParams``,
  sampling helpers, ``decode``, ``GenerationMixin``, CUDA-graph decoding).
* :mod:`flash_attn.utils.distributed`: tensor-parallel collectives over a ``torch.distributed`` process group.
* :mod:`flash_attn.utils.pretrained`: ``state_dict_from_pretrained`` (local directories and the HF cache).

None is imported by ``import flash_attn``; import them explicitly.
"""
