"""fa_parallel: context parallelism for Flash Attention Plus (ring and all-gather attention across ranks).

Public: :func:`context_parallel_attn_func` (dense shards, ``strategy="ring"`` or ``"allgather"``,
``layout="zigzag"`` or ``"contiguous"``), :func:`context_parallel_varlen_attn_func` (packed documents,
all-gather), and the sharding helpers :func:`shard_sequence`, :func:`unshard_sequence`,
:func:`zigzag_shard`, :func:`zigzag_unshard`.
"""

from fa_parallel.api import STRATEGIES, context_parallel_attn_func, context_parallel_varlen_attn_func
from fa_parallel.sharding import (
    LAYOUTS,
    local_chunks,
    num_chunks,
    shard_sequence,
    unshard_sequence,
    zigzag_shard,
    zigzag_unshard,
)

__version__ = "0.1.0"

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "__version__",
    "context_parallel_attn_func",
    "context_parallel_varlen_attn_func",
    "local_chunks",
    "num_chunks",
    "shard_sequence",
    "unshard_sequence",
    "zigzag_shard",
    "zigzag_unshard",
]
