"""Paged KV cache bookkeeping: the block pool, chained block hashes and per-request tables.

Pure Python over block ids (and host-tier slots); the KV tensors themselves live with the
workers.
"""

from ernie_cluster.engine.kv_cache.block_pool import BlockPool, KVBlock, hash_block_tokens
from ernie_cluster.engine.kv_cache.host_tier import HostTier, HostTierStats
from ernie_cluster.engine.kv_cache.kv_cache_manager import KVCacheManager, PrefixCacheStats

__all__ = [
    "BlockPool",
    "HostTier",
    "HostTierStats",
    "KVBlock",
    "KVCacheManager",
    "PrefixCacheStats",
    "hash_block_tokens",
]
