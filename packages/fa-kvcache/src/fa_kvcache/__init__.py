"""fa-kvcache: KV-cache attention for Flash Attention Plus (decode, paged caches, in-place append).

Public API:

* :func:`flash_attn_with_kvcache` -- flash-attn 2.8's function (same signature and return).
* :class:`PagedKVCache` -- a paged cache manager for serving loops (block allocation, fork with
  copy-on-write, block tables).
* :func:`cascade_decode` -- shared-prefix (cascade) decode over a :class:`CascadePlan`
  (:func:`cascade_plan_from_cache` builds one from a :class:`PagedKVCache`), and
  :func:`merge_attention_states`, the lse-weighted merge of two partial attention results.
* :func:`unified_attention` -- one paged launch for a serving step that mixes decode tokens and prefill chunks of
  many requests (split-KV, FP8 caches with descales), :func:`plan_unified` / :class:`UnifiedPlan` (its launch
  plan, built once for CUDA graphs) and :func:`append_paged_kv` (new keys / values into the pages, rotary,
  FP8 quantization).
* Lower level: :func:`append_to_cache` (fused append + rotary of new k/v), :func:`num_splits_heuristic`,
  :func:`plan_decode` (a decode call's launch plan), :func:`force_tile` (impose a split-KV tile, for tuners),
  :func:`kvcache_value_checks_enabled`.
"""

from fa_kvcache.cache_manager import CacheFullError, PagedKVCache
from fa_kvcache.cascade import CascadePlan, cascade_decode, cascade_plan_from_cache
from fa_kvcache.decode_configs import force_tile, num_splits_heuristic
from fa_kvcache.interface import (
    DecodePlan,
    append_to_cache,
    flash_attn_with_kvcache,
    kvcache_value_checks_enabled,
    plan_decode,
)
from fa_kvcache.merge import merge_attention_states
from fa_kvcache.unified import UnifiedPlan, append_paged_kv, plan_unified, unified_attention

__version__ = "0.1.0"

__all__ = [
    "CacheFullError",
    "CascadePlan",
    "DecodePlan",
    "PagedKVCache",
    "UnifiedPlan",
    "append_paged_kv",
    "append_to_cache",
    "cascade_decode",
    "cascade_plan_from_cache",
    "flash_attn_with_kvcache",
    "force_tile",
    "kvcache_value_checks_enabled",
    "merge_attention_states",
    "num_splits_heuristic",
    "plan_decode",
    "plan_unified",
    "unified_attention",
    "__version__",
]
