"""fa-kvcache: KV-cache attention for Flash Attention Plus (decode, paged caches, in-place append).

Public API:

* :func:`flash_attn_with_kvcache` -- flash-attn 2.8's function (same signature and return).
* :class:`PagedKVCache` -- a paged cache manager for serving loops (block allocation, fork with
  copy-on-write, block tables).
* Lower level: :func:`append_to_cache` (fused append + rotary of new k/v), :func:`num_splits_heuristic`,
  :func:`kvcache_value_checks_enabled`.
"""

from fa_kvcache.cache_manager import CacheFullError, PagedKVCache
from fa_kvcache.interface import (
    append_to_cache,
    flash_attn_with_kvcache,
    kvcache_value_checks_enabled,
    num_splits_heuristic,
)

__version__ = "0.1.0"

__all__ = [
    "CacheFullError",
    "PagedKVCache",
    "append_to_cache",
    "flash_attn_with_kvcache",
    "kvcache_value_checks_enabled",
    "num_splits_heuristic",
    "__version__",
]
