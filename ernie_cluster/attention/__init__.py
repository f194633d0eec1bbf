"""Paged attention: per-step metadata and the backends that consume it."""

from ernie_cluster.attention.backend import AttentionBackend, TorchPagedAttention
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.attention.selector import get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchPagedAttention", "get_attention_backend"]
