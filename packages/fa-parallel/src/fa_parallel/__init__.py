"""fa_parallel: context parallelism for Flash Attention Plus (ring and all-gather attention across ranks).

Public: :func:`context_parallel_attn_func` (dense shards, ``strategy="ring"`` or ``"allgather"``,
``layout="zigzag"`` or ``"contiguous"``), :func:`context_parallel_varlen_attn_func` (packed documents,
all-gather, ``layout="contiguous"`` or the per-document ``"zigzag"``), and the sharding helpers
:func:`shard_sequence`, :func:`unshard_sequence`, :func:`zigzag_shard`, :func:`zigzag_unshard`, and for
packed documents :func:`document_sharding`, :func:`document_shard`, :func:`document_unshard`,
:func:`document_pairs_per_rank`.
"""

from fa_parallel.api import STRATEGIES, context_parallel_attn_func, context_parallel_varlen_attn_func
from fa_parallel.documents import (
    DocumentSharding,
    LocalDocuments,
    document_pairs_per_rank,
    document_shard,
    document_sharding,
    document_unshard,
)
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
    "DocumentSharding",
    "LocalDocuments",
    "STRATEGIES",
    "__version__",
    "context_parallel_attn_func",
    "context_parallel_varlen_attn_func",
    "document_pairs_per_rank",
    "document_shard",
    "document_sharding",
    "document_unshard",
    "local_chunks",
    "num_chunks",
    "shard_sequence",
    "unshard_sequence",
    "zigzag_shard",
    "zigzag_unshard",
]
